"""Test helpers for the finish step: scene cases, Blender's own reference, pixel compare.

`make_finish_scenes` builds every named case in ONE Blender subprocess (tiny Cycles
scenes: a cube, an emissive sphere, a plane; colour management, compositor and output
settings vary by case). `render_reference` is Blender's own `blender -b scene -f N`
(a one-frame `render(animation=True)`), also batched. `compare_images` reads file pairs
with the OpenImageIO bundled with bpy (exact for every format), in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

#: case -> what it sets (documentation; the script below is the truth).
CASES = (
    "agx_punchy_png16",
    "filmic_png8",
    "standard_curves_jpeg",
    "tiff16",
    "exr_half",
    "exr_float",
    "exr_multilayer",
    "blur_denoise_node",
    "file_output",
    "depth_normal",
    "template_path",
    "no_compositor",
    "movie",
    "denoised",
    "escape_output",
    "escape_file_output",
    "bad_template",
    "sequencer",
    "external_image",
    "other_scene",
    "absolute_output",
    "aov_cryptomatte",
    "exr_multilayer_crypto",
)

MAKE_SCENES = r"""
import json, sys
import bpy

out_dir, cases = sys.argv[-2], json.loads(sys.argv[-1])


def socket(node, identifier):
    return next(s for s in node.inputs if s.identifier == identifier)


def build(case):
    bpy.ops.wm.read_factory_settings(use_empty=False)
    sc = bpy.context.scene
    r = sc.render
    r.engine = "CYCLES"
    sc.cycles.device = "CPU"
    sc.cycles.samples = 8
    sc.cycles.use_adaptive_sampling = False
    sc.cycles.use_denoising = case == "denoised"
    sc.cycles.seed = 3
    r.resolution_x, r.resolution_y, r.resolution_percentage = 64, 48, 100
    if case == "movie":
        r.resolution_x, r.resolution_y = 63, 47  # odd: the preview pads to even
    r.filepath = "//render/shot_####"
    sc.frame_start, sc.frame_end, sc.frame_current = 1, 4, 1
    bpy.ops.mesh.primitive_plane_add(size=20, location=(0, 0, -1))
    bpy.ops.mesh.primitive_uv_sphere_add(radius=0.7, location=(1.8, 0.5, 0.2))
    sphere = bpy.context.object
    emit = bpy.data.materials.new("Emit")
    emit.use_nodes = True
    bsdf = emit.node_tree.nodes["Principled BSDF"]
    bsdf.inputs["Emission Color"].default_value = (1.0, 0.4, 0.1, 1)
    bsdf.inputs["Emission Strength"].default_value = 25.0
    sphere.data.materials.append(emit)
    cube = bpy.data.objects["Cube"]
    blue = bpy.data.materials.new("Blue")
    blue.use_nodes = True
    blue.node_tree.nodes["Principled BSDF"].inputs["Base Color"].default_value = (0.1, 0.3, 0.9, 1)
    cube.data.materials.append(blue)
    cube.rotation_euler = (0, 0, 0)
    cube.keyframe_insert("rotation_euler", frame=1)
    cube.rotation_euler = (0, 0, 1.5)
    cube.keyframe_insert("rotation_euler", frame=4)
    bpy.data.lights["Light"].energy = 800
    layer = sc.view_layers[0]
    layer.use_pass_z = layer.use_pass_normal = layer.use_pass_mist = True
    layer.use_pass_emit = True
    vs = sc.view_settings
    vs.view_transform, vs.look, vs.exposure, vs.gamma = "AgX", "AgX - Punchy", 0.6, 1.1
    im = r.image_settings
    im.file_format, im.color_depth, im.color_mode = "PNG", "16", "RGBA"

    tree = bpy.data.node_groups.new("Compositing", "CompositorNodeTree")
    tree.interface.new_socket("Image", in_out="OUTPUT", socket_type="NodeSocketColor")
    sc.compositing_node_group = tree
    N, L = tree.nodes, tree.links
    rl = N.new("CompositorNodeRLayers")
    rl.scene, rl.layer = sc, layer.name
    out = N.new("NodeGroupOutput")
    glare = N.new("CompositorNodeGlare")
    glare.inputs["Type"].default_value = "Fog Glow"
    glare.inputs["Highlights Threshold"].default_value = 0.8
    balance = N.new("CompositorNodeColorBalance")
    balance.inputs["Color Gain"].default_value = (1.1, 0.95, 0.9, 1)
    lens = N.new("CompositorNodeLensdist")
    lens.inputs["Distortion"].default_value = 0.05
    lens.inputs["Dispersion"].default_value = 0.02
    L.new(rl.outputs["Image"], glare.inputs["Image"])
    L.new(glare.outputs["Image"], balance.inputs["Image"])
    L.new(balance.outputs["Image"], lens.inputs["Image"])
    last = lens.outputs["Image"]

    if case == "filmic_png8":
        vs.view_transform, vs.look = "Filmic", "High Contrast"
        im.color_depth = "8"
    if case == "standard_curves_jpeg":
        vs.view_transform, vs.look, vs.use_curve_mapping = "Standard", "None", True
        curve = vs.curve_mapping.curves[3]
        curve.points[0].location = (0.0, 0.1)
        curve.points[1].location = (1.0, 0.9)
        curve.points.new(0.5, 0.6)
        vs.curve_mapping.update()
        im.file_format, im.color_mode, im.quality = "JPEG", "RGB", 90
    if case == "tiff16":
        im.file_format, im.color_depth = "TIFF", "16"
    if case in ("exr_half", "exr_float"):
        im.file_format = "OPEN_EXR"
        im.color_depth = "16" if case == "exr_half" else "32"
        im.exr_codec = "ZIP"
    if case == "exr_multilayer_crypto":
        layer.use_pass_cryptomatte_object = True
        layer.use_pass_diffuse_color = True
    if case in ("exr_multilayer", "exr_multilayer_crypto"):
        im.media_type = "MULTI_LAYER_IMAGE"
        im.file_format, im.color_depth, im.exr_codec = "OPEN_EXR_MULTILAYER", "16", "ZIP"
    if case == "blur_denoise_node":
        blur = N.new("CompositorNodeBlur")
        blur.inputs["Size"].default_value = (3, 3)
        denoise = N.new("CompositorNodeDenoise")
        L.new(last, blur.inputs["Image"])
        L.new(blur.outputs["Image"], denoise.inputs["Image"])
        L.new(rl.outputs["Normal"], denoise.inputs["Normal"])
        last = denoise.outputs["Image"]
    if case == "depth_normal":
        ranged = N.new("ShaderNodeMapRange")
        L.new(rl.outputs["Depth"], ranged.inputs[0])
        ranged.inputs["From Min"].default_value, ranged.inputs["From Max"].default_value = 2, 20
        dot = N.new("ShaderNodeVectorMath")
        dot.operation = "DOT_PRODUCT"
        L.new(rl.outputs["Normal"], dot.inputs[0])
        dot.inputs[1].default_value = (0.3, -0.5, 0.8)
        fog = N.new("ShaderNodeMix")
        fog.data_type = "RGBA"
        L.new(ranged.outputs["Result"], socket(fog, "Factor_Float"))
        L.new(last, socket(fog, "A_Color"))
        socket(fog, "B_Color").default_value = (0.6, 0.7, 0.9, 1)
        shade = N.new("ShaderNodeMix")
        shade.data_type, shade.blend_type = "RGBA", "MULTIPLY"
        socket(shade, "Factor_Float").default_value = 0.5
        L.new(fog.outputs[2], socket(shade, "A_Color"))
        L.new(dot.outputs["Value"], socket(shade, "B_Color"))
        last = shade.outputs[2]
    if case in ("file_output", "escape_file_output"):
        fo = N.new("CompositorNodeOutputFile")
        fo.directory = "//render/fo/" if case == "file_output" else "//../fo/"
        fo.file_name = "extra_"
        fo.format.media_type = "IMAGE"
        fo.format.file_format, fo.format.color_depth = "PNG", "16"
        fo.file_output_items.new("RGBA", "beauty")
        fo.file_output_items.new("FLOAT", "depth")
        L.new(lens.outputs["Image"], fo.inputs["beauty"])
        ranged = N.new("ShaderNodeMapRange")
        ranged.inputs["From Max"].default_value = 20
        L.new(rl.outputs["Depth"], ranged.inputs[0])
        L.new(ranged.outputs["Result"], fo.inputs["depth"])
    if case == "template_path":
        r.filepath = "//render/{blend_name}/{scene_name}_{resolution_x}_####"
    if case == "no_compositor":
        r.use_compositing = False
    if case == "movie":
        im.media_type = "VIDEO"
        im.file_format = "FFMPEG"
        im.color_mode = "RGB"
        r.ffmpeg.format, r.ffmpeg.codec = "MPEG4", "H264"
    if case == "denoised":
        layer.cycles.denoising_store_passes = False
    if case == "escape_output":
        r.filepath = "//../escape/shot_####"
    if case == "absolute_output":
        r.filepath = "/nonexistent/tessera-abs/shot_####"
    if case == "bad_template":
        r.filepath = "//render/{scene}_####"
    if case == "sequencer":
        editor = sc.sequence_editor_create()
        editor.strips.new_effect("red", "COLOR", channel=1, frame_start=1, length=4)
        r.use_sequencer = True
    if case == "external_image":
        plate = N.new("CompositorNodeImage")
        plate.image = bpy.data.images.new("plate", 8, 8)
        plate.image.source, plate.image.filepath = "FILE", "/nonexistent/plates/plate.png"
        over = N.new("ShaderNodeMix")
        over.data_type = "RGBA"
        socket(over, "Factor_Float").default_value = 0.0
        L.new(last, socket(over, "A_Color"))
        L.new(plate.outputs["Image"], socket(over, "B_Color"))
        last = over.outputs[2]
    if case == "other_scene":
        other = bpy.data.scenes.new("Background")
        other_rl = N.new("CompositorNodeRLayers")
        other_rl.scene = other
        over = N.new("ShaderNodeMix")
        over.data_type = "RGBA"
        L.new(last, socket(over, "A_Color"))
        L.new(other_rl.outputs["Image"], socket(over, "B_Color"))
        last = over.outputs[2]
    if case == "aov_cryptomatte":
        aov = layer.aovs.add()
        aov.name, aov.type = "tint", "COLOR"
        aov_node = blue.node_tree.nodes.new("ShaderNodeOutputAOV")
        aov_node.aov_name = "tint"
        aov_node.inputs["Color"].default_value = (0.9, 0.2, 0.5, 1)
        layer.use_pass_cryptomatte_object = True
        tinted = N.new("ShaderNodeMix")
        tinted.data_type = "RGBA"
        socket(tinted, "Factor_Float").default_value = 0.3
        L.new(last, socket(tinted, "A_Color"))
        L.new(rl.outputs["tint"], socket(tinted, "B_Color"))
        matte = N.new("CompositorNodeCryptomatteV2")
        matte.scene, matte.matte_id = sc, "Cube"
        L.new(tinted.outputs[2], matte.inputs["Image"])
        last = matte.outputs["Image"]
    L.new(last, out.inputs[0])
    path = f"{out_dir}/{case}/scene.blend"
    bpy.ops.wm.save_as_mainfile(filepath=path)
    return path


print("SCENES " + json.dumps({case: build(case) for case in cases}))
"""

REFERENCE = r"""
import json, sys
import bpy

jobs = json.loads(sys.argv[-1])
for scene_path, frame in jobs:
    bpy.ops.wm.open_mainfile(filepath=scene_path)
    sc = bpy.context.scene
    sc.frame_start = sc.frame_end = frame
    sc.frame_set(frame)
    bpy.ops.render.render(animation=True)
print("DONE")
"""

COMPARE = r"""
import glob, json, os, sys
import bpy
root = bpy.utils.resource_path("LOCAL")
sys.path.insert(0, glob.glob(os.path.join(root, "python", "lib", "python3*", "site-packages"))[0])
import numpy as np
import OpenImageIO as oiio

def read(path):
    found = oiio.ImageInput.open(path)
    if found is None:
        raise SystemExit("cannot open " + path + " " + oiio.geterror())
    spec = found.spec()
    native = np.asarray(found.read_image(0, 0, 0, spec.nchannels, "unknown"))
    floats = np.asarray(found.read_image(0, 0, 0, spec.nchannels, "float"), dtype=np.float64)
    found.close()
    return spec, native, floats

results = []
for a, b in json.loads(sys.argv[-1]):
    sa, na, fa = read(a)
    sb, nb, fb = read(b)
    same_shape = na.shape == nb.shape
    results.append({
        "a": a, "b": b, "shape_a": list(na.shape), "shape_b": list(nb.shape),
        "format_a": str(sa.format), "format_b": str(sb.format),
        "channels_a": list(sa.channelnames), "channels_b": list(sb.channelnames),
        "max_diff": float(np.nanmax(np.abs(fa - fb))) if same_shape else None,
        "mean_diff": float(np.nanmean(np.abs(fa - fb))) if same_shape else None,
        "differing": int((na != nb).sum()) if same_shape else None,
    })
print("COMPARE " + json.dumps(results))
"""


def _run_bpy(
    script: str, arguments: list[str], folder: Path, marker: str, timeout: float = 600
) -> Any:
    path = folder / f"_{marker.lower()}.py"
    path.write_text(script)
    completed = subprocess.run(
        [sys.executable, "-I", str(path), *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    path.unlink()
    for line in completed.stdout.splitlines():
        if line.startswith(marker + " "):
            return json.loads(line[len(marker) + 1 :])
        if line == marker:
            return None
    raise RuntimeError(f"{marker} script failed:\n{completed.stderr[-3000:]}")


def make_finish_scenes(folder: Path, cases: list[str]) -> dict[str, Path]:
    """Build each case's scene at folder/<case>/scene.blend, in one Blender process."""
    for case in cases:
        (folder / case).mkdir(parents=True, exist_ok=True)
    built = _run_bpy(MAKE_SCENES, [str(folder), json.dumps(cases)], folder, "SCENES")
    return {case: Path(path) for case, path in built.items()}


def render_reference(jobs: list[tuple[Path, int]], folder: Path) -> None:
    """Blender's own `-f N` render of each (scene, frame): files land beside the scene."""
    _run_bpy(REFERENCE, [json.dumps([[str(s), f] for s, f in jobs])], folder, "DONE")


def compare_images(pairs: list[tuple[Path, Path]], folder: Path) -> list[dict[str, Any]]:
    """Per pair: shapes, pixel types, channel names, max |a-b| (0..1 units for integer
    formats, native floats for EXR) and how many values differ."""
    result: list[dict[str, Any]] = _run_bpy(
        COMPARE, [json.dumps([[str(a), str(b)] for a, b in pairs])], folder, "COMPARE"
    )
    return result


def reference_files(scene: Path) -> list[Path]:
    """Every file Blender's render wrote beside `scene`, relative to its folder."""
    folder = scene.parent
    return sorted(p.relative_to(folder) for p in (folder / "render").rglob("*") if p.is_file())

"""Test helpers that prepare .blend files in a real Blender subprocess.

The BAT scenes have no camera; tests give them one here and save a copy in tmp_path
(the originals in ../shared/scenes are never modified). Also builds deliberately broken
scenes (no camera, EEVEE, an add-on engine) for the bad-input tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

PREPARE = r"""
import json, sys
import bpy
from mathutils import Vector

src, dst, opts = sys.argv[-3], sys.argv[-2], json.loads(sys.argv[-1])
bpy.ops.wm.open_mainfile(filepath=src, load_ui=False, use_scripts=False)
scene = bpy.context.scene
if opts.get("add_camera"):
    meshes = [o for o in scene.objects if o.type == "MESH"]
    points = [o.matrix_world @ Vector(c) for o in meshes for c in o.bound_box]
    lo = Vector([min(p[i] for p in points) for i in range(3)])
    hi = Vector([max(p[i] for p in points) for i in range(3)])
    centre, size = (lo + hi) / 2, max((hi - lo).length, 1.0)
    data = bpy.data.cameras.new("TestCamera")
    cam = bpy.data.objects.new("TestCamera", data)
    scene.collection.objects.link(cam)
    cam.location = centre + Vector((1.2, -1.6, 0.9)) * size
    cam.rotation_euler = (centre - cam.location).to_track_quat("-Z", "Y").to_euler()
    scene.camera = cam
    if not any(o.type == "LIGHT" for o in scene.objects):
        light = bpy.data.objects.new("TestSun", bpy.data.lights.new("TestSun", "SUN"))
        scene.collection.objects.link(light)
        light.rotation_euler = (0.6, 0.2, 0.8)
if opts.get("remove_camera"):
    scene.camera = None
    for obj in [o for o in scene.objects if o.type == "CAMERA"]:
        bpy.data.objects.remove(obj)
if "engine" in opts:
    if opts["engine"] == "ADDON_ENGINE":
        class AddonEngine(bpy.types.RenderEngine):
            bl_idname = "ADDON_ENGINE"
            bl_label = "Add-on engine"
        bpy.utils.register_class(AddonEngine)
    scene.render.engine = opts["engine"]
for key in ("resolution_x", "resolution_y", "resolution_percentage"):
    if key in opts:
        setattr(scene.render, key, opts[key])
if "samples" in opts:
    scene.cycles.samples = opts["samples"]
for key in ("frame_start", "frame_end"):
    if key in opts:
        setattr(scene, key, opts[key])
if "film_transparent" in opts:
    scene.render.film_transparent = opts["film_transparent"]
if "adaptive" in opts:
    scene.cycles.use_adaptive_sampling = opts["adaptive"]
if "adaptive_threshold" in opts:
    scene.cycles.adaptive_threshold = opts["adaptive_threshold"]
    scene.cycles.adaptive_min_samples = opts.get("adaptive_min_samples", 0)
if "denoise" in opts:
    scene.cycles.use_denoising = opts["denoise"]
if "filepath" in opts:
    scene.render.filepath = opts["filepath"]
if "view_transform" in opts:
    scene.view_settings.view_transform = opts["view_transform"]
if opts.get("glass"):  # every surface clear glass (the demo scene renders ~2x faster so)
    for material in bpy.data.materials:
        shader = material.node_tree and material.node_tree.nodes.get("Principled BSDF")
        if shader is not None:
            shader.inputs["Transmission Weight"].default_value = 1.0
            shader.inputs["Roughness"].default_value = 0.0
    cycles = scene.cycles
    cycles.max_bounces = cycles.transmission_bounces = cycles.glossy_bounces = 64
    cycles.transparent_max_bounces = 64
if "output_format" in opts:
    if opts["output_format"] == "FFMPEG":
        scene.render.image_settings.media_type = "VIDEO"  # Blender 5: media type first
    else:
        scene.render.image_settings.media_type = "IMAGE"
    scene.render.image_settings.file_format = opts["output_format"]
if opts.get("python_driver"):
    obj = next(o for o in scene.objects if o.type == "MESH")
    fcurve = obj.driver_add("location", 2)
    fcurve.driver.type = "SCRIPTED"
    fcurve.driver.expression = "__import__('os').getpid() * 0"
if opts.get("registered_text"):
    text = bpy.data.texts.new("autorun.py")
    text.write("open(%r, 'w').write('scene python ran')\n" % opts["registered_text"])
    text.use_module = True
bpy.ops.wm.save_as_mainfile(filepath=dst, compress=False, relative_remap=False)
print(json.dumps({"saved": dst}))
"""


def prepare_scene(source: Path, target: Path, **options: Any) -> Path:
    """Open `source` in Blender, apply `options`, save the result as `target`."""
    script = target.with_suffix(".prepare.py")
    script.write_text(PREPARE)
    completed = subprocess.run(
        [sys.executable, "-I", str(script), str(source), str(target), json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    script.unlink()
    if completed.returncode != 0 or not target.exists():
        raise RuntimeError(f"preparing {source.name} failed:\n{completed.stderr[-3000:]}")
    return target


BLENDER_RENDER = r"""
import json, sys
import bpy
scene_path, out, opts = sys.argv[-3], sys.argv[-2], json.loads(sys.argv[-1])
bpy.ops.wm.open_mainfile(filepath=scene_path, load_ui=False, use_scripts=False)
scene = bpy.context.scene
scene.frame_set(opts["frame"])
scene.render.resolution_percentage = opts["percentage"]
scene.cycles.samples = opts["samples"]
scene.cycles.seed = opts["seed"]
scene.cycles.use_denoising = True
settings = scene.render.image_settings
settings.media_type = "MULTI_LAYER_IMAGE"
settings.file_format = "OPEN_EXR_MULTILAYER"
settings.color_depth = "32"
scene.render.filepath = out
bpy.ops.render.render(write_still=True)
"""


def render_denoised_in_blender(
    scene: Path, out: Path, *, frame: int, percentage: int, samples: int, seed: int
) -> Path:
    """Blender's own one-piece render with its in-render denoiser: the reference."""
    script = out.with_suffix(".render.py")
    script.write_text(BLENDER_RENDER)
    options = {"frame": frame, "percentage": percentage, "samples": samples, "seed": seed}
    completed = subprocess.run(
        [sys.executable, "-I", str(script), str(scene), str(out), json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    script.unlink()
    if completed.returncode != 0 or not out.exists():
        raise RuntimeError(f"reference render failed:\n{completed.stderr[-3000:]}")
    return out

"""A file saved by an older Blender (a compositor in `scene.node_tree`, not Blender 5's
`compositing_node_group`) is finished as Blender 5 itself renders it.

The scene is made by Debian's Blender 3.4 (`make test` installs it; CI must not skip),
then rendered two ways with bpy 5.0.1: Blender's own `-f 1` (the reference) and the
farm's path (2x2 tiles, merge, finish). Same files, same pixels.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from renderers.finish import FinishRequest
from renderers.local_render import LocalRenderOptions, render_frame_local
from renderers.worker import RenderWorker
from tests.finish_tools import compare_images, reference_files, render_reference

pytestmark = pytest.mark.skipif(
    shutil.which("blender") is None and not os.environ.get("CI"),
    reason="needs Debian's Blender 3.4 to save an old-style file (apt-get install blender)",
)

MAKE_LEGACY = r"""
import bpy, sys
out = sys.argv[-1]
bpy.ops.wm.read_factory_settings(use_empty=False)
sc = bpy.context.scene
r = sc.render
r.engine = "CYCLES"
sc.cycles.device = "CPU"
sc.cycles.samples = 8
sc.cycles.use_adaptive_sampling = False
sc.cycles.use_denoising = False
sc.cycles.seed = 5
r.resolution_x, r.resolution_y, r.resolution_percentage = 64, 48, 100
r.filepath = "//render/legacy_####"
r.image_settings.file_format = "PNG"
r.image_settings.color_depth = "16"
sc.view_settings.view_transform = "Filmic"
sc.view_settings.exposure = 0.4
bpy.ops.mesh.primitive_uv_sphere_add(radius=0.6, location=(1.5, 0.3, 0.4))
emit = bpy.data.materials.new("Emit")
emit.use_nodes = True
bsdf = emit.node_tree.nodes["Principled BSDF"]
bsdf.inputs["Emission"].default_value = (1.0, 0.5, 0.2, 1)
bsdf.inputs["Emission Strength"].default_value = 30.0
bpy.context.object.data.materials.append(emit)
sc.use_nodes = True
tree = sc.node_tree
layers = tree.nodes["Render Layers"]
composite = tree.nodes["Composite"]
glare = tree.nodes.new("CompositorNodeGlare")
glare.glare_type = "FOG_GLOW"
glare.threshold = 0.8
balance = tree.nodes.new("CompositorNodeColorBalance")
balance.lift = (1.0, 0.95, 1.05)
tree.links.new(layers.outputs["Image"], glare.inputs["Image"])
tree.links.new(glare.outputs["Image"], balance.inputs["Image"])
tree.links.new(balance.outputs["Image"], composite.inputs["Image"])
bpy.ops.wm.save_as_mainfile(filepath=out)
print("SAVED", bpy.app.version_string)
"""


@pytest.fixture(scope="module")
def legacy_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("legacy")
    scene = folder / "legacy.blend"
    done = subprocess.run(
        ["blender", "-b", "--factory-startup", "--python-expr", MAKE_LEGACY, "--", str(scene)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "HOME": str(folder)},
    )
    assert done.returncode == 0 and scene.is_file(), done.stdout[-2000:] + done.stderr[-2000:]
    assert "SAVED 3." in done.stdout  # an old Blender made it
    render_reference([(scene, 1)], folder)
    return scene


def test_an_old_files_compositor_is_finished_as_blender_5_renders_it(
    worker: RenderWorker, legacy_scene: Path, tmp_path: Path
) -> None:
    expected = reference_files(legacy_scene)
    assert [str(p) for p in expected] == ["render/legacy_0001.png"]
    merged = tmp_path / "merged.exr"
    render_frame_local(
        worker, legacy_scene, merged, LocalRenderOptions(frame=1, grid=(2, 2), preview=False)
    )
    result = worker.finish(FinishRequest(legacy_scene, merged, 1, tmp_path / "out"))
    assert [f.path for f in result.files] == expected
    (report,) = compare_images(
        [(legacy_scene.parent / expected[0], tmp_path / "out" / expected[0])], tmp_path
    )
    assert report["shape_a"] == report["shape_b"], report
    assert report["format_a"] == report["format_b"], report
    assert report["max_diff"] == 0.0, report

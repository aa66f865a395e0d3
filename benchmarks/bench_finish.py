"""Finish overhead: tiled render + merge + finish vs Blender's own one-piece render.

The demo scene at 1920x1080 (or --percentage of it) with a compositor (Fog Glow glare,
then Lens Distortion with dispersion), AgX, 16-bit PNG output, denoising off:

- Blender's own `-f N`: a fresh process opens the file and renders the frame with its
  compositor and writes the PNG (`render(animation=True)` over one frame). The baseline
  is the time inside that render call (Blender's start-up and file load excluded, which
  only flatters the baseline); the process wall time is reported too;
- the farm's path on one machine: 2x2 tiles through a warm worker, merge, then
  `RenderWorker.finish` (compositor + PNG write) on the merged EXR;
- the finish alone.

Figures are ratios measured in the same run. Goal: tiled + merge + finish within 1.10x
of Blender's own render. Run: `python -m benchmarks.bench_finish [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import report
from renderers.builds import BlenderBuild, default_build
from renderers.demo_scene import ensure_demo_scene
from renderers.finish import FinishRequest
from renderers.local_render import LocalRenderOptions, render_frame_local
from renderers.worker import RenderWorker

GOAL = 1.10
FRAME = 7

PREPARE = r"""
import json, sys
import bpy
src, dst, opts = sys.argv[-3], sys.argv[-2], json.loads(sys.argv[-1])
bpy.ops.wm.open_mainfile(filepath=src, load_ui=False, use_scripts=False)
sc = bpy.context.scene
r = sc.render
r.resolution_x, r.resolution_y, r.resolution_percentage = 1920, 1080, opts["percentage"]
sc.cycles.samples = opts["samples"]
sc.cycles.use_denoising = False
r.filepath = "//render/bench_####"
r.image_settings.media_type = "IMAGE"
r.image_settings.file_format, r.image_settings.color_depth = "PNG", "16"
sc.view_settings.view_transform = "AgX"
tree = bpy.data.node_groups.new("Compositing", "CompositorNodeTree")
tree.interface.new_socket("Image", in_out="OUTPUT", socket_type="NodeSocketColor")
sc.compositing_node_group = tree
r.use_compositing = True
layers = tree.nodes.new("CompositorNodeRLayers")
layers.scene = sc
glare = tree.nodes.new("CompositorNodeGlare")
glare.inputs["Type"].default_value = "Fog Glow"
lens = tree.nodes.new("CompositorNodeLensdist")
lens.inputs["Distortion"].default_value = 0.04
lens.inputs["Dispersion"].default_value = 0.02
out = tree.nodes.new("NodeGroupOutput")
tree.links.new(layers.outputs["Image"], glare.inputs["Image"])
tree.links.new(glare.outputs["Image"], lens.inputs["Image"])
tree.links.new(lens.outputs["Image"], out.inputs[0])
bpy.ops.wm.save_as_mainfile(filepath=dst, compress=False)
"""

BLENDER_RENDER = r"""
import sys, time
import bpy
scene_path, frame = sys.argv[-2], int(sys.argv[-1])
bpy.ops.wm.open_mainfile(filepath=scene_path, load_ui=False, use_scripts=False)
sc = bpy.context.scene
sc.frame_start = sc.frame_end = frame
started = time.perf_counter()
bpy.ops.render.render(animation=True)
print("RENDER_SECONDS", time.perf_counter() - started)
"""


def _run_script(build: BlenderBuild, script: str, folder: Path, *arguments: str) -> str:
    if build.kind != "bpy":
        raise SystemExit("bench_finish runs with the bpy module build only.")
    path = folder / "script.py"
    path.write_text(script)
    done = subprocess.run(
        [str(build.path), "-I", str(path), *arguments],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"Blender script failed:\n{done.stderr[-2000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10%% size, 4 samples")
    parser.add_argument("--percentage", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None)
    args = parser.parse_args()
    percentage, samples = (10, 4) if args.quick else (100, 8)
    percentage = args.percentage or percentage
    samples = args.samples or samples
    build = default_build()
    demo = ensure_demo_scene(build)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        scene = folder / "bench.blend"
        options = json.dumps({"percentage": percentage, "samples": samples})
        _run_script(build, PREPARE, folder, str(demo), str(scene), options)

        started = time.perf_counter()
        stdout = _run_script(build, BLENDER_RENDER, folder, str(scene), str(FRAME))
        blender_wall = time.perf_counter() - started
        blender_render = float(stdout.split("RENDER_SECONDS")[1].split()[0])

        with RenderWorker(build) as worker:
            worker.start()
            merged = folder / "merged.exr"
            tiled = LocalRenderOptions(frame=FRAME, grid=(2, 2), denoise=False, preview=False)
            started = time.perf_counter()
            local = render_frame_local(worker, scene, merged, tiled)
            merged_at = time.perf_counter()
            result = worker.finish(FinishRequest(scene, merged, FRAME, folder / "out"))
            farm = time.perf_counter() - started
            finish = time.perf_counter() - merged_at
        size = f"{local.width}x{local.height}"
        assert result.frame_file.is_file()
    rows: list[dict[str, object]] = [
        {
            "method": "Blender -f N: render + composite + write (inside render())",
            "size": size,
            "seconds": blender_render,
            "ratio": 1.0,
        },
        {
            "method": "Blender -f N: whole process (start, load, render)",
            "size": size,
            "seconds": blender_wall,
            "ratio": blender_wall / blender_render,
        },
        {
            "method": "farm: 2x2 tiles (warm worker) + merge + finish",
            "size": size,
            "seconds": farm,
            "ratio": farm / blender_render,
        },
        {
            "method": "  of which: tile renders (sum of 4, inside Blender)",
            "size": size,
            "seconds": local.render_seconds,
            "ratio": local.render_seconds / blender_render,
        },
        {
            "method": "  of which: merge",
            "size": size,
            "seconds": local.merge_seconds,
            "ratio": local.merge_seconds / blender_render,
        },
        {
            "method": "  of which: tile I/O, merged EXR write, requests",
            "size": size,
            "seconds": local.wall_seconds - local.render_seconds - local.merge_seconds,
            "ratio": (local.wall_seconds - local.render_seconds - local.merge_seconds)
            / blender_render,
        },
        {
            "method": "  of which: finish (copy EXR, open scene, composite, write PNG16)",
            "size": size,
            "seconds": finish,
            "ratio": finish / blender_render,
        },
    ]
    report("finish", rows, ["method", "size", "seconds", "ratio"])
    ratio = farm / blender_render
    verdict = "meets" if ratio <= GOAL else "misses"
    print(
        f"samples {samples}; tiled + merge + finish: {ratio:.3f}x Blender's own render, "
        f"{verdict} the {GOAL:.2f}x goal"
    )


if __name__ == "__main__":
    main()

"""Tile overhead: what splitting a frame into 4x4 tiles costs, measured in one run.

Three ways to render the same frame of the demo scene at 480x270 (75% of 640x360):
- one piece through the warm worker (the baseline, 1.00x);
- 4x4 tiles through the same warm worker, merge included (what Tessera does);
- 4x4 tiles with a cold Blender start per tile (what farms that restart Blender pay).
Denoising is off in all three (it runs once per frame either way). Goal: warm tiles
within 1.10x of one piece. Run: `python -m benchmarks.bench_tiles [--quick]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from benchmarks.common import report
from renderers.builds import BlenderBuild, default_build
from renderers.demo_scene import ensure_demo_scene
from renderers.local_render import LocalRenderOptions, plan_for_scene, render_frame_local
from renderers.regions import border_fractions
from renderers.scene_info import inspect_scene
from renderers.worker import RenderRequest, RenderWorker

GOAL = 1.10


def _best_of(repeats: int, run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def cold_tiles(build: BlenderBuild, scene: Path, options: LocalRenderOptions, out: Path) -> None:
    """Each tile in a new Blender process: start, open the file, render, quit."""
    with RenderWorker(build) as probe:
        info = inspect_scene(probe, scene)
    plan = plan_for_scene(info, options)
    for tile in plan.tiles:
        with RenderWorker(build) as worker:
            worker.render(
                RenderRequest(
                    scene=info.path,
                    frame=options.frame or 1,
                    output=out / f"cold_{tile.index}.exr",
                    border=border_fractions(tile.render, plan.width, plan.height),
                    samples=options.samples,
                    percentage=options.percentage,
                )
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small frame, one repeat")
    parser.add_argument("--samples", type=int, default=None)
    args = parser.parse_args()
    percentage, samples, repeats = (25, 8, 1) if args.quick else (75, 16, 2)
    samples = args.samples or samples
    build = default_build()
    scene = ensure_demo_scene(build)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as scratch, RenderWorker(build) as worker:
        out = Path(scratch)
        for adaptive in (True, False):
            common = {
                "frame": 7,
                "percentage": percentage,
                "samples": samples,
                "denoise": False,
                "preview": False,
                "adaptive_sampling": adaptive,
            }
            whole = LocalRenderOptions(grid=(1, 1), **common)  # type: ignore[arg-type]
            tiled = LocalRenderOptions(grid=(4, 4), **common)  # type: ignore[arg-type]
            render_frame_local(worker, scene, out / "warmup.exr", whole)
            plan = render_frame_local(worker, scene, out / "probe.exr", tiled).plan
            t_whole = _best_of(
                repeats, partial(render_frame_local, worker, scene, out / "w.exr", whole)
            )
            t_tiled = _best_of(
                repeats, partial(render_frame_local, worker, scene, out / "t.exr", tiled)
            )
            size = f"{plan.width}x{plan.height}"
            pixels = sum(tile.render.area for tile in plan.tiles) / (plan.width * plan.height)
            label = "adaptive on" if adaptive else "adaptive off"
            rows.append(
                {
                    "method": f"one piece, warm worker ({label})",
                    "size": size,
                    "margin_px": 0,
                    "pixels": 1.0,
                    "seconds": t_whole,
                    "ratio": 1.0,
                }
            )
            rows.append(
                {
                    "method": f"4x4 tiles, warm worker, merge included ({label})",
                    "size": size,
                    "margin_px": plan.margin,
                    "pixels": pixels,
                    "seconds": t_tiled,
                    "ratio": t_tiled / t_whole,
                }
            )
            if adaptive:
                t_cold = _best_of(1, partial(cold_tiles, build, scene, tiled, out))
                rows.append(
                    {
                        "method": f"4x4 tiles, cold Blender per tile ({label})",
                        "size": size,
                        "margin_px": plan.margin,
                        "pixels": pixels,
                        "seconds": t_cold,
                        "ratio": t_cold / t_whole,
                    }
                )
    report("tiles", rows, ["method", "size", "margin_px", "pixels", "seconds", "ratio"])
    print(
        f"samples {samples}; 'pixels' is the share of the frame the tiles render, margins "
        "included (adaptive sampling needs a margin for exact tiles)."
    )
    for row in rows:
        if str(row["method"]).startswith("4x4 tiles, warm"):
            ratio = float(row["ratio"])  # type: ignore[arg-type]
            verdict = "meets" if ratio <= GOAL else "misses"
            print(f"{row['method']}: {ratio:.3f}x one piece, {verdict} the {GOAL:.2f}x goal")


if __name__ == "__main__":
    main()

"""Tile overhead: what splitting a frame into tiles costs against one piece, measured in
one run, with every tiled frame checked pixel for pixel against the one-piece frame.

Rows (the demo scene, frame 7, its own 64 samples and adaptive threshold 0.02):
- 4x4 tiles of 480x270 (75%) and 8x8 tiles of 960x540 (150%), both tiles of 120x67 px,
  adaptive sampling on and off, through one warm worker, merge included. The tiles
  render the margin renderers.regions.render_margin derives (0 px at these settings:
  Cycles' only adaptive filter pass follows the last sample). `--tiles auto` picks 8x8
  for one 960x540 frame on 64 nodes at its default minimum tile (printed; a probe that
  measures a costlier sync per render makes it pick fewer, larger tiles), so the 8x8 row
  measures its choice.
- 4x4 tiles with a cold Blender start per tile (what farms that restart Blender pay).
Ratios are medians over `--pairs` (one piece, tiles) pairs run back to back; `cpu_ratio`
compares Blender's CPU seconds, which a busy shared machine blurs far less than wall
time. Denoising is off (it runs once per frame either way). Goal: tiles within 1.05x of
one piece with adaptive sampling on, judged on CPU seconds (wall time is printed too; on
a quiet machine the two agree). Run: `python -m benchmarks.bench_tiles [--quick]`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.common import report
from renderers.auto_tiles import choose_grid
from renderers.builds import BlenderBuild, default_build
from renderers.demo_scene import ensure_demo_scene
from renderers.exr import read_exr
from renderers.local_render import (
    LocalRenderOptions,
    LocalRenderResult,
    plan_for_scene,
    render_frame_local,
)
from renderers.regions import border_fractions, overhead_estimate
from renderers.scene_info import inspect_scene
from renderers.worker import RenderRequest, RenderWorker

GOAL = 1.05
#: (grid, percentage of the demo's 640x360): tiles of 120x67 px at both sizes.
CASES = (((4, 4), 75), ((8, 8), 150))
QUICK_CASES = (((4, 4), 25),)


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
                    adaptive_sampling=options.adaptive_sampling,
                )
            )


def differing_pixels(a: Path, b: Path) -> int:
    """Values that differ between two EXRs of the same channels (0: bit-identical)."""
    left, right = read_exr(a), read_exr(b)
    if left.channel_names() != right.channel_names() or left.width != right.width:
        return -1
    return sum(
        int(np.count_nonzero(left.channel(name) != right.channel(name)))
        for name in right.channel_names()
    )


def _cpu(result: LocalRenderResult) -> float:
    return result.stage_seconds.get("cpu", 0.0)


def measure(
    worker: RenderWorker,
    scene: Path,
    out: Path,
    whole: LocalRenderOptions,
    tiled: LocalRenderOptions,
    pairs: int,
) -> dict[str, object]:
    """Median wall and CPU ratios of `pairs` (one piece, tiles) renders, and equality."""
    # Blender's first render in a process loads kernels: a tiny one takes that cost.
    render_frame_local(worker, scene, out / "warmup.exr", replace(whole, percentage=5, samples=1))
    walls, cpus, plan, seconds = [], [], None, 0.0
    for _ in range(max(1, pairs)):
        one = render_frame_local(worker, scene, out / "w.exr", whole)
        split = render_frame_local(worker, scene, out / "t.exr", tiled)
        walls.append(split.wall_seconds / one.wall_seconds)
        cpus.append(_cpu(split) / max(1e-9, _cpu(one)))
        plan, seconds = split.plan, one.wall_seconds
    assert plan is not None
    return {
        "size": f"{plan.width}x{plan.height}",
        "margin_px": plan.margin,
        "pixels": 1.0 + overhead_estimate(plan),
        "seconds": seconds,
        "ratio": statistics.median(walls),
        "cpu_ratio": statistics.median(cpus),
        "differing": differing_pixels(out / "t.exr", out / "w.exr"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one small frame, one pair")
    parser.add_argument("--samples", type=int, default=None, help="default: the scene's (64)")
    parser.add_argument("--pairs", type=int, default=2, help="(one piece, tiles) pairs per row")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-start row")
    parser.add_argument(
        "--size", choices=["480x270", "960x540"], default=None, help="only this frame size"
    )
    args = parser.parse_args()
    cases: tuple[tuple[tuple[int, int], int], ...] = QUICK_CASES if args.quick else CASES
    if args.size and not args.quick:
        cases = tuple(case for case in CASES if 640 * case[1] // 100 == int(args.size[:3]))
    pairs = 1 if args.quick else args.pairs
    samples = 16 if args.quick and args.samples is None else args.samples
    build = default_build()
    scene = ensure_demo_scene(build)
    auto = choose_grid(960, 540, nodes=64, frames=1, margin=0)
    print(f"--tiles auto for one 960x540 frame on 64 nodes: {auto.describe()}", flush=True)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as scratch, RenderWorker(build) as worker:
        out = Path(scratch)
        for grid, percentage in cases:
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
                tiled = LocalRenderOptions(grid=grid, **common)  # type: ignore[arg-type]
                label = "adaptive on" if adaptive else "adaptive off"
                row = measure(worker, scene, out, whole, tiled, pairs)
                rows.append({"method": f"{grid[0]}x{grid[1]} tiles, warm ({label})", **row})
                print(rows[-1], flush=True)
                if adaptive and grid == (4, 4) and not args.no_cold:
                    started = time.perf_counter()
                    cold_tiles(build, scene, tiled, out)
                    cold = time.perf_counter() - started
                    rows.append(
                        {
                            "method": f"4x4 tiles, cold Blender per tile ({label})",
                            "size": row["size"],
                            "margin_px": row["margin_px"],
                            "pixels": row["pixels"],
                            "seconds": cold,
                            "ratio": cold / float(row["seconds"]),  # type: ignore[arg-type]
                            "cpu_ratio": "",
                            "differing": "",
                        }
                    )
    columns = ["method", "size", "margin_px", "pixels", "seconds", "ratio", "cpu_ratio"]
    name = "tiles" if args.size is None or args.quick else f"tiles_{args.size}"
    report(name, rows, [*columns, "differing"])
    print(
        f"samples {samples or 'of the scene (64)'}; 'seconds' is one piece; ratios are medians "
        f"of {pairs} pair(s); 'differing' counts values unlike the one-piece frame (0: exact)."
    )
    failed = False
    for row in rows:
        if "warm" not in str(row["method"]):
            continue
        if row["differing"] != 0:
            failed = True
            print(f"{row['method']}: NOT bit-identical to one piece ({row['differing']})")
        if "adaptive on" in str(row["method"]):
            ratio, cpu = float(row["ratio"]), float(row["cpu_ratio"])  # type: ignore[arg-type]
            verdict = "meets" if cpu <= GOAL else "misses"
            print(
                f"{row['method']} {row['size']}: {cpu:.3f}x CPU seconds ({ratio:.3f}x wall): "
                f"{verdict} the {GOAL:.2f}x goal"
            )
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

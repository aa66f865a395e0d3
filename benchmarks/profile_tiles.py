"""Where a tiled frame's extra time goes: one piece against tiles through one warm worker,
stage by stage (docs/tile-overhead.md records a run).

For each case it renders the frame once in one piece and once in tiles, and prints the
seconds of every stage summed over the renders: Blender's own (`prepare`: open the file
and apply the request; `startup`: the render operator until Cycles reports; `sync`: scene
sync, BVH, kernels; `trace`: path tracing; `write`: the EXR write), reading the tiles back
(`read`), the merge, and what is left of the wall time (the worker protocol, the final
EXR write). Run: `python -m benchmarks.profile_tiles [--quick]`. It measures; it asserts
nothing (benchmarks/bench_tiles.py checks equality and the goal).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import report
from renderers.builds import default_build
from renderers.demo_scene import ensure_demo_scene
from renderers.local_render import LocalRenderOptions, LocalRenderResult, render_frame_local
from renderers.worker import RenderWorker

STAGES = ("prepare", "startup", "sync", "trace", "write", "read")


def _row(label: str, result: LocalRenderResult, whole: LocalRenderResult) -> dict[str, object]:
    plan = result.plan
    row: dict[str, object] = {
        "case": label,
        "tiles": len(plan.tiles),
        "margin_px": plan.margin,
        "pixels": sum(t.render.area for t in plan.tiles) / (plan.width * plan.height),
    }
    for stage in STAGES:
        row[stage] = result.stage_seconds.get(stage, 0.0)
    row["merge"] = result.merge_seconds
    accounted = sum(result.stage_seconds.get(stage, 0.0) for stage in STAGES)
    row["other"] = result.wall_seconds - accounted - result.merge_seconds
    row["wall"] = result.wall_seconds
    row["ratio"] = result.wall_seconds / whole.wall_seconds
    row["cpu"] = result.stage_seconds.get("cpu", 0.0)
    row["cpu_ratio"] = row["cpu"] / max(1e-9, whole.stage_seconds.get("cpu", 0.0))  # type: ignore[operator]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small frame, few samples")
    parser.add_argument("--percentage", type=int, default=75, help="75: 480x270")
    parser.add_argument("--samples", type=int, default=None, help="default: the scene's (64)")
    parser.add_argument("--grids", default="4x4", help="comma-separated grids, e.g. 4x4,8x8")
    parser.add_argument("--margins", default="4,0", help="margins to try with adaptive on")
    args = parser.parse_args()
    percentage = 25 if args.quick else args.percentage
    samples = 16 if args.quick else args.samples
    grids = [tuple(int(v) for v in g.split("x")) for g in args.grids.split(",")]
    margins = [int(m) for m in args.margins.split(",")]
    build = default_build()
    scene = ensure_demo_scene(build)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as scratch, RenderWorker(build) as worker:
        out = Path(scratch)
        common = {"frame": 7, "percentage": percentage, "samples": samples, "denoise": False}
        for adaptive in (True, False):
            label = "on" if adaptive else "off"
            options = {**common, "preview": False, "adaptive_sampling": adaptive}
            render_frame_local(worker, scene, out / "warm.exr", LocalRenderOptions(**options))  # type: ignore[arg-type]
            whole = render_frame_local(worker, scene, out / "w.exr", LocalRenderOptions(**options))  # type: ignore[arg-type]
            rows.append(_row(f"one piece, adaptive {label}", whole, whole))
            for grid in grids:
                for margin in margins if adaptive else [0]:
                    tiled = LocalRenderOptions(grid=grid, margin=margin, **options)  # type: ignore[arg-type]
                    result = render_frame_local(worker, scene, out / "t.exr", tiled)
                    name = f"{grid[0]}x{grid[1]}, adaptive {label}, margin {margin}"
                    rows.append(_row(name, result, whole))
                    print(rows[-1], flush=True)
    columns = [
        "case",
        "tiles",
        "margin_px",
        "pixels",
        *STAGES,
        "merge",
        "other",
        "wall",
        "ratio",
        "cpu",
        "cpu_ratio",
    ]
    report("profile_tiles", rows, columns)
    print(f"frame {whole.width}x{whole.height}, samples {samples or 'scene'}; seconds per stage")


if __name__ == "__main__":
    main()

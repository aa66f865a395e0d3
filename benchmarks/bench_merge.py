"""How much merging tiles costs on top of the EXR I/O it cannot avoid.

Writes 16 tiles (4x4, with the adaptive-sampling margin) of a 3840x2160 multilayer EXR
(Combined RGBA + Denoising Albedo, Normal and Depth; float32, ZIP) to a temporary folder,
then times, best of N:

- the I/O floor: read the 16 tiles with `read_exr`, write a full frame with `write_exr`;
- the merge: read + `merge_tiles` + write, as the coordinator does it.

Goal: the merge within 1.5x of the floor. Run from the repository root:
`python -m benchmarks.bench_merge [--quick] [--repeats N]`. This script must not be
imported by the product code.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import report
from renderers.exr import ExrImage, ExrPart, crop, read_exr, same_pixels, write_exr
from renderers.merge import merge_tiles
from renderers.regions import ADAPTIVE_SAMPLING_MARGIN, RegionPlan, plan_grid

FULL_SIZE = (3840, 2160)
QUICK_SIZE = (960, 540)
GRID = (4, 4)
GOAL_RATIO = 1.5

PASSES = {
    "Combined": "RGBA",
    "Denoising Albedo": "RGB",
    "Denoising Normal": "XYZ",
    "Denoising Depth": "Z",
}


def synthetic_frame(width: int, height: int, seed: int = 0) -> ExrImage:
    """A render-like frame: smooth gradients plus noise, quantised so ZIP has work to do
    but is not handed pure entropy (real renders compress about as well)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    parts = []
    for pass_index, (pass_name, components) in enumerate(PASSES.items()):
        channels = {}
        for component_index, component in enumerate(components):
            phase = np.float32(pass_index * 4 + component_index)
            smooth = 0.5 + 0.4 * np.sin(xs / (97.0 + 13 * phase) + phase) * np.cos(ys / 71.0)
            noise = rng.normal(0.0, 0.02, (height, width)).astype(np.float32)
            values = np.round((smooth + noise) * 4096.0) / 4096.0
            channels[f"ViewLayer.{pass_name}.{component}"] = values.astype(np.float32)
        parts.append(ExrPart(f"ViewLayer.{pass_name}", channels, {"Camera": "Camera"}))
    return ExrImage(width, height, parts)


def write_tiles(frame: ExrImage, plan: RegionPlan, folder: Path) -> dict[int, Path]:
    """Each tile's render rectangle as its own EXR, as the nodes return them."""
    paths = {}
    for tile in plan.tiles:
        paths[tile.index] = folder / f"tile_{tile.index:02d}.exr"
        write_exr(paths[tile.index], crop(frame, tile.render))
    return paths


def timed(action: Callable[[], object]) -> float:
    """Seconds one run of `action` takes."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 when the goal is met, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a 960x540 frame (smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (best of)")
    args = parser.parse_args(argv)

    width, height = QUICK_SIZE if args.quick else FULL_SIZE
    plan = plan_grid(width, height, *GRID, margin=ADAPTIVE_SAMPLING_MARGIN)
    frame = synthetic_frame(width, height)
    channel_count = len(frame.channel_names())
    with tempfile.TemporaryDirectory(prefix="tessera-bench-merge-") as temporary:
        folder = Path(temporary)
        tile_paths = write_tiles(frame, plan, folder)
        tile_bytes = sum(path.stat().st_size for path in tile_paths.values())
        output = folder / "frame.exr"

        def io_floor() -> None:
            tiles = [read_exr(path) for path in tile_paths.values()]
            write_exr(output, frame)
            del tiles

        def merge() -> None:
            write_exr(output, merge_tiles(plan, tile_paths))

        tiles_in_memory = {index: read_exr(path) for index, path in tile_paths.items()}

        def placement_only() -> None:
            merge_tiles(plan, tiles_in_memory)

        if not same_pixels(merge_tiles(plan, tile_paths), frame):
            raise SystemExit("merge_tiles did not reproduce the frame: the benchmark is void")

        # Interleave the two measurements so that drift (page cache, clocks) hits both.
        floor_runs, merge_runs = [], []
        for _ in range(args.repeats):
            floor_runs.append(timed(io_floor))
            merge_runs.append(timed(merge))
        placement_seconds = min(timed(placement_only) for _ in range(args.repeats))
        floor_seconds, merge_seconds = min(floor_runs), min(merge_runs)
        frame_bytes = output.stat().st_size

    ratio = merge_seconds / floor_seconds
    size = f"{width}x{height}, {channel_count} float32 channels, ZIP"
    rows: list[dict[str, object]] = [
        {"step": "I/O floor: read 16 tiles + write frame", "seconds": floor_seconds},
        {"step": "merge: read + merge_tiles + write", "seconds": merge_seconds},
        {"step": "placement only (tiles in memory)", "seconds": placement_seconds},
        {
            "step": "ratio merge / floor",
            "seconds": "",
            "ratio": f"{ratio:.3f}x",
            "goal": f"within {GOAL_RATIO}x",
            "met": ratio <= GOAL_RATIO,
        },
    ]
    for row in rows[:3]:
        row["frame"] = size
    rows[0]["tile_mb"] = round(tile_bytes / 1e6, 1)
    rows[1]["frame_mb"] = round(frame_bytes / 1e6, 1)
    name = "merge_quick" if args.quick else "merge"
    report(name, rows, ["step", "seconds", "ratio", "goal", "met", "tile_mb", "frame_mb", "frame"])
    return 0 if ratio <= GOAL_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())

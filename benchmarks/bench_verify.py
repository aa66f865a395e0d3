"""Verification: what duplicate sampling costs and how surely it catches a cheat.

Measured in one run on the demo scene (64 samples, adaptive sampling on, the scene's own
settings) for three layouts: 4x4 and 2x2 tiles of 480x270 (75%), and whole 640x360
frames, through warm workers:

- **overhead**: the render time of the duplicate samples the coordinator asks for
  (its own `window_assignment`, margin included) as a share of the tiles' render time,
  for several sampling rates; beside Golem's verifier, which re-renders 3 crops of
  10% x 10% of every subtask (given the same margin, so its crops compare fairly);
- **detection**: the share of faked tiles a window catches, per cheat (a quarter of the
  samples, a copy of another tile, noise, black), with the coordinator's comparator
  (`renderers.compare`) across two CPU kernels, the harder case;
- **catch probability**: for a provider that fakes 10% of its tiles, the chance of
  being caught within its first 50 tasks, by Monte Carlo over 20,000 providers using
  the measured detection rates and the coordinator's own sampling policy (and fixed
  rates for comparison).

Goal: >= 99% caught with <= 3% overhead. Run: `python -m benchmarks.bench_verify [--quick]`.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from benchmarks.common import report
from coordinator.planning import plan_assignments
from coordinator.verify.judge import window_assignment
from coordinator.verify.policy import (
    ProviderRecord,
    VerificationPolicy,
    sampling_rate,
)
from protocol.models import FrameRange, JobSpec, Region, RenderAssignment, SceneSummary
from renderers.builds import default_build
from renderers.compare import compare_windows
from renderers.demo_scene import ensure_demo_scene
from renderers.exr import read_exr
from renderers.regions import PixelRect, border_fractions
from renderers.scene_info import inspect_scene
from renderers.worker import RenderRequest, RenderWorker

Array = npt.NDArray[np.float32]
FAKE_SHARE = 0.10
FIRST_TASKS = 50
GOAL_CAUGHT = 0.99
GOAL_OVERHEAD = 0.03
#: Golem's Blender verifier as reported: 87.7% of wrong results rejected per check.
GOLEM_PUBLISHED_DETECTION = 0.877


@dataclass(frozen=True)
class Rendered:
    assignment: RenderAssignment
    pixels: Array
    seconds: float


def _render(
    worker: RenderWorker, scene: Path, a: RenderAssignment, out: Path, samples: int | None = None
) -> Rendered:
    r = a.render_region
    request = RenderRequest(
        scene=scene,
        frame=a.frame,
        output=out,
        border=border_fractions(PixelRect(r.x0, r.y0, r.x1, r.y1), a.width, a.height),
        samples=samples or a.samples,
        percentage=a.percentage,
    )
    started = time.perf_counter()
    worker.render(request)
    seconds = time.perf_counter() - started
    return Rendered(a, read_exr(out).combined_rgba(), seconds)


def _crop(result: Rendered, window: Region) -> Array:
    origin = result.assignment.render_region
    x0, y0 = window.x0 - origin.x0, window.y0 - origin.y0
    return result.pixels[y0 : y0 + window.y1 - window.y0, x0 : x0 + window.x1 - window.x0]


def golem_crops(
    tile: RenderAssignment, spec: JobSpec, rng: random.Random
) -> list[RenderAssignment]:
    """Golem's check: 3 random crops of 10% x 10% of the subtask."""
    golem = VerificationPolicy(window_fraction=0.10, min_window=1, max_window=10_000)
    return [window_assignment(tile, spec, golem, rng) for _ in range(3)]


def catch_probability(
    rate_for: Callable[[ProviderRecord], float],
    detection: float,
    trials: int,
    rng: random.Random,
) -> float:
    """Share of 10%-faking providers caught within their first 50 tasks."""
    caught = 0
    for _ in range(trials):
        record = ProviderRecord()
        for _ in range(FIRST_TASKS):
            faked = rng.random() < FAKE_SHARE
            if rng.random() >= rate_for(record):
                continue
            if faked and rng.random() < detection:
                caught += 1
                break
            if not faked:
                record = ProviderRecord(record.verified + 1, record.rejected)
    return caught / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer tiles and trials")
    args = parser.parse_args()
    build = default_build()
    # (percentage, grid): small tiles, bigger tiles, whole frames (one task per frame).
    layouts = [(75, (2, 2))] if args.quick else [(75, (4, 4)), (75, (2, 2)), (100, (1, 1))]
    trials = 2_000 if args.quick else 20_000
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        scene = ensure_demo_scene(build)
        with (
            RenderWorker(build) as worker,
            RenderWorker(build, extra_env={"CYCLES_CPU_NO_AVX2": "1"}) as other,
        ):
            for percentage, grid in layouts:
                folder = Path(tmp) / f"{percentage}-{grid[0]}x{grid[1]}"
                folder.mkdir()
                measured = _measure(worker, other, scene, percentage, grid, folder)
                rows += _rows(measured, trials)
    report("bench_verify", rows, ["tiles", "method", "overhead", "caught_in_50", "goal_met"])


@dataclass(frozen=True)
class Measured:
    label: str
    tile_seconds: float
    window_seconds: float
    golem_seconds: float
    detection: dict[str, float]


def _measure(
    worker: RenderWorker,
    other: RenderWorker,
    scene: Path,
    percentage: int,
    grid: tuple[int, int],
    folder: Path,
) -> Measured:
    """Render every tile, a quarter-sample fake of it, one window of it on the other
    kernel (Tessera), and Golem's 3 crops; time each render."""
    policy = VerificationPolicy()
    rng = random.Random(1)
    info = inspect_scene(worker, scene)
    spec = _spec(info.resolution_x, info.resolution_y, info.samples, percentage, grid)
    tiles = [a for _, a in plan_assignments(spec)]
    _render(worker, scene, tiles[0], folder / "warm.exr")  # loads the scene
    _render(other, scene, tiles[0], folder / "warm2.exr")
    rendered = [_render(worker, scene, t, folder / f"t{i}.exr") for i, t in enumerate(tiles)]
    cheap = [
        _render(worker, scene, t, folder / f"q{i}.exr", samples=max(1, info.samples // 4))
        for i, t in enumerate(tiles)
    ]
    ours = [window_assignment(t, spec, policy, rng) for t in tiles]
    samples = [_render(other, scene, w, folder / f"w{i}.exr") for i, w in enumerate(ours)]
    golem_seconds = 0.0
    for i, tile in enumerate(tiles):
        for j, crop in enumerate(golem_crops(tile, spec, rng)):
            golem_seconds += _render(worker, scene, crop, folder / f"g{i}-{j}.exr").seconds
    core = tiles[0].core_region
    size = f"{core.x1 - core.x0}x{core.y1 - core.y0} px"
    return Measured(
        label=f"{len(tiles)} tiles of {size}" if len(tiles) > 1 else f"whole frame {size}",
        tile_seconds=sum(r.seconds for r in rendered),
        window_seconds=sum(r.seconds for r in samples),
        golem_seconds=golem_seconds,
        detection=_detection(rendered, cheap, samples),
    )


def _rows(measured: Measured, trials: int) -> list[dict[str, object]]:
    policy = VerificationPolicy()
    worst = min(measured.detection.values())
    window_share = measured.window_seconds / measured.tile_seconds
    golem_share = measured.golem_seconds / measured.tile_seconds
    rows: list[dict[str, object]] = []

    def add(
        method: str,
        rate_for: Callable[[ProviderRecord], float],
        overhead: float,
        detection: float = worst,
    ) -> None:
        caught = catch_probability(rate_for, detection, trials, random.Random(7))
        rows.append(
            {
                "tiles": measured.label,
                "method": method,
                "overhead": f"{overhead:.2%}",
                "caught_in_50": f"{caught:.2%}",
                "goal_met": caught >= GOAL_CAUGHT and overhead <= GOAL_OVERHEAD,
            }
        )

    add(
        "Tessera policy (probation: every tile, one window)",
        lambda record: sampling_rate(record, policy),
        window_share,
    )
    for rate in (0.5, 0.25, 0.1):
        add(f"Tessera, fixed rate {rate:g}", _fixed(rate), rate * window_share)
    add("Golem, 3 crops of 10% x 10% each task", _fixed(1.0), golem_share)
    add(
        "Golem, with its published 87.7% correct rejections",
        _fixed(1.0),
        golem_share,
        GOLEM_PUBLISHED_DETECTION,
    )
    for cheat, share in measured.detection.items():
        rows.append(
            {
                "tiles": measured.label,
                "method": f"detection per sample: {cheat}",
                "caught_in_50": f"{share:.2%}",
            }
        )
    return rows


def _fixed(rate: float) -> Callable[[ProviderRecord], float]:
    return lambda _record: rate


def _detection(
    rendered: list[Rendered], cheap: list[Rendered], samples: list[Rendered]
) -> dict[str, float]:
    """Per cheat, the share of samples (another kernel's windows) that disagree with it."""
    caught: dict[str, list[bool]] = {"quarter samples": [], "copy": [], "noise": [], "black": []}
    noise_rng = np.random.default_rng(3)
    for index, (tile, sample) in enumerate(zip(rendered, samples, strict=True)):
        window = sample.assignment.core_region
        truth = _crop(sample, window)
        other = rendered[(index + 1) % len(rendered)]
        fakes = {
            "quarter samples": _crop(cheap[index], window),
            "copy": _shifted_copy(other, window),
            "noise": noise_rng.uniform(0, float(tile.pixels.max()), truth.shape).astype(np.float32),
            "black": np.where(np.arange(4) == 3, 1.0, 0.0).astype(np.float32) * np.ones_like(truth),
        }
        assert compare_windows(truth, _crop(tile, window), exact=False).agree
        for name, fake in fakes.items():
            caught[name].append(not compare_windows(truth, fake, exact=False).agree)
    return {name: sum(hits) / len(hits) for name, hits in caught.items()}


def _shifted_copy(other: Rendered, window: Region) -> Array:
    """The same-sized window from another tile (what a copied tile shows there)."""
    h, w = window.y1 - window.y0, window.x1 - window.x0
    return other.pixels[:h, :w]


def _spec(width: int, height: int, samples: int, percentage: int, grid: tuple[int, int]) -> JobSpec:
    scene = SceneSummary(
        name="demo",
        frame_start=1,
        frame_end=1,
        resolution_x=width,
        resolution_y=height,
        resolution_percentage=100,
        samples=samples,
        adaptive_sampling=True,
        denoising=False,
        camera="Camera",
    )
    return JobSpec.model_validate(
        {
            "name": "bench",
            "bundle": "0" * 64,
            "scene_path": "scene.blend",
            "scene": scene,
            "frames": FrameRange(start=1, end=1),
            "tiles": {"columns": grid[0], "rows": grid[1]},
            "percentage": percentage,
            "denoise": False,
        }
    )


if __name__ == "__main__":
    main()

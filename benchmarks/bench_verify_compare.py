"""Duplicate-sampling calibration: does `renderers.compare` accept every honest window and
reject the cheats? All figures come from renders made in this run.

The demo scene is rendered at 160x90 (25%) for a few (frame, seed, samples) settings by
three workers: two on the default CPU kernel (AVX2; two providers of the same class) and
one with CYCLES_CPU_NO_AVX2=1 (SSE4.2; an honest provider whose pixels differ where a
path was traced differently). Cheats: the same frame with half or a quarter of the
samples asked, another window of the same frame (a copied tile), uniform noise in
[0, max of the frame], and black. Milder variants (3/4 and 15/16 of the samples) are
reported for information. Windows are chosen as the coordinator chooses them
(`coordinator.verify.policy.choose_window` on tiles of 1x1..4x4 grids), so they are mostly
8x8 px. A window re-rendered with a border equals the same crop of a full-frame render
(docs: RENDERING_FACTS.md), so crops of full frames stand in for window renders.

Writes results/verify_compare.json (the table), results/verify_compare_renders.json
(what the honest renders differ by) and results/verify_compare_detection.json (per-cheat
detection rates for the catch-probability benchmark). `--quick` writes *_quick names.
Run: `python -m benchmarks.bench_verify_compare [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from benchmarks.common import RESULTS_DIR, report
from coordinator.verify.policy import VerificationPolicy, choose_window
from renderers import compare
from renderers.builds import BlenderBuild, default_build
from renderers.compare import compare_windows
from renderers.demo_scene import ensure_demo_scene
from renderers.exr import read_exr
from renderers.regions import PixelRect, plan_grid
from renderers.worker import RenderRequest, RenderWorker

Frame = npt.NDArray[np.float32]
PERCENTAGE = 25
GRIDS = ((1, 1), (2, 2), (3, 3), (4, 4))
NO_AVX2 = {"CYCLES_CPU_NO_AVX2": "1"}


@dataclass(frozen=True, slots=True)
class Setting:
    frame: int
    seed: int
    samples: int

    @property
    def label(self) -> str:
        return f"frame {self.frame}, seed {self.seed}, {self.samples} spp"


#: Reported apart: with 128 samples most pixels of the demo stop adaptively before 64.
ADAPTIVE = Setting(3, 0, 128)
ADAPTIVE_LABEL = "128 spp adaptive"


@dataclass(slots=True)
class Renders:
    """One setting's frames: honest renders by kernel, cheats by sample count."""

    setting: Setting
    avx2: Frame
    avx2_again: Frame
    sse: Frame
    by_samples: dict[int, Frame] = field(default_factory=dict)


# Cheat variants rendered with fewer samples: (name, numerator, denominator, required).
SAMPLE_CHEATS = (
    ("half samples", 1, 2, True),
    ("quarter samples", 1, 4, True),
    ("3/4 samples", 3, 4, False),
    ("15/16 samples", 15, 16, False),
)


def _cheat_samples(samples: int) -> dict[str, int]:
    return {name: max(1, samples * num // den) for name, num, den, _ in SAMPLE_CHEATS}


def _render(worker: RenderWorker, scene: Path, out: Path, setting: Setting, samples: int) -> Frame:
    path = out / f"f{setting.frame}_s{setting.seed}_{samples}_{worker.pid}.exr"
    request = RenderRequest(
        scene=scene,
        frame=setting.frame,
        output=path,
        samples=samples,
        percentage=PERCENTAGE,
        seed=setting.seed,
    )
    worker.render(request)
    return read_exr(path).combined_rgba()


def render_all(
    build: BlenderBuild, scene: Path, settings: list[Setting], out: Path
) -> list[Renders]:
    """Every setting on both kernels (AVX2 twice, in two processes) plus the cheats."""
    with (
        RenderWorker(build) as first,
        RenderWorker(build) as second,
        RenderWorker(build, extra_env=NO_AVX2) as sse,
    ):
        results = []
        for setting in settings:
            renders = Renders(
                setting,
                avx2=_render(first, scene, out, setting, setting.samples),
                avx2_again=_render(second, scene, out, setting, setting.samples),
                sse=_render(sse, scene, out, setting, setting.samples),
            )
            for samples in sorted(set(_cheat_samples(setting.samples).values())):
                renders.by_samples[samples] = _render(first, scene, out, setting, samples)
            results.append(renders)
    return results


def draw_windows(width: int, height: int, count: int, rng: random.Random) -> list[PixelRect]:
    """`count` windows chosen as the coordinator chooses them, on random tile grids."""
    policy = VerificationPolicy()
    plans = [plan_grid(width, height, columns, rows) for columns, rows in GRIDS]
    windows = []
    for _ in range(count):
        tile = rng.choice(rng.choice(plans).tiles)
        windows.append(choose_window(tile.core, policy, rng))
    return windows


def _crop(frame: Frame, rect: PixelRect) -> Frame:
    return frame[rect.y0 : rect.y1, rect.x0 : rect.x1]


def _elsewhere(rect: PixelRect, frame: Frame, rng: random.Random) -> PixelRect:
    """A window of the same size at another place of the frame."""
    height, width = frame.shape[:2]
    w, h = rect.x1 - rect.x0, rect.y1 - rect.y0
    while True:
        x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
        if (x0, y0) != (rect.x0, rect.y0):
            return PixelRect(x0, y0, x0 + w, y0 + h)


# A candidate maker: (renders, window, rng, exact) -> (reference window, candidate window).
Pair = tuple[Frame, Frame]
Maker = Callable[[Renders, PixelRect, random.Random, bool], Pair]


def _honest_same(renders: Renders, rect: PixelRect, _rng: random.Random, _exact: bool) -> Pair:
    return _crop(renders.avx2, rect), _crop(renders.avx2_again, rect)


def _honest_cross(renders: Renders, rect: PixelRect, rng: random.Random, _exact: bool) -> Pair:
    # Either provider may be the verifier: the reference's noise sets the tolerance.
    pair = (_crop(renders.avx2, rect), _crop(renders.sse, rect))
    return pair if rng.random() < 0.5 else (pair[1], pair[0])


def _fewer_samples(name: str) -> Maker:
    def make(renders: Renders, rect: PixelRect, _rng: random.Random, exact: bool) -> Pair:
        # Exact mode is for a verifier of the same class; tolerance for another kernel.
        verifier = renders.avx2 if exact else renders.sse
        samples = _cheat_samples(renders.setting.samples)[name]
        return _crop(verifier, rect), _crop(renders.by_samples[samples], rect)

    return make


def _another_window(renders: Renders, rect: PixelRect, rng: random.Random, _exact: bool) -> Pair:
    return _crop(renders.avx2, rect), _crop(renders.avx2, _elsewhere(rect, renders.avx2, rng))


def _uniform_noise(renders: Renders, rect: PixelRect, rng: random.Random, _exact: bool) -> Pair:
    reference = _crop(renders.avx2, rect)
    noise = np.random.default_rng(rng.getrandbits(32)).uniform(
        0.0, float(renders.avx2.max()), reference.shape
    )
    return reference, noise.astype(np.float32)


def _black(renders: Renders, rect: PixelRect, _rng: random.Random, _exact: bool) -> Pair:
    reference = _crop(renders.avx2, rect)
    black = np.zeros_like(reference)
    black[..., 3] = 1.0  # opaque black: the alpha channel alone does not give it away
    return reference, black


Role = Literal["honest", "cheat", "milder", "info"]


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of comparison. Roles: `honest` must always agree (false rejections);
    `cheat` must be caught; `milder` cheats and `info` rows are reported, not required."""

    name: str
    role: Role
    modes: tuple[bool, ...]  # exact?
    make: Maker


def kinds() -> list[Kind]:
    listed = [
        Kind("honest, same kernel", "honest", (True, False), _honest_same),
        Kind("honest, AVX2 vs SSE4.2", "honest", (False,), _honest_cross),
        Kind("AVX2 vs SSE4.2 (exact, must differ)", "info", (True,), _honest_cross),
    ]
    for name, _num, _den, required in SAMPLE_CHEATS:
        modes = (False, True) if required else (False,)
        listed.append(Kind(name, "cheat" if required else "milder", modes, _fewer_samples(name)))
    listed += [
        Kind("another window", "cheat", (False, True), _another_window),
        Kind("uniform noise", "cheat", (False, True), _uniform_noise),
        Kind("black", "cheat", (False, True), _black),
    ]
    return listed


def adaptive_kinds() -> list[Kind]:
    """At 128 spp adaptive sampling stops most demo pixels before 64 samples."""
    return [
        Kind(f"{ADAPTIVE_LABEL}: honest, AVX2 vs SSE4.2", "honest", (False,), _honest_cross),
        Kind(f"{ADAPTIVE_LABEL}: half samples", "milder", (False,), _fewer_samples("half samples")),
    ]


@dataclass(slots=True)
class Tally:
    kind: Kind
    exact: bool
    statistics: list[float] = field(default_factory=list)
    rejected: int = 0
    #: Windows where the candidate is not bit-identical to the reference.
    differs: int = 0
    #: Windows where the candidate is not what an honest AVX2 provider returns (a cheat
    #: that leaves a window's pixels as they were cannot be seen there, nor did it harm).
    tampered: int = 0

    def add(self, reference: Frame, candidate: Frame, honest: Frame) -> None:
        verdict = compare_windows(reference, candidate, exact=self.exact)
        self.statistics.append(verdict.statistic)
        self.rejected += not verdict.agree
        self.differs += not np.array_equal(reference, candidate)
        self.tampered += not np.array_equal(honest, candidate)


def measure(
    all_renders: list[Renders], listed: list[Kind], count: int, rng: random.Random
) -> list[Tally]:
    """Compare `count` windows per kind and mode, spread evenly over the settings."""
    tallies = []
    for kind in listed:
        for exact in kind.modes:
            tally = Tally(kind, exact)
            for index in range(count):
                renders = all_renders[index % len(all_renders)]
                height, width = renders.avx2.shape[:2]
                rect = draw_windows(width, height, 1, rng)[0]
                reference, candidate = kind.make(renders, rect, rng, exact)
                tally.add(reference, candidate, honest=_crop(renders.avx2, rect))
            tallies.append(tally)
    return tallies


def _row(tally: Tally) -> dict[str, object]:
    stats = np.asarray(tally.statistics)
    windows = len(stats)
    cheat = tally.kind.role in ("cheat", "milder")
    return {
        "comparison": tally.kind.name,
        "role": tally.kind.role,
        "mode": "exact" if tally.exact else "tolerance",
        "windows": windows,
        "differs": f"{tally.differs / windows:.1%}",
        "tampered": f"{tally.tampered / windows:.1%}" if cheat else "-",
        "rejected": tally.rejected,
        "rate": f"{tally.rejected / windows:.1%}",
        "stat_min": _g(stats.min()),
        "stat_p1": _g(np.quantile(stats, 0.01)),
        "stat_median": _g(np.median(stats)),
        "stat_p99": _g(np.quantile(stats, 0.99)),
        "stat_max": _g(stats.max()),
    }


def _g(value: float) -> str:
    # Honest statistics are tiny: three significant digits, not three decimals.
    return f"{value:.3g}"


def _render_rows(all_renders: list[Renders]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for renders in all_renders:
        diff = np.abs(renders.sse.astype(np.float64) - renders.avx2)
        rows.append(
            {
                "setting": renders.setting.label,
                "size": f"{renders.avx2.shape[1]}x{renders.avx2.shape[0]}",
                "avx2_twice_identical": bool(np.array_equal(renders.avx2, renders.avx2_again)),
                "sse_values_differ": f"{np.count_nonzero(diff) / diff.size:.1%}",
                "sse_pixels_over_1e-3": int(np.count_nonzero(diff.max(axis=-1) > 1e-3)),
                "sse_max_abs_diff": f"{diff.max():.3g}",
                "sse_mean_abs_diff": f"{diff.mean():.3g}",
            }
        )
    return rows


def _key(name: str) -> str:
    """A JSON key for a row name: "3/4 samples" -> "3_of_4_samples"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("/", " of ")).strip("_")


def summarise(tallies: list[Tally], name: str) -> dict[str, Any]:
    """The figures the verification docs and the catch-probability benchmark read."""
    honest = [t for t in tallies if t.kind.role == "honest"]
    honest_tol = np.concatenate([t.statistics for t in honest if not t.exact])
    cheats_tol = np.concatenate(
        [t.statistics for t in tallies if t.kind.role == "cheat" and not t.exact]
    )
    caught = [t for t in tallies if t.kind.role in ("cheat", "milder")]
    return {
        "benchmark": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "threshold": compare.THRESHOLD,
        "noise_clip": compare.NOISE_CLIP,
        "honest": {
            "comparisons": sum(len(t.statistics) for t in honest),
            "false_rejections": sum(t.rejected for t in honest),
            "tolerance_statistic_max": float(honest_tol.max()),
            "tolerance_statistic_p99": float(np.quantile(honest_tol, 0.99)),
        },
        "cheats": {
            "tolerance_statistic_min": float(cheats_tol.min()),
            "tolerance_statistic_p1": float(np.quantile(cheats_tol, 0.01)),
        },
        "margin": float(cheats_tol.min() / honest_tol.max()),
        # Per window: the chance that one duplicate sample of a cheating tile catches it.
        "detection_rate": {
            _key(t.kind.name): t.rejected / len(t.statistics) for t in caught if not t.exact
        },
        "detection_rate_exact": {
            _key(t.kind.name): t.rejected / len(t.statistics) for t in caught if t.exact
        },
        # Share of windows whose pixels the cheat changed at all (detection is only
        # possible there).
        "tampered_share": {
            _key(t.kind.name): t.tampered / len(t.statistics) for t in caught if not t.exact
        },
        "windows": {
            _key(t.kind.name) + ("_exact" if t.exact else ""): len(t.statistics) for t in tallies
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one setting, 250 windows a kind")
    parser.add_argument("--seed", type=int, default=0, help="window sampling seed")
    args = parser.parse_args()
    settings = [Setting(3, 0, 16)]
    if not args.quick:
        settings += [Setting(5, 1, 16), Setting(7, 2, 16), Setting(3, 0, 64)]
    count = 250 if args.quick else 1200
    build = default_build()
    scene = ensure_demo_scene(build)
    started = time.perf_counter()
    if not args.quick:
        settings.append(ADAPTIVE)
    with tempfile.TemporaryDirectory() as scratch:
        rendered_all = render_all(build, scene, settings, Path(scratch))
    all_renders = [r for r in rendered_all if r.setting != ADAPTIVE]
    adaptive = [r for r in rendered_all if r.setting == ADAPTIVE]
    rendered = time.perf_counter()
    rng = random.Random(args.seed)
    tallies = measure(all_renders, kinds(), count, rng)
    if adaptive:
        tallies += measure(adaptive, adaptive_kinds(), count // 4, rng)
    compared = time.perf_counter()

    suffix = "_quick" if args.quick else ""
    report(f"verify_compare_renders{suffix}", _render_rows(rendered_all), RENDER_COLUMNS)
    report(f"verify_compare{suffix}", [_row(t) for t in tallies], COLUMNS)
    summary = summarise(tallies, f"verify_compare_detection{suffix}")
    path = RESULTS_DIR / f"{summary['benchmark']}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    honest, cheats = summary["honest"], summary["cheats"]
    print(
        f"THRESHOLD {compare.THRESHOLD:g}, NOISE_CLIP {compare.NOISE_CLIP:g}: "
        f"{honest['false_rejections']} false rejections in {honest['comparisons']} honest "
        f"comparisons; tolerance statistic, honest max {honest['tolerance_statistic_max']:.3g}"
        f" (p99 {honest['tolerance_statistic_p99']:.3g}), required cheats min "
        f"{cheats['tolerance_statistic_min']:.3g} (p1 {cheats['tolerance_statistic_p1']:.3g}),"
        f" margin {summary['margin']:.1f}x"
    )
    comparisons = sum(len(t.statistics) for t in tallies)
    print(
        f"rendering {rendered - started:.1f} s, {comparisons} comparisons "
        f"{compared - rendered:.1f} s; detection summary: {path}"
    )


RENDER_COLUMNS = [
    "setting",
    "size",
    "avx2_twice_identical",
    "sse_values_differ",
    "sse_pixels_over_1e-3",
    "sse_max_abs_diff",
    "sse_mean_abs_diff",
]
COLUMNS = [
    "comparison",
    "role",
    "mode",
    "windows",
    "differs",
    "tampered",
    "rejected",
    "rate",
    "stat_min",
    "stat_p1",
    "stat_median",
    "stat_p99",
    "stat_max",
]


if __name__ == "__main__":
    main()

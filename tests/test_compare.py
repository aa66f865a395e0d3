"""The duplicate-sampling pixel comparison (renderers/compare.py) on real renders.

One small frame of the demo scene (160x90, 16 samples) is rendered once per module on the
default CPU kernel (AVX2), on the SSE4.2 kernel (CYCLES_CPU_NO_AVX2=1, an honest render
that differs in rare paths), and with fewer samples than asked (the cheats). Windows are
drawn at random with the sizes the coordinator uses (8..20 px).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from renderers.builds import BlenderBuild
from renderers.compare import THRESHOLD, compare_windows, noise_scale
from renderers.exr import read_exr
from renderers.worker import RenderRequest, RenderWorker

Frame = npt.NDArray[np.float32]
Window = tuple[slice, slice]
WINDOWS = 200


@dataclass(frozen=True)
class Renders:
    reference: Frame
    again: Frame
    other_kernel: Frame
    samples: dict[int, Frame]


def _render(worker: RenderWorker, scene: Path, out: Path, samples: int) -> Frame:
    request = RenderRequest(
        scene=scene, frame=3, output=out, samples=samples, percentage=25, seed=0
    )
    worker.render(request)
    return read_exr(out).combined_rgba()


@pytest.fixture(scope="module")
def renders(
    bpy_build: BlenderBuild,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path_factory: pytest.TempPathFactory,
) -> Renders:
    out = tmp_path_factory.mktemp("compare")
    samples = {n: _render(worker, demo_scene, out / f"s{n}.exr", n) for n in (16, 12, 8, 4)}
    again = _render(worker, demo_scene, out / "again.exr", 16)
    sse_env = {"CYCLES_CPU_NO_AVX2": "1"}
    with RenderWorker(bpy_build, scratch_dir=out / "sse", extra_env=sse_env) as sse:
        other_kernel = _render(sse, demo_scene, out / "sse.exr", 16)
    return Renders(samples[16], again, other_kernel, samples)


def _windows(shape: tuple[int, ...], count: int, seed: int) -> Iterator[Window]:
    rng = np.random.default_rng(seed)
    height, width = shape[0], shape[1]
    for _ in range(count):
        w, h = int(rng.integers(8, 21)), int(rng.integers(8, 21))
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        yield slice(y0, y0 + h), slice(x0, x0 + w)


def _another_window(window: Window, shape: tuple[int, ...], seed: int) -> Window:
    """A window of the same size elsewhere in the frame (the copied-tile cheat)."""
    rows, cols = window
    h, w = rows.stop - rows.start, cols.stop - cols.start
    rng = np.random.default_rng(seed)
    while True:
        y0 = int(rng.integers(0, shape[0] - h + 1))
        x0 = int(rng.integers(0, shape[1] - w + 1))
        if (y0, x0) != (rows.start, cols.start):
            return slice(y0, y0 + h), slice(x0, x0 + w)


# --- synthetic arrays -------------------------------------------------------------------


def _noisy_image(sigma: float, seed: int = 0, size: int = 16) -> Frame:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.2, 0.8, size)[None, :, None] * np.ones((size, size, 3))
    rgb = ramp + rng.normal(0.0, sigma, (size, size, 3))
    alpha = np.ones((size, size, 1))
    image: Frame = np.concatenate([rgb, alpha], axis=-1).astype(np.float32)
    return image


def test_synthetic_noise_scale_and_verdicts() -> None:
    image = _noisy_image(0.05)
    scale = noise_scale(image)
    assert np.all(np.abs(scale[:3] - 0.05) < 0.01), scale
    assert scale[3] == 0.0

    same = compare_windows(image, image.copy(), exact=True)
    assert (same.agree, same.statistic, same.mode) == (True, 0.0, "exact")

    signed_zero = image.copy()
    signed_zero[0, 0, 0] = 0.0
    flipped = signed_zero.copy()
    flipped[0, 0, 0] = -0.0
    assert not compare_windows(signed_zero, flipped, exact=True).agree

    rounding = image * np.float32(1 + 1e-6)
    assert compare_windows(image, rounding, exact=False).agree
    one_outlier = image.copy()
    one_outlier[5, 5, :3] += 0.5
    verdict = compare_windows(image, one_outlier, exact=False)
    assert verdict.agree, verdict.detail
    resampled = _noisy_image(0.05, seed=1)
    verdict = compare_windows(image, resampled, exact=False)
    assert not verdict.agree and verdict.statistic > THRESHOLD, verdict.detail
    assert "normalised error" in verdict.detail


def test_bad_input_disagrees_with_a_reason() -> None:
    image = _noisy_image(0.05)
    for exact in (True, False):
        verdict = compare_windows(image, image[:, :-1], exact=exact)
        assert not verdict.agree and "shape mismatch" in verdict.detail
        broken = image.copy()
        broken[3, 4, 1] = np.nan
        verdict = compare_windows(image, broken, exact=exact)
        assert not verdict.agree
        assert "candidate has 1 non-finite" in verdict.detail
        verdict = compare_windows(broken, broken, exact=exact)
        assert not verdict.agree and "reference" in verdict.detail
        infinite = image.copy()
        infinite[0, 0, 0] = np.inf
        assert "non-finite" in compare_windows(image, infinite, exact=exact).detail
        assert "empty" in compare_windows(image[:0], image[:0], exact=exact).detail
    with pytest.raises(ValueError, match="image"):
        compare_windows(image[..., 0], image[..., 0], exact=False)


# --- real renders -----------------------------------------------------------------------


def test_same_kernel_renders_agree_exactly(renders: Renders) -> None:
    assert compare_windows(renders.reference, renders.again, exact=True).agree
    for window in _windows(renders.reference.shape, WINDOWS, seed=1):
        verdict = compare_windows(renders.reference[window], renders.again[window], exact=True)
        assert verdict.agree and verdict.statistic == 0.0, verdict.detail


def test_cross_kernel_renders_agree_within_tolerance(renders: Renders) -> None:
    worst = 0.0
    for window in _windows(renders.reference.shape, WINDOWS, seed=2):
        for reference, candidate in (
            (renders.reference[window], renders.other_kernel[window]),
            (renders.other_kernel[window], renders.reference[window]),
        ):
            verdict = compare_windows(reference, candidate, exact=False)
            assert verdict.agree, verdict.detail
            worst = max(worst, verdict.statistic)
    # Honest differences sit far below the threshold, not just under it.
    assert worst < THRESHOLD / 2


def test_cross_kernel_renders_differ_exactly(renders: Renders) -> None:
    if np.array_equal(renders.reference, renders.other_kernel):
        pytest.skip("this CPU ran the same kernel with CYCLES_CPU_NO_AVX2=1")
    verdict = compare_windows(renders.reference, renders.other_kernel, exact=True)
    assert not verdict.agree and "values differ" in verdict.detail


Cheat = Callable[[Renders, Window, int], Frame]


def _fewer_samples(samples: int) -> Cheat:
    return lambda renders, window, _seed: renders.samples[samples][window]


def _copied_window(renders: Renders, window: Window, seed: int) -> Frame:
    return renders.reference[_another_window(window, renders.reference.shape, seed)]


def _uniform_noise(renders: Renders, window: Window, seed: int) -> Frame:
    high = float(renders.reference.max())
    shape = renders.reference[window].shape
    return np.random.default_rng(seed).uniform(0.0, high, shape).astype(np.float32)


def _black(renders: Renders, window: Window, _seed: int) -> Frame:
    black = np.zeros_like(renders.reference[window])
    black[..., 3] = 1.0
    return black


CHEATS: dict[str, Cheat] = {
    "half samples": _fewer_samples(8),
    "quarter samples": _fewer_samples(4),
    "another window": _copied_window,
    "uniform noise": _uniform_noise,
    "black": _black,
}


@pytest.mark.parametrize("exact", [False, True], ids=["tolerance", "exact"])
@pytest.mark.parametrize("cheat", sorted(CHEATS))
def test_cheats_disagree(renders: Renders, cheat: str, exact: bool) -> None:
    for index, window in enumerate(_windows(renders.reference.shape, WINDOWS, seed=3)):
        candidate = CHEATS[cheat](renders, window, index)
        verdict = compare_windows(renders.reference[window], candidate, exact=exact)
        assert not verdict.agree, f"{cheat} passed: {verdict.detail}"


def test_threshold_is_not_loose(renders: Renders) -> None:
    """A milder cheat (12 of 16 samples) is caught too, and half the samples is caught with
    room to spare: its statistic exceeds twice the threshold on at least 99% of windows."""
    windows = list(_windows(renders.reference.shape, WINDOWS, seed=4))
    for samples, bar in ((8, 2 * THRESHOLD), (12, THRESHOLD)):
        above = sum(
            compare_windows(
                renders.reference[window], renders.samples[samples][window], exact=False
            ).statistic
            > bar
            for window in windows
        )
        assert above / WINDOWS >= 0.99, f"{samples}/16 samples: {above} of {WINDOWS} above {bar}"

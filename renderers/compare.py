"""Compare two renders of the same small window: the pixel check behind duplicate sampling.

The coordinator has a second provider re-render a small random window of a tile and asks
`compare_windows` whether that render (the reference) and the crop of the original tile
(the candidate) are the same picture. Two modes:

- exact: the same device class and Blender build render bit-identical pixels, so the
  window must match bit for bit;
- tolerance: other kernels or devices trace a few paths differently, so the window may
  differ, but only by a small fraction of its own Monte Carlo noise. The noise scale is
  estimated from the reference window itself, and the calibrated constants below come
  from `benchmarks/bench_verify_compare.py` (record: docs/verification-calibration.md).

Pure numpy on arrays already in memory: no Blender, no files, no network, no policy (who
gets checked and what a disagreement costs live in `coordinator/verify/policy.py`). Bad
pixel data (other shapes, NaN or Inf) is a disagreement with a reason, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

#: Largest normalised error (mean over a channel of |candidate - reference| / noise
#: scale, each value capped at NOISE_CLIP, worst channel) still accepted as the same
#: render. Calibrated by benchmarks/bench_verify_compare.py, recorded in
#: docs/verification-calibration.md: honest AVX2-vs-SSE4.2 windows max 0.028 (p99 0.006),
#: half-sample renders min 0.12 (p1 0.37).
THRESHOLD = 0.1
#: Cap on one value's normalised difference, so that a rare path traced differently by
#: another kernel (the honest kind of difference) cannot reject a window on its own.
NOISE_CLIP = 3.0
#: Added to the noise scale of every channel: relative to the channel's mean level and
#: absolute, so noise-free windows (flat colour, converged pixels) still tolerate the
#: rounding differences of another kernel (about 1e-7 relative, measured).
RELATIVE_FLOOR = 1e-3
ABSOLUTE_FLOOR = 1e-5
#: A difference this small relative to the signal (mean |diff| / mean |reference|) is no
#: difference at all, whatever the noise estimate says.
NEGLIGIBLE_RELATIVE = 1e-4

# MAD of a standard normal variable is 0.6745 sigma.
_MAD_TO_SIGMA = 1.4826
_IMAGE_NDIM = 3

#: Any array: bad pixel data is reported, not refused by the type.
Image = npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class WindowComparison:
    """The verdict on one window and the numbers behind it."""

    agree: bool
    mode: Literal["exact", "tolerance"]
    #: 0.0 when identical; exact mode: the share of values that differ; tolerance mode:
    #: the normalised error (see THRESHOLD).
    statistic: float
    #: What the statistic was compared with (0.0 in exact mode).
    threshold: float
    #: One readable sentence, e.g. "37% of values differ; normalised error 4.1 > 0.1".
    detail: str


def compare_windows(reference: Image, candidate: Image, *, exact: bool) -> WindowComparison:
    """Do `candidate` and `reference` show the same render of one window?

    Both are (H, W, C) linear float pixels, normally float32 RGBA; `reference` is the
    verifier's render (its noise sets the tolerance), `candidate` the crop of the tile
    under test. Raises ValueError only when an array is not an image (ndim != 3).
    """
    mode: Literal["exact", "tolerance"] = "exact" if exact else "tolerance"
    for name, array in (("reference", reference), ("candidate", candidate)):
        if np.ndim(array) != _IMAGE_NDIM:
            raise ValueError(f"{name} must be an (H, W, C) image, got shape {np.shape(array)}")
    problem = _unusable(reference, candidate)
    if problem is not None:
        return WindowComparison(False, mode, float("inf"), 0.0 if exact else THRESHOLD, problem)
    if exact:
        return _compare_exact(reference, candidate)
    return _compare_tolerance(reference, candidate)


def noise_scale(window: Image) -> npt.NDArray[np.float64]:
    """Per-channel Monte Carlo noise scale of one window, shape (C,).

    High-pass residual (each pixel minus the mean of its 4 neighbours) removes smooth
    shading; the median absolute deviation of that residual ignores edges and fireflies,
    which are few. For independent pixel noise of standard deviation s the residual has
    standard deviation s * sqrt(1 + 1/k) with k neighbours, which is divided out.
    """
    pixels = np.asarray(window, dtype=np.float64)
    neighbours: list[npt.NDArray[np.float64]] = []
    for axis in (0, 1):
        if pixels.shape[axis] < 2:
            continue
        pad = [(0, 0)] * pixels.ndim
        pad[axis] = (1, 1)
        padded = np.pad(pixels, pad, mode="reflect")
        size = pixels.shape[axis]
        neighbours.append(np.take(padded, np.arange(0, size), axis=axis))
        neighbours.append(np.take(padded, np.arange(2, size + 2), axis=axis))
    if not neighbours:
        return np.zeros(pixels.shape[-1])
    residual = pixels - np.mean(neighbours, axis=0)
    deviation = np.abs(residual - np.median(residual, axis=(0, 1)))
    mad: npt.NDArray[np.float64] = np.median(deviation, axis=(0, 1))
    scale: npt.NDArray[np.float64] = mad * (_MAD_TO_SIGMA / np.sqrt(1.0 + 1.0 / len(neighbours)))
    return scale


def normalised_error(reference: Image, candidate: Image) -> float:
    """The tolerance-mode statistic: how far `candidate` is from `reference` in units of
    the reference's own noise (worst channel; each value capped at NOISE_CLIP)."""
    ref = np.asarray(reference, dtype=np.float64)
    diff = np.abs(np.asarray(candidate, dtype=np.float64) - ref)
    level = np.mean(np.abs(ref), axis=(0, 1))
    scale = noise_scale(ref) + RELATIVE_FLOOR * level + ABSOLUTE_FLOOR
    per_channel = np.mean(np.minimum(diff / scale, NOISE_CLIP), axis=(0, 1))
    return float(np.max(per_channel))


def _unusable(reference: Image, candidate: Image) -> str | None:
    """Why these arrays cannot be compared at all, or None."""
    if reference.shape != candidate.shape:
        return (
            f"shape mismatch: candidate is {_shape(candidate)},"
            f" the reference window is {_shape(reference)}"
        )
    if reference.size == 0:
        return f"empty window ({_shape(reference)})"
    for name, array in (("reference", reference), ("candidate", candidate)):
        if not np.issubdtype(array.dtype, np.floating):
            return f"{name} pixels are {array.dtype}, not floating point"
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            return f"{name} has {bad} non-finite values (NaN or Inf) of {array.size}"
    return None


def _compare_exact(reference: Image, candidate: Image) -> WindowComparison:
    # Compare bit patterns: float == would call -0.0 and +0.0 equal.
    ref = np.ascontiguousarray(reference, dtype=np.float32)
    cand = np.ascontiguousarray(candidate, dtype=np.float32)
    if np.array_equal(ref.view(np.uint32), cand.view(np.uint32)):
        return WindowComparison(True, "exact", 0.0, 0.0, f"bit-identical ({ref.size} values)")
    share = _share_differing(ref, cand)
    largest = float(np.max(np.abs(cand.astype(np.float64) - ref)))
    detail = (
        f"{_percent(share)} of values differ (max abs diff {largest:.3g});"
        " an exact comparison needs bit-identical pixels"
    )
    return WindowComparison(False, "exact", share, 0.0, detail)


def _compare_tolerance(reference: Image, candidate: Image) -> WindowComparison:
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    statistic = normalised_error(ref, cand)
    share = _percent(_share_differing(ref, cand))
    mean_diff = float(np.mean(np.abs(cand - ref)))
    signal = float(np.mean(np.abs(ref)))
    if mean_diff <= NEGLIGIBLE_RELATIVE * signal:
        detail = (
            f"{share} of values differ; mean abs diff {mean_diff:.3g} is negligible"
            f" (<= {NEGLIGIBLE_RELATIVE:g} of the mean level {signal:.3g})"
        )
        return WindowComparison(True, "tolerance", statistic, THRESHOLD, detail)
    agree = statistic <= THRESHOLD
    sign = "<=" if agree else ">"
    detail = f"{share} of values differ; normalised error {statistic:.3g} {sign} {THRESHOLD:g}"
    return WindowComparison(agree, "tolerance", statistic, THRESHOLD, detail)


def _share_differing(reference: Image, candidate: Image) -> float:
    return float(np.count_nonzero(reference != candidate)) / reference.size


def _percent(share: float) -> str:
    if 0.0 < share < 0.001:
        return "<0.1%"
    return f"{share:.1%}"


def _shape(array: Image) -> str:
    return "x".join(str(side) for side in array.shape)

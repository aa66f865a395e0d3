"""A scene's peak render memory, measured at submit time (part of the scene probe).

Cycles reports the memory it uses while it renders ("Mem: 20M" in its render stats);
the worker keeps the largest value of each render (`RenderResult.peak_memory`). A
render's memory is the scene's own (geometry, BVH, textures: the same at any size) plus
buffers that grow with the pixels rendered (the passes, the denoiser's). So the probe
renders the scene twice at one sample, small (`SMALL_PIXELS`) and larger (a quarter of
the frame, at most `LARGE_PIXELS`), and fits `base + per_pixel x pixels` through the two
peaks; `MemoryModel.peak(pixels)` is the estimate for a frame of that many pixels.

Limits, stated plainly: Cycles reports whole megabytes, so the per-pixel part of a
small scene is coarse; the renders are on the submitter's CPU (a GPU holds about the same
scene data, plus its own kernels and working memory, which are not counted); the frame is
the one the probe renders (geometry that changes over the animation is not seen). The
estimate is what a whole frame needs: a tile needs less, never more. This module only
drives renders through the callable it is given: no bpy, no network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LARGE_PIXELS", "SMALL_PIXELS", "MemoryModel", "measure_memory"]

#: The small memory render's pixels (about a 64 x 36 frame).
SMALL_PIXELS = 2304
#: The larger memory render's pixels at most (a quarter of the frame below that).
LARGE_PIXELS = 262_144

#: Renders the probed scene at a resolution percentage, one sample, and returns the
#: (pixels rendered, peak memory in bytes) of that render.
RenderAt = Callable[[int], tuple[int, int]]


@dataclass(frozen=True, slots=True)
class MemoryModel:
    """Peak render memory as `base + per_pixel x pixels`, in bytes (0, 0: not measured)."""

    base: int = 0
    per_pixel: float = 0.0

    @property
    def measured(self) -> bool:
        return self.base > 0 or self.per_pixel > 0

    def peak(self, pixels: int) -> int:
        """The estimated peak memory of rendering `pixels` pixels, in bytes."""
        return self.base + math.ceil(self.per_pixel * max(0, pixels))


def measure_memory(render_at: RenderAt, resolution_x: int, resolution_y: int) -> MemoryModel:
    """Fit the memory model of a scene of `resolution_x` x `resolution_y` (at 100 %)
    from two renders through `render_at` (see the module docstring)."""
    full = resolution_x * resolution_y
    small_pixels, small_peak = render_at(_percentage(resolution_x, resolution_y, SMALL_PIXELS))
    large_target = max(SMALL_PIXELS * 4, min(LARGE_PIXELS, full // 4))
    large_pixels, large_peak = render_at(_percentage(resolution_x, resolution_y, large_target))
    if large_pixels <= small_pixels:
        return MemoryModel(base=max(small_peak, large_peak))
    per_pixel = max(0.0, (large_peak - small_peak) / (large_pixels - small_pixels))
    base = max(0, round(large_peak - per_pixel * large_pixels))
    return MemoryModel(base=base, per_pixel=per_pixel)


def _percentage(resolution_x: int, resolution_y: int, pixels: int) -> int:
    """The resolution percentage (1..100) whose frame has about `pixels` pixels."""
    exact = 100 * math.sqrt(pixels / (resolution_x * resolution_y))
    return max(1, min(100, round(exact)))

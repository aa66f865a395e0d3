"""Tile maths: split a frame into a grid of pixel-exact regions and express them as
Blender border fractions.

Everything here is pure integer (and float32) arithmetic on sizes and rectangles.
Rectangles are half-open and use the EXR convention: origin at the TOP-LEFT of the
frame, row 0 is the top row. Only `border_fractions` speaks Blender's bottom-origin
border language.

This module must not touch files, Blender, OpenEXR or the network; it is imported by
the coordinator, the node and the app alike.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from common.errors import RegionError, UsageError

#: Cycles runs its adaptive-sampling convergence check and filter every 16 samples
#: (`Integrator::get_adaptive_sampling`: `adaptive_step = 16`), never before its minimum
#: sample count, which is at least 4 (`max(4, ...)`). See docs/tile-overhead.md.
ADAPTIVE_STEP: int = 16
MIN_ADAPTIVE_MIN_SAMPLES: int = 4
#: A margin for tests of merge and crop arithmetic (a few pixels, as tiles have);
#: real plans take theirs from `render_margin`.
ADAPTIVE_SAMPLING_MARGIN: int = 4


@dataclass(frozen=True, slots=True)
class PixelRect:
    """A half-open pixel rectangle [x0, x1) x [y0, y1), origin at the top-left."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return self.width * self.height

    def translated(self, dx: int, dy: int) -> PixelRect:
        """The same rectangle moved by (dx, dy) pixels."""
        return PixelRect(self.x0 + dx, self.y0 + dy, self.x1 + dx, self.y1 + dy)

    def contains(self, other: PixelRect) -> bool:
        """Whether `other` lies entirely inside this rectangle."""
        return (
            self.x0 <= other.x0
            and self.y0 <= other.y0
            and other.x1 <= self.x1
            and other.y1 <= self.y1
        )

    def to_list(self) -> list[int]:
        """[x0, y0, x1, y1], for JSON."""
        return [self.x0, self.y0, self.x1, self.y1]

    @classmethod
    def from_list(cls, values: list[int] | tuple[int, ...]) -> PixelRect:
        """The inverse of `to_list`; RegionError unless given four integers."""
        if len(values) != 4 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values
        ):
            raise RegionError(
                f"A pixel rectangle needs four integers [x0, y0, x1, y1], got {values!r}."
            )
        x0, y0, x1, y1 = values
        return cls(x0, y0, x1, y1)


@dataclass(frozen=True, slots=True)
class Tile:
    """One tile of a plan: the pixels it owns and the (larger) pixels it renders."""

    index: int
    column: int
    row: int
    #: The pixels this tile owns in the final frame.
    core: PixelRect
    #: The pixels actually rendered: the core grown by the margin, clamped to the frame.
    render: PixelRect

    @property
    def crop(self) -> PixelRect:
        """The core in the render rectangle's own coordinates (to crop the rendered tile)."""
        return self.core.translated(-self.render.x0, -self.render.y0)


@dataclass(frozen=True, slots=True)
class BorderFractions:
    """Blender's `render.border_min_x` ... `border_max_y` (y counted from the bottom)."""

    min_x: float
    max_x: float
    min_y: float
    max_y: float


@dataclass(frozen=True, slots=True)
class RegionPlan:
    """A frame of `width` x `height` pixels split into tiles (row-major from the top-left)."""

    width: int
    height: int
    margin: int
    tiles: tuple[Tile, ...]

    @property
    def columns(self) -> int:
        return 1 + max(tile.column for tile in self.tiles)

    @property
    def rows(self) -> int:
        return 1 + max(tile.row for tile in self.tiles)

    @property
    def is_whole_frame(self) -> bool:
        """True when one tile covers the whole frame (no border needed)."""
        return len(self.tiles) == 1

    @property
    def frame(self) -> PixelRect:
        """The whole frame as a rectangle."""
        return PixelRect(0, 0, self.width, self.height)


def effective_resolution(resolution_x: int, resolution_y: int, percentage: int) -> tuple[int, int]:
    """The pixel size Blender renders: `(resolution * percentage) // 100`, at least 1."""
    if resolution_x < 1 or resolution_y < 1 or percentage < 1:
        raise RegionError(
            f"Resolution {resolution_x}x{resolution_y} at {percentage}% is not a frame size.",
            hint="Resolution and percentage must be positive (Output Properties > Format).",
        )
    return (
        max(1, resolution_x * percentage // 100),
        max(1, resolution_y * percentage // 100),
    )


def plan_grid(width: int, height: int, columns: int, rows: int, margin: int = 0) -> RegionPlan:
    """Split a frame into `columns` x `rows` tiles whose boundaries are at i*W//C.

    Tiles are numbered row-major from the top-left. Each tile renders its core grown by
    `margin` pixels on every side, clamped to the frame.
    """
    _check_frame_size(width, height)
    if columns < 1 or rows < 1:
        raise RegionError(
            f"A grid of {columns}x{rows} tiles is empty.",
            hint="Use at least one column and one row (e.g. 1x1 for the whole frame).",
        )
    if columns > width or rows > height:
        raise RegionError(
            f"A grid of {columns}x{rows} tiles does not fit a {width}x{height} frame: "
            "every tile needs at least one pixel.",
            hint=f"Use at most {width} columns and {height} rows.",
        )
    if margin < 0:
        raise RegionError(
            f"A tile margin of {margin} pixels is negative.",
            hint="Use 0, or the margin render_margin() derives when adaptive sampling is on.",
        )
    x_edges = [column * width // columns for column in range(columns + 1)]
    y_edges = [row * height // rows for row in range(rows + 1)]
    tiles: list[Tile] = []
    for row in range(rows):
        for column in range(columns):
            core = PixelRect(x_edges[column], y_edges[row], x_edges[column + 1], y_edges[row + 1])
            render = PixelRect(
                max(0, core.x0 - margin),
                max(0, core.y0 - margin),
                min(width, core.x1 + margin),
                min(height, core.y1 + margin),
            )
            tiles.append(Tile(len(tiles), column, row, core, render))
    return RegionPlan(width, height, margin, tuple(tiles))


def plan_frame(
    width: int,
    height: int,
    columns: int,
    rows: int,
    *,
    adaptive_sampling: bool,
    samples: int,
    adaptive_threshold: float | None = None,
    adaptive_min_samples: int | None = None,
) -> RegionPlan:
    """The plan of a frame to render in tiles: the grid, with the margin that keeps tiles
    exact when adaptive sampling is on (its convergence mask crosses tile edges). The one
    rule the farm and local renders share; see `render_margin`."""
    margin = render_margin(
        adaptive_sampling,
        samples=samples,
        adaptive_threshold=adaptive_threshold,
        adaptive_min_samples=adaptive_min_samples,
    )
    return plan_grid(width, height, columns, rows, margin=margin)


def render_margin(
    adaptive_sampling: bool,
    *,
    samples: int,
    adaptive_threshold: float | None = None,
    adaptive_min_samples: int | None = None,
) -> int:
    """Pixels a region is rendered beyond its core so that its core is exact: 0 without
    adaptive sampling, else one pixel per adaptive filter pass that still changes which
    pixels are sampled (`adaptive_filter_passes`).

    Why that is enough (Cycles `kernel/film/adaptive_sampling.h`): a pixel's own samples
    depend on nothing outside it (the pixel filter is importance-sampled per pixel); only
    the convergence mask crosses pixels, and each pass widens it by exactly one pixel
    (`film_adaptive_sampling_filter_x`/`_y`: a 3x3 box, clipped at the region's edge). A
    region's edge can therefore change the samples of pixels at most one pixel further
    in per pass, and a pixel `n` passes in from the edge is exact.
    """
    if not adaptive_sampling:
        return 0
    return adaptive_filter_passes(samples, adaptive_threshold, adaptive_min_samples)


def adaptive_filter_passes(
    samples: int, threshold: float | None = None, min_samples: int | None = None
) -> int:
    """How many of Cycles' adaptive filter passes are followed by more samples (the last
    pass changes nothing that is written), for a render of `samples` samples.

    `threshold` and `min_samples` are the scene's `cycles.adaptive_threshold` and
    `cycles.adaptive_min_samples` (0 means automatic in both, as in Blender); None means
    unknown, and then the count assumes the earliest passes Cycles can make (minimum
    samples 4), which is never fewer passes than the real ones.
    Cycles filters after the 0-based sample `s` when `s > min_samples` and
    `s % 16 == 15` (`AdaptiveSampling::need_filter`).
    """
    if samples < 1:
        raise RegionError(f"A render of {samples} samples is empty.", hint="Use 1 or more.")
    minimum = _min_samples(samples, threshold, min_samples)
    first = (minimum + 1) | (ADAPTIVE_STEP - 1)  # the 0-based sample of the first pass
    last = samples - 2  # the last 0-based sample a pass can follow with samples to come
    return 0 if last < first else (last - first) // ADAPTIVE_STEP + 1


def _min_samples(samples: int, threshold: float | None, min_samples: int | None) -> int:
    """Cycles' adaptive minimum samples (`Integrator::get_adaptive_sampling`), or the
    smallest it can be when the settings are unknown."""
    if threshold is None or min_samples is None:
        return MIN_ADAPTIVE_MIN_SAMPLES
    if min_samples > 0:
        return max(MIN_ADAPTIVE_MIN_SAMPLES, min_samples)
    threshold = float(np.float32(threshold))  # Blender stores it as a float32
    if threshold == 0.0:
        threshold = max(0.001, 1.0 / samples)  # Cycles' automatic threshold
    # ceilf(16 / powf(threshold, 0.3)) in float32; one below when float32 and float64 could
    # round to different sides of a whole number (fewer minimum samples: more passes).
    exact: float = 16.0 / math.pow(threshold, 0.3)
    automatic = math.ceil(exact)
    if automatic - exact < 1e-4 or math.ceil(exact - 1e-4) != automatic:
        automatic -= 1
    return max(MIN_ADAPTIVE_MIN_SAMPLES, automatic)


def overhead_estimate(plan: RegionPlan) -> float:
    """The share of extra pixels a plan renders beyond the frame (0.0 for none): the
    margins' cost as pixel arithmetic. An estimate of time: per-tile fixed costs (about
    15-25 ms of scene sync per tile, docs/tile-overhead.md) come on top."""
    rendered = sum(tile.render.area for tile in plan.tiles)
    return rendered / (plan.width * plan.height) - 1.0


def plan_tile_size(
    width: int, height: int, tile_width: int, tile_height: int, margin: int = 0
) -> RegionPlan:
    """The smallest even grid whose tiles (cores) are at most `tile_width` x `tile_height`."""
    _check_frame_size(width, height)
    if tile_width < 1 or tile_height < 1:
        raise RegionError(
            f"A tile size of {tile_width}x{tile_height} pixels is empty.",
            hint="Use a tile size of at least 1x1 pixels.",
        )
    return plan_grid(
        width, height, math.ceil(width / tile_width), math.ceil(height / tile_height), margin
    )


_GRID_PATTERN = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


def parse_grid(text: str) -> tuple[int, int]:
    """Parse "CxR" (e.g. "3x3", "4X2", " 2 x 2 ") into (columns, rows)."""
    match = _GRID_PATTERN.fullmatch(text)
    if match is None:
        raise UsageError(
            f"{text!r} is not a tile grid.",
            hint='Write the grid as "CxR", columns by rows, e.g. "4x2".',
        )
    columns, rows = int(match.group(1)), int(match.group(2))
    if columns < 1 or rows < 1:
        raise UsageError(
            f"{text!r} is not a tile grid: it has no tiles.",
            hint='Write the grid as "CxR" with at least one column and row, e.g. "1x1".',
        )
    return columns, rows


def border_fractions(rect: PixelRect, width: int, height: int) -> BorderFractions:
    """The Blender border that renders exactly `rect` of a `width` x `height` frame.

    Blender renders [int(f32(min) * W), int(f32(max) * W)) per axis, truncating, so a
    naive px / W can land one pixel low; the middle of the pixel, (px + 0.5) / W, never
    does. Frame edges are exactly 0.0 and 1.0. The y axis is flipped: Blender counts
    border rows from the bottom, so top-origin rows [y0, y1) are [H - y1, H - y0).
    `width` and `height` are the effective resolution (percentage applied).
    """
    _check_frame_size(width, height)
    if not (0 <= rect.x0 < rect.x1 <= width and 0 <= rect.y0 < rect.y1 <= height):
        raise RegionError(
            f"Region {rect.to_list()} is empty or outside the {width}x{height} frame.",
            hint="Regions are [x0, y0, x1, y1] with 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height.",
        )
    return BorderFractions(
        min_x=_edge_fraction(rect.x0, width),
        max_x=_edge_fraction(rect.x1, width),
        min_y=_edge_fraction(height - rect.y1, height),
        max_y=_edge_fraction(height - rect.y0, height),
    )


def blender_pixel_span(fmin: float, fmax: float, size: int) -> tuple[int, int]:
    """The half-open pixel span [start, end) Blender renders for a border [fmin, fmax].

    Reproduces Blender's arithmetic: the border is stored as float32 and multiplied by
    the integer size in float32, then truncated.
    """
    size32 = np.float32(size)
    return int(np.float32(fmin) * size32), int(np.float32(fmax) * size32)


def _edge_fraction(pixel: int, size: int) -> float:
    if pixel <= 0:
        return 0.0
    if pixel >= size:
        return 1.0
    return (pixel + 0.5) / size


def _check_frame_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise RegionError(
            f"A frame of {width}x{height} pixels is empty.",
            hint="Width and height must be at least 1 pixel.",
        )

"""`--tiles auto`: choose a frame's tile grid from its size, the farm's node count and the
job's frame count, with tiles no smaller than a measured efficient size and the margin's
pixels counted against an overhead budget; and say what a grid costs.

Tiles only pay when a frame has fewer nodes than it could use: a job of many frames keeps
every node busy with whole frames (1x1, no overhead at all). Otherwise the grid aims at
one tile per node for the frames in flight, never below `MIN_TILE_WIDTH` x
`MIN_TILE_HEIGHT` (below it a render's fixed cost, about 20 ms of scene sync, write and
read per tile, stops being small; docs/tile-overhead.md) and never past
`MAX_MARGIN_OVERHEAD` extra pixels from margins.

Pure arithmetic on sizes (renderers.regions); no files, Blender or network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.errors import RegionError
from renderers.regions import overhead_estimate, plan_grid

#: The smallest tile (core) `auto` picks: a quarter of a 480x270 frame, where 4x4 tiles
#: cost no more than one piece but the fixed cost per tile starts to show in the CPU
#: seconds (docs/tile-overhead.md).
MIN_TILE_WIDTH = 120
MIN_TILE_HEIGHT = 64
#: The most extra pixels (margins) a grid `auto` picks may render: the farm's goal for
#: tiles (<= 1.05x one piece) with room for the fixed cost per tile.
MAX_MARGIN_OVERHEAD = 0.03
#: The share of a tile's time its render's fixed cost may take (`efficient_tile_pixels`).
FIXED_COST_SHARE = 0.015
#: The protocol's limit (protocol.models.MAX_TILES_PER_AXIS), repeated: renderers never
#: import the protocol. tests/test_auto_tiles.py checks they agree.
MAX_AXIS = 64


@dataclass(frozen=True, slots=True)
class GridChoice:
    """A grid and why: what `auto` chose, or a grid that was asked for, with its cost."""

    columns: int
    rows: int
    #: Tiles per frame that would keep every node busy.
    wanted: int
    #: Extra pixels rendered for margins, as a share of the frame: an estimate of the
    #: overhead (per-tile fixed costs come on top).
    overhead: float
    reason: str

    @property
    def tiles(self) -> int:
        return self.columns * self.rows

    def describe(self) -> str:
        """'4x4 tiles: estimated overhead 2.1% extra pixels (margins of 1 px); ...'."""
        return (
            f"{self.columns}x{self.rows} tiles: estimated overhead "
            f"{100 * self.overhead:.1f}% extra pixels for margins; {self.reason}"
        )


def grid_cost(width: int, height: int, columns: int, rows: int, margin: int) -> GridChoice:
    """What a given grid costs (for `inspect` and submit to say)."""
    plan = plan_grid(width, height, columns, rows, margin)
    reason = f"margin {margin} px" if margin else "no margin needed"
    return GridChoice(columns, rows, columns * rows, overhead_estimate(plan), reason)


def efficient_tile_pixels(
    fixed_seconds: float, seconds_per_pixel_sample: float, samples: int
) -> int:
    """The smallest tile (pixels) whose path tracing takes 1 / FIXED_COST_SHARE times a
    render's fixed cost (scene sync and BVH, which every tile pays again: measured by the
    submit-time probe), and never below MIN_TILE_WIDTH x MIN_TILE_HEIGHT."""
    floor = MIN_TILE_WIDTH * MIN_TILE_HEIGHT
    per_pixel = seconds_per_pixel_sample * max(1, samples)
    if fixed_seconds <= 0.0 or per_pixel <= 0.0:
        return floor
    return max(floor, math.ceil(fixed_seconds / (FIXED_COST_SHARE * per_pixel)))


def choose_grid(
    width: int,
    height: int,
    *,
    nodes: int,
    frames: int,
    margin: int,
    min_tile_pixels: int | None = None,
) -> GridChoice:
    """The grid `--tiles auto` renders each frame with.

    `nodes` renders at once and `frames` frames in the job; `margin` is the job's
    (renderers.regions.render_margin); `min_tile_pixels` the scene's efficient tile size
    (`efficient_tile_pixels`; default MIN_TILE_WIDTH x MIN_TILE_HEIGHT). Among the grids
    whose tiles are at least the efficient size and whose margins stay within the
    budget, the smallest one with enough tiles for the idle nodes, else the one with most
    tiles; ties go to the lower overhead, then to squarer tiles.
    """
    if nodes < 1 or frames < 1:
        raise RegionError(
            f"Choosing tiles for {nodes} node(s) and {frames} frame(s) makes no sense.",
            hint="Pass at least one node and one frame.",
        )
    wanted = max(1, math.ceil(nodes / frames))
    if wanted == 1:
        return GridChoice(1, 1, 1, 0.0, f"{frames} frame(s) keep {nodes} node(s) busy")
    smallest = max(MIN_TILE_WIDTH * MIN_TILE_HEIGHT, min_tile_pixels or 0)
    best: tuple[tuple[float, ...], GridChoice] | None = None
    for columns in range(1, max(1, min(MAX_AXIS, width // MIN_TILE_WIDTH)) + 1):
        for rows in range(1, max(1, min(MAX_AXIS, height // MIN_TILE_HEIGHT)) + 1):
            if columns * rows > 1:
                if (width // columns) * (height // rows) < smallest:
                    continue
                overhead = overhead_estimate(plan_grid(width, height, columns, rows, margin))
                if overhead > MAX_MARGIN_OVERHEAD:
                    continue
            else:
                overhead = 0.0
            tiles = columns * rows
            aspect = (width / columns) / (height / rows)
            key = (
                0.0 if tiles >= wanted else 1.0,
                tiles if tiles >= wanted else -tiles,
                round(overhead, 4),
                abs(math.log(aspect)),
            )
            if best is None or key < best[0]:
                best = (key, GridChoice(columns, rows, wanted, overhead, ""))
    assert best is not None  # 1x1 always qualifies
    choice = best[1]
    if choice.tiles >= wanted:
        reason = f"{choice.tiles} tiles per frame for {nodes} node(s) on {frames} frame(s)"
    else:
        reason = (
            f"{wanted} tiles per frame would keep {nodes} node(s) busy, but tiles under "
            f"{smallest} px or margins over {100 * MAX_MARGIN_OVERHEAD:.0f}% cost more "
            "than they save"
        )
    return GridChoice(choice.columns, choice.rows, wanted, choice.overhead, reason)

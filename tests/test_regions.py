"""Tests of the tile maths: grids cover the frame exactly once, margins are exact, and
Blender borders select exactly the intended pixels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import RegionError, UsageError
from renderers.regions import (
    ADAPTIVE_SAMPLING_MARGIN,
    BorderFractions,
    PixelRect,
    RegionPlan,
    _min_samples,
    adaptive_filter_passes,
    blender_pixel_span,
    border_fractions,
    effective_resolution,
    overhead_estimate,
    parse_grid,
    plan_frame,
    plan_grid,
    plan_tile_size,
    render_margin,
)

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)


@st.composite
def grids(draw: st.DrawFn, max_size: int = 4000) -> tuple[int, int, int, int, int]:
    width = draw(st.integers(1, max_size))
    height = draw(st.integers(1, max_size))
    columns = draw(st.integers(1, min(16, width)))
    rows = draw(st.integers(1, min(16, height)))
    margin = draw(st.integers(0, 16))
    return width, height, columns, rows, margin


@st.composite
def rects_in_frame(draw: st.DrawFn, max_size: int = 32768) -> tuple[PixelRect, int, int]:
    width = draw(st.integers(1, max_size))
    height = draw(st.integers(1, max_size))
    x0 = draw(st.integers(0, width - 1))
    x1 = draw(st.integers(x0 + 1, width))
    y0 = draw(st.integers(0, height - 1))
    y1 = draw(st.integers(y0 + 1, height))
    return PixelRect(x0, y0, x1, y1), width, height


def assert_cores_partition_frame(plan: RegionPlan) -> None:
    """Cores form a grid: column spans partition [0, W), row spans partition [0, H)."""
    column_spans: dict[int, tuple[int, int]] = {}
    row_spans: dict[int, tuple[int, int]] = {}
    cells = set()
    for tile in plan.tiles:
        span_x = column_spans.setdefault(tile.column, (tile.core.x0, tile.core.x1))
        span_y = row_spans.setdefault(tile.row, (tile.core.y0, tile.core.y1))
        assert (tile.core.x0, tile.core.x1) == span_x
        assert (tile.core.y0, tile.core.y1) == span_y
        assert (tile.column, tile.row) not in cells
        cells.add((tile.column, tile.row))
    assert cells == {(c, r) for c in range(plan.columns) for r in range(plan.rows)}
    for spans, size in ((column_spans, plan.width), (row_spans, plan.height)):
        ordered = [spans[i] for i in range(len(spans))]
        assert ordered[0][0] == 0
        assert ordered[-1][1] == size
        for (_, end), (start, stop) in itertools.pairwise(ordered):
            assert end == start
            assert stop > start
    assert sum(tile.core.area for tile in plan.tiles) == plan.width * plan.height


# --- plan_grid ---------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(grids())
def test_grid_cores_cover_the_frame_exactly_once(grid: tuple[int, int, int, int, int]) -> None:
    width, height, columns, rows, margin = grid
    plan = plan_grid(width, height, columns, rows, margin)
    assert (plan.columns, plan.rows) == (columns, rows)
    assert len(plan.tiles) == columns * rows
    assert [tile.index for tile in plan.tiles] == list(range(columns * rows))
    assert_cores_partition_frame(plan)


@PROPERTY_SETTINGS
@given(grids(max_size=200))
def test_grid_cores_cover_every_pixel_once_counted(grid: tuple[int, int, int, int, int]) -> None:
    width, height, columns, rows, margin = grid
    plan = plan_grid(width, height, columns, rows, margin)
    counts = np.zeros((height, width), dtype=np.int32)
    for tile in plan.tiles:
        counts[tile.core.y0 : tile.core.y1, tile.core.x0 : tile.core.x1] += 1
    assert (counts == 1).all()


@PROPERTY_SETTINGS
@given(grids())
def test_render_rects_grow_the_core_by_the_clamped_margin(
    grid: tuple[int, int, int, int, int],
) -> None:
    width, height, columns, rows, margin = grid
    plan = plan_grid(width, height, columns, rows, margin)
    for tile in plan.tiles:
        core, render = tile.core, tile.render
        assert render.contains(core)
        assert plan.frame.contains(render)
        assert core.x0 - render.x0 == min(margin, core.x0)
        assert core.y0 - render.y0 == min(margin, core.y0)
        assert render.x1 - core.x1 == min(margin, width - core.x1)
        assert render.y1 - core.y1 == min(margin, height - core.y1)
        crop = tile.crop
        assert (crop.width, crop.height) == (core.width, core.height)
        assert PixelRect(0, 0, render.width, render.height).contains(crop)
        assert crop.translated(render.x0, render.y0) == core


def test_grid_is_row_major_from_the_top_left() -> None:
    plan = plan_grid(10, 6, 3, 2)
    assert [(t.column, t.row) for t in plan.tiles] == [
        (0, 0),
        (1, 0),
        (2, 0),
        (0, 1),
        (1, 1),
        (2, 1),
    ]
    assert [t.core.to_list() for t in plan.tiles[:3]] == [[0, 0, 3, 3], [3, 0, 6, 3], [6, 0, 10, 3]]
    assert plan.tiles[4].core == PixelRect(3, 3, 6, 6)


def test_margin_example() -> None:
    plan = plan_grid(100, 100, 2, 2, margin=8)
    top_right = plan.tiles[1]
    assert top_right.core == PixelRect(50, 0, 100, 50)
    assert top_right.render == PixelRect(42, 0, 100, 58)
    assert top_right.crop == PixelRect(8, 0, 58, 50)


def test_adaptive_sampling_margin_is_a_small_positive_overscan() -> None:
    assert 1 <= ADAPTIVE_SAMPLING_MARGIN <= 16


# --- the adaptive-sampling margin ------------------------------------------------------------


def _cycles_passes(samples: int, min_samples: int) -> int:
    """Cycles' own rule, sample by sample: a pass follows the 0-based sample s when
    s > min_samples and s % 16 == 15 (AdaptiveSampling::need_filter); it matters only
    when more samples follow."""
    return sum(1 for s in range(samples - 1) if s > min_samples and s % 16 == 15)


@pytest.mark.parametrize(("threshold", "expected"), [(0.1, 32), (0.01, 64), (0.001, 128)])
def test_automatic_min_samples_match_cycles_own_examples(threshold: float, expected: int) -> None:
    # Cycles' comment in Integrator::get_adaptive_sampling: 0.1 -> 32, 0.01 -> 64, 0.001 -> 128.
    assert _min_samples(4096, threshold, 0) == expected


@PROPERTY_SETTINGS
@given(st.integers(1, 700), st.integers(0, 80))
def test_filter_passes_count_what_cycles_runs(samples: int, min_samples: int) -> None:
    expected = _cycles_passes(samples, max(4, min_samples))
    assert adaptive_filter_passes(samples, 0.05, min_samples or 4) == expected


@PROPERTY_SETTINGS
@given(
    st.integers(1, 5000),
    st.floats(0.0, 1.0, allow_nan=False),
    st.integers(0, 200),
)
def test_unknown_settings_never_give_fewer_passes(
    samples: int, threshold: float, min_samples: int
) -> None:
    known = adaptive_filter_passes(samples, threshold, min_samples)
    assert adaptive_filter_passes(samples) >= known
    assert render_margin(True, samples=samples) >= known


def test_margin_examples() -> None:
    # The demo scene (64 samples, threshold 0.02, automatic minimum 52): its only pass
    # follows the last sample, so tiles need no margin at all.
    assert render_margin(True, samples=64, adaptive_threshold=0.02, adaptive_min_samples=0) == 0
    assert render_margin(True, samples=64) == 3  # unknown settings: passes at 16, 32, 48
    assert render_margin(True, samples=512, adaptive_threshold=0.1, adaptive_min_samples=4) == 31
    assert render_margin(True, samples=4096, adaptive_threshold=0.01, adaptive_min_samples=0) == 251
    assert render_margin(False, samples=4096) == 0
    assert render_margin(True, samples=16) == 0


def test_margin_of_an_empty_render_is_refused() -> None:
    with pytest.raises(RegionError) as caught:
        adaptive_filter_passes(0)
    assert caught.value.hint


def test_plan_frame_uses_the_derived_margin() -> None:
    plan = plan_frame(
        96,
        54,
        4,
        4,
        adaptive_sampling=True,
        samples=48,
        adaptive_threshold=0.1,
        adaptive_min_samples=4,
    )
    assert plan.margin == 2
    assert plan_frame(96, 54, 4, 4, adaptive_sampling=False, samples=48).margin == 0


def test_overhead_estimate_is_the_margin_pixels() -> None:
    assert overhead_estimate(plan_grid(100, 100, 2, 2)) == 0.0
    # Each 50x50 core renders 54x54 (two interior edges grow by 4): 4 * 2916 / 10000 - 1.
    assert overhead_estimate(plan_grid(100, 100, 2, 2, margin=4)) == pytest.approx(0.1664)


def test_whole_frame_plan() -> None:
    plan = plan_grid(64, 48, 1, 1, margin=8)
    assert plan.is_whole_frame
    assert plan.tiles[0].core == plan.tiles[0].render == PixelRect(0, 0, 64, 48)
    assert not plan_grid(64, 48, 2, 1).is_whole_frame


@pytest.mark.parametrize(
    ("width", "height", "columns", "rows", "margin"),
    [
        (10, 10, 11, 1, 0),
        (10, 10, 1, 11, 0),
        (10, 10, 0, 1, 0),
        (10, 10, 1, 0, 0),
        (10, 10, 2, 2, -1),
        (0, 10, 1, 1, 0),
        (10, -5, 1, 1, 0),
    ],
)
def test_impossible_grids_are_refused_with_a_hint(
    width: int, height: int, columns: int, rows: int, margin: int
) -> None:
    with pytest.raises(RegionError) as caught:
        plan_grid(width, height, columns, rows, margin)
    assert caught.value.hint


# --- plan_tile_size --------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(
    st.integers(1, 4000),
    st.integers(1, 4000),
    st.integers(1, 5000),
    st.integers(1, 5000),
    st.integers(0, 16),
)
def test_tile_size_plans_cover_the_frame_within_the_size(
    width: int, height: int, tile_width: int, tile_height: int, margin: int
) -> None:
    # Keep the grid small enough to check quickly; tiny tiles of a big frame are
    # covered by the same grid arithmetic as plan_grid.
    tile_width = max(tile_width, width // 64 + 1)
    tile_height = max(tile_height, height // 64 + 1)
    plan = plan_tile_size(width, height, tile_width, tile_height, margin)
    assert_cores_partition_frame(plan)
    assert plan.margin == margin
    for tile in plan.tiles:
        assert tile.core.width <= tile_width
        assert tile.core.height <= tile_height
    # The fewest tiles that can satisfy the size.
    assert plan.columns == -(-width // tile_width)
    assert plan.rows == -(-height // tile_height)


def test_tile_size_example() -> None:
    plan = plan_tile_size(1920, 1080, 512, 512)
    assert (plan.columns, plan.rows) == (4, 3)
    assert {t.core.width for t in plan.tiles} == {480}
    assert {t.core.height for t in plan.tiles} == {360}


def test_tile_size_must_be_positive() -> None:
    with pytest.raises(RegionError):
        plan_tile_size(100, 100, 0, 10)


# --- effective_resolution ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "y", "pct", "expected"),
    [
        (1920, 1080, 100, (1920, 1080)),
        (1920, 1080, 50, (960, 540)),
        (1921, 1081, 50, (960, 540)),
        (1920, 1080, 33, (633, 356)),
        (3, 3, 1, (1, 1)),
        (100, 100, 200, (200, 200)),
    ],
)
def test_effective_resolution(x: int, y: int, pct: int, expected: tuple[int, int]) -> None:
    assert effective_resolution(x, y, pct) == expected


@pytest.mark.parametrize(("x", "y", "pct"), [(0, 10, 100), (10, -1, 100), (10, 10, 0)])
def test_effective_resolution_refuses_non_positive(x: int, y: int, pct: int) -> None:
    with pytest.raises(RegionError):
        effective_resolution(x, y, pct)


# --- parse_grid ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3x3", (3, 3)), ("4X2", (4, 2)), (" 2 x 2 ", (2, 2)), ("16x9", (16, 9))],
)
def test_parse_grid(text: str, expected: tuple[int, int]) -> None:
    assert parse_grid(text) == expected


@pytest.mark.parametrize("text", ["", "3", "3x", "x3", "3*3", "3x3x3", "-1x2", "a x b", "0x2"])
def test_parse_grid_names_the_bad_text_and_the_form(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_grid(text)
    assert repr(text) in caught.value.message
    assert "CxR" in caught.value.hint


# --- border_fractions ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(rects_in_frame())
def test_border_fractions_select_exactly_the_rect(case: tuple[PixelRect, int, int]) -> None:
    rect, width, height = case
    border = border_fractions(rect, width, height)
    assert blender_pixel_span(border.min_x, border.max_x, width) == (rect.x0, rect.x1)
    bottom_rows = blender_pixel_span(border.min_y, border.max_y, height)
    assert bottom_rows == (height - rect.y1, height - rect.y0)


@pytest.mark.parametrize("size", [1, 2, 3, 1080, 1920, 2160, 3840, 4096, 7680, 32768])
def test_every_edge_round_trips_exhaustively(size: int) -> None:
    pixels = np.arange(0, size + 1)
    fractions = [border_fractions(PixelRect(p, 0, size, 1), size, 1).min_x for p in pixels[:-1]]
    ends = [border_fractions(PixelRect(0, 0, p, 1), size, 1).max_x for p in pixels[1:]]
    size32 = np.float32(size)
    starts = (np.asarray(fractions, dtype=np.float32) * size32).astype(np.int64)
    stops = (np.asarray(ends, dtype=np.float32) * size32).astype(np.int64)
    assert (starts == pixels[:-1]).all()
    assert (stops == pixels[1:]).all()


def test_naive_fractions_fail_at_1920_where_ours_do_not() -> None:
    width = 1920
    naive_misses = [
        px for px in range(1, width) if blender_pixel_span(px / width, 1.0, width)[0] != px
    ]
    # Blender truncates float32(px / W) * W; for 26 edges of a 1920-wide frame that
    # lands one pixel low (checked against bpy 5.0.1 renders with crop to border).
    assert len(naive_misses) == 26
    assert 63 in naive_misses
    assert blender_pixel_span(63 / width, 1.0, width) == (62, width)
    for px in naive_misses:
        border = border_fractions(PixelRect(px, 0, width, 1), width, 1)
        assert blender_pixel_span(border.min_x, border.max_x, width) == (px, width)


def test_border_fractions_flip_rows_and_use_exact_frame_edges() -> None:
    border = border_fractions(PixelRect(0, 0, 100, 25), 100, 100)
    assert border == BorderFractions(min_x=0.0, max_x=1.0, min_y=0.755, max_y=1.0)
    bottom = border_fractions(PixelRect(10, 75, 20, 100), 100, 100)
    assert bottom.min_y == 0.0
    assert bottom.max_y == pytest.approx(0.255)
    assert blender_pixel_span(bottom.min_x, bottom.max_x, 100) == (10, 20)


@pytest.mark.parametrize(
    "rect",
    [
        PixelRect(0, 0, 0, 10),
        PixelRect(5, 0, 4, 10),
        PixelRect(0, 0, 11, 10),
        PixelRect(-1, 0, 5, 5),
    ],
)
def test_border_fractions_refuse_rects_outside_the_frame(rect: PixelRect) -> None:
    with pytest.raises(RegionError):
        border_fractions(rect, 10, 10)


# --- PixelRect -------------------------------------------------------------------------------


def test_pixel_rect_basics() -> None:
    rect = PixelRect(2, 3, 10, 7)
    assert (rect.width, rect.height, rect.area) == (8, 4, 32)
    assert rect.translated(-2, 1) == PixelRect(0, 4, 8, 8)
    assert PixelRect.from_list(rect.to_list()) == rect
    with pytest.raises(RegionError):
        PixelRect.from_list([1, 2, 3])
    with pytest.raises(RegionError):
        PixelRect.from_list([1, 2, 3, 4.5])  # type: ignore[list-item]

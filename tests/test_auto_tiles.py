"""Tests of `--tiles auto`'s choice (renderers.auto_tiles): pure arithmetic, no Blender."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import RegionError
from protocol.models import MAX_TILES_PER_AXIS
from renderers import auto_tiles
from renderers.auto_tiles import choose_grid, efficient_tile_pixels, grid_cost


def test_axis_limit_agrees_with_the_protocol() -> None:
    assert auto_tiles.MAX_AXIS == MAX_TILES_PER_AXIS


def test_many_frames_render_whole() -> None:
    choice = choose_grid(1920, 1080, nodes=8, frames=24, margin=0)
    assert (choice.columns, choice.rows, choice.overhead) == (1, 1, 0.0)
    assert "busy" in choice.reason


def test_one_frame_on_many_nodes_reaches_the_efficient_size() -> None:
    # The benchmark's sizes: 480x270 splits at most 4x4, 960x540 at most 8x8 (120x67 px).
    assert (choose_grid(480, 270, nodes=64, frames=1, margin=0).tiles) == 16
    choice = choose_grid(960, 540, nodes=64, frames=1, margin=0)
    assert (choice.columns, choice.rows) == (8, 8)
    assert choice.tiles >= choice.wanted


def test_the_smallest_grid_that_keeps_the_nodes_busy() -> None:
    choice = choose_grid(1920, 1080, nodes=4, frames=1, margin=0)
    assert (choice.columns, choice.rows) == (2, 2)
    assert choose_grid(1920, 1080, nodes=8, frames=2, margin=0).tiles == 4


def test_margins_over_the_budget_make_fewer_tiles() -> None:
    wide = choose_grid(960, 540, nodes=64, frames=1, margin=0)
    costly = choose_grid(960, 540, nodes=64, frames=1, margin=8)
    assert costly.tiles < wide.tiles
    assert costly.overhead <= auto_tiles.MAX_MARGIN_OVERHEAD
    assert "cost more than they save" in costly.reason


def test_a_frame_too_small_to_split_renders_whole() -> None:
    assert choose_grid(64, 36, nodes=16, frames=1, margin=0).tiles == 1


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 4096),
    st.integers(1, 2304),
    st.integers(1, 200),
    st.integers(1, 50),
    st.integers(0, 40),
)
def test_every_choice_fits_the_rules(
    width: int, height: int, nodes: int, frames: int, margin: int
) -> None:
    choice = choose_grid(width, height, nodes=nodes, frames=frames, margin=margin)
    if choice.tiles > 1:
        tile_width, tile_height = width // choice.columns, height // choice.rows
        assert tile_width * tile_height >= auto_tiles.MIN_TILE_WIDTH * auto_tiles.MIN_TILE_HEIGHT
        assert choice.columns == 1 or tile_width >= auto_tiles.MIN_TILE_WIDTH
        assert choice.rows == 1 or tile_height >= auto_tiles.MIN_TILE_HEIGHT
        assert choice.overhead <= auto_tiles.MAX_MARGIN_OVERHEAD
    if choice.tiles < choice.wanted:
        assert "cost more than they save" in choice.reason
    assert choice.overhead == grid_cost(width, height, choice.columns, choice.rows, margin).overhead


def test_a_scene_with_a_costly_sync_gets_bigger_tiles() -> None:
    # The demo scene: ~20 ms fixed per render, 2.5 us per pixel-sample, 64 samples.
    demo = efficient_tile_pixels(0.02, 2.5e-6, 64)
    assert demo <= 9000
    # A scene whose sync takes 2 s at the same speed: tiles of ~830k pixels.
    heavy = efficient_tile_pixels(2.0, 2.5e-6, 64)
    assert heavy == pytest.approx(2.0 / (0.015 * 64 * 2.5e-6), rel=1e-3)
    light = choose_grid(1920, 1080, nodes=64, frames=1, margin=0, min_tile_pixels=demo)
    slow = choose_grid(1920, 1080, nodes=64, frames=1, margin=0, min_tile_pixels=heavy)
    assert light.tiles == 64 and slow.tiles == 2
    assert f"tiles under {heavy} px" in slow.reason
    assert efficient_tile_pixels(0.0, 2.5e-6, 64) == 120 * 64  # nothing measured


def test_grid_cost_names_the_estimate() -> None:
    cost = grid_cost(480, 270, 4, 4, margin=4)
    assert cost.overhead == pytest.approx(0.1433, abs=1e-4)
    assert "estimated overhead 14.3%" in cost.describe()
    assert grid_cost(480, 270, 4, 4, margin=0).overhead == 0.0


@pytest.mark.parametrize(("nodes", "frames"), [(0, 1), (1, 0), (-3, 2)])
def test_nonsense_counts_are_refused(nodes: int, frames: int) -> None:
    with pytest.raises(RegionError) as caught:
        choose_grid(100, 100, nodes=nodes, frames=frames, margin=0)
    assert caught.value.hint

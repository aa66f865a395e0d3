"""Tests of tile merging: split a frame per plan (with margins), merge, get it back exactly."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ExrError, MergeError
from renderers.exr import ExrImage, ExrPart, crop, read_exr, same_pixels, write_exr
from renderers.merge import merge_tiles
from renderers.regions import ADAPTIVE_SAMPLING_MARGIN, RegionPlan, plan_grid


def full_frame(width: int, height: int, seed: int = 0) -> ExrImage:
    """A random multilayer frame with float32, float16 and uint32 passes."""
    rng = np.random.default_rng(seed)

    def plane(dtype: type[np.generic]) -> np.ndarray:
        return rng.standard_normal((height, width)).astype(dtype)

    return ExrImage(
        width,
        height,
        [
            ExrPart(
                "ViewLayer.Combined",
                {f"ViewLayer.Combined.{c}": plane(np.float32) for c in "ABGR"},
                {"cycles.ViewLayer.samples": "64", "Camera": "Camera"},
            ),
            ExrPart(
                "ViewLayer.Denoising Normal",
                {f"ViewLayer.Denoising Normal.{c}": plane(np.float16) for c in "XYZ"},
            ),
            ExrPart(
                "ViewLayer.Denoising Depth",
                {"ViewLayer.Denoising Depth.Z": plane(np.float32)},
            ),
            ExrPart(
                "ViewLayer.IndexOB",
                {"ViewLayer.IndexOB.X": rng.integers(0, 2**32, (height, width), dtype=np.uint32)},
            ),
        ],
    )


def split(frame: ExrImage, plan: RegionPlan) -> dict[int, ExrImage]:
    """What the nodes would return: each tile's render rectangle, tile-sized."""
    tiles = {tile.index: crop(frame, tile.render) for tile in plan.tiles}
    # Different tiles carry different render statistics; the first one's must win.
    for index, image in tiles.items():
        for part in image.parts:
            part.attributes = {**part.attributes, "tessera.tile": str(index)}
    return tiles


@pytest.mark.parametrize(
    ("width", "height", "columns", "rows", "margin"),
    [
        (64, 48, 1, 1, 0),
        (64, 48, 1, 1, ADAPTIVE_SAMPLING_MARGIN),
        (64, 48, 2, 2, 0),
        (64, 48, 3, 3, ADAPTIVE_SAMPLING_MARGIN),
        (97, 61, 4, 3, 5),
        (50, 40, 50, 1, 2),
        (33, 17, 7, 17, 16),
    ],
)
def test_split_and_merge_gives_the_frame_back(
    width: int, height: int, columns: int, rows: int, margin: int
) -> None:
    frame = full_frame(width, height)
    plan = plan_grid(width, height, columns, rows, margin)
    merged = merge_tiles(plan, split(frame, plan))
    assert (merged.width, merged.height) == (width, height)
    assert [p.name for p in merged.parts] == [p.name for p in frame.parts]
    assert merged.channel_names() == frame.channel_names()
    assert same_pixels(merged, frame)
    for part in merged.parts:
        for pixels in part.channels.values():
            assert pixels.flags.c_contiguous
    assert merged.parts[0].attributes == {
        "cycles.ViewLayer.samples": "64",
        "Camera": "Camera",
        "tessera.tile": "0",
    }


@st.composite
def small_grids(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    width = draw(st.integers(1, 80))
    height = draw(st.integers(1, 80))
    columns = draw(st.integers(1, min(6, width)))
    rows = draw(st.integers(1, min(6, height)))
    return width, height, columns, rows, draw(st.integers(0, 9))


@settings(max_examples=60, deadline=None)
@given(small_grids(), st.integers(0, 2**32 - 1))
def test_merge_is_exact_for_any_plan(grid: tuple[int, int, int, int, int], seed: int) -> None:
    width, height, columns, rows, margin = grid
    frame = full_frame(width, height, seed)
    plan = plan_grid(width, height, columns, rows, margin)
    assert same_pixels(merge_tiles(plan, split(frame, plan)), frame)


def test_merge_reads_tile_files(tmp_path: Path) -> None:
    frame = full_frame(70, 50, seed=5)
    plan = plan_grid(70, 50, 3, 2, margin=ADAPTIVE_SAMPLING_MARGIN)
    paths: dict[int, ExrImage | Path] = {}
    for index, image in split(frame, plan).items():
        paths[index] = tmp_path / f"tile_{index}.exr"
        write_exr(tmp_path / f"tile_{index}.exr", image)
    merged = merge_tiles(plan, paths)
    assert same_pixels(merged, frame)
    write_exr(tmp_path / "frame.exr", merged)
    assert same_pixels(read_exr(tmp_path / "frame.exr"), frame)


def test_channel_order_within_a_tile_does_not_matter() -> None:
    frame = full_frame(20, 10)
    plan = plan_grid(20, 10, 2, 1)
    tiles = split(frame, plan)
    tiles[1].parts.reverse()
    combined = tiles[1].parts[-1]
    combined.channels = dict(reversed(list(combined.channels.items())))
    assert same_pixels(merge_tiles(plan, tiles), frame)


def test_missing_tile_is_named() -> None:
    frame = full_frame(30, 30)
    plan = plan_grid(30, 30, 3, 3)
    tiles = split(frame, plan)
    del tiles[4], tiles[7]
    with pytest.raises(MergeError, match=r"tile\(s\) 4, 7 of 9 are missing") as caught:
        merge_tiles(plan, tiles)
    assert caught.value.hint


def test_tile_outside_the_plan_is_refused() -> None:
    frame = full_frame(30, 30)
    plan = plan_grid(30, 30, 2, 2)
    tiles: dict[int, ExrImage | Path] = dict(split(frame, plan))
    tiles[9] = frame
    with pytest.raises(MergeError, match=r"Tile\(s\) 9 are not part"):
        merge_tiles(plan, tiles)


def test_wrong_tile_size_names_tile_and_sizes() -> None:
    frame = full_frame(40, 30)
    plan = plan_grid(40, 30, 2, 2, margin=4)
    tiles = split(frame, plan)
    # The core instead of the render rectangle: a node that forgot the margin.
    tiles[3] = crop(frame, plan.tiles[3].core)
    with pytest.raises(MergeError, match=re.escape("Tile 3 is 20x15 pixels")) as caught:
        merge_tiles(plan, tiles)
    assert "24x19" in caught.value.message


def test_wrong_size_of_the_first_tile_is_caught_too() -> None:
    frame = full_frame(40, 30)
    plan = plan_grid(40, 30, 2, 2, margin=4)
    tiles = split(frame, plan)
    tiles[0] = frame
    with pytest.raises(MergeError, match="Tile 0 is 40x30"):
        merge_tiles(plan, tiles)


def test_missing_and_extra_channels_are_named() -> None:
    frame = full_frame(40, 30)
    plan = plan_grid(40, 30, 2, 2)
    tiles = split(frame, plan)
    depth = tiles[2].part("ViewLayer.Denoising Depth")
    depth.channels["ViewLayer.Denoising Depth.W"] = depth.channels.pop(
        "ViewLayer.Denoising Depth.Z"
    )
    with pytest.raises(MergeError, match="Tile 2") as caught:
        merge_tiles(plan, tiles)
    assert "missing channels ['ViewLayer.Denoising Depth.Z']" in caught.value.message
    assert "extra channels ['ViewLayer.Denoising Depth.W']" in caught.value.message


def test_missing_part_is_named() -> None:
    frame = full_frame(40, 30)
    plan = plan_grid(40, 30, 2, 1)
    tiles = split(frame, plan)
    tiles[1].parts = [p for p in tiles[1].parts if p.name != "ViewLayer.Denoising Normal"]
    with pytest.raises(MergeError, match=r"Tile 1 .*missing channels .*Denoising Normal\.X"):
        merge_tiles(plan, tiles)


def test_other_pixel_type_is_refused() -> None:
    frame = full_frame(40, 30)
    plan = plan_grid(40, 30, 2, 1)
    tiles = split(frame, plan)
    combined = tiles[1].part("ViewLayer.Combined")
    combined.channels = {k: v.astype(np.float16) for k, v in combined.channels.items()}
    with pytest.raises(MergeError, match=r"Tile 1 stores channels differently.*float16"):
        merge_tiles(plan, tiles)


def test_missing_tile_file_is_an_exr_error(tmp_path: Path) -> None:
    plan = plan_grid(10, 10, 1, 1)
    with pytest.raises(ExrError, match="does not exist"):
        merge_tiles(plan, {0: tmp_path / "gone.exr"})

"""Assemble rendered tiles into one full-frame multilayer image.

Each tile was rendered over its plan's `render` rectangle (core plus margin); merging
crops the margin away and places the core where it belongs. The merged image has the
first tile's parts, channel order, pixel types and attributes.

This module must not read or write the final file, denoise, or judge pixel values:
verification and output live elsewhere. It refuses anything that would make a frame
silently wrong (a missing tile, a wrong size, a missing or extra pass).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from common.errors import MergeError
from renderers.exr import ExrImage, ExrPart, read_exr
from renderers.regions import RegionPlan, Tile


def merge_tiles(plan: RegionPlan, tiles: Mapping[int, ExrImage | Path]) -> ExrImage:
    """Crop every tile of `plan` to its core and place it in one full-frame image.

    `tiles` maps each tile index to its rendered image (or the path of its EXR), which
    must be exactly `tile.render` in size. Paths are read one at a time, so at most one
    tile is in memory besides the frame.
    """
    missing = [tile.index for tile in plan.tiles if tile.index not in tiles]
    if missing:
        raise MergeError(
            f"Cannot merge the frame: tile(s) {_index_list(missing)} of "
            f"{len(plan.tiles)} are missing.",
            hint="Wait until every tile is rendered, or re-render the missing ones.",
        )
    unknown = sorted(set(tiles) - {tile.index for tile in plan.tiles})
    if unknown:
        raise MergeError(
            f"Tile(s) {_index_list(unknown)} are not part of this {plan.columns}x{plan.rows} plan.",
            hint="Merge with the plan the tiles were rendered from.",
        )

    first_tile = plan.tiles[0]
    first_image = _load(first_tile, tiles[first_tile.index])
    _check_size(first_tile, first_image)
    frame_parts = [
        ExrPart(
            part.name,
            {
                name: np.empty((plan.height, plan.width), dtype=pixels.dtype)
                for name, pixels in part.channels.items()
            },
            dict(part.attributes),
        )
        for part in first_image.parts
    ]
    reference_layout = _layout(first_image)

    for tile in plan.tiles:
        image = first_image if tile is first_tile else _load(tile, tiles[tile.index])
        _check_size(tile, image)
        if tile is not first_tile:
            _check_layout(tile, _layout(image), reference_layout, first_tile.index)
        tile_channels = {
            name: pixels for part in image.parts for name, pixels in part.channels.items()
        }
        core, crop = tile.core, tile.crop
        for frame_part in frame_parts:
            for name, target in frame_part.channels.items():
                source = tile_channels[name]
                target[core.y0 : core.y1, core.x0 : core.x1] = source[
                    crop.y0 : crop.y1, crop.x0 : crop.x1
                ]
    return ExrImage(plan.width, plan.height, frame_parts)


#: Full channel name -> (part name, pixel type): what must agree between tiles.
_Layout = dict[str, tuple[str, np.dtype[np.generic]]]


def _load(tile: Tile, source: ExrImage | Path) -> ExrImage:
    if isinstance(source, ExrImage):
        return source
    if isinstance(source, str | os.PathLike):
        return read_exr(Path(source))
    raise MergeError(f"Tile {tile.index} is a {type(source).__name__}, not an image or a path.")


def _layout(image: ExrImage) -> _Layout:
    return {
        name: (part.name, pixels.dtype)
        for part in image.parts
        for name, pixels in part.channels.items()
    }


def _check_size(tile: Tile, image: ExrImage) -> None:
    expected = (tile.render.width, tile.render.height)
    if (image.width, image.height) != expected:
        raise MergeError(
            f"Tile {tile.index} is {image.width}x{image.height} pixels but its render region "
            f"{tile.render.to_list()} is {expected[0]}x{expected[1]}.",
            hint="The tile was rendered with another plan or margin; re-render it.",
        )


def _check_layout(tile: Tile, layout: _Layout, reference: _Layout, reference_index: int) -> None:
    # Order within the file does not matter (channels are placed by name), but the set of
    # channels, the part holding each and its pixel type must match the first tile.
    if layout == reference:
        return
    missing = [name for name in reference if name not in layout]
    extra = [name for name in layout if name not in reference]
    if missing or extra:
        details = []
        if missing:
            details.append(f"missing channels {missing}")
        if extra:
            details.append(f"extra channels {extra}")
        raise MergeError(
            f"Tile {tile.index} does not have the passes of tile {reference_index}: "
            + "; ".join(details)
            + ".",
            hint="Every tile must be rendered with the same passes; re-render this tile.",
        )
    differences = [
        f"{name} (in part {layout[name][0]!r} as {layout[name][1]}, "
        f"expected part {expected_part!r} as {expected_dtype})"
        for name, (expected_part, expected_dtype) in reference.items()
        if layout[name] != (expected_part, expected_dtype)
    ]
    raise MergeError(
        f"Tile {tile.index} stores channels differently from tile {reference_index}: "
        + ", ".join(differences)
        + ".",
        hint="Every tile must be rendered with the same output settings; re-render this tile.",
    )


def _index_list(indices: list[int]) -> str:
    return ", ".join(str(index) for index in indices)

"""Tests of PNG previews: tone mapping values, PNG encoding (decoded independently),
downscaling and the written file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from common.errors import ExrError
from renderers.exr import ExrImage, ExrPart
from renderers.preview import box_downscale, encode_png, tonemap_to_srgb8, write_preview_png


def decode_png(data: bytes) -> np.ndarray:
    """A minimal PNG decoder for 8-bit RGB/RGBA, filter type 0, checking every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat, header = 8, b"", b""
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            assert offset + 12 + length == len(data)
        offset += 12 + length
    width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert (depth, interlace) == (8, 0)
    channels = {2: 3, 6: 4}[color_type]
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, -1)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, channels)


def rgba_image(rgba: np.ndarray) -> ExrImage:
    height, width = rgba.shape[:2]
    channels = {f"ViewLayer.Combined.{c}": rgba[..., i].copy() for i, c in enumerate("RGBA")}
    return ExrImage(width, height, [ExrPart("ViewLayer.Combined", channels)])


def one_value(value: float) -> int:
    pixels = np.full((1, 1, 4), value, dtype=np.float32)
    return int(tonemap_to_srgb8(pixels)[0, 0, 0])


@pytest.mark.parametrize(
    ("linear", "expected"),
    [
        (0.0, 0),
        (1.0, 255),
        (0.5, 188),
        (0.18, 118),
        (0.0031308, 10),  # the end of the linear segment: 12.92 * v * 255 = 10.31
        (0.001, 3),  # linear segment: 3.29
        (-0.5, 0),
        (2.0, 255),
        (float("nan"), 0),
        (float("inf"), 255),
    ],
)
def test_known_tonemap_values(linear: float, expected: int) -> None:
    assert one_value(linear) == expected


def test_tonemap_rounds_half_up_and_clamps_alpha() -> None:
    # 12.92 * v * 255 == 2.5 exactly at v = 2.5 / 3294.6; round half up gives 3.
    assert one_value(2.5 / (12.92 * 255) + 1e-9) == 3
    pixels = np.array([[[0.0, 0.0, 0.0, 1.5], [0.0, 0.0, 0.0, -1.0], [0, 0, 0, np.nan]]])
    assert tonemap_to_srgb8(pixels.astype(np.float32))[0, :, 3].tolist() == [255, 0, 0]


def test_tonemap_refuses_other_shapes() -> None:
    with pytest.raises(ExrError):
        tonemap_to_srgb8(np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize("channels", [3, 4])
def test_png_round_trips_through_a_decoder(channels: int) -> None:
    rng = np.random.default_rng(channels)
    pixels = rng.integers(0, 256, (37, 53, channels), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(pixels)), pixels)


def test_png_is_read_by_qt(tmp_path: Path) -> None:
    qt_gui = pytest.importorskip("PySide6.QtGui")
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, (9, 13, 4), dtype=np.uint8)
    path = tmp_path / "qt.png"
    path.write_bytes(encode_png(pixels))
    image = qt_gui.QImage(str(path))
    assert not image.isNull()
    assert (image.width(), image.height()) == (13, 9)
    for y, x in [(0, 0), (4, 7), (8, 12)]:
        color = image.pixelColor(x, y)
        expected = pixels[y, x].tolist()
        assert [color.red(), color.green(), color.blue(), color.alpha()] == expected


def test_encode_png_refuses_bad_input() -> None:
    with pytest.raises(ExrError):
        encode_png(np.zeros((4, 4, 4), np.float32))  # type: ignore[arg-type]
    with pytest.raises(ExrError):
        encode_png(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ExrError):
        encode_png(np.zeros((0, 4, 3), np.uint8))


def test_write_preview_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rgba = rng.random((30, 40, 4), dtype=np.float32)
    rgba[..., 3] = 1.0
    path = write_preview_png(rgba_image(rgba), tmp_path / "frame.png")
    assert path == tmp_path / "frame.png"
    assert np.array_equal(decode_png(path.read_bytes()), tonemap_to_srgb8(rgba))
    assert [p.name for p in tmp_path.iterdir()] == ["frame.png"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_preview_is_downscaled_by_box_filter(tmp_path: Path) -> None:
    rgba = np.zeros((30, 100, 4), dtype=np.float32)
    rgba[..., 3] = 1.0
    rgba[:, :50, 0] = 1.0  # left half red
    path = write_preview_png(rgba_image(rgba), tmp_path / "small.png", max_size=25)
    pixels = decode_png(path.read_bytes())
    assert pixels.shape == (8, 25, 4)  # factor 4: 100 -> 25, 30 -> ceil(7.5) = 8
    assert (pixels[:, :12, 0] == 255).all()
    assert (pixels[:, 13:, 0] == 0).all()
    assert (pixels[:, 12, 0] == one_value(0.5)).all()  # block 48..51 straddles the edge
    assert (pixels[..., 3] == 255).all()


def test_preview_smaller_than_max_size_is_not_scaled(tmp_path: Path) -> None:
    rgba = np.ones((10, 20, 4), dtype=np.float32)
    path = write_preview_png(rgba_image(rgba), tmp_path / "p.png", max_size=20)
    assert decode_png(path.read_bytes()).shape == (10, 20, 4)


def test_box_downscale_averages_partial_edge_blocks() -> None:
    pixels = np.arange(5 * 5, dtype=np.float32).reshape(5, 5, 1)
    small = box_downscale(pixels, 2)
    assert small.shape == (3, 3, 1)
    assert small[0, 0, 0] == np.mean([0, 1, 5, 6])
    assert small[2, 2, 0] == 24.0
    assert small[0, 2, 0] == np.mean([4, 9])


def test_premultiplied_edges_are_unpremultiplied(tmp_path: Path) -> None:
    # Blender's Combined is premultiplied: half-covered white is (0.5, 0.5, 0.5, 0.5).
    rgba = np.array([[[0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]], dtype=np.float32)
    path = write_preview_png(rgba_image(rgba), tmp_path / "edge.png")
    assert decode_png(path.read_bytes()).tolist() == [[[255, 255, 255, 128], [0, 0, 0, 0]]]


def test_preview_of_an_image_without_combined(tmp_path: Path) -> None:
    image = ExrImage(2, 2, [ExrPart("ViewLayer.Depth", {"ViewLayer.Depth.Z": np.zeros((2, 2))})])
    with pytest.raises(ExrError, match="Combined"):
        write_preview_png(image, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())

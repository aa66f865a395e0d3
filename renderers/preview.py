"""PNG previews of rendered frames: a quick look at the Combined pass, nothing more.

The preview applies the plain sRGB transfer function to linear Rec.709 values (no view
transform, no look, no exposure), so it is NOT what Blender's own PNG output looks like
with AgX or Filmic; it is for thumbnails and progress views, never for delivery or
verification. PNG encoding uses only the standard library (zlib, struct).
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from common.errors import ExrError
from renderers.atomic import write_atomically
from renderers.exr import ExrImage

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPES = {3: 2, 4: 6}  # channels -> PNG colour type (truecolour, with alpha)


def tonemap_to_srgb8(rgba: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """Linear (H, W, 4) RGBA to 8-bit sRGB: RGB clamped to 0..1 then the sRGB OETF,
    alpha clamped; NaN becomes 0; values are rounded half up."""
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ExrError(f"A preview needs (height, width, 4) RGBA pixels, got shape {rgba.shape}.")
    values = np.nan_to_num(rgba.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    np.clip(values, 0.0, 1.0, out=values)
    rgb = values[..., :3]
    values[..., :3] = np.where(
        rgb <= np.float32(0.0031308),
        rgb * np.float32(12.92),
        np.float32(1.055) * np.power(rgb, np.float32(1.0 / 2.4)) - np.float32(0.055),
    )
    rounded_half_up = np.floor(values * np.float32(255.0) + np.float32(0.5))
    encoded: npt.NDArray[np.uint8] = rounded_half_up.astype(np.uint8)
    return encoded


def encode_png(pixels: npt.NDArray[np.uint8]) -> bytes:
    """Encode (H, W, 3) RGB or (H, W, 4) RGBA uint8 pixels as a PNG file's bytes."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in _PNG_COLOR_TYPES:
        raise ExrError(
            f"PNG pixels must be uint8 (height, width, 3 or 4), got {pixels.dtype} {pixels.shape}."
        )
    height, width, channels = pixels.shape
    if height < 1 or width < 1:
        raise ExrError(f"Cannot encode an empty {width}x{height} image as PNG.")
    # Every scanline starts with its filter type; 0 (None) keeps encoding one numpy copy.
    scanlines = np.zeros((height, 1 + width * channels), dtype=np.uint8)
    scanlines[:, 1:] = pixels.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPES[channels], 0, 0, 0)
    return b"".join(
        (
            _PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)),
            _png_chunk(b"IEND", b""),
        )
    )


def write_preview_png(image: ExrImage, path: Path, *, max_size: int | None = None) -> Path:
    """Write the first view layer's Combined pass as a PNG preview (atomically).

    With `max_size`, the frame is box-filtered down by a whole factor so that its long
    side is at most `max_size` pixels. Returns `path`.
    """
    if max_size is not None and max_size < 1:
        raise ExrError(f"A preview of at most {max_size} pixels is empty.")
    rgba = np.nan_to_num(image.combined_rgba(), nan=0.0, posinf=1.0, neginf=0.0)
    if max_size is not None:
        factor = math.ceil(max(image.width, image.height) / max_size)
        if factor > 1:
            rgba = box_downscale(rgba, factor)
    straight = _unpremultiply(rgba)
    data = encode_png(tonemap_to_srgb8(straight))
    _write_bytes_atomically(Path(path), data)
    return Path(path)


def box_downscale(pixels: npt.NDArray[np.float32], factor: int) -> npt.NDArray[np.float32]:
    """Average `factor` x `factor` blocks of an (H, W, C) image; edge blocks may be smaller."""
    height, width = pixels.shape[:2]
    row_starts = np.arange(0, height, factor)
    column_starts = np.arange(0, width, factor)
    sums = np.add.reduceat(
        np.add.reduceat(pixels.astype(np.float64), row_starts, axis=0), column_starts, axis=1
    )
    row_counts = np.diff(np.append(row_starts, height))
    column_counts = np.diff(np.append(column_starts, width))
    counts = np.outer(row_counts, column_counts)[..., np.newaxis]
    averages: npt.NDArray[np.float32] = (sums / counts).astype(np.float32)
    return averages


def _unpremultiply(rgba: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    # Blender's Combined pass has associated (premultiplied) alpha; PNG stores straight
    # alpha, so semi-transparent edges would come out too dark without this.
    alpha = rgba[..., 3:4]
    partly_covered = (alpha > 0.0) & (alpha < 1.0)
    if not partly_covered.any():
        return rgba
    straight = rgba.copy()
    safe_alpha = np.where(partly_covered, alpha, np.float32(1.0))
    straight[..., :3] = rgba[..., :3] / safe_alpha
    return straight


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_bytes_atomically(path: Path, data: bytes) -> None:
    write_atomically(path, lambda temporary: temporary.write_bytes(data), "the preview")

"""Previews and thumbnails: a quick look at a frame, never for delivery or verification.

Two kinds:

- `write_preview_png(ExrImage)`: the raw merged frame's Combined pass with the plain
  sRGB transfer function on linear Rec.709 (no view transform, look or exposure), for
  progress views before a frame is finished. NOT what Blender's output looks like with
  AgX or Filmic.
- `write_thumbnail(deliverable)`: a small PNG or JPEG (Pillow) of a FINISHED file of
  any format the finish writes, so it shows the scene's colour management, compositor
  and look. Display-referred files (PNG, JPEG, TIFF, WebP...) are shown as they are
  (read by Pillow, or by ffmpeg where Pillow cannot, e.g. DPX or 16-bit RGB TIFF);
  scene-linear EXR deliverables get the standard sRGB view of their Composite/Combined
  layer or R, G, B channels, as an EXR viewer shows them (not the scene's view
  transform, which only Blender's OCIO config knows). Thumbnails carry an sRGB ICC
  profile.

`encode_png` (raw previews) stays a plain standard-library encoder (filter type 0).
"""

from __future__ import annotations

import io
import math
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import OpenEXR
from PIL import Image, ImageCms, UnidentifiedImageError

from common.errors import ExrError, TesseraError
from renderers.atomic import write_atomically
from renderers.exr import ExrImage

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPES = {3: 2, 4: 6}  # channels -> PNG colour type (truecolour, with alpha)
_EXR_MAGIC = b"\x76\x2f\x31\x01"


class ThumbnailError(TesseraError):
    """A thumbnail could not be made from a finished file."""


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


def write_thumbnail(source: Path, target: Path, *, max_size: int = 256, quality: int = 85) -> Path:
    """A thumbnail of a finished deliverable, long side at most `max_size` pixels.

    `target`'s suffix picks PNG (alpha kept) or JPEG (.jpg/.jpeg: alpha composited over
    black, `quality`). Raises ThumbnailError for a file nothing here can read."""
    if max_size < 1:
        raise ThumbnailError(f"A thumbnail of at most {max_size} pixels is empty.")
    suffix = target.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg"):
        raise ThumbnailError(f"Thumbnails are PNG or JPEG, not {target.suffix or 'no suffix'}.")
    image = _open_deliverable(source)
    if image.mode not in ("RGB", "RGBA"):
        has_alpha = "A" in image.getbands() or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    if suffix != ".png" and image.mode == "RGBA":
        flat = Image.new("RGB", image.size, (0, 0, 0))
        flat.paste(image, mask=image.getchannel("A"))
        image = flat
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buffer = io.BytesIO()
    if suffix == ".png":
        # Made for every finished frame on the coordinator, beside the next render:
        # zlib level 1 takes a fifth of the default's time (384x216: 7 vs 34 ms) for a
        # file about a quarter larger.
        image.save(buffer, "PNG", icc_profile=profile, compress_level=1)
    else:
        image.save(buffer, "JPEG", quality=quality, icc_profile=profile)
    _write_bytes_atomically(target, buffer.getvalue())
    return target


def _open_deliverable(source: Path) -> Image.Image:
    try:
        with source.open("rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise ThumbnailError(f"Cannot read {source}: {exc.strerror or exc}.") from exc
    if head == _EXR_MAGIC:
        return _exr_display_image(source)
    try:
        with Image.open(source) as opened:
            opened.load()
            if opened.mode in ("I;16", "I;16B", "I;16L", "I"):
                values = np.asarray(opened, dtype=np.float64) / 65535.0
                return Image.fromarray(np.clip(values * 255 + 0.5, 0, 255).astype(np.uint8))
            return opened.copy()
    except (UnidentifiedImageError, OSError, ValueError):
        return _ffmpeg_decode(source)


def _exr_display_image(source: Path) -> Image.Image:
    """The first of Composite.Combined, *.Combined, or bare R/G/B(/A) channels, in the
    standard sRGB view (EXR deliverables are scene-linear)."""
    try:
        parts = OpenEXR.File(str(source), separate_channels=True).parts
    except Exception as exc:
        raise ThumbnailError(f"Cannot read {source.name} as OpenEXR: {exc}") from exc
    channels = {name: ch.pixels for part in parts for name, ch in part.channels.items()}
    for prefix in ("Composite.Combined.", *_combined_prefixes(channels), ""):
        if all(f"{prefix}{c}" in channels for c in "RGB"):
            break
    else:
        raise ThumbnailError(f"{source.name} has no R, G, B channels to show.")
    planes = [channels[f"{prefix}{c}"].astype(np.float32) for c in "RGB"]
    alpha = channels.get(f"{prefix}A")
    planes.append(np.ones_like(planes[0]) if alpha is None else alpha.astype(np.float32))
    rgba = tonemap_to_srgb8(_unpremultiply(np.stack(planes, axis=-1)))
    return Image.fromarray(rgba, "RGBA" if alpha is not None else "RGBX").convert(
        "RGBA" if alpha is not None else "RGB"
    )


def _combined_prefixes(channels: dict[str, Any]) -> list[str]:
    return sorted({n.rsplit(".", 1)[0] + "." for n in channels if ".Combined." in n})


def _ffmpeg_decode(source: Path) -> Image.Image:
    """What Pillow cannot read (16-bit RGB TIFF, DPX, Cineon, HDR, JPEG 2000...)."""
    from renderers.video import VideoError, ffmpeg_binary

    try:
        command = [ffmpeg_binary(), "-hide_banner", "-loglevel", "error", "-i", str(source)]
        command += ["-frames:v", "1", "-pix_fmt", "rgba", "-f", "image2pipe", "-c:v", "png", "-"]
        done = subprocess.run(command, capture_output=True, timeout=120, check=False)
    except (VideoError, subprocess.TimeoutExpired) as exc:
        raise ThumbnailError(f"Cannot decode {source.name}: {exc}") from exc
    if done.returncode != 0 or not done.stdout:
        message = done.stderr.decode(errors="replace").strip()[-400:]
        raise ThumbnailError(f"Cannot read {source.name} as an image: {message}")
    with Image.open(io.BytesIO(done.stdout)) as decoded:
        decoded.load()
        return decoded.copy()

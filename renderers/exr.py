"""Multilayer EXR reading and writing with Blender's naming.

An `ExrImage` is a list of parts ("ViewLayer.Combined", "ViewLayer.Denoising Depth", ...)
whose channels carry their full Blender names ("ViewLayer.Combined.R"). Blender 5 writes
one part per pass; older files put every channel in one part, which `read_exr` groups
back into passes, so callers see the same shape either way. `read_exr` also reports the
codec the file was stored with (`ExrImage.compression`), so a reader can refuse a lossy one.

`read_exr_header` (renderers.exr_header) reads only a file's header: a stranger's upload
is size-checked before a pixel is decoded, and `read_exr(path, max_pixels=...)` refuses
(ExrTooLargeError) a part over the bound before decoding anything.

This module only moves pixels between files and numpy arrays, losslessly: it never
writes lossy codecs, never changes a pixel's value or type, and writes atomically so a
reader never sees half a file. It must not know about tiles, the farm or Blender itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
import OpenEXR

from common.errors import ExrError
from renderers.atomic import write_atomically
from renderers.exr_header import ExrHeader, ExrPartHeader, ExrTooLargeError, read_exr_header
from renderers.regions import PixelRect

__all__ = [
    "LOSSLESS_COMPRESSIONS",
    "ExrHeader",
    "ExrImage",
    "ExrPart",
    "ExrPartHeader",
    "ExrTooLargeError",
    "Pixels",
    "compression_name",
    "crop",
    "read_exr",
    "read_exr_header",
    "same_pixels",
    "set_io_threads",
    "write_exr",
    "write_single_part_exr",
]

#: Codecs that store pixels exactly. DWAA/DWAB/B44/PXR24 are lossy and never written.
LOSSLESS_COMPRESSIONS = ("none", "rle", "zips", "zip", "piz")

_COMPRESSION_CODES: Mapping[str, Any] = MappingProxyType(
    {
        "none": OpenEXR.NO_COMPRESSION,
        "rle": OpenEXR.RLE_COMPRESSION,
        "zips": OpenEXR.ZIPS_COMPRESSION,
        "zip": OpenEXR.ZIP_COMPRESSION,
        "piz": OpenEXR.PIZ_COMPRESSION,
    }
)
_LOSSY_COMPRESSIONS = ("dwaa", "dwab", "b44", "b44a", "pxr24")

#: Pixel types an EXR can hold, as numpy reads and writes them.
_EXR_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint32))

_EXR_MAGIC = b"\x76\x2f\x31\x01"

#: Header keys that describe the file's structure; OpenEXR derives them on write, and a
#: stale copy (e.g. a read part's "name") makes the write fail.
_STRUCTURAL_KEYS = frozenset(
    {
        "name",
        "type",
        "channels",
        "chunkCount",
        "compression",
        "dataWindow",
        "displayWindow",
        "lineOrder",
        "tiles",
        "version",
    }
)

_NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})


@dataclass
class _IoThreads:
    #: Whether the process-wide OpenEXR thread count was chosen (by a caller or by default).
    chosen: bool = False


_IO_THREADS = _IoThreads()

Pixels = npt.NDArray[Any]


@dataclass
class ExrPart:
    """One pass (one EXR part in Blender 5): its channels and string attributes."""

    #: e.g. "ViewLayer.Combined".
    name: str
    #: Full channel name ("ViewLayer.Combined.R") -> 2-D (H, W) C-contiguous array.
    channels: dict[str, Pixels]
    #: String header attributes worth carrying (never Date/RenderTime or timings).
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class ExrImage:
    """A decoded (multilayer) EXR: every part has the same width and height."""

    width: int
    height: int
    parts: list[ExrPart]
    #: The codec the file was stored with, lower-case as OpenEXR names it without
    #: "_COMPRESSION" ("zip", "piz", "dwaa", "none", ...): for a multi-part file whose
    #: parts differ, the first one that is not in `LOSSLESS_COMPRESSIONS`. "" for an
    #: image made in memory (its codec is chosen when it is written).
    compression: str = ""

    def part(self, name: str) -> ExrPart:
        """The part called `name`; ExrError naming the available parts otherwise."""
        for part in self.parts:
            if part.name == name:
                return part
        available = ", ".join(repr(p.name) for p in self.parts) or "none"
        raise ExrError(f"The image has no part {name!r}; it has {available}.")

    def channel(self, name: str) -> Pixels:
        """The channel with full name `name`, from whichever part holds it."""
        for part in self.parts:
            if name in part.channels:
                return part.channels[name]
        raise ExrError(
            f"The image has no channel {name!r}.",
            hint=f"Its channels are: {_short_list(self.channel_names())}.",
        )

    def channel_names(self) -> list[str]:
        """Every full channel name, in part order."""
        return [name for part in self.parts for name in part.channels]

    def view_layers(self) -> list[str]:
        """View layer names in first-seen order ("ViewLayer" from "ViewLayer.Combined")."""
        layers: dict[str, None] = {}
        for part in self.parts:
            layer, dot, _ = part.name.rpartition(".")
            # Blender splits names from the right: pass names hold no dot, layer names may.
            if dot:
                layers.setdefault(layer, None)
        return list(layers)

    def combined_rgba(self, view_layer: str | None = None) -> npt.NDArray[np.float32]:
        """The Combined pass as (H, W, 4) float32 RGBA (alpha 1 where the file has none).

        Uses the first view layer by default. A plain (non-layered) EXR with bare
        R, G, B channels is accepted when no view layer is asked for.
        """
        layers = self.view_layers()
        if view_layer is None and not any(self._has_combined(layer) for layer in layers):
            names = set(self.channel_names())
            if {"R", "G", "B"} <= names:
                return self._stack_rgba("")
        if view_layer is None:
            if not layers:
                raise ExrError(
                    "The image has no view layers and no R, G, B channels.",
                    hint=f"Its channels are: {_short_list(self.channel_names())}.",
                )
            view_layer = layers[0]
        if not self._has_combined(view_layer):
            raise ExrError(
                f"The image has no Combined pass for view layer {view_layer!r}.",
                hint=f"Its parts are: {_short_list([p.name for p in self.parts])}.",
            )
        return self._stack_rgba(f"{view_layer}.Combined.")

    def _has_combined(self, view_layer: str) -> bool:
        prefix = f"{view_layer}.Combined."
        names = set(self.channel_names())
        return all(f"{prefix}{c}" in names for c in "RGB")

    def _stack_rgba(self, prefix: str) -> npt.NDArray[np.float32]:
        rgba = np.empty((self.height, self.width, 4), dtype=np.float32)
        for index, component in enumerate("RGB"):
            rgba[..., index] = self.channel(f"{prefix}{component}")
        if f"{prefix}A" in self.channel_names():
            rgba[..., 3] = self.channel(f"{prefix}A")
        else:
            rgba[..., 3] = 1.0
        return rgba


def set_io_threads(count: int | None = None) -> int:
    """Set how many threads OpenEXR uses to (de)compress, process-wide; returns the count.

    `None` means one per CPU this process may run on. Reading and writing call this
    with `None` on first use unless it was called before: the OpenEXR Python module
    starts with 0 (everything on the calling thread) and ignores the per-file
    `num_threads` argument, which made ZIP writes ~8x slower on 16 cores.
    """
    if count is None:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        count = count or os.cpu_count() or 1
    if count < 0:
        raise ExrError(f"{count} is not a thread count.", hint="Use 0 (no threads) or more.")
    OpenEXR.set_global_thread_count(count)
    _IO_THREADS.chosen = True
    return count


def read_exr(path: Path, *, max_pixels: int | None = None) -> ExrImage:
    """Read a (multilayer) EXR file: every part, every channel, at data-window size.

    Multi-part files keep their parts. A single-part file whose channels are named
    "Layer.Pass.Chan" is grouped into one part per "Layer.Pass". `max_pixels` bounds
    each part's width x height: a larger one raises ExrTooLargeError from the header
    alone, before any pixel is decoded.
    """
    path = Path(path)
    _check_is_exr_file(path)
    if max_pixels is not None:
        read_exr_header(path).check_size(path, max_pixels)
    _choose_io_threads()
    try:
        expected = OpenEXR.File(str(path), header_only=True)
        decoded = OpenEXR.File(str(path), separate_channels=True)
    except (RuntimeError, ValueError) as error:
        raise ExrError(
            f"{path} could not be read as an EXR file ({error}).",
            hint="The file may be truncated or corrupt; render or download it again.",
        ) from error
    # OpenEXR drops a part whose pixels fail to decode with only a printed warning, so a
    # truncated file would otherwise read as a valid image with fewer passes.
    expected_layout = [_header_layout(part.header) for part in expected.parts]
    decoded_layout = [(part.name() or "", sorted(part.channels)) for part in decoded.parts]
    if decoded_layout != expected_layout:
        decoded_names = {name for name, _ in decoded_layout}
        missing = [name or "(unnamed)" for name, _ in expected_layout if name not in decoded_names]
        raise ExrError(
            f"{path} is truncated or corrupt: the pixels of part(s) "
            f"{', '.join(missing) or 'some channels'} could not be decoded.",
            hint="Render or download the file again.",
        )
    width, height = _data_window_size(path, decoded.parts[0].header)
    compression = _stored_compression([part.header for part in expected.parts])
    parts: list[ExrPart] = []
    for exr_part in decoded.parts:
        if _data_window_size(path, exr_part.header) != (width, height):
            raise ExrError(
                f"{path} has parts of different sizes; Tessera needs one size for all passes."
            )
        attributes = _carried_attributes(exr_part.header)
        channels: dict[str, Pixels] = {}
        for name, channel in exr_part.channels.items():
            pixels = channel.pixels
            if pixels is None or pixels.shape != (height, width):
                raise ExrError(
                    f"{path}: channel {name!r} is not a full {width}x{height} plane "
                    "(subsampled or undecodable channels are not supported).",
                )
            channels[name] = np.ascontiguousarray(pixels)
        parts.append(ExrPart(exr_part.name() or "", channels, attributes))
    if len(parts) == 1:
        parts = _group_by_pass(parts[0])
    return ExrImage(width, height, parts, compression)


def write_exr(path: Path, image: ExrImage, *, compression: str = "zip") -> None:
    """Write `image` as a multi-part EXR, one part per `ExrPart`, atomically.

    Part names, channel names and string attributes are kept, so Blender reads the file
    back as the same view layers and passes. Lossy codecs are refused.
    """
    codec = _compression_code(compression)
    _check_writable(image)
    names = [part.name for part in image.parts]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ExrError(f"The image has several parts named {', '.join(map(repr, duplicates))}.")
    if len(names) > 1 and "" in names:
        # OpenEXR would silently call it "Part0", and the file would not read back the same.
        raise ExrError("A multi-part EXR needs a name for every part; one part has none.")
    exr_parts = [
        OpenEXR.Part(_header(codec, part.attributes), _contiguous(part.channels), part.name)
        for part in image.parts
    ]
    _write_atomically(path, OpenEXR.File(exr_parts))


def write_single_part_exr(
    path: Path,
    image: ExrImage,
    *,
    extra_attributes: Mapping[str, str] = _NO_ATTRIBUTES,
    compression: str = "zip",
) -> None:
    """Write every channel of every part into ONE part (what Cycles' file denoiser reads).

    Attributes of all parts are merged (the first part wins a clash), then
    `extra_attributes` are added on top. Written atomically; lossy codecs are refused.
    """
    codec = _compression_code(compression)
    _check_writable(image)
    channels: dict[str, Pixels] = {}
    attributes: dict[str, str] = {}
    for part in image.parts:
        for name, pixels in part.channels.items():
            if name in channels:
                raise ExrError(f"Channel {name!r} appears in more than one part.")
            channels[name] = pixels
        for key, value in part.attributes.items():
            attributes.setdefault(key, value)
    attributes.update(extra_attributes)
    exr_file = OpenEXR.File(_header(codec, attributes), _contiguous(channels))
    _write_atomically(path, exr_file)


def crop(image: ExrImage, rect: PixelRect) -> ExrImage:
    """The pixels of `rect` (in the image's own coordinates) as a new image (copied)."""
    if not (0 <= rect.x0 < rect.x1 <= image.width and 0 <= rect.y0 < rect.y1 <= image.height):
        raise ExrError(
            f"Crop {rect.to_list()} is empty or outside the {image.width}x{image.height} image."
        )
    rows, columns = slice(rect.y0, rect.y1), slice(rect.x0, rect.x1)
    parts = [
        ExrPart(
            part.name,
            {
                name: np.ascontiguousarray(pixels[rows, columns])
                for name, pixels in part.channels.items()
            },
            dict(part.attributes),
        )
        for part in image.parts
    ]
    return ExrImage(rect.width, rect.height, parts, image.compression)


def same_pixels(a: ExrImage, b: ExrImage, channels: Iterable[str] | None = None) -> bool:
    """Whether two images decode to the same pixels (same size, types and values).

    Compares all channels (and requires the same channel names) unless `channels`
    names the ones to compare. NaN equals NaN. Headers are ignored: they carry the
    render date and time, so file hashes of identical renders differ.
    """
    if (a.width, a.height) != (b.width, b.height):
        return False
    if channels is None:
        if sorted(a.channel_names()) != sorted(b.channel_names()):
            return False
        names: Iterable[str] = a.channel_names()
    else:
        names = channels
    present_a, present_b = set(a.channel_names()), set(b.channel_names())
    for name in names:
        if name not in present_a or name not in present_b:
            return False
        pixels_a, pixels_b = a.channel(name), b.channel(name)
        if pixels_a.dtype != pixels_b.dtype:
            return False
        equal_nan = pixels_a.dtype.kind == "f"
        if not np.array_equal(pixels_a, pixels_b, equal_nan=equal_nan):
            return False
    return True


# --- helpers ---------------------------------------------------------------------------------


def _check_is_exr_file(path: Path) -> None:
    if not path.exists():
        raise ExrError(
            f"EXR file {path} does not exist.",
            hint="Check the path; the render may have failed before writing it.",
        )
    if not path.is_file():
        raise ExrError(f"{path} is not a file.", hint="Pass the path of an .exr file.")
    try:
        with path.open("rb") as stream:
            magic = stream.read(len(_EXR_MAGIC))
    except OSError as error:
        raise ExrError(
            f"EXR file {path} cannot be read ({error.strerror}).",
            hint="Check the file's permissions.",
        ) from error
    if magic != _EXR_MAGIC:
        raise ExrError(
            f"{path} is not an EXR file.",
            hint="Set the output format to OpenEXR MultiLayer, or pass the .exr the render wrote.",
        )


def _header_layout(header: Mapping[str, Any]) -> tuple[str, list[str]]:
    name = header.get("name") or ""
    return name, sorted(channel.name for channel in header.get("channels", []))


def _data_window_size(path: Path, header: Mapping[str, Any]) -> tuple[int, int]:
    try:
        (x0, y0), (x1, y1) = header["dataWindow"]
    except (KeyError, TypeError, ValueError) as error:
        raise ExrError(f"{path} has no usable data window in its header.") from error
    return int(x1) - int(x0) + 1, int(y1) - int(y0) + 1


def compression_name(codec: Any) -> str:
    """OpenEXR's codec as Tessera names it: Compression.DWAA_COMPRESSION -> "dwaa"."""
    name = str(getattr(codec, "name", codec))
    name = name.rsplit(".", 1)[-1].upper().removesuffix("_COMPRESSION")
    return "none" if name == "NO" else name.lower()


def _stored_compression(headers: Iterable[Mapping[str, Any]]) -> str:
    names = [compression_name(header.get("compression", "unknown")) for header in headers]
    unusual = [name for name in names if name not in LOSSLESS_COMPRESSIONS]
    return (unusual or names or [""])[0]


def _carried_attributes(header: Mapping[str, Any]) -> dict[str, str]:
    return {
        key: value
        for key, value in header.items()
        if isinstance(value, str) and key not in _STRUCTURAL_KEYS and not _is_volatile(key)
    }


def _is_volatile(key: str) -> bool:
    # Date and render times differ on every render and describe one tile, not the frame.
    return key in ("Date", "RenderTime") or key.endswith("_time")


def _group_by_pass(part: ExrPart) -> list[ExrPart]:
    groups: dict[str, dict[str, Pixels]] = {}
    for name, pixels in part.channels.items():
        prefix, dot, _ = name.rpartition(".")
        groups.setdefault(prefix if dot else part.name, {})[name] = pixels
    return [ExrPart(name, channels, dict(part.attributes)) for name, channels in groups.items()]


def _compression_code(compression: str) -> Any:
    key = compression.strip().lower()
    if key in _COMPRESSION_CODES:
        return _COMPRESSION_CODES[key]
    if key in _LOSSY_COMPRESSIONS:
        raise ExrError(
            f"EXR compression {compression!r} is lossy; Tessera only writes lossless EXRs.",
            hint=f"Use one of {', '.join(LOSSLESS_COMPRESSIONS)}.",
        )
    raise ExrError(
        f"Unknown EXR compression {compression!r}.",
        hint=f"Use one of {', '.join(LOSSLESS_COMPRESSIONS)}.",
    )


def _check_writable(image: ExrImage) -> None:
    if not image.parts or not any(part.channels for part in image.parts):
        raise ExrError("The image has no channels to write.")
    for part in image.parts:
        if not part.channels:
            raise ExrError(f"Part {part.name!r} has no channels to write.")
        for name, pixels in part.channels.items():
            if pixels.shape != (image.height, image.width):
                raise ExrError(
                    f"Channel {name!r} is {pixels.shape[::-1]} but the image is "
                    f"{image.width}x{image.height}."
                )
            if pixels.dtype not in _EXR_DTYPES:
                raise ExrError(
                    f"Channel {name!r} has type {pixels.dtype}; EXR stores float32, "
                    "float16 or uint32.",
                    hint="Convert the array with .astype(numpy.float32) first.",
                )


def _header(codec: Any, attributes: Mapping[str, str]) -> dict[str, Any]:
    # A fresh dict per part: OpenEXR.Part fills in dataWindow and name in place.
    carried = {k: v for k, v in attributes.items() if k not in _STRUCTURAL_KEYS}
    return {"compression": codec, "type": OpenEXR.scanlineimage, **carried}


def _contiguous(channels: Mapping[str, Pixels]) -> dict[str, Pixels]:
    # OpenEXR 3.5.3 writes a non-contiguous view (e.g. rgba[..., 0]) silently wrong, and
    # replaces the arrays of the dict it is given with Channel objects: always a new dict.
    return {name: np.ascontiguousarray(pixels) for name, pixels in channels.items()}


def _write_atomically(path: Path, exr_file: Any) -> None:
    _choose_io_threads()
    write_atomically(Path(path), lambda temporary: exr_file.write(str(temporary)))


def _choose_io_threads() -> None:
    if not _IO_THREADS.chosen:
        set_io_threads()


def _short_list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown or "none"

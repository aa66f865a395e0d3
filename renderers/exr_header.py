"""Read an OpenEXR file's header and nothing else: a cheap size check before decoding.

A few kilobytes of ZIP-compressed zeros can claim 8000x8000 float pixels per channel
(256 MiB each, gigabytes for a multilayer frame): decoding a stranger's upload before
knowing its size is a decompression bomb. `read_exr_header` parses the header bytes
itself (the OpenEXR 2 file layout: magic, version flags, then one attribute list per
part), reading at most `MAX_HEADER_BYTES` and never a pixel, and reports every part's
data window, channels and compression. `ExrHeader.check_size` refuses a file over a
pixel budget; `renderers.exr.read_exr(max_pixels=...)` does so before decoding.

Standard library only; never touches the network.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from common.errors import ExrError

__all__ = [
    "MAX_HEADER_BYTES",
    "ExrHeader",
    "ExrPartHeader",
    "ExrTooLargeError",
    "read_exr_header",
]

#: No real header comes near this (Blender's are a few KiB); a larger one is refused.
MAX_HEADER_BYTES = 16 << 20
#: More parts than any render has passes; a file claiming more is refused.
MAX_PARTS = 4096

_MAGIC = b"\x76\x2f\x31\x01"
_TILED, _LONG_NAMES, _DEEP, _MULTIPART = 0x200, 0x400, 0x800, 0x1000
_COMPRESSIONS = (
    "none",
    "rle",
    "zips",
    "zip",
    "piz",
    "pxr24",
    "b44",
    "b44a",
    "dwaa",
    "dwab",
    "htj2k256",
    "htj2k32",
)
#: Bytes per sample of each pixel type (UINT, HALF, FLOAT).
_PIXEL_TYPES = {0: ("uint", 4), 1: ("half", 2), 2: ("float", 4)}


class ExrTooLargeError(ExrError):
    """An EXR whose header claims more pixels than the reader allows (refused before
    any pixel is decoded)."""

    default_hint = "Render at a lower resolution, or split the frame into more tiles."


@dataclass(frozen=True, slots=True)
class ExrPartHeader:
    """One part as its header describes it (no pixel was read)."""

    name: str
    #: (x_min, y_min, x_max, y_max), inclusive, as stored.
    data_window: tuple[int, int, int, int]
    #: Channel name -> pixel type ("half", "float", "uint").
    channels: dict[str, str]
    compression: str
    #: "scanlineimage", "tiledimage", "deepscanline"... ("" when the header has none).
    type: str = ""

    @property
    def width(self) -> int:
        return self.data_window[2] - self.data_window[0] + 1

    @property
    def height(self) -> int:
        return self.data_window[3] - self.data_window[1] + 1

    @property
    def pixels(self) -> int:
        return max(self.width, 0) * max(self.height, 0)

    @property
    def decoded_bytes(self) -> int:
        """Memory its channels take once decoded."""
        return self.pixels * sum(_SAMPLE_BYTES[kind] for kind in self.channels.values())


_SAMPLE_BYTES = {name: size for name, size in _PIXEL_TYPES.values()}


@dataclass(frozen=True, slots=True)
class ExrHeader:
    """Every part of an EXR file, from its header alone."""

    parts: tuple[ExrPartHeader, ...]
    version: int
    tiled: bool
    deep: bool
    multipart: bool

    @property
    def max_pixels(self) -> int:
        """The largest part's width x height."""
        return max((part.pixels for part in self.parts), default=0)

    @property
    def decoded_bytes(self) -> int:
        """Memory every channel of every part takes once decoded."""
        return sum(part.decoded_bytes for part in self.parts)

    def check_size(self, path: Path, max_pixels: int | None) -> None:
        """Raise ExrTooLargeError when a part is over `max_pixels` (None: no bound)."""
        if max_pixels is None:
            return
        for part in self.parts:
            if part.pixels > max_pixels:
                raise ExrTooLargeError(
                    f"{path}: part {part.name or '(unnamed)'} is {part.width}x{part.height} "
                    f"pixels, more than the {max_pixels} allowed; it was not decoded."
                )


def read_exr_header(path: Path) -> ExrHeader:
    """Parse the header of the EXR file at `path` without reading any pixel.

    Raises ExrError for a file that is missing, not an EXR, truncated within its
    header, or whose header is implausible (over MAX_HEADER_BYTES or MAX_PARTS, an
    inverted data window, an unknown pixel type).
    """
    path = Path(path)
    try:
        with path.open("rb") as stream:
            return _parse(_Reader(stream, path), path)
    except OSError as error:
        raise ExrError(f"EXR file {path} cannot be read ({error.strerror or error}).") from error


class _Reader:
    """Bounded reads from the start of a file: never more than MAX_HEADER_BYTES."""

    def __init__(self, stream: BinaryIO, path: Path) -> None:
        self.stream, self.path, self.used = stream, path, 0

    def take(self, count: int) -> bytes:
        if count < 0 or self.used + count > MAX_HEADER_BYTES:
            raise ExrError(f"{self.path}: the EXR header is larger than {MAX_HEADER_BYTES} bytes.")
        data = self.stream.read(count)
        self.used += len(data)
        if len(data) != count:
            raise ExrError(f"{self.path} is truncated within its EXR header.")
        return data

    def name(self, limit: int) -> str:
        """A null-terminated string of at most `limit` bytes ('' for the terminator)."""
        raw = bytearray()
        while (byte := self.take(1)) != b"\0":
            raw += byte
            if len(raw) > limit:
                raise ExrError(f"{self.path}: a name in the EXR header is over {limit} bytes.")
        return raw.decode("utf-8", errors="replace")


def _parse(reader: _Reader, path: Path) -> ExrHeader:
    if reader.stream.read(4) != _MAGIC:
        raise ExrError(f"{path} is not an EXR file.")
    reader.used = 4
    (flags,) = struct.unpack("<i", reader.take(4))
    version = flags & 0xFF
    if version != 2:
        raise ExrError(f"{path}: EXR file version {version} is not supported.")
    limit = 255 if flags & _LONG_NAMES else 31
    multipart = bool(flags & _MULTIPART)
    parts: list[ExrPartHeader] = []
    while True:
        attributes = _attributes(reader, path, limit)
        if attributes is None:  # the empty header that ends a multi-part list
            break
        parts.append(_part(attributes, path))
        if not multipart:
            break
        if len(parts) > MAX_PARTS:
            raise ExrError(f"{path} claims more than {MAX_PARTS} parts.")
    if not parts:
        raise ExrError(f"{path} has no parts in its EXR header.")
    return ExrHeader(tuple(parts), version, bool(flags & _TILED), bool(flags & _DEEP), multipart)


def _attributes(reader: _Reader, path: Path, limit: int) -> dict[str, tuple[str, bytes]] | None:
    attributes: dict[str, tuple[str, bytes]] = {}
    while name := reader.name(limit):
        kind = reader.name(limit)
        (size,) = struct.unpack("<i", reader.take(4))
        attributes[name] = (kind, reader.take(size))
    return attributes or None


def _part(attributes: dict[str, tuple[str, bytes]], path: Path) -> ExrPartHeader:
    def value(name: str, kind: str) -> bytes:
        found = attributes.get(name)
        if found is None or found[0] != kind:
            raise ExrError(f"{path}: the EXR header has no {kind} attribute '{name}'.")
        return found[1]

    window = value("dataWindow", "box2i")
    if len(window) != 16:
        raise ExrError(f"{path}: the EXR data window is malformed.")
    x0, y0, x1, y1 = struct.unpack("<4i", window)
    if x1 < x0 or y1 < y0:
        raise ExrError(f"{path}: the EXR data window ({x0},{y0})-({x1},{y1}) is empty.")
    codec = value("compression", "compression")
    if len(codec) != 1:
        raise ExrError(f"{path}: the EXR compression attribute is malformed.")
    compression = _COMPRESSIONS[codec[0]] if codec[0] < len(_COMPRESSIONS) else f"#{codec[0]}"
    name_kind = attributes.get("name", ("string", b""))
    type_kind = attributes.get("type", ("string", b""))
    return ExrPartHeader(
        name=name_kind[1].decode("utf-8", errors="replace"),
        data_window=(x0, y0, x1, y1),
        channels=_channels(value("channels", "chlist"), path),
        compression=compression,
        type=type_kind[1].decode("utf-8", errors="replace"),
    )


def _channels(data: bytes, path: Path) -> dict[str, str]:
    channels: dict[str, str] = {}
    offset = 0
    while offset < len(data) and data[offset] != 0:
        end = data.find(b"\0", offset)
        if end < 0 or end + 17 > len(data):
            raise ExrError(f"{path}: the EXR channel list is malformed.")
        name = data[offset:end].decode("utf-8", errors="replace")
        (pixel_type,) = struct.unpack_from("<i", data, end + 1)
        if pixel_type not in _PIXEL_TYPES:
            raise ExrError(f"{path}: channel {name!r} has unknown pixel type {pixel_type}.")
        channels[name] = _PIXEL_TYPES[pixel_type][0]
        offset = end + 17  # type (4), pLinear (1), reserved (3), x/y sampling (4 + 4)
    return channels

"""EXR decompression bombs (issue 17, finding 7): the header alone tells the size.

`read_exr_header` reads no pixel: a ~1 MB ZIP file that decodes to 768 MiB is
size-checked in a few KiB of memory, and `read_exr(max_pixels=...)` refuses it before
decoding. The header parser is checked against OpenEXR's own on real and synthetic files.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import OpenEXR
import pytest

from common.errors import ExrError
from renderers.exr import (
    ExrHeader,
    ExrImage,
    ExrPart,
    ExrTooLargeError,
    compression_name,
    read_exr,
    read_exr_header,
    write_exr,
    write_single_part_exr,
)
from renderers.exr_header import MAX_HEADER_BYTES
from tests.test_exr import blender_exr, synthetic_image

__all__ = ["blender_exr"]  # the real render fixture, shared with test_exr

ROOT = Path(__file__).resolve().parents[1]


def _attribute(name: str, kind: str, data: bytes) -> bytes:
    return name.encode() + b"\0" + kind.encode() + b"\0" + struct.pack("<i", len(data)) + data


def _header(size: int, channels: str = "RGB") -> bytes:
    chlist = b"".join(
        c.encode() + b"\0" + struct.pack("<iB3xii", 2, 0, 1, 1) for c in sorted(channels)
    )
    window = struct.pack("<4i", 0, 0, size - 1, size - 1)
    return b"".join(
        [
            _attribute("channels", "chlist", chlist + b"\0"),
            _attribute("compression", "compression", bytes([3])),  # ZIP
            _attribute("dataWindow", "box2i", window),
            _attribute("displayWindow", "box2i", window),
            _attribute("lineOrder", "lineOrder", bytes([0])),
            _attribute("pixelAspectRatio", "float", struct.pack("<f", 1.0)),
            _attribute("screenWindowCenter", "v2f", struct.pack("<2f", 0, 0)),
            _attribute("screenWindowWidth", "float", struct.pack("<f", 1.0)),
        ]
    )


def write_bomb(path: Path, size: int, channels: str = "RGB") -> Path:
    """A valid scanline ZIP EXR of `size`x`size` float zeros, written chunk by chunk
    without ever holding the pixels: every 16-line chunk is the same tiny zlib block."""
    header = _header(size, channels) + b"\0"
    lines, chunks = 16, (size + 15) // 16
    # ZIP's predictor stores each byte as a difference + 128: zeros encode as 0, 128, ...
    raw = size * lines * 4 * len(channels)
    block = zlib.compress(bytes([0]) + bytes([128]) * (raw - 1), 9)
    start = 8 + len(header) + 8 * chunks
    offsets = [start + i * (8 + len(block)) for i in range(chunks)]
    with path.open("wb") as out:
        out.write(b"\x76\x2f\x31\x01" + struct.pack("<i", 2) + header)
        out.write(struct.pack(f"<{chunks}Q", *offsets))
        for i in range(chunks):
            out.write(struct.pack("<ii", i * lines, len(block)) + block)
    return path


def test_a_small_bomb_is_a_real_exr(tmp_path: Path) -> None:
    """The bomb builder writes files OpenEXR decodes (so the big one is a real bomb)."""
    image = read_exr(write_bomb(tmp_path / "small.exr", 64))
    assert (image.width, image.height) == (64, 64)
    assert all(not channel.any() for channel in image.parts[0].channels.values())


MEASURE = r"""
import json, resource, sys
from pathlib import Path
from renderers.exr import ExrTooLargeError, read_exr, read_exr_header
path = Path(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
header = read_exr_header(path)
try:
    read_exr(path, max_pixels=4096 * 4096)
    refused = False
except ExrTooLargeError as exc:
    refused = str(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
part = header.parts[0]
print(json.dumps({"grew_kib": after - before, "size": [part.width, part.height],
                  "channels": part.channels, "compression": part.compression,
                  "decoded": header.decoded_bytes, "refused": refused}))
"""


def test_an_8000px_zip_bomb_is_sized_from_its_header_in_little_memory(tmp_path: Path) -> None:
    bomb = write_bomb(tmp_path / "bomb.exr", 8000)
    assert bomb.stat().st_size < 1_200_000, "about a megabyte on disk"
    completed = subprocess.run(
        [sys.executable, "-c", MEASURE, str(bomb)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    report = json.loads(completed.stdout)
    assert report["size"] == [8000, 8000]
    assert report["channels"] == {"B": "float", "G": "float", "R": "float"}
    assert report["compression"] == "zip"
    assert report["decoded"] == 8000 * 8000 * 4 * 3, "768 MiB once decoded"
    assert report["refused"] and "8000x8000" in report["refused"]
    assert "not decoded" in report["refused"]
    assert report["grew_kib"] < 50 * 1024, f"grew {report['grew_kib']} KiB"


def test_header_matches_openexr_on_a_real_blender_render(blender_exr: Path) -> None:
    _same_as_openexr(blender_exr)
    header = read_exr_header(blender_exr)
    assert header.multipart and len(header.parts) > 1
    assert (header.parts[0].width, header.parts[0].height) == (64, 48)
    assert header.max_pixels == 64 * 48
    read_exr(blender_exr, max_pixels=64 * 48)  # exactly at the bound: read
    with pytest.raises(ExrTooLargeError, match="64x48"):
        read_exr(blender_exr, max_pixels=64 * 48 - 1)


@pytest.mark.parametrize("compression", ["none", "rle", "zips", "zip", "piz"])
def test_header_matches_openexr_on_written_files(tmp_path: Path, compression: str) -> None:
    image = synthetic_image()
    write_exr(tmp_path / "multi.exr", image, compression=compression)
    header = _same_as_openexr(tmp_path / "multi.exr")
    assert [p.name for p in header.parts] == [p.name for p in image.parts]
    kinds = {p.name: set(p.channels.values()) for p in header.parts}
    assert kinds["ViewLayer.Denoising Albedo"] == {"half"}
    assert kinds["ViewLayer.IndexOB"] == {"uint"}
    single = tmp_path / "single.exr"
    channels = {f"L.Combined.{c}": np.zeros((5, 7), np.float32) for c in "RG"}
    write_single_part_exr(
        single, ExrImage(7, 5, [ExrPart("L.Combined", channels)]), compression=compression
    )
    header = _same_as_openexr(single)
    assert not header.multipart and (header.parts[0].width, header.parts[0].height) == (7, 5)


def _same_as_openexr(path: Path) -> ExrHeader:
    header = read_exr_header(path)
    theirs = OpenEXR.File(str(path), header_only=True).parts
    assert len(header.parts) == len(theirs)
    for mine, part in zip(header.parts, theirs, strict=True):
        (x0, y0), (x1, y1) = part.header["dataWindow"]
        assert mine.data_window == (int(x0), int(y0), int(x1), int(y1))
        assert sorted(mine.channels) == sorted(c.name for c in part.header["channels"])
        assert mine.compression == compression_name(part.header["compression"])
        assert mine.name == (part.header.get("name") or "")
    return header


def test_broken_headers_are_errors_not_allocations(tmp_path: Path) -> None:
    path = tmp_path / "x.exr"
    path.write_text("not an exr at all")
    with pytest.raises(ExrError, match="not an EXR"):
        read_exr_header(path)
    good = write_bomb(tmp_path / "good.exr", 32).read_bytes()
    path.write_bytes(good[:60])
    with pytest.raises(ExrError, match="truncated within its EXR header"):
        read_exr_header(path)
    # An attribute claiming 2 GiB: refused by size, never read or allocated.
    huge = b"channels\0chlist\0" + struct.pack("<i", 2**31 - 1)
    path.write_bytes(b"\x76\x2f\x31\x01" + struct.pack("<i", 2) + huge)
    with pytest.raises(ExrError, match=f"larger than {MAX_HEADER_BYTES}"):
        read_exr_header(path)
    inverted = _header(16).replace(
        struct.pack("<4i", 0, 0, 15, 15), struct.pack("<4i", 0, 0, -5, 15), 1
    )
    path.write_bytes(b"\x76\x2f\x31\x01" + struct.pack("<i", 2) + inverted + b"\0")
    with pytest.raises(ExrError, match="is empty"):
        read_exr_header(path)
    with pytest.raises(ExrError, match="does not exist"):
        read_exr(tmp_path / "missing.exr", max_pixels=1)


def test_max_pixels_none_reads_as_before(tmp_path: Path) -> None:
    image = ExrImage(3, 2, [ExrPart("L.Combined", {"L.Combined.R": np.ones((2, 3), np.float32)})])
    write_exr(tmp_path / "a.exr", image)
    assert read_exr(tmp_path / "a.exr").width == 3
    assert read_exr(tmp_path / "a.exr", max_pixels=None).height == 2

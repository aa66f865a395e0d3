"""The bundle cache with real zip files: hash checks, every way out of the bundle folder
refused before a byte is written, zip bombs, LRU eviction and pinned bundles."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from common.errors import BundleError
from farm_node.bundle_cache import BundleCache
from farm_node.errors import UnsafeBundleError

Entry = tuple[str | zipfile.ZipInfo, bytes]


def _zip_bytes(entries: Iterable[Entry], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Source:
    """A fake coordinator's bundle store: counts fetches."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.fetches: list[str] = []

    def add(self, data: bytes) -> str:
        sha = _sha(data)
        self.blobs[sha] = data
        return sha

    def fetcher(self, sha: str, data: bytes | None = None) -> Callable[[Path], Path]:
        def fetch(target: Path) -> Path:
            self.fetches.append(sha)
            target.write_bytes(self.blobs[sha] if data is None else data)
            return target

        return fetch


@pytest.fixture()
def source() -> Source:
    return Source()


def _files_under(root: Path) -> list[str]:
    return sorted(
        str(path.relative_to(root)) for path in root.rglob("*") if path.name != "index.json"
    )


def test_ensure_extracts_once_and_reuses(tmp_path: Path, source: Source) -> None:
    sha = source.add(_zip_bytes([("scene.blend", b"BLENDER"), ("tex/wood.png", b"png")]))
    cache = BundleCache(tmp_path / "cache", max_bytes=1 << 20)
    folder = cache.ensure(sha, source.fetcher(sha))
    assert folder == tmp_path / "cache" / sha
    assert (folder / "scene.blend").read_bytes() == b"BLENDER"
    assert (folder / "tex" / "wood.png").read_bytes() == b"png"
    assert cache.ensure(sha, source.fetcher(sha)) == folder
    assert source.fetches == [sha]
    assert cache.cached() == [sha]
    assert not (tmp_path / "cache" / f"{sha}.zip").exists(), "the zip is dropped once extracted"


def test_a_new_cache_on_the_same_folder_knows_the_bundles(tmp_path: Path, source: Source) -> None:
    sha = source.add(_zip_bytes([("scene.blend", b"x")]))
    BundleCache(tmp_path, max_bytes=1 << 20).ensure(sha, source.fetcher(sha))
    again = BundleCache(tmp_path, max_bytes=1 << 20)
    assert again.cached() == [sha]
    again.ensure(sha, source.fetcher(sha))
    assert source.fetches == [sha]


def test_hash_mismatch_deletes_the_download(tmp_path: Path, source: Source) -> None:
    sha = source.add(_zip_bytes([("scene.blend", b"good")]))
    cache = BundleCache(tmp_path, max_bytes=1 << 20)
    with pytest.raises(BundleError, match="corrupt"):
        cache.ensure(sha, source.fetcher(sha, _zip_bytes([("scene.blend", b"evil")])))
    assert _files_under(tmp_path) == []
    assert cache.cached() == []


def test_a_fetch_that_fails_leaves_nothing(tmp_path: Path) -> None:
    def broken(target: Path) -> Path:
        target.write_bytes(b"half")
        raise OSError("connection reset")

    cache = BundleCache(tmp_path, max_bytes=1 << 20)
    with pytest.raises(OSError, match="reset"):
        cache.ensure("a" * 64, broken)
    assert _files_under(tmp_path) == []


def test_a_bad_hash_is_refused_before_fetching(tmp_path: Path, source: Source) -> None:
    cache = BundleCache(tmp_path, max_bytes=1 << 20)
    with pytest.raises(BundleError, match="not a bundle hash"):
        cache.ensure("../../etc", source.fetcher("x"))
    assert source.fetches == []


def test_not_a_zip_is_a_bundle_error(tmp_path: Path, source: Source) -> None:
    sha = source.add(b"this is no zip")
    with pytest.raises(BundleError, match="not a readable zip"):
        BundleCache(tmp_path, max_bytes=1 << 20).ensure(sha, source.fetcher(sha))
    assert _files_under(tmp_path) == []


def _symlink(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _fifo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFIFO | 0o644) << 16
    return info


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("/etc/cron.d/evil", "absolute path"),
        ("../outside.txt", "'..' component"),
        ("textures/../../outside.txt", "'..' component"),
        ("C:/Windows/evil.dll", "drive letter"),
        ("c:evil.txt", "drive letter"),
        ("..\\outside.txt", "backslash"),
        ("textures\\wood.png", "backslash"),
        (_symlink("link", "/etc/passwd"), "symbolic link"),
        (_fifo("pipe"), "special file"),
    ],
    ids=[
        "absolute",
        "dotdot",
        "nested-dotdot",
        "drive",
        "drive-relative",
        "backslash-dotdot",
        "backslash",
        "symlink",
        "fifo",
    ],
)
def test_escape_attempts_are_refused_before_anything_is_written(
    tmp_path: Path, source: Source, entry: str | zipfile.ZipInfo, reason: str
) -> None:
    # The bad entry comes LAST: the good ones before it must not be written either.
    data = b"/etc/passwd" if isinstance(entry, zipfile.ZipInfo) else b"payload"
    sha = source.add(_zip_bytes([("scene.blend", b"ok"), ("a/b.txt", b"ok"), (entry, data)]))
    cache = BundleCache(tmp_path / "cache", max_bytes=1 << 20)
    name = entry.filename if isinstance(entry, zipfile.ZipInfo) else entry
    with pytest.raises(UnsafeBundleError, match=reason) as raised:
        cache.ensure(sha, source.fetcher(sha))
    assert repr(name) in str(raised.value), "the error names the entry"
    assert _files_under(tmp_path / "cache") == []
    assert _files_under(tmp_path) == ["cache"]
    assert cache.cached() == []


def test_encrypted_entries_are_refused(tmp_path: Path, source: Source) -> None:
    raw = bytearray(_zip_bytes([("scene.blend", b"x")], zipfile.ZIP_STORED))
    # Set the "encrypted" flag bit in both the local header and the central directory.
    local = raw.find(b"PK\x03\x04")
    central = raw.find(b"PK\x01\x02")
    raw[local + 6] |= 1
    raw[central + 8] |= 1
    sha = source.add(bytes(raw))
    with pytest.raises(UnsafeBundleError, match="encryption"):
        BundleCache(tmp_path, max_bytes=1 << 20).ensure(sha, source.fetcher(sha))


def test_a_size_bomb_is_refused_before_anything_is_written(tmp_path: Path, source: Source) -> None:
    # 3 MiB of zeros compress to a few KiB; the limit is 2 MiB.
    sha = source.add(_zip_bytes([("scene.blend", b"ok"), ("bomb.bin", bytes(3 << 20))]))
    cache = BundleCache(tmp_path / "c", max_bytes=1 << 30, max_uncompressed_bytes=2 << 20)
    with pytest.raises(UnsafeBundleError, match="extract to"):
        cache.ensure(sha, source.fetcher(sha))
    assert _files_under(tmp_path / "c") == []


def test_a_file_count_bomb_is_refused_before_anything_is_written(
    tmp_path: Path, source: Source
) -> None:
    sha = source.add(_zip_bytes((f"f{i}.txt", b"") for i in range(101)))
    cache = BundleCache(tmp_path / "c", max_bytes=1 << 30, max_files=100)
    with pytest.raises(UnsafeBundleError, match="101 entries"):
        cache.ensure(sha, source.fetcher(sha))
    assert _files_under(tmp_path / "c") == []


def test_an_entry_that_lies_about_its_size_is_stopped(tmp_path: Path, source: Source) -> None:
    payload = bytes(1 << 20)
    raw = bytearray(_zip_bytes([("scene.blend", payload)]))
    # Shrink the declared uncompressed size (central directory, offset 24) to 10 bytes.
    central = raw.find(b"PK\x01\x02")
    raw[central + 24 : central + 28] = (10).to_bytes(4, "little")
    sha = source.add(bytes(raw))
    with pytest.raises(BundleError):
        BundleCache(tmp_path / "c", max_bytes=1 << 30).ensure(sha, source.fetcher(sha))
    assert _files_under(tmp_path / "c") == []


def test_default_limits(tmp_path: Path) -> None:
    cache = BundleCache(tmp_path, max_bytes=1)
    assert cache.max_uncompressed_bytes == 8 << 30
    assert cache.max_files == 20_000


def _bundle(source: Source, index: int, size: int = 1000) -> str:
    # Stored, so the extracted size is what the test expects.
    return source.add(_zip_bytes([(f"scene{index}.blend", bytes([index]) * size)], 0))


def test_least_recently_used_bundles_are_evicted(tmp_path: Path, source: Source) -> None:
    cache = BundleCache(tmp_path, max_bytes=3500)
    first, second, third = (_bundle(source, i) for i in range(3))
    for sha in (first, second, third):
        cache.ensure(sha, source.fetcher(sha))
    cache.ensure(first, source.fetcher(first))  # first is now the most recent
    fourth = _bundle(source, 3)
    cache.ensure(fourth, source.fetcher(fourth))
    assert set(cache.cached()) == {first, third, fourth}
    assert not (tmp_path / second).exists()
    assert cache.total_bytes() <= 3500
    fifth = _bundle(source, 4)
    cache.ensure(fifth, source.fetcher(fifth))
    assert set(cache.cached()) == {first, fourth, fifth}
    assert cache.cached()[0] == fifth


def test_pinned_bundles_survive_eviction(tmp_path: Path, source: Source) -> None:
    cache = BundleCache(tmp_path, max_bytes=2500)
    old, newer = _bundle(source, 0), _bundle(source, 1)
    with cache.pin(old):
        cache.ensure(old, source.fetcher(old))
        cache.ensure(newer, source.fetcher(newer))
        third = _bundle(source, 2)
        cache.ensure(third, source.fetcher(third))
        assert old in cache.cached(), "in use: never evicted"
        assert (tmp_path / old / "scene0.blend").exists()
        assert newer not in cache.cached()
    # Leaving the pin counts as a use: the next eviction takes `third`, then `old`.
    fourth, fifth = _bundle(source, 3), _bundle(source, 4)
    cache.ensure(fourth, source.fetcher(fourth))
    assert set(cache.cached()) == {old, fourth}
    cache.ensure(fifth, source.fetcher(fifth))
    assert set(cache.cached()) == {fourth, fifth}, "unpinned, it can go"


def test_a_bundle_larger_than_the_cache_is_still_served(tmp_path: Path, source: Source) -> None:
    cache = BundleCache(tmp_path, max_bytes=10)
    sha = _bundle(source, 0)
    folder = cache.ensure(sha, source.fetcher(sha))
    assert (folder / "scene0.blend").exists()


def test_the_index_is_written_atomically_and_reconciled(tmp_path: Path, source: Source) -> None:
    cache = BundleCache(tmp_path, max_bytes=1 << 20)
    sha = _bundle(source, 0)
    cache.ensure(sha, source.fetcher(sha))
    index = json.loads((tmp_path / "index.json").read_text())
    assert set(index["bundles"]) == {sha}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # Debris of a killed node, and an index that lies, are cleaned up on start.
    (tmp_path / ".extract-dead").mkdir()
    (tmp_path / f"{'b' * 64}.zip").write_bytes(b"partial")
    (tmp_path / "index.json").write_text('{"bundles": {"' + "c" * 64 + '": {"last_used": 1}}}')
    again = BundleCache(tmp_path, max_bytes=1 << 20)
    assert again.cached() == [sha]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([sha, "index.json"])


def test_a_corrupt_index_is_rebuilt(tmp_path: Path, source: Source) -> None:
    cache = BundleCache(tmp_path, max_bytes=1 << 20)
    sha = _bundle(source, 0)
    cache.ensure(sha, source.fetcher(sha))
    (tmp_path / "index.json").write_text("{not json")
    assert BundleCache(tmp_path, max_bytes=1 << 20).cached() == [sha]


# --- entries that cannot be decoded (issue 17): refused, naming the entry, never a crash ---


def _corrupt_second_entry(compression: int) -> bytes:
    """A bundle with an intact scene and a second entry whose compressed data is garbage."""
    payload = bytes(range(256)) * 64
    entries = [("scene.blend", b"BLENDER-v300 intact"), ("tex/wood.png", payload)]
    raw = bytearray(_zip_bytes(entries, compression))
    # The second local header; its data starts after the fixed header, name and extra.
    local = raw.find(b"PK\x03\x04", 1)
    name_length = int.from_bytes(raw[local + 26 : local + 28], "little")
    extra_length = int.from_bytes(raw[local + 28 : local + 30], "little")
    start = local + 30 + name_length + extra_length
    skip = 16 if compression == zipfile.ZIP_LZMA else 0  # keep LZMA's properties header
    for offset in range(start + skip, start + skip + 64):
        raw[offset] = 0xFF
    return bytes(raw)


def _method(compression: int, method: int) -> bytes:
    """A one-entry bundle that declares compression `method` (e.g. 9, Deflate64; 99, AES)."""
    raw = bytearray(_zip_bytes([("scene.blend", b"x" * 100), ("tex/a.bin", b"y" * 100)]))
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        position = raw.find(signature, raw.find(signature) + 1)
        raw[position + offset : position + offset + 2] = method.to_bytes(2, "little")
    return bytes(raw)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (lambda: _corrupt_second_entry(zipfile.ZIP_DEFLATED), "cannot be decoded"),
        (lambda: _corrupt_second_entry(zipfile.ZIP_LZMA), "cannot be decoded"),
        (lambda: _corrupt_second_entry(zipfile.ZIP_BZIP2), "cannot be decoded"),
        (lambda: _method(zipfile.ZIP_DEFLATED, 9), "compression method 9"),
        (lambda: _method(zipfile.ZIP_DEFLATED, 99), "compression method 99"),
    ],
    ids=["deflate", "lzma", "bzip2", "deflate64", "aes"],
)
def test_an_entry_that_cannot_be_decoded_is_refused_naming_it(
    tmp_path: Path, source: Source, data: Callable[[], bytes], reason: str
) -> None:
    sha = source.add(data())
    cache = BundleCache(tmp_path / "c", max_bytes=1 << 30)
    with pytest.raises(UnsafeBundleError, match=reason) as refused:
        cache.ensure(sha, source.fetcher(sha))
    assert "'tex/" in refused.value.message, "the message names the entry"
    assert _files_under(tmp_path / "c") == [], "nothing half-extracted is left"
    assert cache.cached() == []


def test_a_bad_crc_is_refused_naming_the_entry(tmp_path: Path, source: Source) -> None:
    raw = bytearray(_zip_bytes([("scene.blend", b"intact"), ("tex/a.bin", b"z" * 1000)]))
    central = raw.find(b"PK\x01\x02", raw.find(b"PK\x01\x02") + 1)
    raw[central + 16] ^= 0xFF  # the second entry's CRC-32 in the central directory
    sha = source.add(bytes(raw))
    with pytest.raises(UnsafeBundleError, match=r"'tex/a\.bin'.*cannot be decoded"):
        BundleCache(tmp_path / "c", max_bytes=1 << 30).ensure(sha, source.fetcher(sha))

"""The node's cache of scene bundles: fetched once, verified, extracted safely, evicted LRU.

A bundle is a zip named by its SHA-256. `BundleCache.ensure` returns the folder it was
extracted to (``root/<sha>/``), fetching the zip only when the bundle is not cached,
checking its hash, and extracting through a temporary folder that is renamed into place,
so a folder named by a hash is always complete.

Extraction is the one place where a stranger's file decides where bytes go, so it is
guarded BEFORE anything is written: entries with absolute paths, ``..`` components,
drive letters or backslashes, symbolic links and other special files, encrypted entries,
compression methods this node cannot decode, and archives whose declared size or file
count exceed the limits are refused with an `UnsafeBundleError` naming the entry. While
extracting, no entry may write more bytes than it declared, and an entry whose data
cannot be decoded (corrupt deflate, LZMA or bzip2 data, a wrong CRC) is refused the same
way: its hash was verified, so every node would meet the same bytes, and the task fails
for good instead of taking node after node down.

Least-recently-used bundles are deleted to keep the cache under `max_bytes`; a bundle
in use (`pin`) is never evicted. Last-use times live in a small JSON index written
atomically. This module never touches the network (the caller's `fetch` does) and
never imports Blender.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from common.errors import BundleError
from farm_node.errors import UnsafeBundleError

__all__ = [
    "DEFAULT_MAX_FILES",
    "DEFAULT_MAX_UNCOMPRESSED_BYTES",
    "BundleCache",
    "check_zip_entries",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_UNCOMPRESSED_BYTES = 8 << 30
DEFAULT_MAX_FILES = 20_000
INDEX_NAME = "index.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20
_TEMP_PREFIX = ".extract-"
_TRASH_PREFIX = ".trash-"
_INDEX_TEMP_PREFIX = ".index-"
_LEFTOVER_PREFIXES = (_TEMP_PREFIX, _TRASH_PREFIX, _INDEX_TEMP_PREFIX)
# Unix file types a zip may record in the high 16 bits of external_attr.
_ALLOWED_TYPES = (0, stat.S_IFREG, stat.S_IFDIR)
#: Compression methods zipfile decodes: stored, deflate, bzip2, LZMA (not Deflate64 (9),
#: AES (99), ...).
_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
#: What decoding an entry's data raises when the data is wrong (NotImplementedError is a
#: RuntimeError; bzip2 raises a bare OSError, told apart from disk errors by its errno).
_UNDECODABLE = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    RuntimeError,
    ValueError,
    OSError,
)


@dataclass(slots=True)
class _Entry:
    last_used: float
    size: int


def check_zip_entries(
    infos: list[zipfile.ZipInfo], *, max_bytes: int, max_files: int
) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Validate every entry of an archive and return (entry, safe relative path) pairs.

    Pure: reads only the central directory. Raises `UnsafeBundleError` naming the first
    offending entry, or the totals when the archive is too big or has too many files.
    """
    # Folders count too: a million empty folders exhaust inodes as well as files do.
    if len(infos) > max_files:
        raise UnsafeBundleError(
            f"The bundle holds {len(infos)} entries; a node accepts at most {max_files}."
        )
    declared = sum(info.file_size for info in infos)
    if declared > max_bytes:
        raise UnsafeBundleError(
            f"The bundle would extract to {declared} bytes; a node accepts at most {max_bytes}."
        )
    checked: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    for info in infos:
        checked.append((info, _safe_member_path(info)))
    return checked


def _safe_member_path(info: zipfile.ZipInfo) -> PurePosixPath:
    name = info.filename
    # zipfile turns "\" into "/" on Windows only; here a backslash stays a literal and
    # would mean a different path to a Windows node.
    reason = None
    if not name or "\x00" in name:
        reason = "an empty or NUL-containing name"
    elif "\\" in name:
        reason = "a backslash in its path"
    elif name.startswith("/"):
        reason = "an absolute path"
    elif _DRIVE.match(name):
        reason = "a drive letter"
    elif ".." in name.split("/"):
        reason = "a '..' component"
    elif info.flag_bits & 0x1:
        reason = "encryption"
    elif info.compress_type not in _METHODS:
        reason = f"compression method {info.compress_type}, which no node decodes"
    else:
        file_type = stat.S_IFMT(info.external_attr >> 16)
        if file_type == stat.S_IFLNK:
            reason = "a symbolic link"
        elif file_type not in _ALLOWED_TYPES:
            reason = f"a special file type ({oct(file_type)})"
    if reason is not None:
        raise UnsafeBundleError(f"Refusing bundle entry {name!r}: {reason}.")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts:
        raise UnsafeBundleError(f"Refusing bundle entry {name!r}: it names no file.")
    return PurePosixPath(*parts)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += (Path(folder) / name).lstat().st_size
    return total


class BundleCache:
    """Extracted bundles under `root`, at most `max_bytes` in all (zips included).

    Thread-safe: one lock serialises fetches, extraction, eviction and the index.
    """

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        *,
        max_uncompressed_bytes: int = DEFAULT_MAX_UNCOMPRESSED_BYTES,
        max_files: int = DEFAULT_MAX_FILES,
    ) -> None:
        if max_bytes < 0 or max_uncompressed_bytes < 1 or max_files < 1:
            raise ValueError("cache limits must be positive")
        self.root = root
        self.max_bytes = max_bytes
        self.max_uncompressed_bytes = max_uncompressed_bytes
        self.max_files = max_files
        self._lock = threading.RLock()
        self._pins: dict[str, int] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, _Entry] = {}
        self._index = self._load_index()
        self._clock = max((entry.last_used for entry in self._index.values()), default=0.0)
        self._evict(keep=None)
        self._save_index()

    # --- public ---------------------------------------------------------------------------

    def cached(self) -> list[str]:
        """Hashes of the bundles present, most recently used first."""
        with self._lock:
            return sorted(self._index, key=lambda sha: self._index[sha].last_used, reverse=True)

    def path(self, sha256: str) -> Path:
        """Where bundle `sha256` is (or would be) extracted."""
        return self.root / _checked_sha(sha256)

    def total_bytes(self) -> int:
        with self._lock:
            return sum(entry.size for entry in self._index.values())

    def ensure(self, sha256: str, fetch: Callable[[Path], Path]) -> Path:
        """The extracted folder of bundle `sha256`, fetched with ``fetch(zip_path)`` if absent.

        `fetch` must write the zip to the path it is given (or return another path it
        wrote). A zip whose SHA-256 differs is deleted and raises `BundleError`; an unsafe
        one raises `UnsafeBundleError` and nothing is extracted.
        """
        sha = _checked_sha(sha256)
        with self._lock:
            folder = self.root / sha
            if sha in self._index and folder.is_dir():
                self._touch(sha)
                return folder
            zip_path = self.root / f"{sha}.zip"
            try:
                fetched = fetch(zip_path)
                self._verify(sha, fetched)
                self._extract(sha, fetched, folder)
            finally:
                # The extracted folder is what renders use; the zip would double the disk.
                zip_path.unlink(missing_ok=True)
            self._index[sha] = _Entry(last_used=self._now(), size=_tree_size(folder))
            self._evict(keep=sha)
            self._save_index()
            return folder

    @contextlib.contextmanager
    def pin(self, sha256: str) -> Iterator[None]:
        """Keep bundle `sha256` from eviction while the block runs (it may be fetched in it)."""
        sha = _checked_sha(sha256)
        with self._lock:
            self._pins[sha] = self._pins.get(sha, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._pins[sha] -= 1
                if not self._pins[sha]:
                    del self._pins[sha]
                if sha in self._index:
                    self._touch(sha)

    def evict(self) -> list[str]:
        """Delete least-recently-used unpinned bundles until under `max_bytes`."""
        with self._lock:
            evicted = self._evict(keep=None)
            self._save_index()
            return evicted

    # --- internals ---------------------------------------------------------------------------

    def _verify(self, sha: str, zip_path: Path) -> None:
        if not zip_path.is_file():
            raise BundleError(f"Fetching bundle {sha[:12]} produced no file at {zip_path}.")
        actual = _sha256_file(zip_path)
        if actual != sha:
            zip_path.unlink(missing_ok=True)
            raise BundleError(
                f"Bundle {sha[:12]} is corrupt: its SHA-256 is {actual[:12]}.",
                hint="It was deleted; the next task downloads it again.",
            )

    def _extract(self, sha: str, zip_path: Path, folder: Path) -> None:
        try:
            archive = zipfile.ZipFile(zip_path)
        except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, EOFError) as exc:
            # Its hash was verified: every node would get these bytes, and fail the same.
            raise UnsafeBundleError(
                f"Bundle {sha[:12]} is not a readable zip file ({exc})."
            ) from exc
        with archive:
            entries = check_zip_entries(
                archive.infolist(),
                max_bytes=self.max_uncompressed_bytes,
                max_files=self.max_files,
            )
            staging = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{sha[:12]}-", dir=self.root))
            try:
                budget = self.max_uncompressed_bytes
                for info, relative in entries:
                    budget -= self._extract_entry(archive, info, staging, relative, budget)
                if folder.exists():  # a folder the index forgot: replace it
                    self._remove_tree(folder)
                staging.rename(folder)
            except (OSError, zipfile.BadZipFile, EOFError, RuntimeError) as exc:
                raise BundleError(f"Extracting bundle {sha[:12]} failed: {exc}") from exc
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _extract_entry(
        archive: zipfile.ZipFile,
        info: zipfile.ZipInfo,
        staging: Path,
        relative: PurePosixPath,
        budget: int,
    ) -> int:
        target = staging.joinpath(*relative.parts)
        # Belt and braces: the name checks already rule this out.
        if not target.resolve().is_relative_to(staging.resolve()):
            raise UnsafeBundleError(
                f"Refusing bundle entry {info.filename!r}: it leaves its folder."
            )
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            return 0
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        try:
            source = archive.open(info)
        except _UNDECODABLE as exc:
            raise _undecodable(info, exc) from exc
        with source, target.open("xb") as sink:
            while True:
                try:
                    block = source.read(_CHUNK)
                except _UNDECODABLE as exc:
                    raise _undecodable(info, exc) from exc
                if not block:
                    break
                written += len(block)
                # zipfile stops at the declared size; this also bounds a lying header.
                if written > info.file_size or written > budget:
                    raise UnsafeBundleError(
                        f"Refusing bundle entry {info.filename!r}: it inflates past its "
                        "declared size."
                    )
                sink.write(block)
        return written

    def _evict(self, keep: str | None) -> list[str]:
        evicted: list[str] = []
        total = sum(entry.size for entry in self._index.values())
        for sha in sorted(self._index, key=lambda s: self._index[s].last_used):
            if total <= self.max_bytes:
                break
            if sha == keep or self._pins.get(sha):
                continue
            total -= self._index.pop(sha).size
            self._remove_tree(self.root / sha)
            evicted.append(sha)
            log.info("Evicted bundle %s from the cache", sha[:12])
        if total > self.max_bytes:
            log.warning(
                "The bundle cache holds %d bytes, over its %d-byte limit: the rest is in use",
                total,
                self.max_bytes,
            )
        return evicted

    def _remove_tree(self, folder: Path) -> None:
        # Rename first so a half-deleted folder is never taken for a complete bundle.
        if not folder.exists():
            return
        trash = self.root / f"{_TRASH_PREFIX}{folder.name}-{os.getpid()}-{time.monotonic_ns()}"
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _touch(self, sha: str) -> None:
        self._index[sha].last_used = self._now()
        self._save_index()

    def _now(self) -> float:
        # Strictly increasing, so two uses within one clock tick still have an order.
        self._clock = max(time.time(), self._clock + 1e-6)
        return self._clock

    def _load_index(self) -> dict[str, _Entry]:
        """Read the index and reconcile it with the folders really present."""
        for leftover in self.root.iterdir():
            # Debris of a node killed mid-fetch, mid-extraction or mid-eviction.
            if leftover.name.startswith(_LEFTOVER_PREFIXES) or leftover.suffix in (".zip", ".part"):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
        stored: dict[str, object] = {}
        index_path = self.root / INDEX_NAME
        try:
            loaded = json.loads(index_path.read_text())
            if isinstance(loaded, dict) and isinstance(loaded.get("bundles"), dict):
                stored = loaded["bundles"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("Bundle cache index %s is unreadable (%s); rebuilding it", index_path, exc)
        index: dict[str, _Entry] = {}
        for folder in self.root.iterdir():
            if not (folder.is_dir() and _SHA256.match(folder.name)):
                continue
            record = stored.get(folder.name)
            if isinstance(record, dict) and isinstance(record.get("last_used"), int | float):
                size = record.get("size")
                index[folder.name] = _Entry(
                    float(record["last_used"]),
                    size if isinstance(size, int) else _tree_size(folder),
                )
            else:
                index[folder.name] = _Entry(folder.stat().st_mtime, _tree_size(folder))
        return index

    def _save_index(self) -> None:
        data = {
            "version": 1,
            "bundles": {
                sha: {"last_used": entry.last_used, "size": entry.size}
                for sha, entry in self._index.items()
            },
        }
        handle, temp = tempfile.mkstemp(prefix=_INDEX_TEMP_PREFIX, suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(data, stream, indent=1, sort_keys=True)
                stream.flush()
                os.fsync(stream.fileno())
            Path(temp).replace(self.root / INDEX_NAME)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


def _undecodable(info: zipfile.ZipInfo, error: Exception) -> Exception:
    """`error`, met while decoding entry `info`, as what the node should raise."""
    if isinstance(error, OSError) and error.errno is not None:
        return error  # the disk, not the data: a BundleError (retryable) further up
    detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    what = type(error).__name__ + (f": {detail}" if detail else "")
    return UnsafeBundleError(
        f"Refusing bundle entry {info.filename!r}: its data cannot be decoded ({what})."
    )


def _checked_sha(sha256: str) -> str:
    if not _SHA256.match(sha256):
        raise BundleError(f"{sha256[:80]!r} is not a bundle hash (64 lower-case hex digits).")
    return sha256

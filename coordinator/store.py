"""Content-addressed file storage: every bundle, tile and frame is a file named by its
SHA-256, written atomically (temp file, fsync, rename) so a crash never leaves a
half-written object under a real name. Knows nothing about jobs or HTTP.

An upload is written once: a `Spool` writes the body into ``tmp/`` and hashes it as it
goes; `adopt` then checks the hash and renames the file into place (`os.replace`), so
no byte is copied a second time.

Several coordinator replicas may share one store folder (`--store`, a shared mount):
each spools into its own ``tmp/<spool_name>/`` and clears only its own leftovers at
start-up, and two replicas adopting the same object rename identical bytes onto one
name, which leaves it whole. `Store` is the interface the farm uses, so that another
backend (an S3-compatible object store) can be added behind it.

A write the file system refuses for want of room (ENOSPC, a quota, a file-size limit)
raises `StorageFullError`, which the API answers with 507 and Retry-After: the sender
keeps its data and tries again later. Nothing already stored is touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from common.disk_space import NO_ROOM_ERRNOS
from coordinator.errors import HashMismatchError, StorageFullError, UploadTooLargeError

__all__ = [
    "ContentStore",
    "HashMismatchError",
    "Spool",
    "SpooledUpload",
    "StorageFullError",
    "Store",
    "TooLargeError",
    "is_no_room",
    "no_room",
]

CHUNK = 1 << 20


class TooLargeError(UploadTooLargeError):
    pass


def is_no_room(exc: BaseException) -> bool:
    """Whether an OSError means "the disk (or a limit on it) is full"."""
    return isinstance(exc, OSError) and exc.errno in NO_ROOM_ERRNOS


def no_room(what: str, exc: OSError) -> StorageFullError:
    reason = os.strerror(exc.errno or 0)
    return StorageFullError(
        f"The coordinator's disk is full: it could not store {what} ({reason})."
    )


class Store(Protocol):
    """What the farm asks of its content store (`ContentStore` is the folder one).
    `path` is a local file to read (a remote store would cache the object there) and
    `tmp` a local scratch folder."""

    tmp: Path

    def clear_leftovers(self) -> int: ...
    def path(self, sha256: str) -> Path: ...
    def exists(self, sha256: str) -> bool: ...
    def size(self, sha256: str) -> int: ...
    def free_bytes(self) -> int: ...
    def check_room(self, incoming: int, keep_free: int) -> None: ...
    def spool(self, max_bytes: int) -> Spool: ...
    def spool_chunks(self, chunks: Iterable[bytes], max_bytes: int) -> SpooledUpload: ...
    def adopt(self, upload: SpooledUpload, expected_sha256: str | None = None) -> str: ...
    def put_stream(
        self, chunks: Iterable[bytes], *, max_bytes: int, expected_sha256: str | None = None
    ) -> tuple[str, int]: ...
    def put_file(self, source: Path) -> str: ...
    def put_bytes(self, data: bytes) -> str: ...


class ContentStore:
    def __init__(self, root: Path, spool_name: str | None = None) -> None:
        """`spool_name`: this replica's own folder under ``tmp/`` when several share
        `root` (None: ``tmp/`` itself, the store of one coordinator)."""
        self.root = root
        self.tmp = root / "tmp" if spool_name is None else root / "tmp" / spool_name
        self.tmp.mkdir(parents=True, exist_ok=True)

    def clear_leftovers(self) -> int:
        """Delete what a process killed mid-write left in its ``tmp/`` folder (partial
        uploads and objects); call it at start-up only, before anything writes. Returns
        the count."""
        removed = 0
        for leftover in self.tmp.iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def free_bytes(self) -> int:
        """Free space of the file system holding the store (for an unprivileged user)."""
        return shutil.disk_usage(self.root).free

    def check_room(self, incoming: int, keep_free: int) -> None:
        """Refuse (StorageFullError) a write of `incoming` bytes that would leave less
        than `keep_free` bytes free; 0 turns the check off."""
        if keep_free <= 0:
            return
        free = self.free_bytes()
        if free - max(0, incoming) < keep_free:
            raise StorageFullError(
                "The coordinator's disk is nearly full: taking this upload would leave less"
                " than the minimum free space it keeps (min_free_disk)."
            )

    def spool(self, max_bytes: int) -> Spool:
        """A file in ``tmp/`` that takes an upload chunk by chunk (see `Spool`)."""
        try:
            return Spool(self.tmp, max_bytes)
        except OSError as exc:
            if is_no_room(exc):
                raise no_room("an upload", exc) from exc
            raise

    def adopt(self, upload: SpooledUpload, expected_sha256: str | None = None) -> str:
        """Move a spooled upload into the store under its hash (a rename, no copy).
        A hash that is not the expected one keeps nothing. Returns the hash."""
        try:
            if expected_sha256 is not None and upload.sha256 != expected_sha256:
                raise HashMismatchError(
                    f"The upload's SHA-256 is {upload.sha256}, not the expected {expected_sha256}."
                )
            target = self.path(upload.sha256)
            target.parent.mkdir(exist_ok=True)
            upload.path.replace(target)  # os.replace: a rename, never a copy
            _sync_folder(target.parent)  # the rename itself survives a crash
            return upload.sha256
        except OSError as exc:
            if is_no_room(exc):
                raise no_room(f"an upload of {upload.size} bytes", exc) from exc
            raise
        finally:
            upload.path.unlink(missing_ok=True)

    def put_stream(
        self, chunks: Iterable[bytes], *, max_bytes: int, expected_sha256: str | None = None
    ) -> tuple[str, int]:
        """Store a stream; refuse it if it exceeds `max_bytes` or its hash is not the
        expected one (nothing is kept in either case). Returns (sha256, size)."""
        upload = self.spool_chunks(chunks, max_bytes)
        return self.adopt(upload, expected_sha256), upload.size

    def spool_chunks(self, chunks: Iterable[bytes], max_bytes: int) -> SpooledUpload:
        spool = self.spool(max_bytes)
        with spool:
            for chunk in chunks:
                spool.write(chunk)
            return spool.finish()

    def put_file(self, source: Path) -> str:
        with source.open("rb") as handle:
            sha256, _ = self.put_stream(iter(lambda: handle.read(CHUNK), b""), max_bytes=1 << 62)
        return sha256

    def put_bytes(self, data: bytes) -> str:
        sha256, _ = self.put_stream([data], max_bytes=1 << 62)
        return sha256


def _sync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@dataclass(frozen=True, slots=True)
class SpooledUpload:
    """A complete upload in the store's ``tmp/``, hashed while it was written."""

    path: Path
    sha256: str
    size: int


class Spool:
    """One upload being written to ``tmp/``: `write` each chunk (hashed as it goes),
    then `finish`. Used as a context manager, it deletes the file unless finished.
    Past `max_bytes` it raises `TooLargeError`; a full disk is `StorageFullError`."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        handle, name = tempfile.mkstemp(dir=folder, suffix=".upload")
        self.path = Path(name)
        self.max_bytes = max_bytes
        self.size = 0
        self._digest = hashlib.sha256()
        self._out = os.fdopen(handle, "wb")
        self._finished = False

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._finished:
            self.discard()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise TooLargeError(f"The upload is larger than the limit of {self.max_bytes} bytes.")
        self._digest.update(chunk)
        try:
            self._out.write(chunk)
        except OSError as exc:
            if is_no_room(exc):
                raise no_room(f"an upload ({self.size} bytes in)", exc) from exc
            raise

    def finish(self) -> SpooledUpload:
        try:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
        except OSError as exc:
            if is_no_room(exc):
                raise no_room(f"an upload of {self.size} bytes", exc) from exc
            raise
        self._finished = True
        return SpooledUpload(self.path, self._digest.hexdigest(), self.size)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._out.close()
        self.path.unlink(missing_ok=True)

"""Content-addressed file storage: every bundle, tile and frame is a file named by its
SHA-256, written atomically (temp file, fsync, rename) so a crash never leaves a
half-written object under a real name. Knows nothing about jobs or HTTP.

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
from pathlib import Path

from common.disk_space import NO_ROOM_ERRNOS
from common.errors import BundleError, TesseraError

CHUNK = 1 << 20


class HashMismatchError(BundleError):
    default_hint = "The data was corrupted in transit or the hash is wrong; upload it again."


class TooLargeError(BundleError):
    pass


class StorageFullError(TesseraError):
    """The coordinator's disk cannot take this write now; the sender should retry later."""

    default_hint = (
        "Keep the data and send it again later; the farm's admin must free space in the "
        "coordinator's data folder."
    )


def is_no_room(exc: BaseException) -> bool:
    """Whether an OSError means "the disk (or a limit on it) is full"."""
    return isinstance(exc, OSError) and exc.errno in NO_ROOM_ERRNOS


def no_room(what: str, exc: OSError) -> StorageFullError:
    reason = os.strerror(exc.errno or 0)
    return StorageFullError(
        f"The coordinator's disk is full: it could not store {what} ({reason})."
    )


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)

    def clear_leftovers(self) -> int:
        """Delete what a process killed mid-write left in ``tmp/`` (partial uploads and
        objects); call it at start-up only, before anything writes. Returns the count."""
        removed = 0
        for leftover in (self.root / "tmp").iterdir():
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
                f"The coordinator's disk is nearly full: {free} bytes free, and it keeps at "
                f"least {keep_free} free (min_free_disk), so it cannot take {incoming} more."
            )

    def put_stream(
        self, chunks: Iterable[bytes], *, max_bytes: int, expected_sha256: str | None = None
    ) -> tuple[str, int]:
        """Store a stream; refuse it if it exceeds `max_bytes` or its hash is not the
        expected one (nothing is kept in either case). Returns (sha256, size)."""
        digest = hashlib.sha256()
        size = 0
        handle, temp_name = tempfile.mkstemp(dir=self.root / "tmp")
        temp = Path(temp_name)
        try:
            with os.fdopen(handle, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLargeError(
                            f"The upload is larger than the limit of {max_bytes} bytes."
                        )
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha256 = digest.hexdigest()
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise HashMismatchError(
                    f"The upload's SHA-256 is {sha256}, not the expected {expected_sha256}."
                )
            target = self.path(sha256)
            target.parent.mkdir(exist_ok=True)
            temp.replace(target)
            return sha256, size
        except OSError as exc:
            if is_no_room(exc):
                raise no_room(f"an upload of {size} bytes", exc) from exc
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def put_file(self, source: Path) -> str:
        with source.open("rb") as handle:
            sha256, _ = self.put_stream(iter(lambda: handle.read(CHUNK), b""), max_bytes=1 << 62)
        return sha256

    def put_bytes(self, data: bytes) -> str:
        sha256, _ = self.put_stream([data], max_bytes=1 << 62)
        return sha256

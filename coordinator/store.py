"""Content-addressed file storage: every bundle, tile and frame is a file named by its
SHA-256, written atomically (temp file, fsync, rename) so a crash never leaves a
half-written object under a real name. Knows nothing about jobs or HTTP."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from common.errors import BundleError

CHUNK = 1 << 20


class HashMismatchError(BundleError):
    default_hint = "The data was corrupted in transit or the hash is wrong; upload it again."


class TooLargeError(BundleError):
    pass


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

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

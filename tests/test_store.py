"""The content store takes an upload with one write: spooled (hashed as it comes), then
renamed into place, never copied."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from coordinator.store import ContentStore, HashMismatchError, TooLargeError


def test_a_spooled_upload_is_adopted_by_rename_not_copied(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    data = b"tile" * 100_000
    with store.spool(max_bytes=len(data)) as spool:
        for start in range(0, len(data), 65_536):
            spool.write(data[start : start + 65_536])
        upload = spool.finish()
    assert upload.sha256 == hashlib.sha256(data).hexdigest() and upload.size == len(data)
    inode = upload.path.stat().st_ino
    assert store.adopt(upload, upload.sha256) == upload.sha256
    stored = store.path(upload.sha256)
    assert stored.read_bytes() == data
    assert stored.stat().st_ino == inode, "the spooled file itself is the stored object"
    assert not list((store.root / "tmp").iterdir())


def test_a_wrong_hash_or_a_body_past_the_limit_keeps_nothing(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    upload = store.spool_chunks([b"abc"], max_bytes=10)
    with pytest.raises(HashMismatchError):
        store.adopt(upload, "0" * 64)
    assert not store.exists(upload.sha256)
    with pytest.raises(TooLargeError), store.spool(max_bytes=2) as spool:
        spool.write(b"abc")
    assert not list((store.root / "tmp").iterdir())

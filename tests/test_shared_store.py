"""One store folder shared by several coordinator replicas (`--store`): each spools into
its own folder and clears only its own leftovers; replicas storing the same object at
once leave it whole; a replica's spool name is stable across restarts."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from coordinator.config import CoordinatorConfig
from coordinator.store import ContentStore


def test_a_replica_starting_clears_its_own_leftovers_not_another_replicas_upload(
    tmp_path: Path,
) -> None:
    a, b = ContentStore(tmp_path, "a"), ContentStore(tmp_path, "b")
    in_flight = b.spool(1 << 20)
    in_flight.write(b"half of an upload")
    stale = a.spool(1 << 20)
    stale.write(b"left by a killed run")
    assert ContentStore(tmp_path, "a").clear_leftovers() == 1  # a restarts
    assert not stale.path.exists()
    assert in_flight.path.exists()
    upload = in_flight.finish()
    assert b.adopt(upload) == hashlib.sha256(b"half of an upload").hexdigest()
    assert a.exists(upload.sha256)


def test_replicas_storing_one_object_at_once_leave_it_whole(tmp_path: Path) -> None:
    stores = [ContentStore(tmp_path, f"r{i}") for i in range(8)]
    data = bytes(range(256)) * 4096
    start = threading.Barrier(len(stores))

    def put(store: ContentStore) -> str:
        start.wait()
        return store.put_bytes(data)

    with ThreadPoolExecutor(len(stores)) as pool:
        hashes = set(pool.map(put, stores))
    assert hashes == {hashlib.sha256(data).hexdigest()}
    (sha,) = hashes
    assert stores[0].path(sha).read_bytes() == data
    assert not any(p.is_file() for p in (tmp_path / "tmp").rglob("*"))


def test_a_replicas_spool_folder_is_its_own_and_stable(tmp_path: Path) -> None:
    own = CoordinatorConfig(data_dir=tmp_path / "one")
    assert own.spool_name is None and own.store_dir == tmp_path / "one" / "store"
    first = CoordinatorConfig(data_dir=tmp_path / "one", shared_store=tmp_path / "shared")
    again = CoordinatorConfig(data_dir=tmp_path / "one", shared_store=tmp_path / "shared")
    other = CoordinatorConfig(data_dir=tmp_path / "two", shared_store=tmp_path / "shared")
    assert first.store_dir == tmp_path / "shared"
    assert first.spool_name == again.spool_name != other.spool_name

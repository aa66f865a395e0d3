"""Faults between the node and the coordinator, and in the coordinator itself, each ending
with the job complete, its frames equal to one-piece renders, the ledger balanced and
no task paid twice.

- the network cuts an upload mid-body, and loses the reply to an accepted upload (a real
  TCP proxy between a real node and a real coordinator);
- the coordinator process is killed (SIGKILL) again and again while nodes upload, and
  restarted on the same data folder and port; its database stays intact;
- the coordinator's disk is full: uploads get 507 with Retry-After, the node keeps its
  result and delivers it once there is room, and nothing accepted before is lost.

(A node killed mid-render and a Blender crash are in test_farm_e2e.py and
test_node_daemon.py; slow nodes in test_backups.py.)
"""

from __future__ import annotations

import logging
import random
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from common.errors import ApiError
from coordinator import ledger
from coordinator.db import Database
from coordinator.errors import DomainError
from coordinator.farm import Farm, Principal
from coordinator.http.errors import status_of
from coordinator.store import ContentStore, StorageFullError
from protocol.client import TesseraClient, sha256_file
from protocol.models import (
    FailureKind,
    JobSpec,
    LeaseRequest,
    Role,
    TaskFailure,
    TaskKind,
    TaskStatus,
)
from renderers.builds import BlenderBuild
from renderers.exr import read_exr
from renderers.local_render import LocalRenderOptions, render_frame_local
from renderers.scene_info import inspect_scene
from renderers.worker import RenderWorker
from tests.coordinator_tools import FreshFarm
from tests.farm_tools import REPO, RunningCoordinator, job_spec, make_bundle, wait_for_job
from tests.fault_tools import (
    FaultyProxy,
    assert_books_balance,
    integrity,
    port_of,
    running_nodes,
    start_config_coordinator,
)
from tests.inprocess_farm import TRUTH, setup_farm, small_spec, task_status, write_tile_exr

CHANNELS = [f"ViewLayer.Combined.{c}" for c in "RGBA"]
#: Quick leases and beats, so that a restart or a lost node costs seconds.
QUICK: dict[str, Any] = {"lease_seconds": 6.0, "heartbeat_interval": 0.5, "poll_timeout": 2.0}


def _accounts(coordinator: RunningCoordinator, providers: int) -> tuple[str, list[str]]:
    with coordinator.client(coordinator.admin_token) as admin:
        requester = admin.create_account("artist", "requester").token
        admin.grant("artist", 1000)
        tokens = [admin.create_account(f"p{i}", "provider").token for i in range(providers)]
    return requester, tokens


def _submit(
    coordinator: RunningCoordinator,
    requester: str,
    worker: RenderWorker,
    scene: Path,
    folder: Path,
    frames: str = "1-2",
) -> tuple[str, JobSpec]:
    info = inspect_scene(worker, scene)
    bundle, sha = make_bundle(scene, folder)
    spec = job_spec(info, sha, frames=frames, tiles=(2, 1), denoise=False, max_price=1.0)
    with coordinator.client(requester) as client:
        client.upload_bundle(bundle)
        return client.submit_job(spec).id, spec


def _assert_frames_match_one_piece_renders(
    client: TesseraClient, job_id: str, spec: JobSpec, worker: RenderWorker, scene: Path, out: Path
) -> None:
    for frame in spec.frames.frames():
        farm = read_exr(client.download_frame(job_id, frame, out / f"farm{frame}.exr"))
        local = out / f"local{frame}.exr"
        options = LocalRenderOptions(
            frame=frame, percentage=10, samples=4, denoise=False, preview=False
        )
        reference = read_exr(render_frame_local(worker, scene, local, options).output)
        for name in CHANNELS:
            assert np.array_equal(farm.channel(name), reference.channel(name)), (frame, name)


def test_an_upload_cut_mid_body_and_a_lost_reply_cost_a_retry_not_a_tile_or_a_payment(
    bpy_build: BlenderBuild,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nodes -> proxy -> coordinator. The proxy cuts the first lease's upload after 1000
    bytes of its body, and passes the second lease's upload whole but drops the
    coordinator's answer to it. The nodes retry both: the first is then accepted, the
    second gets its original receipt (not "lease is over"), and each task is paid once.
    Two providers, so that accepted tiles wait for a duplicate sample ("checking"): a
    repeated upload must be recognised in that state too."""
    caplog.set_level(logging.INFO, logger="farm_node")
    coordinator = start_config_coordinator(tmp_path / "coordinator", **QUICK)
    try:
        requester, providers = _accounts(coordinator, 2)
        job_id, spec = _submit(coordinator, requester, worker, demo_scene, tmp_path / "bundle")
        with (
            FaultyProxy(port_of(coordinator.url), ("cut", "drop"), cut_body_after=1000) as proxy,
            running_nodes(bpy_build, proxy.url, providers, tmp_path) as nodes,
            coordinator.client(requester) as client,
        ):
            assert wait_for_job(client, job_id, timeout=90) == "completed"
            assert not any(n.daemon.pending() for n in nodes), "a result was left undelivered"
            _assert_frames_match_one_piece_renders(
                client, job_id, spec, worker, demo_scene, tmp_path
            )
        (cut,) = proxy.seen("cut")
        (dropped,) = proxy.seen("dropped")
        uploads = proxy.seen("upload")
        assert uploads.count(cut) == 2 and uploads.count(dropped) == 2, proxy.events
        refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert not refused, refused
        with coordinator.client(coordinator.admin_token) as admin:
            tasks = admin.tasks(job_id)
            tiles = [t for t in tasks if t.kind is TaskKind.RENDER]
            assert len(tiles) == 4 and all(t.status is TaskStatus.COMPLETED for t in tiles)
            assert all(t.attempts == 0 for t in tasks), "a task was rendered twice"
            assert_books_balance(admin, coordinator.data_dir / "coordinator.sqlite", job_id)
        with closing(sqlite3.connect(coordinator.data_dir / "coordinator.sqlite")) as conn:
            receipts = dict(conn.execute("SELECT lease_id, accepted FROM receipts").fetchall())
        completed = sum(t.status is TaskStatus.COMPLETED for t in tasks)
        assert receipts[cut] == 1 and receipts[dropped] == 1 and len(receipts) == completed
    finally:
        coordinator.stop()
    assert integrity(coordinator.data_dir / "coordinator.sqlite") == "ok"


def test_a_coordinator_killed_again_and_again_mid_upload_loses_nothing_accepted(
    bpy_build: BlenderBuild, demo_scene: Path, worker: RenderWorker, tmp_path: Path
) -> None:
    """Two nodes of two providers (so tiles are also duplicate-sampled: more writes) and a
    coordinator process that is SIGKILLed three times at random moments while they
    upload, each time restarted on the same data folder and port. Tiles accepted before
    a kill stay accepted with the same result; after every kill, before the restart, the
    database passes `PRAGMA integrity_check` and the ledger balances; the job completes."""
    rng = random.Random(20261126)
    data = tmp_path / "coordinator"
    coordinator = start_config_coordinator(data, **QUICK)
    port = port_of(coordinator.url)
    try:
        requester, tokens = _accounts(coordinator, 2)
        job_id, spec = _submit(
            coordinator, requester, worker, demo_scene, tmp_path / "bundle", frames="1-3"
        )
        kills = []
        with running_nodes(bpy_build, coordinator.url, tokens, tmp_path):
            for _ in range(3):
                with coordinator.client(coordinator.admin_token, retries=8) as admin:
                    # Kill once the nodes are busy again, at a random moment after that.
                    deadline = time.monotonic() + 30
                    while not any(n.status == "busy" for n in admin.nodes()):
                        assert time.monotonic() < deadline, "no node took work"
                        time.sleep(0.05)
                    time.sleep(rng.uniform(0.0, 1.5))
                    accepted = {
                        t.id: t.result_sha256
                        for t in admin.tasks(job_id)
                        if t.status is TaskStatus.COMPLETED
                    }
                    if admin.job(job_id).status.value == "completed":
                        break
                coordinator.kill()
                kills.append(len(accepted))
                # What the crash left is consistent on its own, before any restart.
                assert integrity(data / "coordinator.sqlite") == "ok"
                crashed = Database(data / "coordinator.sqlite")
                try:
                    assert ledger.check(crashed) == [], f"after kill {len(kills)}"
                finally:
                    crashed.close()
                coordinator = start_config_coordinator(data, port, **QUICK)
                with coordinator.client(coordinator.admin_token, retries=8) as admin:
                    after = {t.id: t for t in admin.tasks(job_id)}
                for task_id, sha in accepted.items():
                    assert after[task_id].status is TaskStatus.COMPLETED, after[task_id]
                    assert after[task_id].result_sha256 == sha, "an accepted tile was replaced"
            with coordinator.client(requester, retries=8) as client:
                assert wait_for_job(client, job_id, timeout=120) == "completed", kills
        assert len(kills) >= 2, f"the job finished before the coordinator was killed: {kills}"
        with coordinator.client(requester) as client:
            _assert_frames_match_one_piece_renders(
                client, job_id, spec, worker, demo_scene, tmp_path
            )
        with coordinator.client(coordinator.admin_token) as admin:
            assert_books_balance(admin, data / "coordinator.sqlite", job_id)
    finally:
        coordinator.stop()
    assert integrity(data / "coordinator.sqlite") == "ok"
    assert not list((data / "store" / "tmp").iterdir()), "partial uploads were left behind"


def test_a_full_disk_on_the_coordinator_answers_507_and_the_node_delivers_later(
    bpy_build: BlenderBuild,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The disk is "full" through the coordinator's own guard: `min_free_disk` set above
    the free space of the data folder's real file system (measured with
    shutil.disk_usage), so the refusal is the coordinator's honest reading of the disk,
    not a mocked write. (Filling a real disk needs root or a loop mount; the kernel's
    own refusals, ENOSPC/EFBIG, are exercised below through RLIMIT_FSIZE.) Part of the
    job is accepted first; then the coordinator restarts with the guard up: uploads get
    507 with Retry-After and a body naming the problem, the node keeps its result; then
    it restarts with room again and the node delivers."""
    caplog.set_level(logging.INFO, logger="farm_node")
    data = tmp_path / "coordinator"
    # Leases outlive the restarts (a loaded machine takes seconds to restart the
    # coordinator): the kept result must still belong to a live lease when room is back.
    room: dict[str, Any] = {
        **QUICK,
        "lease_seconds": 60.0,
        "storage_retry_after": 1.0,
        "min_free_disk": 0,
    }
    coordinator = start_config_coordinator(data, **room)
    port = port_of(coordinator.url)
    try:
        requester, (provider,) = _accounts(coordinator, 1)
        job_id, spec = _submit(coordinator, requester, worker, demo_scene, tmp_path / "bundle")
        with running_nodes(bpy_build, coordinator.url, [provider], tmp_path) as (node,):
            with coordinator.client(requester) as client:
                deadline = time.monotonic() + 60
                while client.job(job_id).progress.tasks_done < 1:
                    assert time.monotonic() < deadline, "no tile was accepted"
                    time.sleep(0.05)
            coordinator.stop()
            coordinator = start_config_coordinator(data, port, **{**room, "min_free_disk": 1 << 60})
            with coordinator.client(requester) as client:
                before = {t.id: t.result_sha256 for t in client.tasks(job_id) if t.result_sha256}
                assert before, "nothing was accepted before the disk filled"
                # What any uploader is told: 507, when to come back, and why.
                reply = requests.put(
                    f"{coordinator.url}/api/v1/bundles/{'ab' * 32}",
                    data=b"x" * 1000,
                    headers={"Authorization": f"Bearer {requester}"},
                    timeout=10,
                )
                assert reply.status_code == 507, reply.text
                assert reply.headers["Retry-After"] == "1"
                body = reply.json()
                assert body["error"] == "insufficient storage"
                assert "disk" in body["detail"] and "min_free_disk" in body["detail"]
                # The node keeps its finished result and keeps trying.
                deadline = time.monotonic() + 60
                while not node.daemon.pending() or not any(
                    "disk is nearly full" in r.getMessage() for r in caplog.records
                ):
                    assert time.monotonic() < deadline, "the node never met the full disk"
                    time.sleep(0.05)
                time.sleep(1.5)  # a few more refused tries
                (kept,) = node.daemon.pending()
                assert kept.path.is_file()
                tasks = {t.id: t for t in client.tasks(job_id)}
                assert tasks[kept.task_id].status is TaskStatus.ACTIVE
                assert {t.id: t.result_sha256 for t in tasks.values() if t.result_sha256} == before
            coordinator.stop()
            coordinator = start_config_coordinator(data, port, **room)
            with coordinator.client(requester) as client:
                assert wait_for_job(client, job_id, timeout=90) == "completed"
                assert not node.daemon.pending()
                tasks = {t.id: t for t in client.tasks(job_id)}
                assert tasks[kept.task_id].result_sha256 == kept.sha256, "not the kept result"
                assert all(tasks[i].result_sha256 == sha for i, sha in before.items())
                _assert_frames_match_one_piece_renders(
                    client, job_id, spec, worker, demo_scene, tmp_path
                )
        with coordinator.client(coordinator.admin_token) as admin:
            assert_books_balance(admin, data / "coordinator.sqlite", job_id)
    finally:
        coordinator.stop()
    assert integrity(data / "coordinator.sqlite") == "ok"


_FSIZE_PROBE = """
import resource, sys
from pathlib import Path
from coordinator.db import Database
from coordinator.store import ContentStore, StorageFullError

folder = Path(sys.argv[1])
store = ContentStore(folder / "store")
kept = store.put_bytes(b"accepted before the disk filled")
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
try:
    store.put_bytes(b"x" * (256 * 1024))
except StorageFullError as exc:
    print("refused:", exc.message)
assert store.exists(kept) and not list((folder / "store" / "tmp").iterdir())
"""


def test_a_write_the_kernel_refuses_for_room_is_a_storage_full_error(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes the kernel refuse writes past 64 KiB (EFBIG), a real refusal of
    the kind a full disk gives (ENOSPC): the store reports StorageFullError, keeps what
    it had, and leaves no partial file."""
    probe = subprocess.run(
        [sys.executable, "-c", _FSIZE_PROBE, str(tmp_path)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert "refused: The coordinator's disk is full" in probe.stdout, probe.stdout


def test_a_full_database_is_a_storage_full_error_and_the_connection_recovers(
    tmp_path: Path,
) -> None:
    """SQLite's own "database or disk is full" (SQLITE_FULL, from `max_page_count`): the
    transaction rolls back whole, the error says the disk is full, and the connection
    takes the next transaction (a failed COMMIT must not leave it inside one)."""
    db = Database(tmp_path / "c.sqlite")
    try:
        with db.transaction() as conn:
            conn.execute("CREATE TABLE blobs (data BLOB)")
            conn.execute("INSERT INTO blobs VALUES (?)", (b"kept",))
        pages = int(db.fetch_one("PRAGMA page_count")[0])
        db.conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StorageFullError, match="disk is full"), db.transaction() as conn:
            conn.execute("INSERT INTO blobs VALUES (?)", (b"k" * 100,))
            conn.execute("INSERT INTO blobs VALUES (?)", (b"x" * 1_000_000,))
        assert not db.conn.in_transaction
        assert [bytes(r[0]) for r in db.query("SELECT data FROM blobs")] == [b"kept"]
        db.conn.execute(f"PRAGMA max_page_count = {pages * 1000}")
        with db.transaction() as conn:
            conn.execute("INSERT INTO blobs VALUES (?)", (b"after",))
        assert len(db.query("SELECT data FROM blobs")) == 2
    finally:
        db.close()


def test_the_client_waits_out_429_and_507_on_idempotent_requests(tmp_path: Path) -> None:
    """Against a real coordinator whose disk guard is up: an idempotent request is retried
    on 507 (bounded, honouring Retry-After), then the 507 reaches the caller as ApiError
    with its message; a 429 from the rate limit is retried until the bucket refills."""
    coordinator = start_config_coordinator(
        tmp_path / "c",
        min_free_disk=1 << 60,
        storage_retry_after=1.0,
        rate_limit=2.0,
        rate_burst=2,
    )
    try:
        bundle = tmp_path / "b.zip"
        bundle.write_bytes(b"PK" + b"\0" * 100)
        requester = _accounts(coordinator, 0)[0]
        with TesseraClient(coordinator.url, requester, retries=2, backoff=0.01) as client:
            started = time.monotonic()
            with pytest.raises(ApiError) as refused:
                client.upload_bundle(bundle)
            waited = time.monotonic() - started
            assert refused.value.status == 507 and "disk" in refused.value.message
            assert waited >= 2.0, "Retry-After was not honoured between tries"
            # Four calls at once spend the burst of two: the third meets a 429 (Retry-After:
            # 1) and is sent again after it, so the four take at least a second.
            started = time.monotonic()
            for _ in range(4):
                assert client.wallet().balance == 1000
            assert time.monotonic() - started >= 0.9, "no 429 was met (or it was not waited)"
    finally:
        coordinator.stop()


def test_the_content_store_checks_room_against_the_real_disk(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    store.check_room(1 << 20, 0)  # off
    store.check_room(1 << 20, 1)
    with pytest.raises(StorageFullError, match="min_free_disk"):
        store.check_room(0, store.free_bytes() + (1 << 40))


def test_partial_files_of_a_killed_coordinator_are_cleared_at_start(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    kept = store.put_bytes(b"accepted")
    (store.root / "tmp" / "abc.upload").write_bytes(b"half an upl")
    (store.root / "tmp" / "scratch").mkdir()
    assert store.clear_leftovers() == 2
    assert not list((store.root / "tmp").iterdir()) and store.exists(kept)


# --- the coordinator's side of idempotent delivery, in-process ----------------------------

A, B = Principal("a", Role.PROVIDER), Principal("b", Role.PROVIDER)


@pytest.fixture()
def farm(fresh_farm: FreshFarm) -> Farm:
    return fresh_farm()


def test_a_repeated_upload_gets_its_first_receipt_and_is_paid_once(
    farm: Farm, demo_scene: Path, tmp_path: Path
) -> None:
    """The tile waits for a duplicate sample (two providers are online), the state in
    which a repeat used to meet "lease is over". Another hash for the same lease is a
    conflict; another provider is refused."""
    _, (node_a, _) = setup_farm(farm, small_spec(), demo_scene, tmp_path / "bundle")
    lease = farm.try_lease(A, node_a, LeaseRequest(wait=0))
    assert lease is not None and lease.assignment is not None
    r = lease.assignment.render_region
    tile = write_tile_exr(tmp_path / "tile.exr", TRUTH[r.y0 : r.y1, r.x0 : r.x1])
    sha = sha256_file(tile)
    first = farm.accept_result(A, lease.lease_id, sha, iter([tile.read_bytes()]))
    assert first.accepted and task_status(farm, lease.task.id) == TaskStatus.CHECKING
    again = farm.accept_result(A, lease.lease_id, sha, iter([tile.read_bytes()]))
    assert again == first
    farm.check_upload(A, lease.lease_id)  # the API lets the repeat's body in
    other = write_tile_exr(tmp_path / "other.exr", TRUTH[r.y0 : r.y1, r.x0 : r.x1] * 0.5)
    with pytest.raises(DomainError) as conflict:
        farm.accept_result(A, lease.lease_id, sha256_file(other), iter([other.read_bytes()]))
    assert status_of(conflict.value) == 409
    for attempt in (farm.check_upload, lambda who, lid: farm.accept_result(who, lid, sha, [])):
        with pytest.raises(DomainError) as foreign:
            attempt(B, lease.lease_id)
        assert status_of(foreign.value) == 403
    receipts = farm.db.query("SELECT * FROM receipts WHERE lease_id = ?", (lease.lease_id,))
    assert len(receipts) == 1
    assert farm.ledger_check(Principal("admin", Role.ADMIN)).ok


def test_a_repeated_failure_report_changes_nothing(
    farm: Farm, demo_scene: Path, tmp_path: Path
) -> None:
    _, (node_a, _) = setup_farm(farm, small_spec(), demo_scene, tmp_path / "bundle")
    lease = farm.try_lease(A, node_a, LeaseRequest(wait=0))
    assert lease is not None
    failure = TaskFailure(kind=FailureKind.OUT_OF_MEMORY, message="out of memory", retryable=True)
    farm.report_failure(A, lease.lease_id, failure)
    farm.report_failure(A, lease.lease_id, failure)  # its reply was lost: sent again
    count = farm.db.fetch_one(
        "SELECT COUNT(*) FROM failures WHERE lease_id = ?", (lease.lease_id,)
    )[0]
    attempts = farm.db.fetch_one("SELECT attempts FROM tasks WHERE id = ?", (lease.task.id,))[0]
    assert (count, attempts) == (1, 1)
    assert task_status(farm, lease.task.id) == TaskStatus.SOFT_FAILED
    with pytest.raises(DomainError) as stranger:
        farm.report_failure(B, lease.lease_id, failure)
    assert status_of(stranger.value) == 404

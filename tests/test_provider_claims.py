"""Nothing one provider says decides (issue 17): one provider's failure report never
fails a job (finding 6: a provider could fail any job it leased, its free text reached the
requester raw, and the same node got the same task again and again), a lease ends once
(finding 12: concurrent bad uploads on one lease were each counted), and a provider
reads a bundle only while it holds a live lease on it. In process, with synthetic EXRs."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.errors import DomainError, LeaseOverError, NotFoundError
from coordinator.farm import Farm, Principal
from coordinator.http.errors import status_of
from coordinator.results import Results
from coordinator.verify.policy import VerificationPolicy
from protocol.client import sha256_file
from protocol.models import (
    JobStatus,
    Lease,
    LeaseRequest,
    Role,
    TaskFailure,
    TaskKind,
    TaskStatus,
)
from tests.coordinator_tools import FreshFarm
from tests.inprocess_farm import (
    CAPS,
    TRUTH,
    setup_farm,
    small_spec,
    task_status,
    write_tile_exr,
)

A, B, C = (Principal(name, Role.PROVIDER) for name in "abc")
ARTIST = Principal("artist", Role.REQUESTER)
#: The most characters of a node's own words a requester is shown, quotes included.
REPORT_CHARS = 300


def _lease(farm: Farm, who: Principal, node: str) -> Lease:
    lease = farm.try_lease(who, node, LeaseRequest(wait=0))
    assert lease is not None and lease.assignment is not None
    return lease


def _upload(farm: Farm, who: Principal, lease: Lease, folder: Path, frame: Any = TRUTH) -> Any:
    assert lease.assignment is not None
    r = lease.assignment.render_region
    path = write_tile_exr(folder / f"{lease.lease_id}.exr", frame[r.y0 : r.y1, r.x0 : r.x1])
    return farm.accept_result(who, lease.lease_id, sha256_file(path), iter([path.read_bytes()]))


def _record(farm: Farm, account: str) -> tuple[int, int, str | None]:
    row = farm.db.query_one(
        "SELECT verified, rejected, suspended FROM providers WHERE account = ?", (account,)
    )
    return (0, 0, None) if row is None else (row[0], row[1], row[2])


def _third_provider(farm: Farm) -> str:
    """Provider c's node: neither side of a dispute between a and b."""
    farm.create_account("c", Role.PROVIDER)
    return farm.register_node(C, CAPS.model_copy(update={"name": "c", "price": 1.0})).node_id


def _offline(farm: Farm, node_id: str) -> None:
    with farm.db.transaction() as conn:
        conn.execute("UPDATE nodes SET last_seen = 0 WHERE id = ?", (node_id,))


# --- finding 6: one provider's report fails no job ----------------------------------------


def test_one_providers_scene_fault_is_confirmed_by_another_before_the_job_fails(
    fresh_farm: FreshFarm, demo_scene: Path, tmp_path: Path
) -> None:
    farm = fresh_farm(verification=VerificationPolicy(enabled=False))
    job_id, (node_a, node_b) = setup_farm(farm, small_spec(), demo_scene, tmp_path / "b")
    node_c = _third_provider(farm)
    claim = _lease(farm, A, node_a)
    farm.report_failure(
        A, claim.lease_id, TaskFailure(kind="no_camera", message="no camera", retryable=False)
    )
    assert farm.job(ARTIST, job_id).status is JobStatus.ACTIVE  # failed before the fix
    assert task_status(farm, claim.task.id) == TaskStatus.SOFT_FAILED
    # a is kept off the task it called impossible; b renders it.
    again = _lease(farm, A, node_a)
    assert again.task.id != claim.task.id
    retry = _lease(farm, B, node_b)
    assert retry.task.id == claim.task.id
    assert _record(farm, "a")[1] == 0
    assert _upload(farm, B, retry, tmp_path).accepted
    # b's word against a's: a third provider checks b's result before anyone is judged
    # (even with verification off), and a, the claimant, never judges it.
    assert task_status(farm, claim.task.id) == TaskStatus.CHECKING
    window = _lease(farm, C, node_c)
    assert window.task.kind is TaskKind.VERIFY
    assert _upload(farm, C, window, tmp_path).accepted
    assert task_status(farm, claim.task.id) == TaskStatus.COMPLETED
    # The claim was contradicted by a confirmed result: it costs a's reputation, once.
    assert _record(farm, "a")[1] == 1
    assert _upload(farm, A, again, tmp_path).accepted
    assert _record(farm, "a")[1] == 1
    assert farm.job(ARTIST, job_id).status is not JobStatus.FAILED


def test_an_unconfirmed_result_never_gets_a_claimant_penalised(
    fresh_farm: FreshFarm, demo_scene: Path, tmp_path: Path
) -> None:
    """A requester's partner (b) uploads made-up pixels for a task an honest provider (a)
    truthfully called impossible: with nobody else to judge, the result is accepted as an
    unsampled tile would be, but a's true report costs a nothing (the collusion the
    mixed-attack suite found)."""
    farm = fresh_farm(verification=VerificationPolicy(enabled=False))
    _, (node_a, node_b) = setup_farm(farm, small_spec(), demo_scene, tmp_path / "b")
    claim = _lease(farm, A, node_a)
    farm.report_failure(
        A, claim.lease_id, TaskFailure(kind="corrupt_scene", message="no DNA1", retryable=False)
    )
    retry = _lease(farm, B, node_b)
    assert retry.task.id == claim.task.id
    fake = np.zeros_like(TRUTH)
    assert _upload(farm, B, retry, tmp_path, fake).accepted
    assert task_status(farm, claim.task.id) == TaskStatus.COMPLETED
    assert _record(farm, "a") == (0, 0, None)


def test_a_scene_fault_nobody_else_comes_to_check_fails_with_a_quoted_reason(
    fresh_farm: FreshFarm, demo_scene: Path, tmp_path: Path
) -> None:
    farm = fresh_farm()
    job_id, (node_a, node_b) = setup_farm(farm, small_spec(), demo_scene, tmp_path / "b")
    _offline(farm, node_b)
    lease = _lease(farm, A, node_a)
    text = 'Visit "http://evil.example"\nnow!\r\n\u202eFAKE: your job was cancelled' + "x" * 3000
    farm.report_failure(A, lease.lease_id, TaskFailure(kind="no_camera", message=text))
    assert farm.job(ARTIST, job_id).status is JobStatus.ACTIVE, "a alone fails nothing at once"
    with farm.db.transaction() as conn:  # ...and no one else came for a while
        conn.execute("UPDATE tasks SET updated_at = '2000-01-01T00:00:00+00:00'")
    assert farm.fail_unconfirmed() == 1
    job = farm.job(ARTIST, job_id)
    assert job.status is JobStatus.FAILED
    assert "no other provider came to try it" in job.message
    assert "\n" not in job.message and "\r" not in job.message and "\u202e" not in job.message
    assert len(job.message) <= REPORT_CHARS
    quoted = job.message[job.message.index('node reported: "') :]
    assert quoted.endswith('"') and quoted.count('"') == 2
    assert "http://evil.example" in quoted
    (task,) = [t for t in farm.tasks(ARTIST, job_id) if t.id == lease.task.id]
    assert task.message.startswith('node reported: "') and len(task.message) <= REPORT_CHARS


def test_a_claim_nobody_else_comes_to_check_fails_the_job_after_a_while(
    fresh_farm: FreshFarm, demo_scene: Path, tmp_path: Path
) -> None:
    farm = fresh_farm()
    job_id, (node_a, node_b) = setup_farm(farm, small_spec(), demo_scene, tmp_path / "b")
    lease = _lease(farm, A, node_a)
    farm.report_failure(A, lease.lease_id, TaskFailure(kind="corrupt_scene", message="bad"))
    assert farm.job(ARTIST, job_id).status is JobStatus.ACTIVE, "b could still try it"
    _offline(farm, node_b)
    assert farm.fail_unconfirmed() == 0, "b may come back: the task waits a while"
    with farm.db.transaction() as conn:
        conn.execute("UPDATE tasks SET updated_at = '2000-01-01T00:00:00+00:00'")
    assert farm.fail_unconfirmed() == 1
    job = farm.job(ARTIST, job_id)
    assert job.status is JobStatus.FAILED
    assert "no other provider came to try it" in job.message
    assert 'corrupt_scene: node reported: "bad"' in job.message
    assert task_status(farm, lease.task.id) == TaskStatus.FAILED
    assert farm.ledger_check(Principal("admin", Role.ADMIN)).ok


def test_a_task_is_not_leased_twice_in_a_row_to_the_node_it_failed_on(
    fresh_farm: FreshFarm, demo_scene: Path, tmp_path: Path
) -> None:
    farm = fresh_farm(verification=VerificationPolicy(enabled=False))
    _, (node_a, node_b) = setup_farm(farm, small_spec(), demo_scene, tmp_path / "b")
    bad = np.full_like(TRUTH, np.nan)
    first = _lease(farm, A, node_a)
    with pytest.raises(DomainError) as refused:
        _upload(farm, A, first, tmp_path, bad)
    assert status_of(refused.value) == 422
    second = _lease(farm, A, node_a)
    assert second.task.id != first.task.id, "the same node got the task it just failed"
    farm.release(A, second.lease_id)
    assert _lease(farm, B, node_b).task.id == first.task.id
    # With no one else to take it, the same node tries again after a while.
    solo = fresh_farm(verification=VerificationPolicy(enabled=False))
    _, (solo_a, solo_b) = setup_farm(solo, small_spec(), demo_scene, tmp_path / "solo")
    _offline(solo, solo_b)
    lease = _lease(solo, A, solo_a)
    solo.report_failure(A, lease.lease_id, TaskFailure(kind="render_failed", message="x"))
    other = _lease(solo, A, solo_a)
    assert other.task.id != lease.task.id
    solo.release(A, other.lease_id)
    with solo.db.transaction() as conn:
        conn.execute("UPDATE failures SET at = '2000-01-01T00:00:00+00:00'")
    assert _lease(solo, A, solo_a).task.id == lease.task.id


def test_bad_uploads_of_one_provider_alone_never_fail_the_job(
    fresh_farm: FreshFarm, demo_scene: Path, tmp_path: Path
) -> None:
    farm = fresh_farm(verification=VerificationPolicy(suspend_after=100))
    job_id, (node_a, _) = setup_farm(farm, small_spec(), demo_scene, tmp_path / "b")
    bad = np.full_like(TRUTH, np.nan)
    task_id = None
    for _ in range(farm.config.max_attempts):
        with farm.db.transaction() as conn:  # as if no one else had come for it meanwhile
            conn.execute("UPDATE failures SET at = '2000-01-01T00:00:00+00:00'")
            conn.execute("DELETE FROM blocklist")
        lease = _lease(farm, A, node_a)
        task_id = task_id or lease.task.id
        assert lease.task.id == task_id
        with pytest.raises(DomainError):
            _upload(farm, A, lease, tmp_path, bad)
    assert farm.job(ARTIST, job_id).status is JobStatus.ACTIVE, "b never had a try"
    excluded = farm.db.fetch_one("SELECT excluded_owners FROM tasks WHERE id = ?", (task_id,))
    assert excluded[0] == "a"


# --- finding 12: a lease ends once ---------------------------------------------------------


def test_concurrent_bad_uploads_on_one_lease_count_once(
    fresh_farm: FreshFarm, demo_scene: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    farm = fresh_farm()
    _, (node_a, _) = setup_farm(farm, small_spec(), demo_scene, tmp_path / "b")
    lease = _lease(farm, A, node_a)
    racers = 4
    barrier = threading.Barrier(racers, timeout=30)
    check = Results._check

    def slow_check(self: Results, row: Any, sha256: str) -> Any:
        barrier.wait()  # every upload passed the first status check before any is judged
        return check(self, row, sha256)

    monkeypatch.setattr(Results, "_check", slow_check)
    bad = np.full_like(TRUTH, np.nan)
    errors: list[BaseException] = []

    def upload(number: int) -> None:
        folder = tmp_path / f"racer{number}"
        folder.mkdir()
        try:
            _upload(farm, A, lease, folder, bad)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(n,)) for n in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    statuses = sorted(status_of(e) for e in errors if isinstance(e, DomainError))
    assert statuses == [409, 409, 409, 422], errors
    assert sum(isinstance(e, LeaseOverError) for e in errors) == racers - 1
    failures = farm.db.fetch_one(
        "SELECT COUNT(*) FROM failures WHERE lease_id = ?", (lease.lease_id,)
    )[0]
    attempts = farm.db.fetch_one("SELECT attempts FROM tasks WHERE id = ?", (lease.task.id,))[0]
    assert (failures, attempts, _record(farm, "a")[1]) == (1, 1, 1)


def test_concurrent_copies_of_one_failure_report_count_once(
    fresh_farm: FreshFarm, demo_scene: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    farm = fresh_farm()
    _, (node_a, _) = setup_farm(farm, small_spec(), demo_scene, tmp_path / "b")
    lease = _lease(farm, A, node_a)
    barrier = threading.Barrier(2, timeout=30)
    lease_row = farm.scheduler.lease_row

    def slow_lease_row(who: Principal, lease_id: str) -> Any:
        row = lease_row(who, lease_id)
        barrier.wait()
        return row

    monkeypatch.setattr(farm.scheduler, "lease_row", slow_lease_row)
    failure = TaskFailure(kind="out_of_memory", message="oom")
    errors: list[BaseException] = []

    def report() -> None:
        try:
            farm.report_failure(A, lease.lease_id, failure)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=report) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    count = farm.db.fetch_one("SELECT COUNT(*) FROM failures WHERE lease_id = ?", (lease.lease_id,))
    assert count[0] == 1


# --- minor: bundles only while a lease lives ----------------------------------------------


def test_a_bundle_is_refused_to_a_provider_once_its_lease_ended(
    fresh_farm: FreshFarm, demo_scene: Path, tmp_path: Path
) -> None:
    farm = fresh_farm(verification=VerificationPolicy(enabled=False))
    _, (node_a, _) = setup_farm(farm, small_spec(), demo_scene, tmp_path / "b")
    lease = _lease(farm, A, node_a)
    assert farm.bundles.download(A, lease.bundle).exists()
    assert _upload(farm, A, lease, tmp_path).accepted
    with pytest.raises(NotFoundError):
        farm.bundles.download(A, lease.bundle)
    with pytest.raises(NotFoundError):
        farm.bundles.download(B, lease.bundle)
    assert farm.bundles.download(ARTIST, lease.bundle).exists()

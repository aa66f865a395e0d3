"""A slow node holding the last tile of a frame: an idle node gets a backup copy, the
first result wins, the loser is told to stop, and only the winner is paid.

Real SQLite and files, the coordinator's own `Farm`, synthetic EXRs (as in
test_sampling.py); the time a tile has run is real (short sleeps).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from coordinator.errors import DomainError
from coordinator.farm import Farm, Principal
from coordinator.http.errors import status_of
from coordinator.verify.policy import VerificationPolicy
from protocol.client import sha256_file
from protocol.models import Heartbeat, JobSpec, Lease, LeaseRequest, Role, TaskKind, TaskStatus
from tests.coordinator_tools import FreshFarm
from tests.inprocess_farm import TRUTH, setup_farm, small_spec, task_status, write_tile_exr

A, B = Principal("a", Role.PROVIDER), Principal("b", Role.PROVIDER)
ARTIST = Principal("artist", Role.REQUESTER)


@pytest.fixture()
def spec() -> JobSpec:
    return small_spec()


@pytest.fixture()
def farm(fresh_farm: FreshFarm) -> Farm:
    return fresh_farm(verification=VerificationPolicy(enabled=False), backup_after_seconds=0.05)


def _lease(farm: Farm, who: Principal, node_id: str) -> Lease:
    lease = farm.try_lease(who, node_id, LeaseRequest(wait=0))
    assert lease is not None and lease.assignment is not None
    return lease


def _upload(farm: Farm, who: Principal, lease: Lease, folder: Path) -> bool:
    assert lease.assignment is not None
    r = lease.assignment.render_region
    path = write_tile_exr(folder / f"{lease.lease_id}.exr", TRUTH[r.y0 : r.y1, r.x0 : r.x1])
    receipt = farm.accept_result(who, lease.lease_id, sha256_file(path), iter([path.read_bytes()]))
    return receipt.accepted


def _paid(farm: Farm, task_id: str) -> int:
    return int(
        farm.db.fetch_one(
            "SELECT COUNT(*) FROM ledger_txns WHERE kind = 'pay' AND task_id = ?", (task_id,)
        )[0]
    )


def test_a_backup_that_finishes_first_wins_and_the_slow_node_is_told(
    farm: Farm, spec: JobSpec, demo_scene: Path, tmp_path: Path
) -> None:
    job_id, (node_a, node_b) = setup_farm(farm, spec, demo_scene, tmp_path / "bundle")
    first = _lease(farm, A, node_a)
    assert _upload(farm, A, first, tmp_path)
    slow = _lease(farm, B, node_b)  # the frame's last tile, held by b
    assert farm.try_lease(A, node_a, LeaseRequest(wait=0)) is None, "not slow yet"
    time.sleep(0.3)  # past backup_after and twice the first tile's time
    backup = _lease(farm, A, node_a)
    assert backup.task.kind is TaskKind.BACKUP
    assert backup.assignment == slow.assignment
    assert farm.try_lease(A, node_a, LeaseRequest(wait=0)) is None, "one backup at a time"

    assert _upload(farm, A, backup, tmp_path)
    assert task_status(farm, slow.task.id) == TaskStatus.COMPLETED
    assert task_status(farm, backup.task.id) == TaskStatus.CANCELED
    with pytest.raises(DomainError) as beat:
        farm.heartbeat(B, slow.lease_id, Heartbeat(progress=0.5))
    assert status_of(beat.value) == 404
    with pytest.raises(DomainError):
        _upload(farm, B, slow, tmp_path)
    assert _paid(farm, slow.task.id) == 1 and _paid(farm, backup.task.id) == 0
    node = farm.db.fetch_one("SELECT node_id FROM tasks WHERE id = ?", (slow.task.id,))
    assert node[0] == node_a, "the winner is paid for the tile"
    assert farm.ledger_check(Principal("admin", Role.ADMIN)).ok
    # The slow original rendered for nothing from its lease until the backup's result
    # came (at least the 0.3 s slept): the job's cost counts it as wasted work.
    assert farm.job(ARTIST, job_id).cost.wasted_seconds >= 0.3


def test_the_original_finishing_first_cancels_its_backup(
    farm: Farm, spec: JobSpec, demo_scene: Path, tmp_path: Path
) -> None:
    job_id, (node_a, node_b) = setup_farm(farm, spec, demo_scene, tmp_path / "bundle")
    assert _upload(farm, A, _lease(farm, A, node_a), tmp_path)
    slow = _lease(farm, B, node_b)
    time.sleep(0.3)
    backup = _lease(farm, A, node_a)
    time.sleep(0.2)  # the backup renders a while before the original's result comes
    assert _upload(farm, B, slow, tmp_path)
    assert farm.heartbeat(A, backup.lease_id, Heartbeat()).cancel
    with pytest.raises(DomainError) as late:
        _upload(farm, A, backup, tmp_path)
    assert status_of(late.value) == 409, "a late backup is not accepted"
    assert task_status(farm, slow.task.id) == TaskStatus.COMPLETED
    assert _paid(farm, backup.task.id) == 0 and _paid(farm, slow.task.id) == 1
    assert farm.ledger_check(Principal("admin", Role.ADMIN)).ok
    # The losing backup's render, from its lease to its cancel, was wasted.
    assert farm.job(ARTIST, job_id).cost.wasted_seconds >= 0.2


def test_backups_can_be_turned_off(
    fresh_farm: FreshFarm, spec: JobSpec, demo_scene: Path, tmp_path: Path
) -> None:
    farm = fresh_farm(verification=VerificationPolicy(enabled=False), backup_after_seconds=0)
    _, (node_a, node_b) = setup_farm(farm, spec, demo_scene, tmp_path / "bundle")
    assert _upload(farm, A, _lease(farm, A, node_a), tmp_path)
    _lease(farm, B, node_b)
    time.sleep(0.3)
    assert farm.try_lease(A, node_a, LeaseRequest(wait=0)) is None

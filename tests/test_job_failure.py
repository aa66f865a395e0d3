"""A job that fails while other tiles are rendering: those tiles are cancelled (their
nodes hear it at the next heartbeat), nothing is accepted or paid after the escrow was
refunded, and the ledger balances."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.errors import DomainError
from coordinator.farm import Farm, Principal
from coordinator.http.errors import status_of
from protocol.client import sha256_file
from protocol.models import Heartbeat, JobStatus, LeaseRequest, Role, TaskFailure, TaskStatus
from tests.coordinator_tools import FreshFarm
from tests.inprocess_farm import TRUTH, setup_farm, small_spec, task_status, write_tile_exr

A, B = Principal("a", Role.PROVIDER), Principal("b", Role.PROVIDER)


@pytest.fixture()
def farm(fresh_farm: FreshFarm) -> Farm:
    return fresh_farm()


def test_a_failed_job_cancels_its_running_tiles(
    farm: Farm, demo_scene: Path, tmp_path: Path
) -> None:
    job_id, (node_a, node_b) = setup_farm(farm, small_spec(), demo_scene, tmp_path / "bundle")
    running = farm.try_lease(A, node_a, LeaseRequest(wait=0))
    failing = farm.try_lease(B, node_b, LeaseRequest(wait=0))
    assert running is not None and failing is not None and running.assignment is not None
    farm.report_failure(
        B, failing.lease_id, TaskFailure(kind="no_camera", message="no camera", retryable=False)
    )
    artist = Principal("artist", Role.REQUESTER)
    assert farm.job(artist, job_id).status is JobStatus.FAILED
    assert task_status(farm, running.task.id) == TaskStatus.CANCELED
    assert farm.heartbeat(A, running.lease_id, Heartbeat()).cancel
    r = running.assignment.render_region
    path = write_tile_exr(tmp_path / "late.exr", TRUTH[r.y0 : r.y1, r.x0 : r.x1])
    with pytest.raises(DomainError) as late:
        farm.accept_result(A, running.lease_id, sha256_file(path), iter([path.read_bytes()]))
    assert status_of(late.value) == 409
    assert farm.wallet(artist).escrow == 0 and farm.wallet(artist).balance == 100
    assert farm.ledger_check(Principal("admin", Role.ADMIN)).ok

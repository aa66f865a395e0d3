"""A job that fails while other tiles are rendering (once two providers agree its scene
is at fault): those tiles are cancelled (their nodes hear it at the next heartbeat),
nothing is accepted or paid after the escrow was refunded, and the ledger balances."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.errors import DomainError
from coordinator.farm import Farm, Principal
from coordinator.http.errors import status_of
from protocol.client import sha256_file
from protocol.models import Heartbeat, JobStatus, LeaseRequest, Role, TaskFailure, TaskStatus
from tests.coordinator_tools import FreshFarm
from tests.inprocess_farm import CAPS, TRUTH, setup_farm, small_spec, task_status, write_tile_exr

A, B, C = (Principal(name, Role.PROVIDER) for name in "abc")


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
    no_camera = TaskFailure(kind="no_camera", message="no camera", retryable=False)
    farm.report_failure(B, failing.lease_id, no_camera)
    artist = Principal("artist", Role.REQUESTER)
    # One provider's word fails nothing: the task waits for a provider of another account.
    assert farm.job(artist, job_id).status is JobStatus.ACTIVE
    assert task_status(farm, failing.task.id) == TaskStatus.SOFT_FAILED
    farm.create_account("c", Role.PROVIDER)
    node_c = farm.register_node(C, CAPS.model_copy(update={"name": "c", "price": 1.0})).node_id
    confirming = farm.try_lease(C, node_c, LeaseRequest(wait=0))
    assert confirming is not None and confirming.task.id == failing.task.id
    farm.report_failure(C, confirming.lease_id, no_camera)
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

"""Two coordinator replicas on one PostgreSQL database and one shared store, with four
real nodes split across them (each node knows both URLs, its own replica first). Either
replica is killed with SIGKILL at random moments mid-job and restarted; the job
completes, its frames equal one-piece renders, every task is paid exactly once, and the
ledger check passes (checked on the database after every kill, before the restart)."""

from __future__ import annotations

import random
import time
from pathlib import Path

from coordinator import ledger
from coordinator.db import open_database
from protocol.models import TaskStatus
from renderers.builds import BlenderBuild
from renderers.worker import RenderWorker
from tests.farm_tools import RunningCoordinator, wait_for_job
from tests.fault_tools import port_of, running_nodes, start_config_coordinator
from tests.postgres_tools import PostgresServer
from tests.test_faults import QUICK, _accounts, _assert_frames_match_one_piece_renders, _submit


def _books(url: str, job_id: str, *, finished: bool = False) -> None:
    """The ledger check passes; no task paid twice; every completed tile paid (and, once
    the job is finished, there are some)."""
    db = open_database(url, Path("unused.sqlite"))
    try:
        assert ledger.check(db) == []
        paid = {
            row[0]: row[1]
            for row in db.query(
                "SELECT task_id, COUNT(*) FROM ledger_txns WHERE kind = 'pay' AND job_id = ?"
                " GROUP BY task_id",
                (job_id,),
            )
        }
        tiles = {
            row[0]
            for row in db.query(
                "SELECT id FROM tasks WHERE job_id = ? AND status = 'completed' AND kind ="
                " 'render'",
                (job_id,),
            )
        }
    finally:
        db.close()
    assert all(count == 1 for count in paid.values()), f"paid more than once: {paid}"
    assert tiles <= set(paid), f"tiles never paid: {sorted(tiles - set(paid))}"
    assert tiles or not finished


def test_two_replicas_killed_at_random_mid_job_lose_nothing_and_pay_once(
    bpy_build: BlenderBuild,
    demo_scene: Path,
    worker: RenderWorker,
    postgres: PostgresServer,
    tmp_path: Path,
) -> None:
    rng = random.Random(20261203)
    url = postgres.new_database()
    config = {**QUICK, "db_url": url, "shared_store": str(tmp_path / "store")}
    data = [tmp_path / "replica-a", tmp_path / "replica-b"]
    replicas: list[RunningCoordinator] = [start_config_coordinator(data[0], **config)]
    replicas.append(start_config_coordinator(data[1], **config))
    ports = [port_of(r.url) for r in replicas]
    urls = [r.url for r in replicas]
    admin_token = replicas[0].admin_token
    assert not (data[1] / "admin.token").exists(), "the admin is created once per database"
    try:
        requester, tokens = _accounts(replicas[0], 4)
        job_id, spec = _submit(
            replicas[1],
            requester,
            worker,
            demo_scene,
            tmp_path / "bundle",
            frames="1-16",  # long enough for several kills, however fast tiles render
        )
        both = [f"{urls[0]},{urls[1]}", f"{urls[1]},{urls[0]}"]
        kills: list[str] = []
        with (
            running_nodes(bpy_build, both[0], tokens[:2], tmp_path / "a", retries=8),
            running_nodes(bpy_build, both[1], tokens[2:], tmp_path / "b", retries=8),
        ):
            for _ in range(3):
                victim = rng.randrange(2)
                other = replicas[1 - victim]
                with other.client(admin_token, retries=8) as admin:
                    deadline = time.monotonic() + 60
                    while not any(n.status == "busy" for n in admin.nodes()):
                        if admin.job(job_id).status.value == "completed":
                            break
                        assert time.monotonic() < deadline, f"no node took work: {kills}"
                        time.sleep(0.05)
                    time.sleep(rng.uniform(0.0, 0.8))
                    if admin.job(job_id).status.value == "completed":
                        break
                    accepted = {
                        t.id: t.result_sha256
                        for t in admin.tasks(job_id)
                        if t.status is TaskStatus.COMPLETED
                    }
                replicas[victim].kill()
                kills.append(f"{'ab'[victim]}@{len(accepted)}")
                _books(url, job_id)
                with other.client(admin_token, retries=8) as admin:  # the other one serves
                    after = {t.id: t for t in admin.tasks(job_id)}
                for task_id, sha in accepted.items():
                    assert after[task_id].status is TaskStatus.COMPLETED, after[task_id]
                    assert after[task_id].result_sha256 == sha, "an accepted tile was replaced"
                time.sleep(rng.uniform(0.0, 1.0))  # the nodes of the dead one fail over
                replicas[victim] = start_config_coordinator(data[victim], ports[victim], **config)
            with replicas[0].client(requester, retries=8) as client:
                assert wait_for_job(client, job_id, timeout=180) == "completed", kills
        assert len(kills) >= 2, f"the job finished before the replicas were killed: {kills}"
        with replicas[1].client(requester) as client:
            _assert_frames_match_one_piece_renders(
                client, job_id, spec, worker, demo_scene, tmp_path
            )
        _books(url, job_id, finished=True)
        with replicas[0].client(admin_token) as admin:
            assert admin.ledger_check().ok
    finally:
        for replica in replicas:
            replica.stop()

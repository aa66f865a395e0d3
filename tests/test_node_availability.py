"""Idle-only providing and per-render limits, with the real node against the real
coordinator (a process on 127.0.0.1) and real Blender.

The node's view of the machine comes from a machine state file (`NodeConfig.
machine_state_file`), written by the test as a user's script would: the node leases
nothing while the user is active, hands a running task back within seconds when the
user returns (a release, not a failure: no penalty, the task is re-queued), and a node
short of disk space hands its tasks back and stops taking work while another node
completes the job, with the ledger balanced.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from farm_node.availability import ProvidePolicy
from farm_node.bundle_cache import BundleCache
from farm_node.config import NodeConfig
from farm_node.daemon import NodeDaemon
from farm_node.runner import TaskRunner
from protocol.client import TesseraClient
from protocol.models import API_PREFIX, NodeInfo, Task
from renderers.builds import BlenderBuild
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.worker import RenderLimits, RenderWorker
from tests.farm_tools import (
    RunningCoordinator,
    job_spec,
    make_bundle,
    start_coordinator,
    wait_for_job,
)

IDLE_POLICY = ProvidePolicy(when="idle", idle_after=60)
USER_ACTIVE = {"input_idle_seconds": 0}
USER_AWAY = {"input_idle_seconds": 3600}


@dataclass
class Farm:
    coordinator: RunningCoordinator
    admin: TesseraClient
    requester: TesseraClient
    provider_token: str
    bundle_sha: str
    info: SceneInfo

    def node(self, name: str) -> NodeInfo:
        (node,) = [n for n in self.admin.nodes() if n.capabilities.name == name]
        return node

    def tasks(self, job_id: str) -> list[Task]:
        return self.requester.tasks(job_id)


@pytest.fixture(scope="module")
def farm(
    bpy_build: BlenderBuild,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Farm]:
    folder = tmp_path_factory.mktemp("availability-farm")
    info = inspect_scene(worker, demo_scene)
    bundle, sha = make_bundle(demo_scene, folder / "bundle")
    coordinator = start_coordinator(
        folder / "coordinator",
        "--heartbeat-interval",
        "0.5",
        "--no-verification",
        # The request limits' options reach the coordinator (checked at the end).
        "--max-body-bytes",
        "16K",
        "--rate-limit",
        "100",
        "--rate-burst",
        "400",
        "--max-concurrent",
        "64",
    )
    try:
        with coordinator.client(coordinator.admin_token) as admin:
            provider = admin.create_account("provider", "provider").token
            requester_token = admin.create_account("requester", "requester").token
            with coordinator.client(requester_token) as requester:
                requester.upload_bundle(bundle)
                yield Farm(coordinator, admin, requester, provider, sha, info)
    finally:
        coordinator.stop()


def write_state(path: Path, readings: dict[str, float]) -> None:
    """Replace the machine state file atomically, as a script should."""
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(readings))
    temp.replace(path)


def wait_until(what: str, condition: Callable[[], bool], timeout: float = 60) -> float:
    """Seconds it took for `condition` to hold."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)
    return time.monotonic() - start


@contextmanager
def running_node(
    farm: Farm,
    build: BlenderBuild,
    folder: Path,
    name: str,
    *,
    runner_limits: RenderLimits | None = None,
    **options: object,
) -> Iterator[NodeDaemon]:
    """A real `NodeDaemon` serving `farm` in a thread until the block ends.

    `runner_limits` gives the runner's workers limits of their own (default: the
    config's), as when the disk fills up between the node's check and the render."""
    config = NodeConfig(
        coordinator_url=farm.coordinator.url,
        data_dir=folder / name,
        token=farm.provider_token,
        name=name,
        poll_wait=0.3,
        benchmark=False,
        retry_initial=0.1,
        retry_max=1.0,
        availability_interval=0.2,
        **options,  # type: ignore[arg-type]
    )
    client = TesseraClient(farm.coordinator.url, farm.provider_token)
    runner = TaskRunner(
        build,
        config.scratch_dir,
        task_timeout=120,
        limits=runner_limits if runner_limits is not None else config.limits,
    )
    daemon = NodeDaemon(config, client, runner, BundleCache(config.cache_dir, 1 << 30))
    stop = threading.Event()
    thread = threading.Thread(target=daemon.run, args=(stop,), name=f"node-{name}")
    thread.start()
    try:
        wait_until(f"{name} registered", lambda: daemon.node_id is not None, 30)
        yield daemon
    finally:
        stop.set()
        daemon.abort()
        thread.join(60)
        client.close()
    assert not thread.is_alive()


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_an_idle_only_node_waits_for_the_user_to_leave(
    farm: Farm, bpy_build: BlenderBuild, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="farm_node")
    state = tmp_path / "machine.json"
    write_state(state, USER_ACTIVE)
    job = farm.requester.submit_job(
        job_spec(farm.info, farm.bundle_sha, frames="1", tiles=(2, 1), denoise=False)
    )
    with running_node(
        farm, bpy_build, tmp_path, "desk", policy=IDLE_POLICY, machine_state_file=state
    ) as node:
        time.sleep(1.5)  # some 7 availability checks, and time enough to lease
        assert node.paused_reason is not None
        assert node.paused_reason.startswith("paused: the user is active (input 0 s ago")
        assert {task.status.value for task in farm.tasks(job.id)} == {"queued"}
        assert farm.node("desk").tasks_completed == 0
        # The coordinator lists it as paused, with the reason, not idle or offline.
        listed = farm.node("desk")
        assert listed.status == "paused", listed
        assert listed.paused is not None and "the user is active" in listed.paused

        write_state(state, USER_AWAY)
        assert wait_for_job(farm.requester, job.id, timeout=60) == "completed"
        assert node.paused_reason is None
        assert farm.node("desk").status != "paused"
    assert farm.node("desk").tasks_completed == 2
    # Logged once per change, not once per check.
    assert len(messages(caplog, "Not taking work: paused: the user is active")) == 1
    assert len(messages(caplog, "Taking work again (rendering: the machine is idle")) == 1
    assert farm.admin.ledger_check().ok


def test_a_returning_user_gets_the_machine_back_within_seconds(
    farm: Farm, bpy_build: BlenderBuild, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="farm_node")
    state = tmp_path / "machine.json"
    write_state(state, USER_AWAY)
    # One slow tile: half size at 16 samples takes seconds on two cores.
    spec = job_spec(
        farm.info,
        farm.bundle_sha,
        frames="1",
        tiles=(1, 1),
        percentage=50,
        samples=16,
        denoise=False,
    )
    job = farm.requester.submit_job(spec)
    with running_node(
        farm, bpy_build, tmp_path, "gamer", policy=IDLE_POLICY, machine_state_file=state
    ) as node:
        wait_until("the tile is rendering", lambda: node.runner.worker_starts >= 1)
        wait_until("the tile is leased", lambda: farm.tasks(job.id)[0].status.value == "active")
        time.sleep(1.0)  # into the render proper
        assert node.runner.warm_bundles() == [farm.bundle_sha], "Blender is rendering"

        write_state(state, USER_ACTIVE)
        seconds = wait_until(
            "the lease is released", lambda: farm.tasks(job.id)[0].status.value == "queued", 10
        )
        assert seconds < 3, f"the machine was handed back after {seconds:.1f} s"
        (task,) = farm.tasks(job.id)
        assert task.attempts == 0 and task.render_seconds is None
        assert node.runner.warm_bundles() == [], "the render's Blender was stopped"
        assert messages(caplog, "Cancelling the current task: paused: the user is active")
        assert messages(caplog, "Released lease")
        assert node.paused_reason is not None and "the user is active" in node.paused_reason
        time.sleep(0.5)
        assert farm.tasks(job.id)[0].status.value == "queued", "no new lease while active"

        write_state(state, USER_AWAY)
        assert wait_for_job(farm.requester, job.id, timeout=60) == "completed"
    gamer = farm.node("gamer")
    assert (gamer.tasks_completed, gamer.tasks_failed, gamer.rejected) == (1, 0, 0)
    assert not messages(caplog, "failed (")
    assert farm.admin.ledger_check().ok


def test_a_node_short_of_disk_hands_its_tasks_to_another(
    farm: Farm, bpy_build: BlenderBuild, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="farm_node")
    job = farm.requester.submit_job(
        job_spec(farm.info, farm.bundle_sha, frames="1", tiles=(2, 1), denoise=False)
    )
    impossible = RenderLimits(min_free_disk=1 << 60, sandbox="off")
    # "full": its own check before leasing fails, so it never takes a task.
    # "filling": its check passes, but the disk is short by the time Blender would start
    # (the runner's own limits): it takes a task and must hand it back.
    with (
        running_node(farm, bpy_build, tmp_path, "full", limits=impossible) as full,
        running_node(
            farm, bpy_build, tmp_path, "filling", runner_limits=impossible, disk_full_pause=60
        ) as filling,
    ):
        wait_until("the filling node refused a task", lambda: filling.paused_reason is not None)
        assert filling.paused_reason is not None
        assert "a render needs at least" in filling.paused_reason
        assert "(the last task was handed back)" in filling.paused_reason
        assert full.paused_reason is not None
        assert full.paused_reason.startswith("paused: Only ")
        assert "a render needs at least 1048576.0 TiB free there" in full.paused_reason
        refusals = messages(caplog, "refused for lack of disk space (InsufficientDiskSpaceError)")
        assert len(refusals) == 1, "one refusal, then no more leases"
        assert messages(caplog, "Not taking work for 60 s, and then only with")
        wait_until(
            "the refused task is queued again",
            lambda: {t.status.value for t in farm.tasks(job.id)} == {"queued"},
            10,
        )
        assert all(task.attempts == 0 for task in farm.tasks(job.id))

        with running_node(farm, bpy_build, tmp_path, "roomy"):
            assert wait_for_job(farm.requester, job.id, timeout=60) == "completed"
    assert farm.node("roomy").tasks_completed == 2
    for name in ("full", "filling"):
        node = farm.node(name)
        assert (node.tasks_completed, node.tasks_failed) == (0, 0), name
    assert farm.requester.job(job.id).status.value == "completed"
    assert farm.admin.ledger_check().ok


def test_the_coordinators_request_limit_options_take_effect(farm: Farm) -> None:
    # Started with --max-body-bytes 16K: a 20 KB JSON body is refused before parsing.
    reply = requests.post(
        f"{farm.coordinator.url}{API_PREFIX}/jobs",
        data=b"[" + b"0," * 10_000 + b"0]",
        headers={
            "Authorization": f"Bearer {farm.coordinator.admin_token}",
            "Content-Type": "application/json",
        },
        timeout=10,
    )
    assert reply.status_code == 413
    assert "limit of 16384 bytes" in reply.json()["detail"]

"""A node's workers against a real coordinator on 127.0.0.1: two workers (CPU stand-ins
for two GPUs) register as ``box/gpu0`` and ``box/gpu1``, lease and render at the same
time, and a crash of one worker (its Blender killed, or its daemon dying) restarts that
worker only, while the other goes on."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from farm_node.bundle_cache import BundleCache
from farm_node.config import NodeConfig
from farm_node.fleet import Fleet
from farm_node.runner import TaskRunner
from farm_node.workers import WorkerPlan
from protocol.client import TesseraClient
from protocol.models import JobSpec, NodeInfo
from renderers.builds import BlenderBuild
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.worker import RenderWorker
from tests.farm_tools import (
    RunningCoordinator,
    job_spec,
    make_bundle,
    start_coordinator,
    wait_for_job,
)

#: Two GPUs, played by two CPU workers (the plan's device is what a worker renders with).
STAND_INS = [
    WorkerPlan("gpu0", "CPU", card="stand-in 0"),
    WorkerPlan("gpu1", "CPU", card="stand-in 1"),
]


def _config(url: str, token: str, folder: Path) -> NodeConfig:
    return NodeConfig(
        coordinator_url=url,
        data_dir=folder / "node",
        token=token,
        name="box",
        threads=1,
        poll_wait=0.5,
        benchmark=False,
        retry_initial=0.1,
        retry_max=0.5,
    )


@contextmanager
def _running(fleet: Fleet) -> Iterator[threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=fleet.run, args=(stop,), name="fleet")
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(60)
        assert not thread.is_alive(), "the fleet did not stop"


def _fleet(config: NodeConfig, build: BlenderBuild, **options: float) -> Fleet:
    def parts(worker: NodeConfig) -> tuple[TesseraClient, TaskRunner]:
        client = TesseraClient(worker.coordinator_url, worker.token)
        runner = TaskRunner(build, worker.scratch_dir, worker.device, 1, task_timeout=120)
        return client, runner

    cache = BundleCache(config.cache_dir, 1 << 30)
    return Fleet(config, STAND_INS, parts, cache, **options)


def _farm(folder: Path) -> tuple[RunningCoordinator, str, str]:
    coordinator = start_coordinator(folder / "coordinator", "--heartbeat-interval", "1")
    with coordinator.client(coordinator.admin_token) as admin:
        provider = admin.create_account("provider", "provider").token
        requester = admin.create_account("requester", "requester").token
    return coordinator, provider, requester


def _spec(info: SceneInfo, sha: str) -> JobSpec:
    # Renders of about a second each, so that two workers overlap.
    return job_spec(info, sha, frames="1-2", tiles=(2, 2), percentage=50, samples=64)


def _nodes(coordinator: RunningCoordinator) -> dict[str, NodeInfo]:
    with coordinator.client(coordinator.admin_token) as admin:
        return {node.capabilities.name: node for node in admin.nodes()}


def test_two_workers_lease_and_render_at_the_same_time(
    bpy_build: BlenderBuild, demo_scene: Path, worker: RenderWorker, tmp_path: Path
) -> None:
    info = inspect_scene(worker, demo_scene)
    bundle, sha = make_bundle(demo_scene, tmp_path / "bundle")
    coordinator, provider, requester = _farm(tmp_path)
    try:
        fleet = _fleet(_config(coordinator.url, provider, tmp_path), bpy_build)
        with coordinator.client(requester) as client:
            client.upload_bundle(bundle)
            job = client.submit_job(_spec(info, sha))
            both_busy = False
            with _running(fleet):
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline and client.job(job.id).status.value not in (
                    "completed",
                    "failed",
                ):
                    busy = [n for n in _nodes(coordinator).values() if n.status == "busy"]
                    both_busy = both_busy or len(busy) == 2
                    time.sleep(0.05)
                status = wait_for_job(client, job.id, timeout=5)
        assert status == "completed"
        nodes = _nodes(coordinator)
        assert sorted(nodes) == ["box/gpu0", "box/gpu1"], "each worker is a node of its own"
        assert {n.owner for n in nodes.values()} == {"provider"}
        assert all(n.tasks_completed >= 1 for n in nodes.values()), "both rendered"
        assert sum(n.tasks_completed for n in nodes.values()) >= 8, "8 tiles (and backups)"
        assert both_busy, "the two workers never rendered at the same time"
        assert fleet.starts == {"gpu0": 1, "gpu1": 1}
        results = tmp_path / "node" / "workers"
        assert sorted(p.name for p in results.iterdir()) == ["gpu0", "gpu1"]
    finally:
        coordinator.stop()


def test_a_killed_blender_restarts_only_its_worker(
    bpy_build: BlenderBuild, demo_scene: Path, worker: RenderWorker, tmp_path: Path
) -> None:
    info = inspect_scene(worker, demo_scene)
    bundle, sha = make_bundle(demo_scene, tmp_path / "bundle")
    coordinator, provider, requester = _farm(tmp_path)
    try:
        fleet = _fleet(_config(coordinator.url, provider, tmp_path), bpy_build)
        with coordinator.client(requester) as client:
            client.upload_bundle(bundle)
            first = client.submit_job(job_spec(info, sha, frames="1-2", tiles=(2, 2)))
            with _running(fleet):
                assert wait_for_job(client, first.id, timeout=180) == "completed"
                runners = {label: d.runner for label, d in fleet.daemons.items()}
                before = {label: r.worker_starts for label, r in runners.items()}
                assert all(before.values()), "both workers rendered the first job"
                (victim,) = runners["gpu0"].worker_pids()[:1]
                survivors = runners["gpu1"].worker_pids()
                done_before = _nodes(coordinator)["box/gpu0"].tasks_completed
                os.kill(victim, signal.SIGKILL)
                second = client.submit_job(job_spec(info, sha, frames="1-3", tiles=(2, 2)))
                assert wait_for_job(client, second.id, timeout=180) == "completed"
                after = {label: r.worker_starts for label, r in runners.items()}
                assert runners["gpu1"].worker_pids()[: len(survivors)] == survivors
        assert after["gpu1"] == before["gpu1"], "the other worker's Blender was not restarted"
        assert _nodes(coordinator)["box/gpu0"].tasks_completed > done_before, "gpu0 served on"
        assert after["gpu0"] == before["gpu0"] + 1, "the killed Blender started again"
        assert fleet.starts == {"gpu0": 1, "gpu1": 1}, "no daemon had to be restarted"
    finally:
        coordinator.stop()


def test_a_crashed_worker_is_restarted_and_the_other_goes_on(
    bpy_build: BlenderBuild, tmp_path: Path
) -> None:
    coordinator, provider, _ = _farm(tmp_path)
    try:
        config = _config(coordinator.url, provider, tmp_path)
        # gpu1's folder is a file: its daemon dies (OSError) on every start until removed.
        blocker = tmp_path / "node" / "workers" / "gpu1"
        blocker.parent.mkdir(parents=True)
        blocker.write_text("not a folder")
        fleet = _fleet(config, bpy_build, restart_delay=0.2)
        with _running(fleet):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and fleet.starts["gpu1"] < 3:
                time.sleep(0.1)
            assert fleet.starts["gpu1"] >= 3, "the crashed worker was not started again"
            assert set(_nodes(coordinator)) == {"box/gpu0"}, "gpu0 serves meanwhile"
            assert fleet.starts["gpu0"] == 1
            blocker.unlink()
            while time.monotonic() < deadline and "box/gpu1" not in _nodes(coordinator):
                time.sleep(0.1)
            nodes = _nodes(coordinator)
        assert set(nodes) == {"box/gpu0", "box/gpu1"}, "the restarted worker registered"
        assert fleet.starts["gpu0"] == 1, "the healthy worker was never restarted"
        assert not fleet.stopped
    finally:
        coordinator.stop()

"""A GPU worker takes no work until its warm-up render succeeded, and a failed warm-up is
visible with its reason (never a quiet CPU render).

The coordinator's side runs in process (`Farm`): a worker reporting "warming" or
"failed" is leased nothing while another node gets the task. The node's side runs a
real `NodeDaemon` against a real coordinator, its warm-up done by a CPU stand-in (the
warm-up path is the same for every device; no GPU is needed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from coordinator.farm import Principal
from farm_node.bundle_cache import BundleCache
from farm_node.config import NodeConfig
from farm_node.daemon import NodeDaemon
from farm_node.runner import TaskRunner
from protocol.client import TesseraClient
from protocol.models import LeaseRequest, NodeInfo, Role
from renderers.builds import BlenderBuild
from renderers.scene_info import inspect_scene
from renderers.worker import RenderWorker
from tests.coordinator_tools import FreshFarm
from tests.farm_tools import RunningCoordinator, job_spec, make_bundle, start_coordinator
from tests.inprocess_farm import setup_farm, small_spec
from tests.test_farm_cli import tessera


def _node(farm_nodes: list[NodeInfo], node_id: str) -> NodeInfo:
    return next(node for node in farm_nodes if node.id == node_id)


def test_a_warming_or_failed_worker_is_leased_nothing(
    fresh_farm: FreshFarm, demo_scene: Path, tmp_path: Path
) -> None:
    farm = fresh_farm()
    _, (a, b) = setup_farm(farm, small_spec(), demo_scene, tmp_path)
    who_a, admin = Principal("a", Role.PROVIDER), Principal("admin", Role.ADMIN)
    warming = LeaseRequest(wait=0, readiness="warming", paused="warming up OPTIX: 95 s")
    assert farm.try_lease(who_a, a, warming) is None
    node = _node(farm.nodes(admin), a)
    assert (node.status, node.paused) == ("warming", "warming up OPTIX: 95 s")
    failed = LeaseRequest(wait=0, readiness="failed", paused="warm-up on OPTIX failed: timeout")
    assert farm.try_lease(who_a, a, failed) is None
    node = _node(farm.nodes(admin), a)
    assert (node.status, node.paused) == ("failed", "warm-up on OPTIX failed: timeout")
    assert farm.try_lease(Principal("b", Role.PROVIDER), b, LeaseRequest(wait=0)) is not None
    assert farm.try_lease(who_a, a, LeaseRequest(wait=0)) is not None, "ready: it leases"
    assert _node(farm.nodes(admin), a).status == "busy"


def test_readiness_has_three_values() -> None:
    with pytest.raises(ValueError, match="readiness"):
        LeaseRequest.model_validate({"readiness": "cold"})


def _config(url: str, token: str, folder: Path, **options: object) -> NodeConfig:
    return NodeConfig(
        coordinator_url=url,
        data_dir=folder / "node",
        token=token,
        name="gpu-box",
        threads=1,
        poll_wait=0.5,
        benchmark=False,
        retry_initial=0.1,
        retry_max=0.5,
        warmup=True,  # a CPU stand-in warms up as a GPU worker does
        **options,  # type: ignore[arg-type]
    )


@contextmanager
def _serving(config: NodeConfig, build: BlenderBuild) -> Iterator[NodeDaemon]:
    client = TesseraClient(config.coordinator_url, config.token)
    runner = TaskRunner(build, config.scratch_dir, config.device, 1, task_timeout=120)
    daemon = NodeDaemon(config, client, runner, BundleCache(config.cache_dir, 1 << 30))
    stop = threading.Event()
    thread = threading.Thread(target=daemon.run, args=(stop,), name="warm-node")
    thread.start()
    try:
        yield daemon
    finally:
        stop.set()
        thread.join(60)
        client.close()
    assert not thread.is_alive()


def _farm(folder: Path) -> tuple[RunningCoordinator, str, str]:
    coordinator = start_coordinator(folder / "coordinator", "--heartbeat-interval", "1")
    with coordinator.client(coordinator.admin_token) as admin:
        provider = admin.create_account("provider", "provider").token
        requester = admin.create_account("requester", "requester").token
    return coordinator, provider, requester


def _wait_for_status(coordinator: RunningCoordinator, status: str, timeout: float) -> NodeInfo:
    deadline = time.monotonic() + timeout
    with coordinator.client(coordinator.admin_token) as admin:
        while time.monotonic() < deadline:
            nodes = admin.nodes()
            if nodes and nodes[0].status == status:
                return nodes[0]
            time.sleep(0.1)
        raise AssertionError(f"the node is {[n.status for n in admin.nodes()]}, not {status}")


def test_a_failed_warm_up_is_shown_with_its_reason_and_takes_no_work(
    bpy_build: BlenderBuild, demo_scene: Path, worker: RenderWorker, tmp_path: Path
) -> None:
    info = inspect_scene(worker, demo_scene)
    bundle, sha = make_bundle(demo_scene, tmp_path / "bundle")
    coordinator, provider, requester = _farm(tmp_path)
    try:
        config = _config(coordinator.url, provider, tmp_path, warmup_timeout=0.001)
        with coordinator.client(requester) as client:
            client.upload_bundle(bundle)
            job = client.submit_job(job_spec(info, sha, frames="1", tiles=(1, 1)))
            with _serving(config, bpy_build) as daemon:
                node = _wait_for_status(coordinator, "failed", timeout=120)
                assert node.paused is not None
                assert node.paused.startswith("warm-up on CPU failed: ")
                listing = tessera("nodes", url=coordinator.url, token=coordinator.admin_token)
                time.sleep(2)  # polls go on: still nothing leased
                assert client.job(job.id).status.value == "queued"
                assert daemon.warmup is not None and daemon.warmup.state == "failed"
        assert listing.returncode == 0, listing.stderr
        assert "failed" in listing.stdout
        assert f"gpu-box: {node.paused}" in listing.stdout
        assert node.tasks_completed == 0 and node.current_task is None
    finally:
        coordinator.stop()


def test_a_worker_warms_up_then_renders(
    bpy_build: BlenderBuild,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    info = inspect_scene(worker, demo_scene)
    bundle, sha = make_bundle(demo_scene, tmp_path / "bundle")
    coordinator, provider, requester = _farm(tmp_path)
    caplog.set_level(logging.INFO, logger="farm_node")
    try:
        config = _config(coordinator.url, provider, tmp_path)
        with coordinator.client(requester) as client:
            client.upload_bundle(bundle)
            job = client.submit_job(job_spec(info, sha, frames="1", tiles=(1, 1)))
            with _serving(config, bpy_build) as daemon:
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline and client.job(job.id).status.value != (
                    "completed"
                ):
                    time.sleep(0.1)
                assert client.job(job.id).status.value == "completed"
                assert daemon.warmup is None, "warm, the worker dropped its warm-up"
        text = caplog.text
        assert "Warming up gpu-box on CPU" in text
        assert "gpu-box: warmed up on CPU in" in text
        assert text.index("warmed up") < text.index("Lease "), "no lease before the warm-up"
    finally:
        coordinator.stop()


def test_the_provide_page_sees_every_worker_of_a_multi_gpu_node() -> None:
    from datetime import UTC, datetime

    from app.node_process import combine_workers
    from protocol.models import NodeCapabilities

    def info(name: str, status: str, paused: str | None, done: int, task: str | None) -> NodeInfo:
        return NodeInfo(
            id=name,
            owner="p",
            capabilities=NodeCapabilities(name=name),
            status=status,  # type: ignore[arg-type]
            paused=paused,
            current_task=task,
            last_seen=datetime.now(UTC),
            tasks_completed=done,
            earned=float(done),
        )

    workers = [
        info("box/gpu0", "warming", "warming up OPTIX (compiling GPU kernels): 95 s", 0, None),
        info("box/gpu1", "busy", None, 3, "t-7"),
        info("box/cpu", "idle", None, 2, None),
    ]
    node = combine_workers("box", workers)
    assert node is not None
    assert node.capabilities.name == "box"
    assert node.paused == (
        "gpu0: warming up OPTIX (compiling GPU kernels): 95 s; gpu1: busy; cpu: idle"
    )
    assert (node.status, node.current_task) == ("busy", "t-7")
    assert (node.tasks_completed, node.earned) == (5, 5.0)
    assert combine_workers("box", []) is None

"""Duplicate sampling end to end: a real coordinator, real renders, honest and cheating
providers of separate accounts. Each cheat is caught, the frames stay bit-identical to a
one-piece render, the cheater is not paid for what it faked, honest providers (one of
them on another CPU kernel) are never rejected, and the ledger balances."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.errors import ApiError
from protocol.client import TesseraClient
from protocol.models import JobStatus, LeaseRequest, NodeInfo, Role
from renderers.builds import BlenderBuild
from renderers.exr import read_exr
from renderers.local_render import LocalRenderOptions, render_frame_local
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.worker import RenderWorker
from tests.farm_tools import RunningCoordinator, job_spec, make_bundle, start_coordinator
from tests.verify_tools import VirtualNode, make_node, serve


@pytest.fixture()
def coordinator(tmp_path: Path) -> Iterator[RunningCoordinator]:
    running = start_coordinator(tmp_path / "coordinator")
    yield running
    running.stop()


@pytest.fixture()
def admin(coordinator: RunningCoordinator) -> Iterator[TesseraClient]:
    with coordinator.client(coordinator.admin_token) as client:
        yield client


@pytest.fixture()
def requester(coordinator: RunningCoordinator, admin: TesseraClient) -> Iterator[TesseraClient]:
    token = admin.create_account("artist", Role.REQUESTER).token
    admin.grant("artist", 1000)
    with coordinator.client(token) as client:
        yield client


@pytest.fixture(scope="module")
def demo_info(worker: RenderWorker, demo_scene: Path) -> SceneInfo:
    return inspect_scene(worker, demo_scene)


@pytest.fixture(scope="module")
def other_kernel_worker(
    bpy_build: BlenderBuild, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RenderWorker]:
    scratch = tmp_path_factory.mktemp("sse-worker")
    with RenderWorker(bpy_build, scratch_dir=scratch, extra_env={"CYCLES_CPU_NO_AVX2": "1"}) as w:
        w.start()  # before the leak check's snapshot
        yield w


def _submit(requester: TesseraClient, demo_info: SceneInfo, scene: Path, folder: Path) -> str:
    path, sha = make_bundle(scene, folder)
    requester.upload_bundle(path)
    spec = job_spec(demo_info, sha, frames="1-2", tiles=(2, 2), denoise=False, max_price=2.0)
    return requester.submit_job(spec).id


def _finished(client: TesseraClient, job_id: str) -> bool:
    return client.job(job_id).status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED)


def _node(admin: TesseraClient, name: str) -> NodeInfo:
    return next(n for n in admin.nodes() if n.capabilities.name == name)


def _verifications(coordinator: RunningCoordinator) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{coordinator.data_dir / 'coordinator.sqlite'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute("SELECT * FROM verifications"))
    finally:
        conn.close()


def _assert_frames_exact(
    client: TesseraClient, job_id: str, worker: RenderWorker, scene: Path, folder: Path
) -> None:
    for frame in (1, 2):
        farm = read_exr(client.download_frame(job_id, frame, folder / f"farm{frame}.exr"))
        local = folder / f"local{frame}.exr"
        render_frame_local(
            worker,
            scene,
            local,
            LocalRenderOptions(frame=frame, percentage=10, samples=4, denoise=False, preview=False),
        )
        reference = read_exr(local)
        for name in reference.channel_names():
            assert np.array_equal(farm.channel(name), reference.channel(name)), (frame, name)


CHEATS = ["samples", "copy", "noise", "black"]


@pytest.mark.parametrize("kind", CHEATS)
def test_each_cheat_is_caught_and_the_frames_stay_exact(
    coordinator: RunningCoordinator,
    admin: TesseraClient,
    requester: TesseraClient,
    demo_info: SceneInfo,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
    kind: str,
) -> None:
    url = coordinator.url
    nodes = [
        make_node(admin, url, "cheater", worker, cheat=kind),
        make_node(admin, url, "honest-a", worker),
        make_node(admin, url, "honest-b", worker),
    ]
    job_id = _submit(requester, demo_info, demo_scene, tmp_path / "bundle")
    serve(nodes, demo_scene, tmp_path, lambda: _finished(requester, job_id))

    assert requester.job(job_id).status is JobStatus.COMPLETED
    _assert_frames_exact(requester, job_id, worker, demo_scene, tmp_path)
    cheater = _node(admin, "cheater")
    assert cheater.rejected >= 1, "the cheat went unnoticed"
    assert cheater.earned == 0, "the cheater was paid for faked work"
    assert cheater.reputation < 0.5
    for name in ("honest-a", "honest-b"):
        honest = _node(admin, name)
        assert honest.rejected == 0, f"{name} was rejected"
        assert honest.earned > 0
    # Every tile the cheater rendered was faked, so none of its tiles made it in.
    tasks = requester.tasks(job_id)
    cheater_id = cheater.id
    assert not [t for t in tasks if t.kind.value == "render" and t.node == cheater_id]
    check = admin.ledger_check()
    assert check.ok, check.problems
    assert any(not v["agree"] for v in _verifications(coordinator))


def test_a_provider_faking_a_tenth_of_its_tiles_gets_no_fake_accepted(
    coordinator: RunningCoordinator,
    admin: TesseraClient,
    requester: TesseraClient,
    demo_info: SceneInfo,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
) -> None:
    url = coordinator.url
    # Seed 31 makes the first draw a fake: the cheater's first tile is faked.
    cheater = make_node(admin, url, "sometimes", worker, cheat="sometimes", seed=31)
    nodes = [cheater, make_node(admin, url, "a", worker), make_node(admin, url, "b", worker)]
    job_ids = [_submit(requester, demo_info, demo_scene, tmp_path / f"bundle{i}") for i in range(2)]
    serve(nodes, demo_scene, tmp_path, lambda: all(_finished(requester, j) for j in job_ids))

    assert cheater.faked, "the seeded cheater faked nothing"
    for job_id in job_ids:
        assert requester.job(job_id).status is JobStatus.COMPLETED
        accepted = {
            t.id
            for t in requester.tasks(job_id)
            if t.status.value == "completed"
            and t.node == cheater.node_id
            and t.kind.value == "render"
        }
        assert not accepted & set(cheater.faked), "a faked tile was accepted"
    _assert_frames_exact(requester, job_ids[0], worker, demo_scene, tmp_path)
    assert _node(admin, "sometimes").rejected >= 1
    assert _node(admin, "a").rejected == 0 and _node(admin, "b").rejected == 0
    assert admin.ledger_check().ok


def test_honest_providers_on_two_cpu_kernels_are_never_rejected(
    coordinator: RunningCoordinator,
    admin: TesseraClient,
    requester: TesseraClient,
    demo_info: SceneInfo,
    demo_scene: Path,
    worker: RenderWorker,
    other_kernel_worker: RenderWorker,
    tmp_path: Path,
) -> None:
    url = coordinator.url
    nodes = [
        make_node(admin, url, "avx2", worker),
        make_node(admin, url, "sse42", other_kernel_worker, kernel="SSE4.2"),
    ]
    job_ids = [_submit(requester, demo_info, demo_scene, tmp_path / f"bundle{i}") for i in range(2)]
    serve(nodes, demo_scene, tmp_path, lambda: all(_finished(requester, j) for j in job_ids))

    assert all(requester.job(j).status is JobStatus.COMPLETED for j in job_ids)
    for name in ("avx2", "sse42"):
        info = _node(admin, name)
        assert info.rejected == 0 and info.suspended is None, info
        assert info.verified > 0
    checks = _verifications(coordinator)
    assert checks and all(v["agree"] for v in checks)
    assert {v["mode"] for v in checks} == {"tolerance"}, "cross-kernel pairs use the tolerance"
    assert admin.ledger_check().ok


def test_same_machine_class_is_compared_exactly(
    coordinator: RunningCoordinator,
    admin: TesseraClient,
    requester: TesseraClient,
    demo_info: SceneInfo,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
) -> None:
    nodes = [make_node(admin, coordinator.url, name, worker) for name in ("a", "b")]
    job_id = _submit(requester, demo_info, demo_scene, tmp_path / "bundle")
    serve(nodes, demo_scene, tmp_path, lambda: _finished(requester, job_id))
    checks = _verifications(coordinator)
    assert len(checks) == 8, "a new provider has every tile sampled"
    assert {v["mode"] for v in checks} == {"exact"}
    assert all(v["agree"] for v in checks)


def test_a_repeat_cheater_is_suspended_with_the_reason(
    coordinator: RunningCoordinator,
    admin: TesseraClient,
    requester: TesseraClient,
    demo_info: SceneInfo,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
) -> None:
    url = coordinator.url
    cheater = make_node(admin, url, "cheater", worker, cheat="black")
    nodes = [cheater, make_node(admin, url, "a", worker), make_node(admin, url, "b", worker)]
    job_ids = [_submit(requester, demo_info, demo_scene, tmp_path / f"bundle{i}") for i in range(4)]
    serve(nodes, demo_scene, tmp_path, lambda: all(_finished(requester, j) for j in job_ids))

    assert all(requester.job(j).status is JobStatus.COMPLETED for j in job_ids)
    info = _node(admin, "cheater")
    assert info.suspended is not None and "failed" in info.suspended
    with pytest.raises(ApiError) as refused:
        cheater.client.lease(cheater.node_id, LeaseRequest(wait=0))
    assert refused.value.status == 403
    assert "suspended" in refused.value.message
    admin.reinstate("cheater")
    assert _node(admin, "cheater").suspended is None
    with pytest.raises(ApiError) as again:
        admin.reinstate("cheater")
    assert again.value.status == 404
    assert admin.ledger_check().ok


def test_a_single_provider_is_not_sampled(
    coordinator: RunningCoordinator,
    admin: TesseraClient,
    requester: TesseraClient,
    demo_info: SceneInfo,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
) -> None:
    only: list[VirtualNode] = [make_node(admin, coordinator.url, "alone", worker)]
    job_id = _submit(requester, demo_info, demo_scene, tmp_path / "bundle")
    serve(only, demo_scene, tmp_path, lambda: _finished(requester, job_id))
    assert requester.job(job_id).status is JobStatus.COMPLETED
    assert not _verifications(coordinator)
    assert not [t for t in requester.tasks(job_id) if t.kind.value == "verify"]

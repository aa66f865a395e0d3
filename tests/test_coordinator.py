"""The coordinator as a real process on 127.0.0.1: auth, bundles, job validation, leasing,
uploads, assembly, restarts. Nodes here are a minimal loop over a real Blender worker."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from common.errors import ApiError
from protocol.client import sha256_file
from protocol.models import FrameStatus, Heartbeat, LeaseRequest, NodeCapabilities, Role
from renderers.exr import read_exr
from renderers.local_render import LocalRenderOptions, render_frame_local
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.worker import RenderWorker
from tests.farm_tools import (
    RunningCoordinator,
    job_spec,
    make_bundle,
    serve_leases,
    start_coordinator,
    wait_for_job,
)


@pytest.fixture()
def coordinator(tmp_path: Path, db_url: str | None) -> Iterator[RunningCoordinator]:
    running = start_coordinator(
        tmp_path / "coordinator", "--lease-seconds", "4", "--heartbeat-interval", "1",
        *(["--db", db_url] if db_url else []),
    )  # fmt: skip
    yield running
    running.stop()


@pytest.fixture()
def tokens(coordinator: RunningCoordinator) -> dict[str, str]:
    with coordinator.client(coordinator.admin_token) as admin:
        return {
            "requester": admin.create_account("alice", Role.REQUESTER).token,
            "provider": admin.create_account("bob", Role.PROVIDER).token,
            "provider2": admin.create_account("carol", Role.PROVIDER).token,
        }


@pytest.fixture(scope="module")
def demo_info(worker: RenderWorker, demo_scene: Path) -> SceneInfo:
    return inspect_scene(worker, demo_scene)


@pytest.fixture()
def bundle(demo_scene: Path, tmp_path: Path) -> tuple[Path, str]:
    return make_bundle(demo_scene, tmp_path / "bundle")


def _raw(
    coordinator: RunningCoordinator,
    method: str,
    path: str,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: object,
) -> requests.Response:
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(
        method, f"{coordinator.url}/api/v1{path}", headers=headers, timeout=30, **kwargs
    )  # type: ignore[arg-type]


def test_health_and_openapi_need_no_token(coordinator: RunningCoordinator) -> None:
    assert _raw(coordinator, "GET", "/health").json()["status"] == "ok"
    spec = _raw(coordinator, "GET", "/openapi.json").json()
    assert "/api/v1/jobs" in spec["paths"]


def test_first_start_writes_a_private_admin_token(coordinator: RunningCoordinator) -> None:
    path = coordinator.data_dir / "admin.token"
    assert path.stat().st_mode & 0o777 == 0o600
    assert "admin token written to" in coordinator.log.read_text()


@pytest.mark.parametrize("token", [None, "tsr_not-a-real-token"])
def test_missing_or_bad_token_is_401_with_a_message(
    coordinator: RunningCoordinator, token: str | None
) -> None:
    reply = _raw(coordinator, "GET", "/jobs", token)
    assert reply.status_code == 401
    assert reply.json()["detail"] and reply.json()["hint"]


def test_roles_are_enforced(coordinator: RunningCoordinator, tokens: dict[str, str]) -> None:
    with coordinator.client(tokens["requester"]) as requester:
        with pytest.raises(ApiError) as caught:
            requester.register_node(NodeCapabilities(name="sneaky"))
        assert caught.value.status == 403
        with pytest.raises(ApiError) as caught:
            requester.create_account("mallory", "admin")
        assert caught.value.status == 403
    reply = _raw(coordinator, "PUT", "/bundles/" + "0" * 64, tokens["provider"], data=b"x")
    assert reply.status_code == 403


def test_bundle_upload_is_checked_against_its_hash(
    coordinator: RunningCoordinator, tokens: dict[str, str], bundle: tuple[Path, str]
) -> None:
    path, sha = bundle
    wrong = "f" * 64
    reply = _raw(
        coordinator, "PUT", f"/bundles/{wrong}", tokens["requester"], data=path.read_bytes()
    )
    assert reply.status_code == 400
    assert "SHA-256" in reply.json()["detail"]
    with coordinator.client(tokens["requester"]) as client:
        assert not client.has_bundle(wrong)
        assert client.upload_bundle(path) == sha
        assert client.has_bundle(sha)
        assert client.upload_bundle(path) == sha  # second time: skipped, still fine


def _bad_spec(info: SceneInfo, sha: str, change: str) -> dict[str, object]:
    spec = json.loads(job_spec(info, sha).model_dump_json())
    if change == "frames out of range":
        spec["frames"] = {"start": 1, "end": 500, "step": 1}
    elif change == "zero tiles":
        spec["tiles"] = {"columns": 0, "rows": 2}
    elif change == "10000x10000 tiles":
        spec["tiles"] = {"columns": 10000, "rows": 10000}
    elif change == "negative samples":
        spec["samples"] = -4
    elif change == "unknown field":
        spec["colour"] = "blue"
    elif change == "no camera":
        spec["scene"]["camera"] = None
    elif change == "end before start":
        spec["frames"] = {"start": 5, "end": 2, "step": 1}
    return spec


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("frames out of range", "outside the scene's range 1-24"),
        ("zero tiles", "tiles.columns"),
        ("10000x10000 tiles", "tiles.columns"),
        ("negative samples", "samples"),
        ("unknown field", "colour"),
        ("no camera", "no active camera"),
        ("end before start", "the end is before the start"),
    ],
)
def test_bad_job_specs_get_422_with_what_to_fix(
    coordinator: RunningCoordinator,
    tokens: dict[str, str],
    demo_info: SceneInfo,
    bundle: tuple[Path, str],
    change: str,
    message: str,
) -> None:
    path, sha = bundle
    with coordinator.client(tokens["requester"]) as client:
        client.upload_bundle(path)
        good = client.submit_job(job_spec(demo_info, sha, frames="1"))
        reply = _raw(
            coordinator,
            "POST",
            "/jobs",
            tokens["requester"],
            json=_bad_spec(demo_info, sha, change),
        )
        assert reply.status_code == 422, reply.text
        assert message in reply.json()["detail"]
        assert reply.json()["hint"]
        # Nothing else was disturbed: the good job is intact and still the only one.
        assert [job.id for job in client.jobs()] == [good.id]
        assert client.job(good.id).progress.tasks_total == 4


def test_a_bundle_that_is_not_a_blend_is_refused(
    coordinator: RunningCoordinator,
    tokens: dict[str, str],
    demo_info: SceneInfo,
    tmp_path: Path,
) -> None:
    not_zip = tmp_path / "notes.txt"
    not_zip.write_text("not a zip")
    text_blend = tmp_path / "fake.blend"
    text_blend.write_text("not a blend")
    fake_bundle, fake_sha = make_bundle(text_blend, tmp_path / "fake")
    with coordinator.client(tokens["requester"]) as client:
        zip_sha = client.upload_bundle(not_zip)
        client.upload_bundle(fake_bundle)
        for sha, message in ((zip_sha, "not a zip"), (fake_sha, "not a .blend")):
            with pytest.raises(ApiError) as caught:
                client.submit_job(job_spec(demo_info, sha))
            assert caught.value.status == 422
            assert message in caught.value.message
        missing = job_spec(demo_info, "e" * 64)
        with pytest.raises(ApiError, match="has not been uploaded"):
            client.submit_job(missing)


def test_tiled_job_frames_equal_one_piece_renders(
    coordinator: RunningCoordinator,
    tokens: dict[str, str],
    demo_info: SceneInfo,
    demo_scene: Path,
    bundle: tuple[Path, str],
    worker: RenderWorker,
    tmp_path: Path,
) -> None:
    path, sha = bundle
    with coordinator.client(tokens["requester"]) as client:
        client.upload_bundle(path)
        job = client.submit_job(job_spec(demo_info, sha, frames="2-3", denoise=False))
        assert [(f.frame, f.status, f.tiles_done, f.tiles) for f in client.frames(job.id)] == [
            (2, FrameStatus.PENDING, 0, 4),
            (3, FrameStatus.PENDING, 0, 4),
        ]
        with coordinator.client(tokens["provider"]) as provider:
            done = serve_leases(provider, worker, demo_scene, tmp_path, until_idle=2)
        assert done == 8
        assert wait_for_job(client, job.id) == "completed"
        assert [(f.frame, f.status, f.tiles_done, f.tiles) for f in client.frames(job.id)] == [
            (2, FrameStatus.DONE, 4, 4),
            (3, FrameStatus.DONE, 4, 4),
        ]
        for frame in (2, 3):
            farm = read_exr(client.download_frame(job.id, frame, tmp_path / f"f{frame}.exr"))
            local = tmp_path / f"local{frame}.exr"
            render_frame_local(
                worker,
                demo_scene,
                local,
                LocalRenderOptions(
                    frame=frame, percentage=10, samples=4, denoise=False, preview=False
                ),
            )
            reference = read_exr(local)
            for name in reference.channel_names():
                assert np.array_equal(farm.channel(name), reference.channel(name)), name
            png = client.download_frame(job.id, frame, tmp_path / f"f{frame}.png", kind="png")
            assert png.read_bytes()[:4] == b"\x89PNG"


def test_denoised_job_goes_through_a_denoise_task(
    coordinator: RunningCoordinator,
    tokens: dict[str, str],
    demo_info: SceneInfo,
    demo_scene: Path,
    bundle: tuple[Path, str],
    worker: RenderWorker,
    tmp_path: Path,
) -> None:
    path, sha = bundle
    with coordinator.client(tokens["requester"]) as client:
        client.upload_bundle(path)
        job = client.submit_job(job_spec(demo_info, sha, frames="4", denoise=True))
        with coordinator.client(tokens["provider"]) as provider:
            assert serve_leases(provider, worker, demo_scene, tmp_path, until_idle=2) == 5
        assert wait_for_job(client, job.id) == "completed"
        kinds = sorted(task.kind.value for task in client.tasks(job.id))
        assert kinds == ["denoise", "render", "render", "render", "render"]
        frame = read_exr(client.download_frame(job.id, 4, tmp_path / "f.exr"))
        assert [p.name for p in frame.parts][:2] == ["ViewLayer.Combined", "ViewLayer.Noisy Image"]


def test_a_whole_frame_job_denoises_in_render_without_an_extra_task(
    coordinator: RunningCoordinator,
    tokens: dict[str, str],
    demo_info: SceneInfo,
    demo_scene: Path,
    bundle: tuple[Path, str],
    worker: RenderWorker,
    tmp_path: Path,
) -> None:
    path, sha = bundle
    with coordinator.client(tokens["requester"]) as client:
        client.upload_bundle(path)
        denoised = client.submit_job(job_spec(demo_info, sha, frames="4", tiles=(1, 1)))
        noisy = client.submit_job(job_spec(demo_info, sha, frames="4", tiles=(1, 1), denoise=False))
        with coordinator.client(tokens["provider"]) as provider:
            assert serve_leases(provider, worker, demo_scene, tmp_path, until_idle=2) == 2
        for job in (denoised, noisy):
            assert wait_for_job(client, job.id) == "completed"
            assert [t.kind.value for t in client.tasks(job.id)] == ["render"]
        clean = read_exr(client.download_frame(denoised.id, 4, tmp_path / "d.exr"))
        raw = read_exr(client.download_frame(noisy.id, 4, tmp_path / "n.exr"))
        changed = np.count_nonzero(
            clean.channel("ViewLayer.Combined.R") != raw.channel("ViewLayer.Combined.R")
        )
        assert changed > raw.width * raw.height // 2, "the whole frame was denoised"


def test_uploads_need_the_lease_and_the_right_hash(
    coordinator: RunningCoordinator,
    tokens: dict[str, str],
    demo_info: SceneInfo,
    demo_scene: Path,
    bundle: tuple[Path, str],
    tmp_path: Path,
) -> None:
    path, sha = bundle
    with coordinator.client(tokens["requester"]) as client:
        client.upload_bundle(path)
        client.submit_job(job_spec(demo_info, sha, frames="1", tiles=(1, 1)))
    fake_exr = tmp_path / "tile.exr"
    fake_exr.write_bytes(b"pretend pixels")
    with (
        coordinator.client(tokens["provider"]) as bob,
        coordinator.client(tokens["provider2"]) as carol,
    ):
        node = bob.register_node(NodeCapabilities(name="bob-node"))
        lease = bob.lease(node.node_id, LeaseRequest(wait=1))
        assert lease is not None
        # another provider's node cannot deliver it
        with pytest.raises(ApiError) as caught:
            carol.upload_result(lease.lease_id, fake_exr)
        assert caught.value.status == 403
        # the holder with a wrong hash is refused and nothing is stored
        reply = _raw(
            coordinator,
            "PUT",
            f"/leases/{lease.lease_id}/result",
            tokens["provider"],
            data=b"pretend pixels",
            headers={"X-Content-SHA256": "a" * 64},
        )
        assert reply.status_code == 400
        assert "not the expected" in reply.json()["detail"]
        # right hash, but not an EXR: refused, task back in the queue
        with pytest.raises(ApiError) as caught:
            bob.upload_result(lease.lease_id, fake_exr, sha256_file(fake_exr))
        assert caught.value.status == 422
        assert "not a readable EXR" in caught.value.message
        # the lease is over: no more uploads on it
        with pytest.raises(ApiError) as caught:
            bob.upload_result(lease.lease_id, fake_exr)
        assert caught.value.status == 404
        assert "Unknown lease" in caught.value.message


def test_expired_lease_goes_back_to_the_queue(
    coordinator: RunningCoordinator,
    tokens: dict[str, str],
    demo_info: SceneInfo,
    bundle: tuple[Path, str],
) -> None:
    path, sha = bundle
    with coordinator.client(tokens["requester"]) as client:
        client.upload_bundle(path)
        job = client.submit_job(job_spec(demo_info, sha, frames="1", tiles=(1, 1)))
    with coordinator.client(tokens["provider"]) as bob:
        node = bob.register_node(NodeCapabilities(name="vanishing"))
        first = bob.lease(node.node_id, LeaseRequest(wait=1))
        assert first is not None
        time.sleep(5)  # lease_seconds is 4 and no heartbeat comes
        second = bob.lease(node.node_id, LeaseRequest(wait=3))
        assert second is not None and second.task.id == first.task.id
        assert second.lease_id != first.lease_id
    with coordinator.client(tokens["requester"]) as client:
        assert client.tasks(job.id)[0].status.value == "active"


def test_pause_resume_cancel_and_priority(
    coordinator: RunningCoordinator,
    tokens: dict[str, str],
    demo_info: SceneInfo,
    bundle: tuple[Path, str],
) -> None:
    path, sha = bundle
    with (
        coordinator.client(tokens["requester"]) as client,
        coordinator.client(tokens["provider"]) as bob,
    ):
        client.upload_bundle(path)
        low = client.submit_job(job_spec(demo_info, sha, frames="1", tiles=(1, 1)))
        high = client.submit_job(job_spec(demo_info, sha, frames="2", tiles=(1, 1)))
        client.set_priority(high.id, 90)
        assert client.pause(low.id).status.value == "paused"
        node = bob.register_node(NodeCapabilities(name="n1"))
        lease = bob.lease(node.node_id, LeaseRequest(wait=1))
        assert lease is not None and lease.task.job_id == high.id
        assert bob.lease(node.node_id, LeaseRequest(wait=0.5)) is None  # low is paused
        client.resume(low.id)
        again = bob.lease(node.node_id, LeaseRequest(wait=2))
        assert again is not None and again.task.job_id == low.id
        canceled = client.cancel(high.id)
        assert canceled.status.value == "canceled"
        assert bob.heartbeat(lease.lease_id, _beat()).cancel is True


def _beat() -> Heartbeat:
    return Heartbeat(progress=0.5)


def test_job_without_a_capable_node_says_so(
    coordinator: RunningCoordinator,
    tokens: dict[str, str],
    demo_info: SceneInfo,
    bundle: tuple[Path, str],
) -> None:
    path, sha = bundle
    with (
        coordinator.client(tokens["requester"]) as client,
        coordinator.client(tokens["provider"]) as bob,
    ):
        client.upload_bundle(path)
        job = client.submit_job(job_spec(demo_info, sha, frames="1", device="OPTIX"))
        assert "none is connected" in client.job(job.id).message
        bob.register_node(NodeCapabilities(name="cpu-only"))
        message = client.job(job.id).message
        assert "needs OPTIX" in message and "CPU" in message


def test_restart_keeps_accepted_work(
    tmp_path: Path,
    demo_info: SceneInfo,
    demo_scene: Path,
    worker: RenderWorker,
) -> None:
    data = tmp_path / "coordinator"
    first = start_coordinator(data)
    try:
        with first.client(first.admin_token) as admin:
            requester = admin.create_account("alice", Role.REQUESTER).token
            provider = admin.create_account("bob", Role.PROVIDER).token
        bundle_path, sha = make_bundle(demo_scene, tmp_path / "bundle")
        with first.client(requester) as client:
            client.upload_bundle(bundle_path)
            job = client.submit_job(job_spec(demo_info, sha, frames="1-2", denoise=False))
        with first.client(provider) as bob:
            node = bob.register_node(NodeCapabilities(name="n"))
            lease = bob.lease(node.node_id, LeaseRequest(wait=1))
            assert lease is not None
        first.kill()
        second = start_coordinator(data)
        try:
            with second.client(requester) as client:
                assert client.job(job.id).progress.tasks_total == 8
            with second.client(provider) as bob:
                done = serve_leases(bob, worker, demo_scene, tmp_path, until_idle=2, name="n")
            assert done == 7  # the first lease is still held until it expires
            with second.client(requester) as client:
                tasks = {t.id: t for t in client.tasks(job.id)}
                assert tasks[lease.task.id].status.value == "active"
        finally:
            second.stop()
    finally:
        first.stop()

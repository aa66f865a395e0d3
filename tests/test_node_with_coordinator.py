"""The real node against the real coordinator: a tiled, denoised job submitted by a
requester is rendered by `NodeDaemon` (bundle download, warm worker, heartbeats, uploads,
the denoise task) until the coordinator reports it completed.

The protocol-level cases (outages, retries, restarts, cancels) are in test_node_daemon.py
against a fake; this test catches drift between the node and the coordinator.
"""

from __future__ import annotations

import threading
import zipfile
from pathlib import Path

from farm_node.bundle_cache import BundleCache
from farm_node.config import NodeConfig
from farm_node.daemon import NodeDaemon
from farm_node.runner import TaskRunner
from protocol.client import TesseraClient, sha256_file
from renderers.builds import BlenderBuild
from renderers.exr import read_exr
from renderers.scene_info import inspect_scene
from renderers.worker import RenderWorker
from tests.farm_tools import job_spec, make_bundle, start_coordinator, wait_for_job


def _real_node(
    url: str, token: str, build: BlenderBuild, folder: Path
) -> tuple[NodeDaemon, TesseraClient, TaskRunner]:
    """A real node's parts, as `tessera node` builds them, with short waits for tests."""
    config = NodeConfig(
        coordinator_url=url,
        data_dir=folder / "node",
        token=token,
        name="real-node",
        poll_wait=0.5,
        benchmark=False,
        retry_initial=0.1,
        retry_max=1.0,
    )
    client = TesseraClient(url, token)
    runner = TaskRunner(build, config.scratch_dir, task_timeout=120)
    return (
        NodeDaemon(config, client, runner, BundleCache(config.cache_dir, 1 << 30)),
        client,
        runner,
    )


def test_a_tiled_denoised_job_is_rendered_by_the_node(
    bpy_build: BlenderBuild, demo_scene: Path, worker: RenderWorker, tmp_path: Path
) -> None:
    info = inspect_scene(worker, demo_scene)
    bundle, sha = make_bundle(demo_scene, tmp_path / "bundle")
    coordinator = start_coordinator(tmp_path / "coordinator", "--heartbeat-interval", "1")
    try:
        with coordinator.client(coordinator.admin_token) as admin:
            provider = admin.create_account("provider", "provider").token
            requester = admin.create_account("requester", "requester").token
        with coordinator.client(requester) as client:
            client.upload_bundle(bundle)
            job = client.submit_job(job_spec(info, sha, frames="1", tiles=(2, 2), denoise=True))
            daemon, node_client, runner = _real_node(coordinator.url, provider, bpy_build, tmp_path)
            stop = threading.Event()
            thread = threading.Thread(target=daemon.run, args=(stop,), name="real-node")
            thread.start()
            try:
                status = wait_for_job(client, job.id, timeout=120)
            finally:
                stop.set()
                thread.join(60)
                node_client.close()
            assert not thread.is_alive()
            assert status == "completed", client.job(job.id).message
            frame = client.download_frame(job.id, 1, tmp_path / "frame.exr")
        image = read_exr(frame)
        assert (image.width, image.height) == (64, 36)
        parts = [part.name for part in image.parts]
        assert parts[:2] == ["ViewLayer.Combined", "ViewLayer.Noisy Image"]
        with coordinator.client(coordinator.admin_token) as admin:
            (node,) = admin.nodes()
        assert node.capabilities.name == "real-node"
        assert node.tasks_completed == 5, "four tiles and the denoise"
        assert runner.worker_starts == 0, "the runner was closed when the node stopped"
    finally:
        coordinator.stop()


def _with_corrupt_entry(bundle: Path) -> Path:
    """`bundle` plus a second entry whose deflate data is garbage (the scene is intact)."""
    with zipfile.ZipFile(bundle, "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("textures/wood.png", bytes(range(256)) * 64)
    raw = bytearray(bundle.read_bytes())
    local = raw.find(b"PK\x03\x04", 1)  # the second entry's local header
    start = local + 30 + int.from_bytes(raw[local + 26 : local + 28], "little")
    start += int.from_bytes(raw[local + 28 : local + 30], "little")
    raw[start : start + 64] = b"\xff" * 64
    bundle.write_bytes(bytes(raw))
    return bundle


def test_a_bundle_with_a_corrupt_entry_fails_its_job_and_the_node_goes_on(
    bpy_build: BlenderBuild, demo_scene: Path, worker: RenderWorker, tmp_path: Path
) -> None:
    """Issue 17: a zip whose second entry cannot be inflated used to kill the node (an
    uncaught zlib.error) with its lease released uncounted, so every restarted node took
    the same task and died again. Now the task fails for good with a reported failure,
    and the same node renders the next, honest job."""
    info = inspect_scene(worker, demo_scene)
    bad_bundle, _ = make_bundle(demo_scene, tmp_path / "bad")
    bad_sha = sha256_file(_with_corrupt_entry(bad_bundle))
    good_bundle, good_sha = make_bundle(demo_scene, tmp_path / "good")
    coordinator = start_coordinator(tmp_path / "coordinator", "--heartbeat-interval", "1")
    try:
        with coordinator.client(coordinator.admin_token) as admin:
            provider = admin.create_account("provider", "provider").token
            requester = admin.create_account("requester", "requester").token
        with coordinator.client(requester) as client:
            client.upload_bundle(bad_bundle)
            client.upload_bundle(good_bundle)
            bad_job = client.submit_job(job_spec(info, bad_sha, frames="1", tiles=(1, 1)))
            daemon, node_client, _ = _real_node(coordinator.url, provider, bpy_build, tmp_path)
            stop = threading.Event()
            errors: list[BaseException] = []

            def serve() -> None:
                try:
                    daemon.run(stop)
                except BaseException as exc:
                    errors.append(exc)
                    raise

            thread = threading.Thread(target=serve, name="real-node")
            thread.start()
            try:
                bad_status = wait_for_job(client, bad_job.id, timeout=60)
                assert thread.is_alive(), f"the node died: {errors}"
                good_job = client.submit_job(job_spec(info, good_sha, frames="1", tiles=(1, 1)))
                good_status = wait_for_job(client, good_job.id, timeout=120)
            finally:
                stop.set()
                thread.join(60)
                node_client.close()
            assert not thread.is_alive() and errors == []
            assert bad_status == "failed"
            message = client.job(bad_job.id).message
            assert "unsafe_bundle" in message and "textures/wood.png" in message, message
            assert str(tmp_path) not in message
            (bad_task,) = client.tasks(bad_job.id)
            assert bad_task.attempts == 1, "the failure was counted, once, and not retried"
            assert good_status == "completed", client.job(good_job.id).message
        with coordinator.client(coordinator.admin_token) as admin:
            (node,) = admin.nodes()
        assert node.tasks_completed == 1
    finally:
        coordinator.stop()

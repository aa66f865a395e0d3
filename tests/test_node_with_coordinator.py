"""The real node against the real coordinator: a tiled, denoised job submitted by a
requester is rendered by `NodeDaemon` (bundle download, warm worker, heartbeats, uploads,
the denoise task) until the coordinator reports it completed.

The protocol-level cases (outages, retries, restarts, cancels) are in test_node_daemon.py
against a fake; this test catches drift between the node and the coordinator.
"""

from __future__ import annotations

import threading
from pathlib import Path

from farm_node.bundle_cache import BundleCache
from farm_node.daemon import NodeConfig, NodeDaemon
from farm_node.runner import TaskRunner
from protocol.client import TesseraClient
from renderers.builds import BlenderBuild
from renderers.exr import read_exr
from renderers.scene_info import inspect_scene
from renderers.worker import RenderWorker
from tests.farm_tools import job_spec, make_bundle, start_coordinator, wait_for_job


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
            config = NodeConfig(
                coordinator_url=coordinator.url,
                data_dir=tmp_path / "node",
                token=provider,
                name="real-node",
                poll_wait=0.5,
                benchmark=False,
                retry_initial=0.1,
                retry_max=1.0,
            )
            node_client = TesseraClient(coordinator.url, provider)
            runner = TaskRunner(bpy_build, config.scratch_dir, task_timeout=120)
            daemon = NodeDaemon(config, node_client, runner, BundleCache(config.cache_dir, 1 << 30))
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

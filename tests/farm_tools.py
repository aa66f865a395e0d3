"""Test helpers for the farm: a real coordinator process on 127.0.0.1 (port 0), accounts,
bundles, job specs, and a minimal node loop that renders leases with a real worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.job_spec import scene_summary
from protocol.client import TesseraClient, sha256_file
from protocol.models import (
    FrameRange,
    Heartbeat,
    JobSpec,
    Lease,
    LeaseRequest,
    NodeCapabilities,
    SceneSummary,
    TaskKind,
    TileGrid,
)
from renderers.regions import PixelRect, border_fractions
from renderers.scene_info import SceneInfo
from renderers.worker import RenderRequest, RenderWorker

REPO = Path(__file__).resolve().parent.parent


@dataclass
class RunningCoordinator:
    process: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log: Path

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def client(self, token: str | None = None, **options: float) -> TesseraClient:
        return TesseraClient(self.url, token, **options)  # type: ignore[arg-type]

    def kill(self) -> None:
        """Kill -9, as a crash would."""
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def start_coordinator(data_dir: Path, *extra: str, port: int = 0) -> RunningCoordinator:
    """`tessera coordinator` on 127.0.0.1 with these extra options, started and ready (on
    a new PostgreSQL database when TESSERA_TEST_DB=postgresql)."""
    from tests.postgres_tools import coordinator_db_options

    if "--db" not in extra:
        extra = (*extra, *coordinator_db_options(data_dir))
    argv = ["-m", "app.cli", "coordinator", "--port", str(port), "--data", str(data_dir), *extra]
    return launch_coordinator(argv, data_dir)


def launch_coordinator(argv: list[str], data_dir: Path) -> RunningCoordinator:
    """Run `python ARGV...` (a coordinator that prints "listening on URL") and wait for it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / f"coordinator-{time.monotonic_ns()}.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, *argv], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        for line in text.splitlines():
            if "listening on " in line:
                url = line.split("listening on ", 1)[1].split()[0]
                return RunningCoordinator(process, url, data_dir, log)
        if process.poll() is not None:
            raise RuntimeError(f"coordinator exited:\n{text}")
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"coordinator did not start:\n{log.read_text()}")


def make_bundle(scene: Path, folder: Path, name: str = "scene.blend") -> tuple[Path, str]:
    """A bundle zip holding the scene (assets would sit beside it); returns (path, sha)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bundle.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(scene, name)
    return path, sha256_file(path)


def job_spec(
    info: SceneInfo,
    bundle_sha: str,
    frames: str = "1-2",
    tiles: tuple[int, int] = (2, 2),
    **options: object,
) -> JobSpec:
    fields: dict[str, object] = {
        "name": "test job",
        "bundle": bundle_sha,
        "scene_path": "scene.blend",
        "scene": scene_summary(info),
        "frames": FrameRange.parse(frames),
        "tiles": TileGrid(columns=tiles[0], rows=tiles[1]),
        "percentage": 10,
        "samples": 4,
    }
    fields.update(options)
    return JobSpec.model_validate(fields)


def serve_leases(
    client: TesseraClient,
    worker: RenderWorker,
    scene: Path,
    scratch: Path,
    *,
    until_idle: float = 3.0,
    name: str = "test-node",
    price: float = 0.0,
    pools: tuple[str, ...] = (),
) -> int:
    """A minimal node: lease, render with `worker`, upload; stop after `until_idle` seconds
    without work. Returns the number of tasks done. (The real node is farm_node.)"""
    node = client.register_node(
        NodeCapabilities(name=name, blender_versions=["5.0.1"], price=price, pools=list(pools))
    )
    done, idle_since = 0, time.monotonic()
    while time.monotonic() - idle_since < until_idle:
        lease = client.lease(node.node_id, LeaseRequest(wait=0.5))
        if lease is None:
            continue
        output = scratch / f"{lease.task.id}.exr"
        do_lease(client, worker, scene, lease, output)
        client.heartbeat(lease.lease_id, Heartbeat(progress=1.0))
        client.upload_result(lease.lease_id, output)
        done += 1
        idle_since = time.monotonic()
    return done


def do_lease(
    client: TesseraClient, worker: RenderWorker, scene: Path, lease: Lease, output: Path
) -> None:
    """Render a lease's assignment, denoise its merged frame, or finish its final frame
    (a zip of the scene's files, as the real node packs it) into `output`."""
    from farm_node.runner import lease_resolution, pack_finished
    from renderers.denoise import denoise_frame
    from renderers.exr import read_exr, write_exr
    from renderers.finish import FinishRequest

    if lease.task.kind is TaskKind.FINISH:
        frame = client.download_denoise_input(lease.lease_id, output.with_suffix(".in.exr"))
        staged = output.with_suffix(".files")
        request = FinishRequest(
            scene,
            frame,
            lease.task.frame,
            staged,
            resolution=lease_resolution(lease),
            percentage=lease.percentage,
        )
        result = worker.finish(request)
        pack_finished(result, output)
        return
    if lease.assignment is None:
        merged = client.download_denoise_input(lease.lease_id, output.with_suffix(".in.exr"))
        write_exr(output, denoise_frame(worker, read_exr(merged), samples=lease.samples))
        return
    a = lease.assignment
    region = PixelRect(
        a.render_region.x0, a.render_region.y0, a.render_region.x1, a.render_region.y1
    )
    worker.render(
        RenderRequest(
            scene=scene,
            frame=a.frame,
            output=output,
            border=None if a.whole_frame else border_fractions(region, a.width, a.height),
            samples=a.samples,
            percentage=a.percentage,
            resolution=(a.resolution_x, a.resolution_y),
            denoise_data=a.denoise_data,
            denoise=a.denoise_in_render,
        )
    )


def wait_for_job(client: TesseraClient, job_id: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.job(job_id).status.value
        if status in ("completed", "failed", "canceled"):
            return status
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} still {client.job(job_id).status} after {timeout}s")


class NodeThread:
    """`serve_leases(client, **serve)` on a thread of its own, which closes `client` when
    it ends; `join` waits for it and re-raises what it raised."""

    def __init__(self, client: TesseraClient, **serve: Any) -> None:
        self.done = 0
        self.error: BaseException | None = None
        Path(serve["scratch"]).mkdir(parents=True, exist_ok=True)

        def run() -> None:
            try:
                with client:
                    self.done = serve_leases(client, **serve)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, name="test-node", daemon=True)
        self.thread.start()

    def join(self) -> int:
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "the node loop did not stop"
        if self.error is not None:
            raise self.error
        return self.done


def plain_spec(
    name: str = "shot",
    *,
    scene_name: str = "shot",
    bundle: str = "0" * 64,
    size: tuple[int, int] = (64, 36),
    frames: tuple[int, int] = (1, 4),
    **fields: Any,
) -> JobSpec:
    """A job spec from plain values, for widgets and models tested without a farm: a
    Cycles scene of `size` at 100%, 4 samples, no denoising; `fields` are JobSpec's."""
    scene = SceneSummary(
        name=scene_name,
        frame_start=frames[0],
        frame_end=frames[1],
        resolution_x=size[0],
        resolution_y=size[1],
        resolution_percentage=100,
        samples=4,
        adaptive_sampling=False,
        denoising=False,
        camera="Camera",
    )
    return JobSpec(
        name=name,
        bundle=bundle,
        scene_path="scene.blend",
        scene=scene,
        frames=FrameRange(start=frames[0], end=frames[1]),
        **fields,
    )

"""The whole farm as processes on 127.0.0.1: a coordinator, node processes, real Blender.

Frames rendered in tiles by two nodes equal one-piece renders; a node killed mid-task
a Blender that segfaults and a coordinator killed mid-job cost time, never a frame or a
credit (the ledger checks after each); a node finds a LAN farm.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.follow import follow_job
from app.local_farm import LocalFarm
from app.submit import prepare_submission, submit
from protocol.client import TesseraClient
from protocol.models import JobOptions, Role, Task, TaskKind, TaskStatus
from renderers.exr import read_exr
from renderers.local_render import LocalRenderOptions, render_frame_local
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.worker import RenderWorker
from tests.farm_tools import REPO, job_spec, make_bundle, start_coordinator, wait_for_job
from tests.scene_tools import prepare_scene

NODE_ARGS = ["--no-benchmark"]


@pytest.fixture(scope="module")
def slow_scene(demo_scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo scene with adaptive sampling off, so high sample counts take real time."""
    return prepare_scene(demo_scene, tmp_path_factory.mktemp("slow") / "slow.blend", adaptive=False)


@pytest.fixture()
def farm(tmp_path: Path) -> Iterator[LocalFarm]:
    with LocalFarm(
        tmp_path / "farm",
        nodes=2,
        threads_per_node=1,
        node_args=NODE_ARGS,
        coordinator_args=["--lease-seconds", "6", "--heartbeat-interval", "1"],
    ) as running:
        yield running


def _submit(
    farm: LocalFarm, info: SceneInfo, scene: Path, folder: Path, **options: object
) -> tuple[TesseraClient, str]:
    bundle, sha = make_bundle(scene, folder)
    client = TesseraClient(farm.url, farm.requester_token)
    client.upload_bundle(bundle)
    return client, client.submit_job(job_spec(info, sha, **options)).id  # type: ignore[arg-type]


def test_three_frames_in_2x2_tiles_on_two_nodes_equal_one_piece_renders(
    farm: LocalFarm, worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    info = inspect_scene(worker, demo_scene)
    client, job_id = _submit(
        farm, info, demo_scene, tmp_path / "bundle", frames="5-7", denoise=False
    )
    with client:
        assert wait_for_job(client, job_id, timeout=300) == "completed"
        tiles = _tiles(client.tasks(job_id))
        assert len(tiles) == 12 and all(t.status is TaskStatus.COMPLETED for t in tiles)
        per_node = {node.capabilities.name: node.tasks_completed for node in client.nodes()}
        assert all(per_node.values()), per_node
        for frame in (5, 6, 7):
            farm_frame = read_exr(client.download_frame(job_id, frame, tmp_path / f"{frame}.exr"))
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
            for name in (
                "ViewLayer.Combined.R",
                "ViewLayer.Combined.G",
                "ViewLayer.Combined.B",
                "ViewLayer.Combined.A",
            ):
                assert np.array_equal(farm_frame.channel(name), reference.channel(name)), name


def test_a_linked_library_scene_renders_from_the_bundle_alone(
    worker: RenderWorker, bat_scenes: Path, tmp_path: Path
) -> None:
    """linked_cube.blend's only object is linked from basic_file.blend. Pack it, delete
    the originals, and render on a node that has nothing but the bundle."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("linked_cube.blend", "basic_file.blend"):
        shutil.copy(bat_scenes / name, project / name)
    scene = prepare_scene(
        project / "linked_cube.blend",
        project / "shot.blend",
        add_camera=True,
        resolution_x=64,
        resolution_y=48,
        resolution_percentage=100,
        samples=4,
        film_transparent=True,
    )
    prepared = prepare_submission(
        worker, scene, JobOptions(frames="1", denoise=False), bundle_dir=tmp_path / "bundle"
    )
    assert "basic_file.blend" in prepared.bundle.files
    shutil.rmtree(project)  # the node must not find the library where it was
    with (
        LocalFarm(tmp_path / "farm", nodes=1, threads_per_node=2, node_args=NODE_ARGS) as farm,
        TesseraClient(farm.url, farm.requester_token) as client,
    ):
        job = submit(client, prepared)
        result = follow_job(client, job.id, tmp_path / "frames")
    assert result.job.status.value == "completed", result.job.message
    exr = next(p for f in result.frames for p in f.files if p.suffix == ".exr")
    alpha = read_exr(exr).combined_rgba()[..., 3]
    assert np.count_nonzero(alpha > 0.5) > alpha.size // 50, "the linked object is missing"


def _tiles(tasks: list[Task]) -> list[Task]:
    """The render tasks: every local node is a provider of its own, so the tasks also hold
    verify tasks (other providers re-rendering windows of accepted tiles)."""
    return [task for task in tasks if task.kind is TaskKind.RENDER]


def _assert_ledger_balanced(farm: LocalFarm) -> None:
    with TesseraClient(farm.url, farm.admin_token) as admin:
        check = admin.ledger_check()
    assert check.ok, check.problems


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before children (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def _cpu_ticks(pid: int) -> int:
    """CPU time a process has used so far (user + system, in clock ticks)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _submit_slow_tiles(
    farm: LocalFarm, worker: RenderWorker, slow_scene: Path, tmp_path: Path
) -> tuple[TesseraClient, str]:
    """One frame in 2 tiles at 600 samples: long enough to hurt a node mid-render."""
    return _submit(
        farm,
        inspect_scene(worker, slow_scene),
        slow_scene,
        tmp_path / "bundle",
        frames="1",
        tiles=(2, 1),
        samples=600,
        denoise=False,
    )


def _node_well_into_a_render(client: TesseraClient) -> str:
    """The name of a node that has been rendering for a second."""

    def busy_node() -> str | None:
        return next((n.capabilities.name for n in client.nodes() if n.status == "busy"), None)

    _wait(busy_node, 60, "no node started rendering")
    time.sleep(1.0)
    victim = busy_node()
    assert victim is not None, "the node stopped rendering"
    return victim


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def test_a_node_killed_mid_task_costs_a_retry_not_the_job(
    farm: LocalFarm, worker: RenderWorker, slow_scene: Path, tmp_path: Path
) -> None:
    client, job_id = _submit_slow_tiles(farm, worker, slow_scene, tmp_path)
    with client:
        victim = _node_well_into_a_render(client)
        farm.node_process(farm.node_names.index(victim)).kill()
        assert wait_for_job(client, job_id, timeout=300) == "completed"
        tasks = client.tasks(job_id)
        tiles = _tiles(tasks)
        assert len(tiles) == 2 and all(t.status is TaskStatus.COMPLETED for t in tiles), tasks
        # Every accepted upload is one completed task: nothing was accepted twice.
        survivors = {n.capabilities.name: n.tasks_completed for n in client.nodes()}
        completed = sum(t.status is TaskStatus.COMPLETED for t in tasks)
        assert sum(survivors.values()) == completed, (survivors, tasks)
    _assert_ledger_balanced(farm)


def test_blender_segfaulting_mid_render_costs_a_retry_not_the_job(
    farm: LocalFarm, worker: RenderWorker, slow_scene: Path, tmp_path: Path
) -> None:
    """SIGSEGV to a node's Blender (the way a driver or Cycles bug ends it): the node
    reports the crash, the tile is rendered again, the node keeps working."""
    client, job_id = _submit_slow_tiles(farm, worker, slow_scene, tmp_path)
    with client:
        victim = _node_well_into_a_render(client)
        node_pid = farm.node_process(farm.node_names.index(victim)).pid
        blenders = [pid for pid in _descendants(node_pid) if b"worker_main" in _cmdline(pid)]
        assert blenders, "the busy node has no Blender process"
        # The rendering Blender, not the one a node keeps started for its next bundle.
        print("BLENDERS", [(b, _cpu_ticks(b), _cmdline(b)[-120:]) for b in blenders])
        os.kill(max(blenders, key=_cpu_ticks), signal.SIGSEGV)
        assert wait_for_job(client, job_id, timeout=300) == "completed"
        tiles = _tiles(client.tasks(job_id))
        assert len(tiles) == 2 and all(t.status is TaskStatus.COMPLETED for t in tiles)
        # `attempts` counts failed attempts: the crash is one, and the tile still completed.
        assert sum(t.attempts for t in tiles) == 1, "the crash was not recorded as a failure"
        assert farm.node_process(farm.node_names.index(victim)).poll() is None, "node died"
    _assert_ledger_balanced(farm)


def test_a_coordinator_killed_mid_job_restarts_without_redoing_accepted_tiles(
    farm: LocalFarm, worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    info = inspect_scene(worker, demo_scene)
    client, job_id = _submit(
        farm,
        info,
        demo_scene,
        tmp_path / "bundle",
        frames="1-6",
        tiles=(2, 2),
        samples=16,
        denoise=False,
    )
    with client:
        _wait(lambda: client.job(job_id).progress.tasks_done >= 4, 120, "no tiles accepted")
        before = {
            t.id: t.result_sha256 for t in client.tasks(job_id) if t.status.value == "completed"
        }
    port = farm.port
    farm.processes[0].kill()
    farm.processes[0].wait()
    time.sleep(1.0)
    farm.start_coordinator(port=port)
    with TesseraClient(farm.url, farm.requester_token) as client:
        assert wait_for_job(client, job_id, timeout=300) == "completed"
        tasks = client.tasks(job_id)
        after = {t.id: t.result_sha256 for t in tasks}
        assert all(after[task_id] == sha for task_id, sha in before.items()), (
            "an accepted tile was replaced"
        )
        assert len(_tiles(tasks)) == 24
        # One accepted upload per completed task (tiles and duplicate samples alike).
        accepted = sum(n.tasks_completed for n in client.nodes())
        completed = sum(t.status is TaskStatus.COMPLETED for t in tasks)
        assert accepted == completed, f"{accepted} uploads accepted for {completed} tasks"
    _assert_ledger_balanced(farm)


def test_a_node_started_with_lan_finds_the_farm_and_renders(
    worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    farm_name = f"lan-{uuid.uuid4().hex[:8]}"
    coordinator = start_coordinator(
        tmp_path / "coordinator",
        "--lan",
        "--farm",
        farm_name,
        "--secret",
        "open-sesame",
        "--interface",
        "127.0.0.1",
    )
    node_log = tmp_path / "node.log"
    node: subprocess.Popen[bytes] | None = None
    try:
        with coordinator.client(coordinator.admin_token) as admin:
            requester = admin.create_account("artist", Role.REQUESTER).token
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        with node_log.open("wb") as out:
            node = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "app.cli",
                    "node",
                    "--lan",
                    "--farm",
                    farm_name,
                    "--secret",
                    "open-sesame",
                    "--interface",
                    "127.0.0.1",
                    "--name",
                    "lan-box",
                    "--threads",
                    "1",
                    "--data",
                    str(tmp_path / "node"),
                    *NODE_ARGS,
                ],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        info = inspect_scene(worker, demo_scene)
        bundle, sha = make_bundle(demo_scene, tmp_path / "bundle")
        with TesseraClient(coordinator.url, requester) as client:
            client.upload_bundle(bundle)
            job = client.submit_job(job_spec(info, sha, frames="1", tiles=(1, 1)))
            assert wait_for_job(client, job.id, timeout=180) == "completed", node_log.read_text()[
                -3000:
            ]
            assert [n.capabilities.name for n in client.nodes()] == ["lan-box"]
        assert "Joined farm" in node_log.read_text()
    finally:
        if node is not None:
            node.send_signal(signal.SIGINT)
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        coordinator.stop()

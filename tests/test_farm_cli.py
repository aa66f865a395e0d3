"""The farm commands of the `tessera` CLI, run as subprocesses against a real coordinator
process, with a minimal node loop (tests.farm_tools.serve_leases) rendering the leases
in this process on a background thread that every test joins before it ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from app.follow import follow_job, frame_file_name, frame_folder
from app.packing import pack_scene
from protocol.client import TesseraClient
from protocol.models import Event, Job, Role
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.worker import RenderWorker
from tests.farm_tools import (
    NodeThread,
    RunningCoordinator,
    job_spec,
    make_bundle,
    start_coordinator,
)

REPO = Path(__file__).resolve().parent.parent
CLI = "from app.cli import main; raise SystemExit(main())"
EXR_MAGIC = b"v/1\x01"
PNG_MAGIC = b"\x89PNG"


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    running = start_coordinator(
        tmp_path_factory.mktemp("coordinator"), "--lease-seconds", "10", "--heartbeat-interval", "1"
    )
    yield running
    running.stop()


@pytest.fixture()
def requester(coordinator: RunningCoordinator, request: pytest.FixtureRequest) -> str:
    """A requester account of this test's own, so `jobs` lists only this test's jobs."""
    name = "req-" + request.node.name.replace("[", "-").replace("]", "")[:60]
    with coordinator.client(coordinator.admin_token) as admin:
        return admin.create_account(name, Role.REQUESTER).token


@pytest.fixture(scope="module")
def provider(coordinator: RunningCoordinator) -> str:
    with coordinator.client(coordinator.admin_token) as admin:
        return admin.create_account("provider", Role.PROVIDER).token


@pytest.fixture(scope="module")
def demo_info(worker: RenderWorker, demo_scene: Path) -> SceneInfo:
    return inspect_scene(worker, demo_scene)


def tessera(
    *args: str, url: str | None = None, token: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `tessera ARGS` (the farm commands) in a fresh Python, as a user would."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if url is not None:
        env["TESSERA_COORDINATOR"] = url
    if token is not None:
        env["TESSERA_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-c", CLI, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def bundles_left() -> Iterator[Path]:
    """Files the CLI left in its bundle folder ($TESSERA_HOME/bundles)."""
    bundles = Path(os.environ["TESSERA_HOME"]) / "bundles"
    return bundles.rglob("*") if bundles.exists() else iter(())


def test_submit_wait_renders_and_downloads_frames(
    coordinator: RunningCoordinator,
    requester: str,
    provider: str,
    worker: RenderWorker,
    demo_scene: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "frames"
    stderr_path = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TESSERA_TOKEN"] = requester
    command = [
        sys.executable, "-c", CLI, "submit", str(demo_scene),
        "--frames", "1-2", "--tiles", "2x2", "--percentage", "10", "--samples", "2",
        "--wait", "--out", str(out), "--coordinator", coordinator.url,
    ]  # fmt: skip
    with stderr_path.open("w") as stderr, coordinator.client(provider) as node_client:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        node: NodeThread | None = None
        try:
            assert process.stdout is not None
            job_id = process.stdout.readline().strip()  # printed once the job is submitted
            assert job_id, stderr_path.read_text()
            node = NodeThread(
                node_client,
                worker=worker,
                scene=demo_scene,
                scratch=tmp_path / "node",
                until_idle=2.0,
            )
            rest, _ = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if node is not None:
                tasks_done = node.join()
    log = stderr_path.read_text()
    assert process.returncode == 0, log
    assert rest == ""
    assert tasks_done >= 8
    # The scene's own files, as Blender names them (//render/demo_ -> render/demo_0001.png),
    # beside the raw EXR of every pass.
    for frame in (1, 2):
        assert (out / "demo" / f"frame_{frame:04d}.exr").read_bytes()[:4] == EXR_MAGIC
        assert (out / "demo" / "render" / f"demo_{frame:04d}.png").read_bytes()[:4] == PNG_MAGIC
    assert sorted(str(p.relative_to(out / "demo")) for p in (out / "demo").rglob("*.*")) == [
        "frame_0001.exr", "frame_0002.exr", "render/demo_0001.png", "render/demo_0002.png",
    ]  # fmt: skip
    assert "Packed 1 file(s)" in log and f"Submitted job {job_id}" in log
    assert "frame 1: " in log and "frame 2: " in log
    assert "tiles 8/8" in log and f"Job {job_id} completed" in log
    assert not list(bundles_left())  # the local bundle is deleted once uploaded

    # the same job, seen through `jobs`, `job` and `nodes`
    listed = tessera("jobs", url=coordinator.url, token=requester)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "STATUS", "PROGRESS", "FRAMES", "PRIORITY", "MESSAGE"]
    assert row.split() == [job_id, "demo", "completed", "100%", "2/2", "50"]

    detail = tessera("job", job_id, url=coordinator.url, token=requester)
    assert detail.returncode == 0, detail.stderr
    assert "completed" in detail.stdout and "tiles 8/8 (100%)" in detail.stdout
    assert "1-2          done" in detail.stdout
    assert "per successful frame" in detail.stdout and "of render time wasted" in detail.stdout
    as_json = json.loads(
        tessera("job", job_id, "--json", url=coordinator.url, token=requester).stdout
    )
    assert as_json["job"]["id"] == job_id
    assert as_json["tasks_by_status"]["completed"] >= 8
    assert [f["status"] for f in as_json["frames"]] == ["done", "done"]
    assert as_json["failures"] == []
    assert set(as_json["cost"]) == {
        "credits_per_frame", "success_rate", "wasted_seconds", "estimate", "final",
    }  # fmt: skip
    assert as_json["cost"]["success_rate"] == 1.0 and as_json["cost"]["wasted_seconds"] == 0

    nodes = tessera("nodes", "--json", url=coordinator.url, token=requester)
    assert nodes.returncode == 0, nodes.stderr
    (info,) = json.loads(nodes.stdout)
    assert info["capabilities"]["name"] == "test-node"
    assert info["tasks_completed"] >= 8 and info["status"] in ("idle", "busy")
    assert info["success_rate"] == 1.0 and info["accepted_seconds"] > 0


def test_pause_resume_priority_and_cancel(
    coordinator: RunningCoordinator, requester: str, demo_info: SceneInfo, demo_scene: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    with coordinator.client(requester) as client:
        path, sha = make_bundle(demo_scene, tmp_path / "bundle")
        client.upload_bundle(path, sha)
        job = client.submit_job(job_spec(demo_info, sha, frames="3-4", name="control me"))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return tessera(*args, "--coordinator", coordinator.url, "--token", requester)

    paused = run("pause", job.id)
    assert paused.returncode == 0, paused.stderr
    assert f"Job {job.id} is paused" in paused.stdout
    shown = run("job", job.id)
    assert "paused" in shown.stdout and "3-4          paused" in shown.stdout
    resumed = run("resume", job.id, "--json")
    assert Job.model_validate_json(resumed.stdout).status.value == "queued"
    raised = run("priority", job.id, "80")
    assert raised.returncode == 0 and "priority 80" in raised.stdout
    bad_priority = run("priority", job.id, "101")
    assert bad_priority.returncode == 2 and "between 0 and 100" in bad_priority.stderr
    canceled = run("cancel", job.id)
    assert canceled.returncode == 0 and f"Job {job.id} is canceled" in canceled.stdout
    again = run("cancel", job.id)
    assert again.returncode == 0 and "already canceled" in again.stdout
    refused = run("pause", job.id)
    assert refused.returncode == 2
    assert "error: " in refused.stderr and "only a queued or active job" in refused.stderr
    assert "Traceback" not in refused.stderr
    listed = json.loads(run("jobs", "--json").stdout)
    assert [(j["id"], j["status"], j["priority"]) for j in listed] == [(job.id, "canceled", 80)]
    unknown = run("job", "nope")
    assert unknown.returncode == 2 and "No job nope" in unknown.stderr


def test_a_scene_without_a_camera_is_refused_before_upload(
    coordinator: RunningCoordinator, requester: str, bat_scenes: Path, tmp_path: Path
) -> None:
    result = tessera(
        "submit", str(bat_scenes / "basic_file.blend"), url=coordinator.url, token=requester
    )
    assert result.returncode == 2
    assert "error: " in result.stderr and "no active camera" in result.stderr
    assert "hint: " in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    # packing is deterministic, so this is the hash the CLI would have uploaded
    bundle = pack_scene(bat_scenes / "basic_file.blend", tmp_path)
    with coordinator.client(requester) as client:
        assert client.jobs() == []
        assert not client.has_bundle(bundle.sha256)
    assert not list(bundles_left())


def test_frames_outside_the_scene_are_refused_before_packing(
    coordinator: RunningCoordinator, requester: str, demo_scene: Path
) -> None:
    result = tessera(
        "submit", str(demo_scene), "--frames", "30-40", "--json",
        url=coordinator.url, token=requester,
    )  # fmt: skip
    assert result.returncode == 2
    assert "outside the scene's range 1-24" in result.stderr
    assert json.loads(result.stdout)["error"]["kind"] == "UsageError"
    with coordinator.client(requester) as client:
        assert client.jobs() == []


@pytest.mark.parametrize(
    ("frames", "message"),
    [("abc", "'abc' is not a frame range"), ("5-2", "the end is before the start")],
)
def test_bad_frames_text_is_a_usage_error(frames: str, message: str, demo_scene: Path) -> None:
    result = tessera("submit", str(demo_scene), "--frames", frames, token="unused")
    assert result.returncode == 2
    assert "argument --frames" in result.stderr and message in result.stderr


def test_an_unreachable_coordinator_is_named() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    result = tessera("jobs", "--coordinator", url, "--token", "t")
    assert result.returncode == 2
    assert f"Cannot reach the coordinator at {url}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_token_says_how_to_pass_one(coordinator: RunningCoordinator) -> None:
    result = tessera("nodes", "--coordinator", coordinator.url)
    assert result.returncode == 2
    assert f"No access token for the coordinator at {coordinator.url}" in result.stderr
    assert "--token" in result.stderr and "TESSERA_TOKEN" in result.stderr


def test_the_token_file_and_a_bad_token(coordinator: RunningCoordinator, requester: str) -> None:
    (Path(os.environ["TESSERA_HOME"]) / "token").write_text(requester + "\n")
    from_file = tessera("jobs", url=coordinator.url)
    assert from_file.returncode == 0, from_file.stderr
    assert "No jobs yet" in from_file.stdout
    wrong = tessera("jobs", url=coordinator.url, token="tsr_wrong")
    assert wrong.returncode == 2 and "The token is not valid" in wrong.stderr


class CutStream(TesseraClient):
    """A client whose event stream breaks after its first event, as a flaky proxy would."""

    def events(
        self, job_id: str | None = None, after: int = 0, timeout: float = 60.0
    ) -> Iterator[Event]:
        for event in super().events(job_id, after, timeout):
            yield event
            raise requests.ConnectionError("the stream was cut")


def test_follow_job_polls_when_the_stream_breaks(
    coordinator: RunningCoordinator,
    requester: str,
    provider: str,
    worker: RenderWorker,
    demo_info: SceneInfo,
    demo_scene: Path,
    tmp_path: Path,
) -> None:
    path, sha = make_bundle(demo_scene, tmp_path / "bundle")
    spec = job_spec(demo_info, sha, frames="5-6", tiles=(1, 1), samples=2, denoise=False)
    with CutStream(coordinator.url, requester) as client:
        client.upload_bundle(path, sha)
        job = client.submit_job(spec)
        seen: list[Event] = []
        with coordinator.client(provider) as node_client:
            node = NodeThread(
                node_client,
                worker=worker,
                scene=demo_scene,
                scratch=tmp_path / "node",
                until_idle=2.0,
            )
            try:
                result = follow_job(
                    client, job.id, tmp_path / "out", on_event=seen.append, poll_interval=0.2
                )
            finally:
                node.join()
    assert result.polled and not result.stopped
    assert len(seen) == 1
    assert result.job.status.value == "completed"
    assert result.frame_numbers == [5, 6]
    assert result.folder == tmp_path / "out" / "scene"  # make_bundle names it scene.blend
    for frame in (5, 6):
        files = next(f.files for f in result.frames if f.frame == frame)
        assert [p.name for p in files] == [f"frame_000{frame}.exr", f"frame_000{frame}.png"]
        assert all(p.stat().st_size > 0 for p in files)
    assert not list(result.folder.glob("*.part"))


def test_follow_job_stops_when_asked(
    coordinator: RunningCoordinator,
    requester: str,
    demo_info: SceneInfo,
    demo_scene: Path,
    tmp_path: Path,
) -> None:
    path, sha = make_bundle(demo_scene, tmp_path / "bundle")
    with coordinator.client(requester) as client:
        client.upload_bundle(path, sha)
        job = client.submit_job(job_spec(demo_info, sha, frames="7"))
        seen: list[Event] = []
        started = time.monotonic()
        try:
            # no node renders it: after the first (replayed) event the stream is quiet
            result = follow_job(
                client,
                job.id,
                tmp_path / "out",
                on_event=seen.append,
                stop=lambda: time.monotonic() - started > 1.5,
                poll_interval=0.5,
            )
        finally:
            client.cancel(job.id)
    assert 1.5 < time.monotonic() - started < 10
    assert result.stopped and result.frames == () and not result.polled
    assert [e.job_id for e in seen] == [job.id]  # reconnecting replays nothing
    assert result.job.status.value == "queued"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("frame", "name"),
    [
        (1, "frame_0001.exr"),
        (-1, "frame_-001.exr"),
        (0, "frame_0000.exr"),
        (12345, "frame_12345.exr"),
    ],
)
def test_frame_files_are_numbered_like_blender(frame: int, name: str) -> None:
    assert frame_file_name(frame, "exr") == name


def test_frame_folder_is_the_scene_file_name(demo_info: SceneInfo) -> None:
    job = Job.model_validate(
        {
            "id": "j",
            "name": "n",
            "owner": "o",
            "status": "queued",
            "priority": 50,
            "spec": job_spec(demo_info, "0" * 64).model_copy(
                update={"scene_path": "shots/010 intro.blend"}
            ),
            "progress": {"tasks_total": 1, "tasks_done": 0, "frames_total": 1, "frames_done": 0},
            "created_at": "2025-01-01T00:00:00Z",
            "updated_at": "2025-01-01T00:00:00Z",
        }
    )
    assert frame_folder(Path("out"), job) == Path("out/010 intro")


def test_wallet_grant_and_ledger_check(coordinator: RunningCoordinator, requester: str) -> None:
    url, admin = coordinator.url, coordinator.admin_token
    with coordinator.client(requester) as client:
        name = client.me().account
    granted = tessera("grant", name, "12.5", url=url, token=admin)
    assert granted.returncode == 0, granted.stderr
    assert f"Granted 12.5 credits to {name}; balance 12.5." in granted.stdout
    wallet = tessera("wallet", "--json", url=url, token=requester)
    assert wallet.returncode == 0, wallet.stderr
    data = json.loads(wallet.stdout)
    assert data["balance"] == 12.5 and data["escrow"] == 0
    assert [entry["kind"] for entry in data["history"]] == ["grant"]
    text = tessera("wallet", url=url, token=requester)
    assert "12.5 credits" in text.stdout and "grant" in text.stdout
    refused = tessera("grant", name, "5", url=url, token=requester)
    assert refused.returncode != 0 and "Only an admin" in refused.stderr
    bad = tessera("grant", name, "-3", url=url, token=admin)
    assert bad.returncode == 2 and "positive number" in bad.stderr
    check = tessera("ledger", "check", url=url, token=admin)
    assert check.returncode == 0 and "every invariant holds" in check.stdout, check.stderr


def test_download_fetches_finished_frames_and_resumes_by_hash(
    coordinator: RunningCoordinator,
    requester: str,
    provider: str,
    worker: RenderWorker,
    demo_info: SceneInfo,
    demo_scene: Path,
    tmp_path: Path,
) -> None:
    path, sha = make_bundle(demo_scene, tmp_path / "bundle")
    spec = job_spec(demo_info, sha, frames="7-8", tiles=(2, 1), samples=2, denoise=False)
    with coordinator.client(requester) as client:
        client.upload_bundle(path, sha)
        job = client.submit_job(spec)
        with coordinator.client(provider) as node_client:
            node = NodeThread(
                node_client, worker=worker, scene=demo_scene, scratch=tmp_path / "node"
            )
            try:
                follow_job(client, job.id, tmp_path / "followed", poll_interval=0.2)
            finally:
                node.join()
    out = tmp_path / "out"
    first = tessera(
        "download", job.id, "--out", str(out), "--json", url=coordinator.url, token=requester
    )
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    folder = frame_folder(out, job)
    expected = [folder / frame_file_name(f, k) for f in (7, 8) for k in ("exr", "png")]
    assert sorted(report["downloaded"]) == sorted(map(str, expected)) and not report["present"]
    for file in expected:  # the same bytes `follow_job` fetched
        assert file.read_bytes() == (tmp_path / "followed" / folder.name / file.name).read_bytes()
    (folder / frame_file_name(8, "exr")).write_bytes(b"a download that broke off")
    again = json.loads(
        tessera(
            "download", job.id, "--out", str(out), "--json", url=coordinator.url, token=requester
        ).stdout
    )
    assert again["downloaded"] == [str(folder / frame_file_name(8, "exr"))]
    assert len(again["present"]) == 3 and again["unfinished"] == []
    plain = tessera("download", job.id, "--out", str(out), url=coordinator.url, token=requester)
    assert "0 file(s) downloaded, 4 already there" in plain.stdout


def test_download_of_another_accounts_job_is_refused(
    coordinator: RunningCoordinator, requester: str, tmp_path: Path
) -> None:
    result = tessera(
        "download", "no-such-job", "--out", str(tmp_path), url=coordinator.url, token=requester
    )
    assert result.returncode == 2 and "no-such-job" in result.stderr
    assert not any(tmp_path.iterdir())


def test_submit_tiles_auto_says_the_grid_and_its_cost(
    coordinator: RunningCoordinator, requester: str, demo_scene: Path
) -> None:
    done = tessera(
        "submit", str(demo_scene), "--frames", "7", "--percentage", "150", "--samples", "2",
        "--tiles", "auto", "--estimate", url=coordinator.url, token=requester, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    line = next(text for text in done.stderr.splitlines() if text.startswith("Tiles (auto"))
    assert "node(s)" in line and "estimated overhead" in line and "extra pixels" in line
    assert "Estimated cost" in done.stdout

"""The node daemon end to end against a fake coordinator that is a REAL HTTP server.

The fake (http.server on 127.0.0.1, port 0) speaks the endpoints of protocol/client.py:
register, lease (one prepared lease at a time, then 204s), heartbeat, result upload (the
body's hash checked against X-Content-SHA256), failure, release, bundle and denoise
input downloads. Renders are real and tiny (the demo scene at 5 %, 1 sample).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import signal
import socket
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydantic import BaseModel

from farm_node.bundle_cache import BundleCache
from farm_node.config import NodeConfig
from farm_node.daemon import NodeDaemon
from farm_node.main import run_node, worker_environment
from farm_node.retry import Backoff
from farm_node.runner import TaskRunner
from protocol.client import SHA256_HEADER, TesseraClient
from protocol.models import (
    API_PREFIX,
    MAX_SAMPLES,
    ErrorBody,
    FailureKind,
    Heartbeat,
    HeartbeatReply,
    Lease,
    LeaseRequest,
    NodeCapabilities,
    NodeRegistration,
    Region,
    RenderAssignment,
    Task,
    TaskFailure,
    TaskKind,
    TaskStatus,
    UploadReceipt,
)
from renderers.builds import BlenderBuild
from renderers.exr import read_exr
from renderers.worker import RenderRequest, RenderWorker

TOKEN = "node-secret"
# The demo scene is 640x360: 5 % is 32x18.
WIDTH, HEIGHT, PERCENTAGE = 32, 18, 5
# Long renders are full size: at 5 % adaptive sampling may converge in well under a second.
LONG_PERCENTAGE = 100
HEARTBEAT = 0.2
MAX_LONG_POLL = 0.2


# --- the fake coordinator ---------------------------------------------------------------------


class FakeCoordinator:
    """What the coordinator saw and what it will answer; all access under `cond`."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.queue: list[Lease] = []
        self.issued: dict[str, Lease] = {}
        self.ended: set[str] = set()
        self.registrations: list[NodeCapabilities] = []
        self.lease_requests: list[LeaseRequest] = []
        self.heartbeats: list[tuple[str, Heartbeat]] = []
        self.upload_attempts: list[str] = []
        self.uploads: dict[str, bytes] = {}
        self.failures: list[tuple[str, TaskFailure]] = []
        self.releases: list[str] = []
        self.bundles: dict[str, bytes] = {}
        self.bundle_downloads: list[str] = []
        self.denoise_inputs: dict[str, bytes] = {}
        self.denoise_input_downloads: list[str] = []
        self.fail_uploads = 0
        self.cancel_on_heartbeat = False
        self.unauthorised: list[str] = []

    def add_lease(self, lease: Lease) -> None:
        with self.cond:
            self.queue.append(lease)
            self.issued[lease.lease_id] = lease
            self.cond.notify_all()

    def end_lease(self, lease_id: str) -> None:
        with self.cond:
            self.ended.add(lease_id)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 60) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "the node did not get there in time"

    # Called by the handler threads, under the lock.

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> _Reply:
        if headers.get("authorization") != f"Bearer {TOKEN}":
            self.unauthorised.append(path)
            return _error(401, "no token")
        for pattern, handler in self._routes():
            match = re.fullmatch(pattern, f"{method} {path}")
            if match is not None:
                reply = handler(*match.groups(), headers=headers, body=body)
                self.cond.notify_all()
                return reply
        return _error(404, f"no route {method} {path}")

    def _routes(self) -> list[tuple[str, Callable[..., _Reply]]]:
        return [
            (r"POST /nodes", self._register),
            (r"POST /nodes/([^/]+)/lease", self._lease),
            (r"POST /leases/([^/]+)/heartbeat", self._heartbeat),
            (r"PUT /leases/([^/]+)/result", self._upload),
            (r"POST /leases/([^/]+)/failure", self._failure),
            (r"POST /leases/([^/]+)/release", self._release),
            (r"GET /leases/([^/]+)/denoise-input", self._denoise_input),
            (r"GET /bundles/([0-9a-f]{64})", self._bundle),
        ]

    def _register(self, *, body: bytes, **_: object) -> _Reply:
        self.registrations.append(NodeCapabilities.model_validate_json(body))
        return _json(
            NodeRegistration(node_id="node-1", heartbeat_interval=HEARTBEAT, poll_timeout=1)
        )

    def _lease(self, node_id: str, *, body: bytes, **_: object) -> _Reply:
        request = LeaseRequest.model_validate_json(body)
        self.lease_requests.append(request)
        if node_id != "node-1":
            return _error(404, "unknown node")
        # A short long-poll: wait a little for a lease to be added.
        self.cond.wait_for(lambda: bool(self.queue), min(request.wait, MAX_LONG_POLL))
        if not self.queue:
            return _Reply(204, b"", "")
        return _json(self.queue.pop(0))

    def _lease_state(self, lease_id: str) -> _Reply | None:
        if lease_id not in self.issued:
            return _error(404, "unknown lease")
        if lease_id in self.ended:
            return _error(409, "this lease is over")
        return None

    def _heartbeat(self, lease_id: str, *, body: bytes, **_: object) -> _Reply:
        problem = self._lease_state(lease_id)
        if problem is not None:
            return problem
        self.heartbeats.append((lease_id, Heartbeat.model_validate_json(body)))
        expires = datetime.now(UTC) + timedelta(minutes=1)
        return _json(HeartbeatReply(expires_at=expires, cancel=self.cancel_on_heartbeat))

    def _upload(self, lease_id: str, *, headers: dict[str, str], body: bytes) -> _Reply:
        self.upload_attempts.append(lease_id)
        if self.fail_uploads > 0:
            self.fail_uploads -= 1
            return _error(503, "storage is busy")
        claimed = headers.get(SHA256_HEADER.lower(), "")
        actual = hashlib.sha256(body).hexdigest()
        if claimed != actual:
            return _error(400, f"hash mismatch: header {claimed}, body {actual}")
        previous = self.uploads.get(lease_id)
        if previous is None or hashlib.sha256(previous).hexdigest() != actual:  # else a retry
            problem = self._lease_state(lease_id)
            if problem is not None:
                return problem
            self.uploads[lease_id] = body
            self.ended.add(lease_id)
        task_id = self.issued[lease_id].task.id
        return _json(UploadReceipt(task_id=task_id, sha256=actual, accepted=True))

    def _failure(self, lease_id: str, *, body: bytes, **_: object) -> _Reply:
        problem = self._lease_state(lease_id)
        if problem is not None:
            return problem
        self.failures.append((lease_id, TaskFailure.model_validate_json(body)))
        self.ended.add(lease_id)
        return _Reply(204, b"", "")

    def _release(self, lease_id: str, **_: object) -> _Reply:
        problem = self._lease_state(lease_id)
        if problem is not None:
            return problem
        self.releases.append(lease_id)
        self.ended.add(lease_id)
        return _Reply(204, b"", "")

    def _denoise_input(self, lease_id: str, **_: object) -> _Reply:
        self.denoise_input_downloads.append(lease_id)
        data = self.denoise_inputs.get(lease_id)
        return (
            _error(404, "not a denoise task") if data is None else _Reply(200, data, "image/x-exr")
        )

    def _bundle(self, sha: str, **_: object) -> _Reply:
        self.bundle_downloads.append(sha)
        data = self.bundles.get(sha)
        return (
            _error(404, "no such bundle") if data is None else _Reply(200, data, "application/zip")
        )


class _Reply:
    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        self.status, self.body, self.content_type = status, body, content_type


def _json(model: BaseModel, status: int = 200) -> _Reply:
    return _Reply(status, model.model_dump_json().encode(), "application/json")


def _error(status: int, detail: str) -> _Reply:
    return _json(ErrorBody(error="fake", detail=detail), status)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _serve(self) -> None:
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {key.lower(): value for key, value in self.headers.items()}
        if not path.startswith(API_PREFIX):
            reply = _error(404, "not the API")
        else:
            with self.server.fake.cond:
                reply = self.server.fake.handle(
                    self.command, path[len(API_PREFIX) :], headers, body
                )
        self.send_response(reply.status)
        if reply.content_type:
            self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if reply.body:
            self.wfile.write(reply.body)

    do_GET = do_POST = do_PUT = do_HEAD = _serve  # noqa: N815 - http.server's names


class _Server(ThreadingHTTPServer):
    # Handler threads are joined by server_close(), so no test leaks one.
    daemon_threads = False

    def __init__(self, port: int, fake: FakeCoordinator) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.fake = fake


class RunningServer:
    def __init__(self, fake: FakeCoordinator, port: int = 0) -> None:
        self.server = _Server(port, fake)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-coord"
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture()
def fake() -> FakeCoordinator:
    return FakeCoordinator()


@pytest.fixture()
def server(fake: FakeCoordinator) -> Iterator[RunningServer]:
    running = RunningServer(fake)
    yield running
    running.close()


def _zip_scene(scene: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(scene, "scene.blend")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def demo_bundle(demo_scene: Path) -> tuple[str, bytes]:
    data = _zip_scene(demo_scene)
    return hashlib.sha256(data).hexdigest(), data


def make_lease(
    bundle: str,
    lease_id: str = "lease-1",
    *,
    samples: int = 1,
    percentage: int = PERCENTAGE,
    kind: TaskKind = TaskKind.RENDER,
    scene_path: str = "scene.blend",
) -> Lease:
    width, height = 640 * percentage // 100, 360 * percentage // 100
    region = Region(x0=0, y0=0, x1=width, y1=height)
    return Lease(
        lease_id=lease_id,
        task=Task(
            id=f"task-{lease_id}",
            job_id="job-1",
            kind=kind,
            frame=1,
            tile_index=0,
            status=TaskStatus.ACTIVE,
            attempts=0,
        ),
        job_name="demo",
        bundle=bundle,
        bundle_size=0,
        scene_path=scene_path,
        assignment=RenderAssignment(
            frame=1,
            width=width,
            height=height,
            render_region=region,
            core_region=region,
            whole_frame=True,
            samples=samples,
            percentage=percentage,
            resolution_x=640,
            resolution_y=360,
            seed=0,
            denoise_data=False,
        ),
        device="CPU",
        samples=samples,
        expires_at=datetime.now(UTC) + timedelta(minutes=5),
        heartbeat_interval=HEARTBEAT,
    )


class NodeUnderTest:
    """A daemon with its own client, runner and cache, run in a thread until `finish`."""

    def __init__(self, config: NodeConfig, build: BlenderBuild) -> None:
        self.config = config
        self.client = TesseraClient(config.coordinator_url, TOKEN, retries=0, timeout=10)
        self.runner = TaskRunner(
            build, config.scratch_dir, config.device, task_timeout=config.task_timeout
        )
        self.cache = BundleCache(config.cache_dir, config.cache_max_bytes)
        self.daemon = NodeDaemon(config, self.client, self.runner, self.cache)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="node-under-test")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.daemon.run(self.stop)
        except BaseException as exc:  # handed to the test thread by finish()
            self.errors.append(exc)

    def finish(self, timeout: float = 60) -> None:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the daemon did not stop"
        self.client.close()
        if self.errors:
            raise self.errors[0]


@pytest.fixture()
def start_node(bpy_build: BlenderBuild, tmp_path: Path) -> Iterator[Callable[..., NodeUnderTest]]:
    started: list[NodeUnderTest] = []

    def start(url: str, **overrides: object) -> NodeUnderTest:
        config = NodeConfig(
            coordinator_url=url,
            data_dir=tmp_path / "node",
            token=TOKEN,
            name="test-node",
            cache_max_bytes=1 << 30,
            stop_grace=30,
            heartbeat_grace=30,
            poll_wait=0.2,
            task_timeout=120,
            benchmark=False,
            retry_initial=0.05,
            retry_max=0.3,
        )
        node = NodeUnderTest(replace(config, **overrides), bpy_build)  # type: ignore[arg-type]
        started.append(node)
        return node

    yield start
    for node in started:
        if node.thread.is_alive():
            node.finish()


def _url(server: RunningServer) -> str:
    return f"http://127.0.0.1:{server.port}"


def _results(node: NodeUnderTest) -> list[str]:
    return sorted(path.name for path in node.config.results_dir.iterdir())


# --- tests ---------------------------------------------------------------------------------------


def test_a_task_is_rendered_and_uploaded_with_its_hash(
    fake: FakeCoordinator,
    server: RunningServer,
    start_node: Callable[..., NodeUnderTest],
    demo_bundle: tuple[str, bytes],
    tmp_path: Path,
) -> None:
    sha, data = demo_bundle
    fake.bundles[sha] = data
    fake.add_lease(make_lease(sha))
    node = start_node(_url(server))
    fake.wait_for(lambda: "lease-1" in fake.uploads)
    # The next lease request says the bundle is cached and its Blender warm.
    fake.wait_for(lambda: sha in fake.lease_requests[-1].warm_bundles)
    node.finish()

    (caps,) = fake.registrations
    assert caps.name == "test-node"
    assert caps.devices == ["CPU"]
    assert caps.blender_versions == ["5.0.1"]
    assert fake.bundle_downloads == [sha]
    assert sha in fake.lease_requests[-1].cached_bundles
    assert fake.upload_attempts == ["lease-1"], "the server checked the hash header"
    exr = tmp_path / "uploaded.exr"
    exr.write_bytes(fake.uploads["lease-1"])
    image = read_exr(exr)
    assert (image.width, image.height) == (WIDTH, HEIGHT)
    assert fake.failures == [] and fake.releases == []
    # A whole frame is its finish's input: kept (no note: not a pending result).
    assert _results(node) == ["delivered-lease-1.exr"]
    assert fake.unauthorised == []


def test_the_frame_a_node_delivered_is_finished_without_downloading_it_again(
    fake: FakeCoordinator,
    server: RunningServer,
    start_node: Callable[..., NodeUnderTest],
    demo_bundle: tuple[str, bytes],
) -> None:
    sha, data = demo_bundle
    fake.bundles[sha] = data
    fake.add_lease(make_lease(sha))
    node = start_node(_url(server))
    fake.wait_for(lambda: "lease-1" in fake.uploads)
    frame = fake.uploads["lease-1"]
    finish = make_lease(sha, "finish-1", kind=TaskKind.FINISH).model_copy(
        update={
            "assignment": None,
            "denoise_input": hashlib.sha256(frame).hexdigest(),
            "percentage": PERCENTAGE,
            "resolution_x": 640,
            "resolution_y": 360,
        }
    )
    fake.denoise_inputs["finish-1"] = frame  # what a node without it downloads
    fake.add_lease(finish)
    # Another frame's finish: the node has not got that one, and downloads it.
    other = finish.model_copy(update={"lease_id": "finish-2", "denoise_input": "e" * 64})
    fake.denoise_inputs["finish-2"] = frame
    fake.add_lease(other)
    fake.wait_for(lambda: "finish-2" in fake.uploads)
    node.finish()
    assert fake.denoise_input_downloads == ["finish-2"], "its own frame came from its disk"
    for lease_id in ("finish-1", "finish-2"):
        with zipfile.ZipFile(io.BytesIO(fake.uploads[lease_id])) as archive:
            assert "manifest.json" in archive.namelist()
    assert fake.failures == []
    assert _results(node) == [], "a kept frame is used once, or dropped"


def test_the_node_waits_for_a_coordinator_that_is_down_at_first(
    fake: FakeCoordinator,
    start_node: Callable[..., NodeUnderTest],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as probe:  # a free port that nobody listens on yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with caplog.at_level(logging.DEBUG, logger="farm_node"):
        node = start_node(f"http://127.0.0.1:{port}")
        deadline = threading.Event()
        deadline.wait(1.0)  # several attempts against a closed port
        assert fake.registrations == []
        late = RunningServer(fake, port)
        try:
            fake.wait_for(lambda: len(fake.lease_requests) >= 2)
            node.finish()
        finally:
            late.close()
    assert len(fake.registrations) == 1
    attempts = [r for r in caplog.records if "still fails" in r.getMessage()]
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "Talking to the coordinator failed" in r.getMessage()
    ]
    assert len(warnings) == 1, "a repeated error is logged once"
    assert attempts, "the node kept trying"
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_an_upload_that_fails_once_is_retried_and_delivered_once(
    fake: FakeCoordinator,
    server: RunningServer,
    start_node: Callable[..., NodeUnderTest],
    demo_bundle: tuple[str, bytes],
) -> None:
    sha, data = demo_bundle
    fake.bundles[sha] = data
    fake.fail_uploads = 1
    fake.add_lease(make_lease(sha))
    node = start_node(_url(server))
    fake.wait_for(lambda: "lease-1" in fake.uploads)
    fake.wait_for(lambda: len(fake.lease_requests) >= 2)
    node.finish()
    assert fake.upload_attempts == ["lease-1", "lease-1"]
    assert list(fake.uploads) == ["lease-1"]
    assert _results(node) == []


def test_pending_results_survive_a_restart(
    fake: FakeCoordinator,
    server: RunningServer,
    start_node: Callable[..., NodeUnderTest],
    demo_bundle: tuple[str, bytes],
) -> None:
    sha, data = demo_bundle
    fake.bundles[sha] = data
    fake.fail_uploads = 1_000_000
    fake.add_lease(make_lease(sha))
    first = start_node(_url(server))
    fake.wait_for(lambda: len(fake.upload_attempts) >= 3)  # the first try, then backoff
    first.finish()
    assert fake.uploads == {}
    assert _results(first) == ["lease-1.exr", "lease-1.json"]
    note = json.loads((first.config.results_dir / "lease-1.json").read_text())
    pending = (first.config.results_dir / "lease-1.exr").read_bytes()
    assert note["sha256"] == hashlib.sha256(pending).hexdigest()
    assert note["lease_id"] == "lease-1"

    with fake.cond:
        fake.fail_uploads = 0
        attempts_before = len(fake.upload_attempts)
    second = start_node(_url(server))
    fake.wait_for(lambda: "lease-1" in fake.uploads)
    fake.wait_for(lambda: len(fake.registrations) == 2)
    second.finish()
    assert fake.uploads["lease-1"] == pending
    assert len(fake.upload_attempts) == attempts_before + 1, "delivered exactly once"
    assert _results(second) == []
    assert second.runner.worker_starts == 0, "delivering needs no Blender"


def test_stop_during_a_long_render_releases_the_lease(
    fake: FakeCoordinator,
    server: RunningServer,
    start_node: Callable[..., NodeUnderTest],
    demo_bundle: tuple[str, bytes],
) -> None:
    sha, data = demo_bundle
    fake.bundles[sha] = data
    fake.add_lease(make_lease(sha, samples=MAX_SAMPLES, percentage=LONG_PERCENTAGE))
    node = start_node(_url(server), stop_grace=0.5)
    fake.wait_for(lambda: any(b.message.startswith("rendering:") for _, b in fake.heartbeats))
    node.finish(timeout=30)
    assert fake.releases == ["lease-1"]
    assert fake.uploads == {} and fake.failures == []
    assert _results(node) == []
    requests_at_stop = len(fake.lease_requests)
    assert requests_at_stop == 1, "a stopping node asks for no more work"


def test_a_task_that_ends_within_the_grace_period_is_delivered(
    fake: FakeCoordinator,
    server: RunningServer,
    start_node: Callable[..., NodeUnderTest],
    demo_bundle: tuple[str, bytes],
) -> None:
    sha, data = demo_bundle
    fake.bundles[sha] = data
    fake.add_lease(make_lease(sha, samples=16))
    node = start_node(_url(server), stop_grace=60)
    fake.wait_for(lambda: bool(fake.bundle_downloads))
    node.stop.set()  # while the task is under way
    node.finish()
    assert list(fake.uploads) == ["lease-1"]
    assert fake.releases == []


@pytest.mark.parametrize("how", ["cancelled", "lease gone"])
def test_the_render_stops_when_the_coordinator_cancels_or_forgets_the_lease(
    fake: FakeCoordinator,
    server: RunningServer,
    start_node: Callable[..., NodeUnderTest],
    demo_bundle: tuple[str, bytes],
    how: str,
) -> None:
    sha, data = demo_bundle
    fake.bundles[sha] = data
    fake.add_lease(make_lease(sha, samples=MAX_SAMPLES, percentage=LONG_PERCENTAGE))
    node = start_node(_url(server))
    fake.wait_for(lambda: any(b.message.startswith("rendering:") for _, b in fake.heartbeats))
    with fake.cond:
        if how == "cancelled":
            fake.cancel_on_heartbeat = True
        else:
            fake.ended.add("lease-1")
        requests_before = len(fake.lease_requests)
    # The node drops the task and asks for new work.
    fake.wait_for(lambda: len(fake.lease_requests) > requests_before, timeout=30)
    node.finish()
    assert fake.uploads == {} and fake.failures == [] and fake.releases == []
    assert _results(node) == []


def test_a_scene_error_is_reported_as_not_retryable(
    fake: FakeCoordinator,
    server: RunningServer,
    start_node: Callable[..., NodeUnderTest],
    bat_scenes: Path,
) -> None:
    data = _zip_scene(bat_scenes / "basic_file.blend")  # it has no camera
    sha = hashlib.sha256(data).hexdigest()
    fake.bundles[sha] = data
    fake.add_lease(make_lease(sha, "no-camera"))
    fake.add_lease(make_lease(sha, "missing", scene_path="other/scene.blend"))
    node = start_node(_url(server))
    fake.wait_for(lambda: len(fake.failures) == 2)
    node.finish()
    kinds = {lease_id: (f.kind, f.retryable) for lease_id, f in fake.failures}
    assert kinds == {
        "no-camera": (FailureKind.NO_CAMERA, False),
        "missing": (FailureKind.SCENE_NOT_FOUND, False),
    }
    assert "no active camera" in fake.failures[0][1].message
    assert fake.uploads == {}


def test_a_corrupt_scene_is_reported_without_the_nodes_own_paths(
    fake: FakeCoordinator,
    server: RunningServer,
    start_node: Callable[..., NodeUnderTest],
    tmp_path: Path,
) -> None:
    """Blender names the file it cannot read; the provider's folders stay private."""
    bad = tmp_path / "scene.blend"
    bad.write_bytes(b"BLENDER-v300" + bytes(range(256)) * 16)  # right magic, no blocks
    data = _zip_scene(bad)
    sha = hashlib.sha256(data).hexdigest()
    fake.bundles[sha] = data
    fake.add_lease(make_lease(sha, "corrupt"))
    node = start_node(_url(server))
    fake.wait_for(lambda: len(fake.failures) == 1)
    node.finish()
    ((lease_id, failure),) = fake.failures
    assert (lease_id, failure.kind, failure.retryable) == (
        "corrupt",
        FailureKind.CORRUPT_SCENE,
        False,
    )
    assert str(node.config.data_dir) not in failure.message
    assert str(node.config.data_dir.resolve()) not in failure.message
    assert str(tmp_path) not in failure.message
    assert "<bundle>/scene.blend" in failure.message
    assert len(failure.message) <= 4000


def test_an_unexpected_error_fails_the_task_and_the_node_goes_on(
    fake: FakeCoordinator,
    server: RunningServer,
    start_node: Callable[..., NodeUnderTest],
    demo_bundle: tuple[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever a task raises (here a library's ValueError, with a local path in it) is
    that task's failure, reported and counted; the node renders the next lease."""
    sha, data = demo_bundle
    fake.bundles[sha] = data
    fake.add_lease(make_lease(sha, "breaks"))
    fake.add_lease(make_lease(sha, "honest"))
    real_render = TaskRunner.render

    def render(self: TaskRunner, lease: Lease, scene: Path, *args: Any, **kwargs: Any) -> Any:
        if lease.lease_id == "breaks":
            raise ValueError(f"cannot parse {scene}: " + "x" * 10_000)
        return real_render(self, lease, scene, *args, **kwargs)

    monkeypatch.setattr(TaskRunner, "render", render)
    node = start_node(_url(server))
    fake.wait_for(lambda: "honest" in fake.uploads)
    node.finish()
    ((lease_id, failure),) = fake.failures
    assert (lease_id, failure.kind, failure.retryable) == ("breaks", FailureKind.OTHER, True)
    assert failure.message.startswith("ValueError: cannot parse <bundle>/scene.blend: xxx")
    assert str(node.config.data_dir) not in failure.message
    assert len(failure.message) <= 4000
    assert fake.releases == [], "a failure is reported (and counted), not a release"


def test_a_denoise_task_is_denoised_and_uploaded(
    fake: FakeCoordinator,
    server: RunningServer,
    start_node: Callable[..., NodeUnderTest],
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
) -> None:
    merged = worker.render(
        RenderRequest(
            scene=demo_scene,
            frame=1,
            output=tmp_path / "merged.exr",
            samples=2,
            percentage=PERCENTAGE,
            seed=0,
            denoise_data=True,
        )
    ).output
    lease = make_lease("d" * 64, "denoise-1", samples=2, kind=TaskKind.DENOISE)
    fake.denoise_inputs["denoise-1"] = merged.read_bytes()
    fake.add_lease(lease)
    node = start_node(_url(server))
    fake.wait_for(lambda: "denoise-1" in fake.uploads)
    node.finish()
    out = tmp_path / "denoised.exr"
    out.write_bytes(fake.uploads["denoise-1"])
    parts = [part.name for part in read_exr(out).parts]
    assert parts[:2] == ["ViewLayer.Combined", "ViewLayer.Noisy Image"]
    assert fake.bundle_downloads == [], "denoising needs no bundle"


def test_a_cheating_node_fakes_verify_tasks_but_never_denoise_tasks(
    fake: FakeCoordinator,
    server: RunningServer,
    start_node: Callable[..., NodeUnderTest],
    demo_bundle: tuple[str, bytes],
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sha, data = demo_bundle
    fake.bundles[sha] = data
    merged = worker.render(
        RenderRequest(
            scene=demo_scene,
            frame=1,
            output=tmp_path / "merged.exr",
            samples=2,
            percentage=PERCENTAGE,
            seed=0,
            denoise_data=True,
        )
    ).output
    fake.denoise_inputs["denoise-1"] = merged.read_bytes()
    fake.add_lease(make_lease(sha, "verify-1", samples=4, kind=TaskKind.VERIFY))
    fake.add_lease(make_lease(sha, "denoise-1", samples=2, kind=TaskKind.DENOISE))
    caplog.set_level(logging.INFO, logger="farm_node")
    node = start_node(_url(server), cheat="black")
    fake.wait_for(lambda: {"verify-1", "denoise-1"} <= fake.uploads.keys())
    node.finish()
    images = {}
    for lease_id in ("verify-1", "denoise-1"):
        path = tmp_path / f"{lease_id}.exr"
        path.write_bytes(fake.uploads[lease_id])
        images[lease_id] = read_exr(path).combined_rgba()
    verify, denoised = images["verify-1"], images["denoise-1"]
    assert verify.shape == (HEIGHT, WIDTH, 4)
    assert (verify[..., :3] == 0).all() and (verify[..., 3] == 1).all()
    assert denoised[..., :3].max() > 0, "a denoise task is never faked"
    messages = [record.getMessage() for record in caplog.records]
    assert any("THIS NODE CHEATS (--cheat black)" in m for m in messages)
    assert any("CHEATING (black) on lease verify-1" in m for m in messages)
    assert not any("denoise-1" in m and "CHEATING" in m for m in messages)


# --- small parts ---------------------------------------------------------------------------------


def test_backoff_grows_with_jitter_up_to_its_maximum() -> None:
    import random

    backoff = Backoff(1.0, 8.0, random.Random(7))
    delays = [backoff.next_delay() for _ in range(6)]
    for delay, base in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert base / 2 <= delay <= base
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_the_cpu_kernel_variable_reaches_blender_and_settings_win() -> None:
    assert worker_environment({}, {"CYCLES_CPU_NO_AVX2": "1", "HOME": "/x"}) == {
        "CYCLES_CPU_NO_AVX2": "1"
    }
    assert worker_environment({"A": "b"}, {}) == {"A": "b"}


def test_invalid_settings_fail_fast(tmp_path: Path) -> None:
    from common.errors import UsageError

    with pytest.raises(UsageError, match="poll wait"):
        NodeConfig(coordinator_url="http://x", data_dir=tmp_path, poll_wait=600).validate()
    with pytest.raises(UsageError, match="Unknown device"):
        NodeConfig(coordinator_url="http://x", data_dir=tmp_path, device="TPU").validate()
    with pytest.raises(UsageError, match="--cheat must be one of"):
        NodeConfig(coordinator_url="http://x", data_dir=tmp_path, cheat="gold").validate()
    NodeConfig(coordinator_url="http://x", data_dir=tmp_path).validate()


# --- the entry point the CLI calls ---------------------------------------------------------------


def _entry_config(server: RunningServer, tmp_path: Path, token: str = TOKEN) -> NodeConfig:
    return NodeConfig(
        coordinator_url=_url(server),
        data_dir=tmp_path / "node",
        token=token,
        name="cli-node",
        poll_wait=0.2,
        benchmark=False,
        retry_initial=0.05,
        retry_max=0.3,
    )


def test_run_node_stops_cleanly_on_sigint(
    fake: FakeCoordinator, server: RunningServer, tmp_path: Path
) -> None:
    original = signal.getsignal(signal.SIGINT)

    def interrupt_when_polling() -> None:
        fake.wait_for(lambda: len(fake.lease_requests) >= 2, timeout=30)
        os.kill(os.getpid(), signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_when_polling)
    interrupter.start()
    try:
        code = run_node(_entry_config(server, tmp_path))
    finally:
        interrupter.join()
    assert code == 0
    assert [caps.name for caps in fake.registrations] == ["cli-node"]
    assert signal.getsignal(signal.SIGINT) is original, "the handlers are put back"


def test_run_node_gives_up_on_a_refused_token(
    fake: FakeCoordinator, server: RunningServer, tmp_path: Path
) -> None:
    assert run_node(_entry_config(server, tmp_path, token="wrong")) == 1
    assert fake.unauthorised == ["/nodes"]
    assert run_node(replace(_entry_config(server, tmp_path), coordinator_url="ftp://x")) == 1

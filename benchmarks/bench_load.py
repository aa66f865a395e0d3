"""Load test: 1,000 simulated nodes against one coordinator (`make load`).

A real coordinator runs in its own process on 127.0.0.1 (`coordinator.server.serve`, as
`tessera coordinator` runs it, with the limits of each phase set in its config). Each
simulated node has its own provider account and token and uses the real HTTP API:
register, lease (long poll), heartbeat while it "renders" (a sleep), upload a small valid
EXR of its tile with the SHA-256. The nodes are asyncio tasks on raw keep-alive HTTP/1.1
connections (one per node), in one or more client processes, so that the client costs
little CPU next to the coordinator (both are measured and reported).

Phases, each against a fresh coordinator:

1. **baseline**: 10 nodes, default limits: idle latencies and per-node throughput.
2. **load**: 1,000 nodes, default limits, for the measurement window: sustained leases
   and completed tasks a second, p50/p99 latency per endpoint, the coordinator's CPU and
   peak RSS (VmHWM), responses by status. Ratios against the baseline of the same run.
3. **overload**: 1,000 nodes against a coordinator whose `max_concurrent` and
   `max_waiting` are far below what they ask for, with short renders: the coordinator
   must answer the excess with 503 + Retry-After at once (never a crash, never a 5xx
   other than 503), nodes that wait as told must recover, and afterwards the process is
   alive, answers /health and its ledger check passes.

On PostgreSQL (`--db postgresql` or `both`, which `make load` uses) a throwaway server
is started, and the load phase also runs with `--replicas` coordinators (default 2)
sharing its database and one store, the nodes split across them: the completed tasks a
second of 1 vs 2 replicas, and the CPU per task summed over the replicas.

Run: `python -m benchmarks.bench_load [--nodes 1000] [--window 40] [--quick] [--db both]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from benchmarks.common import report
from common.errors import ApiError, CoordinatorUnreachableError
from protocol.client import TesseraClient
from protocol.models import JobSpec, Role
from renderers.exr import ExrImage, ExrPart, write_exr

REPO = Path(__file__).resolve().parent.parent
API = "/api/v1"
#: The job: 20 frames of 64x48 in 8x6 tiles of 8x8 pixels (960 tasks a job).
WIDTH, HEIGHT, GRID, FRAMES = 64, 48, (8, 6), 20
ENDPOINTS = ("register", "lease", "heartbeat", "upload")
#: The baseline: 10 nodes with short tiles, about the task rate of the load phase.
BASELINE_RENDER = (0.2, 0.6)
#: The overload phase's max_concurrent (the default is 256).
OVERLOAD_CONCURRENT = 16
#: A node refused (429/503) this long before the end with no success since is "stuck".
STUCK_SECONDS = 10.0
OK_STATUSES = ("200", "204", "429", "503", "reconnect")
JSON = (("Content-Type", "application/json"),)


# --- the coordinator process ------------------------------------------------------------------


@dataclass
class ServerOptions:
    data_dir: str
    accounts: int
    lease_seconds: float = 60.0
    heartbeat_interval: float = 5.0
    max_concurrent: int | None = None  # None: the default config's
    max_waiting: int | None = None
    profile: str | None = None  # write a cProfile of the server here
    db_url: str | None = None  # None: SQLite in data_dir; else e.g. postgresql://...
    shared_store: str | None = None  # replicas of one database share this store folder


def serve_main(options: ServerOptions) -> None:
    """The coordinator process: create the provider accounts, then serve until SIGINT."""
    from coordinator.config import CoordinatorConfig
    from coordinator.db import open_database
    from coordinator.events import EventBus
    from coordinator.farm import Farm
    from coordinator.server import serve
    from coordinator.store import ContentStore
    from coordinator.verify.policy import VerificationPolicy
    from protocol.models import Role

    _raise_fd_limit()
    limits: dict[str, Any] = {}
    if options.max_concurrent is not None:
        limits["max_concurrent"] = options.max_concurrent
    if options.max_waiting is not None:
        limits["max_waiting"] = options.max_waiting
    data = Path(options.data_dir)
    config = CoordinatorConfig(
        data_dir=data,
        db_url=options.db_url,
        shared_store=Path(options.shared_store) if options.shared_store else None,
        lease_seconds=options.lease_seconds,
        heartbeat_interval=options.heartbeat_interval,
        backup_after_seconds=0,
        verification=VerificationPolicy(enabled=False),
        **limits,
    )
    # 1,000 accounts through the admin API would take 20 s of the admin token's rate
    # limit; they are set-up, not what is measured, so they are made here directly.
    db = open_database(config.db_url, config.db_path)
    farm = Farm(config, db, ContentStore(config.store_dir, config.spool_name), EventBus())
    farm.ensure_admin()
    tokens = [
        farm.create_account(f"node-{i}", Role.PROVIDER).token for i in range(options.accounts)
    ]
    db.close()
    (data / "tokens.txt").write_text("\n".join(tokens) + "\n")

    def ready(url: str, _: str | None) -> None:
        print(f"listening on {url}", flush=True)

    if options.profile is None:
        serve(config, "127.0.0.1", 0, on_ready=ready)
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        serve(config, "127.0.0.1", 0, on_ready=ready)
    finally:
        profiler.disable()
        profiler.dump_stats(options.profile)


@dataclass
class Coordinator:
    process: subprocess.Popen[bytes]
    url: str
    data: Path
    tokens: list[str]

    @property
    def admin_token(self) -> str:
        return (self.data / "admin.token").read_text().strip()

    def status(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) in KiB, and CPU ticks used so far."""
        fields: dict[str, int] = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        parts = stat[stat.rindex(")") + 2 :].split()
        fields["ticks"] = int(parts[11]) + int(parts[12])  # utime + stime
        return fields

    def stop(self) -> int | None:
        """SIGINT, as Ctrl-C; returns the exit status (None if it had to be killed)."""
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            return None


def start_coordinator(options: ServerOptions) -> Coordinator:
    data = Path(options.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    log = data / "coordinator.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_load", "--serve", json.dumps(asdict(options))],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith("listening on "):
                url = line.removeprefix("listening on ").strip()
                tokens = (data / "tokens.txt").read_text().split()
                return Coordinator(process, url, data, tokens)
        if process.poll() is not None:
            raise RuntimeError(f"coordinator exited:\n{text}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"coordinator did not start:\n{log.read_text()}")


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- a small HTTP/1.1 client ------------------------------------------------------------------


class ConnectionLostError(Exception):
    pass


class Http:
    """One keep-alive HTTP/1.1 connection (what a node's `requests.Session` holds)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reconnects = 0
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self,
        method: str,
        path: str,
        token: str,
        body: bytes = b"",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> tuple[int, dict[str, str], bytes]:
        reused = self.writer is not None
        try:
            return await self._request(method, path, token, body, headers)
        except ConnectionLostError:
            if not reused:
                raise
            self.reconnects += 1  # the server closed an idle keep-alive connection
            return await self._request(method, path, token, body, headers)

    async def _request(
        self,
        method: str,
        path: str,
        token: str,
        body: bytes,
        headers: tuple[tuple[str, str], ...],
    ) -> tuple[int, dict[str, str], bytes]:
        try:
            if self.writer is None or self.reader is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
                sock = self.writer.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            )
            self.writer.write(head.encode() + body)
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            fields = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name:
                    fields[name.strip().lower()] = value.strip()
            length = int(fields.get("content-length", "0"))
            payload = await self.reader.readexactly(length) if length else b""
            if fields.get("connection", "").lower() == "close":
                self.close()
            return status, fields, payload
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise ConnectionLostError(str(exc)) from exc

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# --- the simulated nodes ----------------------------------------------------------------------


@dataclass
class Plan:
    url: str
    tokens: list[str]
    first_index: int
    start_at: float  # wall clock: nodes start registering (spread over `ramp`)
    ramp: float
    window: tuple[float, float]  # wall clock: what is measured
    stop_at: float
    render: tuple[float, float]  # seconds a simulated render takes (uniform)
    heartbeat: float
    lease_wait: float = 10.0
    exr_dir: str = ""


@dataclass
class Tally:
    """What one client process saw. Latencies are seconds, inside the window only."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)  # "endpoint status" -> count
    leases: int = 0  # granted inside the window
    uploads: int = 0  # accepted inside the window
    overloaded: int = 0  # 429 and 503 answers (whole run)
    without_retry_after: int = 0  # ... of which lacked Retry-After
    recoveries: list[float] = field(default_factory=list)  # first refusal -> next success
    unrecovered: int = 0  # nodes refused since STUCK_SECONDS before the end, no success since
    registered: int = 0
    client_cpu: float = 0.0

    def merge(self, other: Tally) -> None:
        for name, values in other.latencies.items():
            self.latencies.setdefault(name, []).extend(values)
        for key, count in other.statuses.items():
            self.statuses[key] = self.statuses.get(key, 0) + count
        self.leases += other.leases
        self.uploads += other.uploads
        self.overloaded += other.overloaded
        self.without_retry_after += other.without_retry_after
        self.recoveries.extend(other.recoveries)
        self.unrecovered += other.unrecovered
        self.registered += other.registered
        self.client_cpu += other.client_cpu


class Node:
    def __init__(self, plan: Plan, index: int, tally: Tally, exrs: dict[tuple[int, int], Any]):
        urls = plan.url.split(",")
        split = urlsplit(urls[index % len(urls)])  # nodes split evenly across replicas
        self.http = Http(split.hostname or "127.0.0.1", split.port or 80)
        self.plan, self.index, self.tally, self.exrs = plan, index, tally, exrs
        self.token = plan.tokens[index]
        self.rng = random.Random(index)
        self.refused_since: float | None = None
        self.statuses: Counter[str] = Counter()

    def in_window(self, when: float) -> bool:
        return self.plan.window[0] <= when < self.plan.window[1]

    async def call(
        self,
        endpoint: str,
        method: str,
        path: str,
        body: bytes = b"",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> tuple[int, bytes] | None:
        """The request, repeated after 429/503 as Retry-After says (with jitter) and after a
        lost connection; None once the run is over."""
        while time.time() < self.plan.stop_at:
            started = time.time()
            begun = time.perf_counter()
            try:
                status, fields, payload = await self.http.request(
                    method, path, self.token, body, headers
                )
            except ConnectionLostError:
                self.statuses[f"{endpoint} conn-error"] += 1
                await asyncio.sleep(0.5 + self.rng.random())
                continue
            elapsed = time.perf_counter() - begun
            self.statuses[f"{endpoint} {status}"] += 1
            if self.in_window(started) and status < 400:  # refusals are counted, not timed
                self.tally.latencies.setdefault(endpoint, []).append(elapsed)
            if status in (429, 503):
                self.tally.overloaded += 1
                if self.refused_since is None:
                    self.refused_since = started
                retry = fields.get("retry-after")
                if retry is None:
                    self.tally.without_retry_after += 1
                wait = float(retry) if retry is not None else 1.0
                await asyncio.sleep(wait + self.rng.random() * wait)
                continue
            if self.refused_since is not None and status < 400:
                self.tally.recoveries.append(time.time() - self.refused_since)
                self.refused_since = None
            return status, payload
        return None

    async def run(self) -> None:
        plan = self.plan
        await asyncio.sleep(max(0.0, plan.start_at - time.time()) + self.rng.random() * plan.ramp)
        name = json.dumps({"name": f"sim-{self.index}"}).encode()
        answer = await self.call("register", "POST", f"{API}/nodes", name, JSON)
        if answer is None or answer[0] != 200:
            return
        self.tally.registered += 1
        node_id = json.loads(answer[1])["node_id"]
        wait = json.dumps({"wait": plan.lease_wait}).encode()
        beat = json.dumps({"progress": 0.5}).encode()
        while time.time() < plan.stop_at:
            answer = await self.call("lease", "POST", f"{API}/nodes/{node_id}/lease", wait, JSON)
            if answer is None:
                break
            status, payload = answer
            if status != 200:
                continue
            if self.in_window(time.time()):
                self.tally.leases += 1
            lease = json.loads(payload)
            lease_id = lease["lease_id"]
            region = lease["assignment"]["render_region"]
            size = (region["x1"] - region["x0"], region["y1"] - region["y0"])
            every = float(lease.get("heartbeat_interval") or plan.heartbeat)  # as told
            done = time.time() + self.rng.uniform(*plan.render)
            while (left := done - time.time()) > 0:
                await asyncio.sleep(min(left, every))
                if done - time.time() > 0:
                    await self.call(
                        "heartbeat", "POST", f"{API}/leases/{lease_id}/heartbeat", beat, JSON
                    )
            data, digest = self.exr(size)
            answer = await self.call(
                "upload",
                "PUT",
                f"{API}/leases/{lease_id}/result",
                data,
                (("X-Content-SHA256", digest), ("Content-Type", "application/octet-stream")),
            )
            if answer is not None and answer[0] == 200 and self.in_window(time.time()):
                self.tally.uploads += 1
        self.http.close()
        if self.http.reconnects:
            self.statuses["keep-alive reconnect"] += self.http.reconnects
        if self.refused_since is not None and self.refused_since < plan.stop_at - STUCK_SECONDS:
            self.tally.unrecovered += 1

    def exr(self, size: tuple[int, int]) -> tuple[bytes, str]:
        if size not in self.exrs:
            path = Path(self.plan.exr_dir) / f"tile_{size[0]}x{size[1]}.exr"
            rng = np.random.default_rng(size[0] * 1000 + size[1])
            channels = {
                f"ViewLayer.Combined.{c}": rng.random((size[1], size[0]), dtype=np.float32)
                for c in "RGBA"
            }
            write_exr(path, ExrImage(size[0], size[1], [ExrPart("ViewLayer.Combined", channels)]))
            data = path.read_bytes()
            self.exrs[size] = (data, hashlib.sha256(data).hexdigest())
        result: tuple[bytes, str] = self.exrs[size]
        return result


async def _drive(plan: Plan, count: int) -> Tally:
    tally = Tally()
    exrs: dict[tuple[int, int], Any] = {}
    nodes = [Node(plan, plan.first_index + i, tally, exrs) for i in range(count)]
    await asyncio.gather(*(node.run() for node in nodes))
    for node in nodes:
        for key, value in node.statuses.items():
            tally.statuses[key] = tally.statuses.get(key, 0) + value
    return tally


def drive(plan: Plan, count: int) -> Tally:
    """Run `count` nodes (tokens from plan.first_index on) until plan.stop_at."""
    _raise_fd_limit()
    cpu = time.process_time()
    tally = asyncio.run(_drive(plan, count))
    tally.client_cpu = time.process_time() - cpu
    return tally


def _drive_child(plan: Plan, count: int, queue: Any) -> None:
    queue.put(asdict(drive(plan, count)))


def drive_all(plan: Plan, count: int, processes: int) -> Tally:
    """`count` nodes spread over `processes` client processes (1: this one)."""
    if processes <= 1:
        return drive(plan, count)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    share = math.ceil(count / processes)
    children = []
    for first in range(0, count, share):
        part = Plan(**{**asdict(plan), "first_index": plan.first_index + first})
        child = context.Process(target=_drive_child, args=(part, min(share, count - first), queue))
        child.start()
        children.append(child)
    tally = Tally()
    for _ in children:
        tally.merge(Tally(**queue.get()))
    for child in children:
        child.join()
    return tally


# --- the requester side -----------------------------------------------------------------------


def _spec(bundle_sha: str, index: int) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": f"load-{index}",
            "bundle": bundle_sha,
            "scene_path": "scene.blend",
            "scene": {
                "name": "load",
                "frame_start": 1,
                "frame_end": FRAMES,
                "resolution_x": WIDTH,
                "resolution_y": HEIGHT,
                "resolution_percentage": 100,
                "samples": 1,
                "adaptive_sampling": False,
                "denoising": False,
                "camera": "Camera",
            },
            "frames": {"start": 1, "end": FRAMES},
            "tiles": {"columns": GRID[0], "rows": GRID[1]},
            "max_price": 1.0,
        }
    )


class Requester:
    """The requester: credits, a bundle, and jobs submitted as the queue runs low, so that
    the nodes always find work but the farm never holds a needlessly long queue."""

    def __init__(self, coordinator: Coordinator, scratch: Path) -> None:
        bundle = scratch / "bundle.zip"
        with zipfile.ZipFile(bundle, "w") as archive:
            archive.writestr("scene.blend", b"BLENDER-v500" + b"\0" * 64)  # magic only
        with TesseraClient(coordinator.url, coordinator.admin_token) as admin:
            self.token = admin.create_account("requester", Role.REQUESTER.value).token
            admin.grant("requester", 1e9)
        self.client = TesseraClient(coordinator.url, self.token)
        self.bundle = self.client.upload_bundle(bundle)
        self.jobs: list[str] = []
        self.open: dict[str, int] = {}  # unfinished job -> tasks not done
        self.refused = 0

    def submit(self) -> None:
        job = self.client.submit_job(_spec(self.bundle, len(self.jobs)))
        self.jobs.append(job.id)
        self.open[job.id] = job.progress.tasks_total

    def feed(self, keep: int, until: float) -> None:
        """Keep at least `keep` tasks not done (leased ones count) until `until`."""
        while True:
            try:
                for job_id in list(self.open):
                    progress = self.client.job(job_id).progress
                    self.open[job_id] = progress.tasks_total - progress.tasks_done
                    if not self.open[job_id]:
                        del self.open[job_id]
                while sum(self.open.values()) < keep:
                    self.submit()
            except ApiError as exc:  # overloaded: wait as told, like every client
                if exc.status not in (429, 503):
                    raise
                self.refused += 1
            except CoordinatorUnreachableError:
                self.refused += 1
            if time.time() >= until:
                return
            time.sleep(1.0)

    def tasks_done(self) -> int:
        return sum(self.client.job(job_id).progress.tasks_done for job_id in self.jobs)


# --- phases -----------------------------------------------------------------------------------


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else math.nan


def run_phase(
    name: str,
    scratch: Path,
    *,
    nodes: int,
    window: float,
    render: tuple[float, float],
    heartbeat: float = 5.0,
    clients: int = 1,
    max_concurrent: int | None = None,
    max_waiting: int | None = None,
    profile: str | None = None,
    db_url: str | None = None,
    replicas: int = 1,
) -> dict[str, Any]:
    """One coordinator (or `replicas` sharing `db_url` and a store), `nodes` simulated
    nodes, measured over `window` seconds once all have registered and settled."""
    options = ServerOptions(
        str(scratch / name),
        nodes,
        heartbeat_interval=heartbeat,
        max_concurrent=max_concurrent,
        max_waiting=max_waiting,
        profile=profile,
        db_url=db_url,
        shared_store=str(scratch / f"{name}-store") if replicas > 1 else None,
    )
    started = time.monotonic()
    coordinator = start_coordinator(options)
    others = [
        start_coordinator(replace(options, data_dir=f"{options.data_dir}-r{i}", accounts=0))
        for i in range(1, replicas)
    ]
    everyone = [coordinator, *others]
    samples: dict[str, dict[str, int]] = {}
    try:
        requester = Requester(coordinator, scratch)
        ramp = min(10.0, nodes / 100)  # registrations spread over this many seconds
        begin = time.time() + 0.5
        window_start = begin + ramp + max(3.0, render[0])  # renders spread out by then
        plan = Plan(
            url=",".join(c.url for c in everyone),
            tokens=coordinator.tokens,
            first_index=0,
            start_at=begin,
            ramp=ramp,
            window=(window_start, window_start + window),
            stop_at=window_start + window + 0.5,
            render=render,
            heartbeat=heartbeat,
            exr_dir=str(scratch),
        )

        def watch() -> None:  # the coordinator's CPU time over the window
            time.sleep(max(0.0, plan.window[0] - time.time()))
            samples["start"] = _total_status(everyone)
            time.sleep(max(0.0, plan.window[1] - time.time()))
            samples["end"] = _total_status(everyone)

        # Work for every node, and for what one node does in the longest render's time.
        keep = nodes + int(nodes * 2 / max(0.1, render[0])) + 100
        feeder = threading.Thread(target=requester.feed, args=(keep, plan.stop_at), daemon=True)
        requester.feed(keep, 0)  # the first jobs before any node starts
        feeder.start()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        tally = drive_all(plan, nodes, clients)
        watcher.join(timeout=30)
        feeder.join(timeout=30)
        alive = all(c.process.poll() is None for c in everyone)
        with TesseraClient(coordinator.url, coordinator.admin_token) as admin:
            health = admin.health().status
            check = admin.ledger_check()
        done = requester.tasks_done()
        requester.client.close()
        final = _total_status(everyone)
    finally:
        for other in others:
            other.stop()
        exit_status = coordinator.stop()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (samples["end"]["ticks"] - samples["start"]["ticks"]) / ticks if len(samples) == 2 else 0
    db_cpu = (samples["end"]["db"] - samples["start"]["db"]) / ticks if len(samples) == 2 else 0
    return {
        "phase": name,
        "nodes": nodes,
        "registered": tally.registered,
        "window_s": window,
        "tally": tally,
        "leases_per_s": tally.leases / window,
        "tasks_per_s": tally.uploads / window,
        "coordinator_cpu": cpu / window,
        "db_cpu": db_cpu / window,
        "client_cpu": tally.client_cpu / (plan.stop_at - begin),
        "peak_rss_mib": final["VmHWM"] / 1024,
        "alive": alive,
        "health": health,
        "ledger_ok": check.ok,
        "exit_status": exit_status,
        "tasks_done": done,
        "jobs": len(requester.jobs),
        "phase_seconds": time.monotonic() - started,
    }


def _total_status(coordinators: list[Coordinator]) -> dict[str, int]:
    """CPU ticks summed over the replicas; the largest peak RSS of one."""
    each = [c.status() for c in coordinators]
    return {
        "db": _postgres_ticks(),
        "ticks": sum(s["ticks"] for s in each),
        "VmHWM": max(s["VmHWM"] for s in each),
        "VmRSS": max(s["VmRSS"] for s in each),
    }


#: The data folder of the PostgreSQL server `_databases` started (None: none).
_PG_DATA: list[Path] = []


def _postgres_ticks() -> int:
    """CPU ticks of the PostgreSQL server so far: the postmaster (with the backends it
    reaped) and its live backends; 0 without a server."""
    if not _PG_DATA:
        return 0
    try:
        postmaster = int((_PG_DATA[0] / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == postmaster:
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        elif int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total


def cpu_per_task(result: dict[str, Any], key: str = "coordinator_cpu") -> float:
    """Coordinator (or `db_cpu`: database server) CPU milliseconds per completed task."""
    uploads = result["tally"].uploads
    return 1000 * result[key] * result["window_s"] / uploads if uploads else math.nan


def summarise(result: dict[str, Any]) -> dict[str, object]:
    """One table row: rates, latency percentiles (ms), resources, answers by status."""
    tally: Tally = result["tally"]
    row: dict[str, object] = {
        "phase": result["phase"],
        "nodes": result["nodes"],
        "leases/s": result["leases_per_s"],
        "tasks/s": result["tasks_per_s"],
    }
    for endpoint in ("lease", "heartbeat", "upload"):
        values = tally.latencies.get(endpoint, [])
        # "-": no such request in the window (the baseline's tiles end before a heartbeat)
        row[f"{endpoint} p50 ms"] = 1000 * percentile(values, 0.5) if values else "-"
        row[f"{endpoint} p99 ms"] = 1000 * percentile(values, 0.99) if values else "-"
    by_status: Counter[str] = Counter()
    for key, count in tally.statuses.items():
        by_status[key.rsplit(" ", 1)[1]] += count
    row["coord cpu"] = f"{100 * result['coordinator_cpu']:.0f}%"
    row["cpu ms/task"] = cpu_per_task(result)
    row["db cpu ms/task"] = cpu_per_task(result, "db_cpu") if result["db_cpu"] else "-"
    row["client cpu"] = f"{100 * result['client_cpu']:.0f}%"
    row["peak rss MiB"] = result["peak_rss_mib"]
    row["503"] = by_status.get("503", 0)
    row["429"] = by_status.get("429", 0)
    row["other errors"] = sum(
        count for status, count in by_status.items() if status not in ("200", "204", "503", "429")
    )
    row["alive+ledger"] = "ok" if result["alive"] and result["ledger_ok"] else "FAILED"
    return row


@contextlib.contextmanager
def _databases(engines: list[str]) -> Iterator[Callable[[str], str | None]]:
    """`new_db(engine)`: None for SQLite (the phase's own file), else a new database on a
    throwaway PostgreSQL server started here (stopped on the way out)."""
    if "postgresql" not in engines:
        yield lambda engine: None
        return
    from tests.postgres_tools import start_postgres, stop_postgres

    server = start_postgres()
    _PG_DATA.append(server.folder / "data")
    try:
        yield lambda engine: None if engine == "sqlite" else server.new_database()
    finally:
        _PG_DATA.clear()
        stop_postgres(server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured per phase")
    parser.add_argument("--clients", type=int, default=1, help="client processes")
    parser.add_argument(
        "--render",
        type=float,
        nargs=2,
        default=(20.0, 40.0),
        metavar=("MIN", "MAX"),
        help="seconds a simulated tile takes (uniform; default 20 40)",
    )
    parser.add_argument(
        "--heartbeat", type=float, default=5.0, help="heartbeat interval (s) of the load phase"
    )
    parser.add_argument("--quick", action="store_true", help="100 nodes, 8 s windows")
    parser.add_argument("--only", choices=("baseline", "load", "overload"), action="append")
    parser.add_argument("--profile", help="cProfile the load phase's coordinator to this file")
    parser.add_argument(
        "--db",
        choices=("sqlite", "postgresql", "both"),
        default="sqlite",
        help="the coordinator's database engine; postgresql starts a throwaway PostgreSQL"
        " server (initdb/pg_ctl) with a fresh database per phase",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="on PostgreSQL, also run the load phase with this many coordinator replicas"
        " sharing the database and a store, the nodes split across them (1: not)",
    )
    args = parser.parse_args()
    if args.serve:
        serve_main(ServerOptions(**json.loads(args.serve)))
        return 0
    nodes, window = (100, 8.0) if args.quick else (args.nodes, args.window)
    render = (args.render[0], args.render[1])
    if args.quick:
        render = (2.0, 4.0)
    phases = args.only or ["baseline", "load", "overload"]
    engines = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch_dir, _databases(engines) as new_db:
        scratch = Path(scratch_dir)
        for engine in engines:
            suffix = "" if engine == "sqlite" else "-pg"
            common: dict[str, Any] = {"db_url": new_db(engine)}
            if "baseline" in phases:
                results["baseline" + suffix] = run_phase(
                    "baseline" + suffix,
                    scratch,
                    nodes=10,
                    window=min(window, 15.0),
                    render=BASELINE_RENDER,
                    **common,
                )
            if "load" in phases:
                common["db_url"] = new_db(engine)
                results["load" + suffix] = run_phase(
                    "load" + suffix,
                    scratch,
                    nodes=nodes,
                    window=window,
                    render=render,
                    heartbeat=args.heartbeat,
                    clients=args.clients,
                    profile=args.profile,
                    **common,
                )
            if "load" in phases and engine == "postgresql" and args.replicas > 1:
                results[f"load-pg-x{args.replicas}"] = run_phase(
                    f"load-pg-x{args.replicas}",
                    scratch,
                    nodes=nodes,
                    window=window,
                    render=render,
                    heartbeat=args.heartbeat,
                    clients=args.clients,
                    db_url=new_db(engine),
                    replicas=args.replicas,
                )
            if "overload" in phases:
                common["db_url"] = new_db(engine)
                results["overload" + suffix] = run_phase(
                    "overload" + suffix,
                    scratch,
                    nodes=nodes,
                    window=min(window, 20.0),
                    render=(0.5, 1.5),
                    clients=args.clients,
                    max_concurrent=OVERLOAD_CONCURRENT,
                    max_waiting=max(10, nodes // 10),
                    **common,
                )
    rows = [summarise(result) for result in results.values()]
    by_phase = {str(row["phase"]): row for row in rows}
    for first, second, label in (
        ("baseline", "load", "load/baseline"),
        ("baseline-pg", "load-pg", "load-pg/baseline-pg"),
        ("load", "load-pg", "load-pg/load"),
        ("load-pg", f"load-pg-x{args.replicas}", f"load-pg-x{args.replicas}/load-pg"),
    ):
        if first in by_phase and second in by_phase:
            ratios: dict[str, object] = {"phase": label}
            for column in ("tasks/s", "lease p99 ms", "upload p99 ms", "cpu ms/task"):
                a, b = by_phase[first][column], by_phase[second][column]
                ratios[column] = f"{float(b) / float(a):.1f}x"  # type: ignore[arg-type]
            rows.append(ratios)
    columns = list(summarise(next(iter(results.values()))).keys()) if results else []
    report("load", rows, columns)
    failed = False
    for result in results.values():
        tally: Tally = result["tally"]
        print(
            f"{result['phase']}: {result['registered']}/{result['nodes']} nodes registered,"
            f" {result['tasks_done']} tasks done in {result['jobs']} jobs,"
            f" {tally.overloaded} answers 429/503 ({tally.without_retry_after} without"
            f" Retry-After), {len(tally.recoveries)} recoveries (p99"
            f" {percentile(tally.recoveries, 0.99):.1f} s), {tally.unrecovered} nodes refused"
            f" without a success for the last {STUCK_SECONDS:.0f} s;"
            f" coordinator alive={result['alive']} health={result['health']}"
            f" ledger ok={result['ledger_ok']} exit={result['exit_status']};"
            f" {result['phase_seconds']:.0f} s"
        )
        errors = {k: v for k, v in tally.statuses.items() if k.split()[1] not in OK_STATUSES}
        if errors:
            print(f"  answers other than {'/'.join(OK_STATUSES)}: {errors}")
        failed |= not (result["alive"] and result["ledger_ok"]) or tally.without_retry_after > 0
        failed |= any(
            (key.split()[1].startswith("5") and key.split()[1] != "503") or "conn-error" in key
            for key in tally.statuses
        )
    print(f"whole run: {time.monotonic() - started:.0f} s")
    print(
        "ratios: 'load/baseline' divides the load phase's figure by the baseline's, measured"
        " in this run: 100x the nodes at a similar task rate (the baseline's tiles are short)."
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

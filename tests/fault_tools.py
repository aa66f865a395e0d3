"""Tools for fault tests: a TCP proxy that breaks uploads on purpose, a coordinator process
started from a `CoordinatorConfig` (every field settable, killable and restartable on
the same port), node daemons in threads, and the end-of-test checks every fault test
makes (the ledger balances, no task paid twice, the database is intact).

Run as a module it is that coordinator process:
``python -m tests.fault_tools --data DIR --port P --config '{"lease_seconds": 3}'``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm_node.bundle_cache import BundleCache
from farm_node.config import NodeConfig
from farm_node.daemon import NodeDaemon
from farm_node.runner import TaskRunner
from protocol.client import TesseraClient
from renderers.builds import BlenderBuild
from tests.farm_tools import REPO, RunningCoordinator

_UPLOAD = re.compile(rb"PUT /api/v1/leases/([^/ ]+)/result HTTP/1\.1\r\n")
_HEAD_END = b"\r\n\r\n"


# --- a proxy that breaks uploads -------------------------------------------------------------


@dataclass
class _Pair:
    client: socket.socket
    server: socket.socket
    head: bytearray = field(default_factory=bytearray)  # request bytes not yet classified
    cut_after: int | None = None  # body bytes still to forward before cutting
    drop_reply: bool = False  # the upload in flight loses its reply
    lease: str = ""


class FaultyProxy:
    """A TCP proxy on 127.0.0.1 in front of a coordinator that breaks result uploads
    (``PUT /api/v1/leases/{id}/result``): the first upload of the n-th lease it sees
    suffers ``plan[n]`` (the node's retries of that upload pass):

    - ``"cut"``: forward the request head and `cut_body_after` bytes of the body, then
      close both connections (the network went away mid-upload; the coordinator never
      gets the whole body);
    - ``"drop"``: forward the whole upload, and when the coordinator answers, close both
      connections instead of passing the answer on (the coordinator accepted the result,
      the node never hears it);
    - ``"pass"`` (and every lease past the plan): untouched.

    Everything else passes untouched. One thread, `selectors`; `close()` stops it.
    `events` lists what it did: ("cut", lease_id) / ("dropped", lease_id), and
    ("upload", lease_id) for every upload it saw.
    """

    def __init__(
        self,
        target_port: int,
        plan: tuple[str, ...] = (),
        *,
        cut_body_after: int = 1000,
    ) -> None:
        self.target_port = target_port
        self.cut_body_after = cut_body_after
        self._plan = list(plan)
        self._leases: set[str] = set()
        self.events: list[tuple[str, str]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="faulty-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def retarget(self, port: int) -> None:
        """Send new connections to another port (the coordinator restarted elsewhere)."""
        self.target_port = port

    def seen(self, kind: str) -> list[str]:
        with self._lock:
            return [lease for what, lease in self.events if what == kind]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.1):
                if key.data is None:
                    self._accept()
                    continue
                pair, from_client = key.data
                try:
                    self._pump(pair, from_client)
                except OSError:
                    self._close(pair)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            client.close()  # the coordinator is down: the client sees a refused request
            return
        for sock in (client, server):
            sock.setblocking(True)
            sock.settimeout(10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(client, server)
        self._selector.register(client, selectors.EVENT_READ, (pair, True))
        self._selector.register(server, selectors.EVENT_READ, (pair, False))

    def _pump(self, pair: _Pair, from_client: bool) -> None:
        source = pair.client if from_client else pair.server
        data = source.recv(1 << 16)
        if not data:
            self._close(pair)
            return
        if not from_client:
            if pair.drop_reply:
                self._record("dropped", pair.lease)
                self._close(pair)
                return
            pair.client.sendall(data)
            return
        if pair.cut_after is not None:
            self._forward_until_cut(pair, data)
            return
        pair.head += data
        match = _UPLOAD.search(pair.head)
        end = pair.head.find(_HEAD_END, match.end() - 2) if match else -1
        if match is None or end < 0:
            pair.server.sendall(data)
            if match is None:
                del pair.head[: max(0, len(pair.head) - 200)]  # keep a possible split line
            return
        # An upload's head is complete: is it one to break?
        pair.lease = match.group(1).decode()
        self._record("upload", pair.lease)
        body_start = end + len(_HEAD_END)
        buffered, pair.head = bytes(pair.head), bytearray()
        already = len(buffered) - len(data)  # head bytes forwarded with earlier chunks
        with self._lock:
            fault = "pass"
            if pair.lease not in self._leases and self._plan:
                fault = self._plan.pop(0)
            self._leases.add(pair.lease)
        if fault == "cut":
            pair.server.sendall(buffered[already:body_start])
            pair.cut_after = self.cut_body_after
            self._forward_until_cut(pair, buffered[body_start:])
            return
        pair.drop_reply = fault == "drop"
        pair.server.sendall(buffered[already:])

    def _forward_until_cut(self, pair: _Pair, body: bytes) -> None:
        assert pair.cut_after is not None
        if len(body) < pair.cut_after:
            pair.server.sendall(body)
            pair.cut_after -= len(body)
            return
        pair.server.sendall(body[: pair.cut_after])
        self._record("cut", pair.lease)
        self._close(pair)

    def _record(self, kind: str, lease: str) -> None:
        with self._lock:
            self.events.append((kind, lease))

    def _close(self, pair: _Pair) -> None:
        for sock in (pair.client, pair.server):
            with suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


# --- a coordinator process from a config ----------------------------------------------------


def start_config_coordinator(data_dir: Path, port: int = 0, **config: Any) -> RunningCoordinator:
    """`python -m tests.fault_tools` on `port` (0: the OS chooses) with `CoordinatorConfig`
    fields from `config` (``verification`` as a dict of `VerificationPolicy` fields)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / f"coordinator-{time.monotonic_ns()}.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [
        sys.executable,
        "-m",
        "tests.fault_tools",
        "--data",
        str(data_dir),
        "--port",
        str(port),
        "--config",
        json.dumps(config),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        found = re.search(r"listening on (\S+)", text)
        if found:
            return RunningCoordinator(process, found.group(1), data_dir, log)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"coordinator did not start:\n{log.read_text(errors='replace')}")


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _serve_from_args(argv: list[str]) -> None:
    from coordinator.config import CoordinatorConfig
    from coordinator.server import serve
    from coordinator.verify.policy import VerificationPolicy

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--config", default="{}")
    args = parser.parse_args(argv)
    fields = json.loads(args.config)
    if "verification" in fields:
        fields["verification"] = VerificationPolicy(**fields["verification"])
    if "shared_store" in fields:
        fields["shared_store"] = Path(fields["shared_store"])
    config = CoordinatorConfig(data_dir=args.data, **fields)

    def ready(url: str, _token: str | None) -> None:
        print(f"Tessera coordinator listening on {url}", flush=True)

    with suppress(KeyboardInterrupt):
        serve(config, "127.0.0.1", args.port, on_ready=ready)


# --- nodes in threads -------------------------------------------------------------------------


@dataclass
class NodeThread:
    daemon: NodeDaemon
    client: TesseraClient
    thread: threading.Thread
    stop_event: threading.Event

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(60)
        self.client.close()
        assert not self.thread.is_alive(), "the node did not stop"


@contextmanager
def running_nodes(
    build: BlenderBuild, url: str, tokens: list[str], folder: Path, **client_options: Any
) -> Iterator[list[NodeThread]]:
    """Real `NodeDaemon`s (one Blender worker each, one thread) against `url`, quick to
    retry; stopped on the way out."""
    nodes: list[NodeThread] = []
    try:
        for index, token in enumerate(tokens):
            config = NodeConfig(
                coordinator_url=url,
                data_dir=folder / f"node{index}",
                token=token,
                name=f"node{index}",
                threads=1,
                poll_wait=0.5,
                benchmark=False,
                retry_initial=0.1,
                retry_max=0.5,
                price=1.0,  # paid work, so that the ledger has payments to check
            )
            options: dict[str, Any] = {"retries": 2, "backoff": 0.1, "timeout": 10.0}
            options.update(client_options)
            client = TesseraClient(url, token, **options)
            runner = TaskRunner(build, config.scratch_dir, threads=1, task_timeout=120)
            daemon = NodeDaemon(config, client, runner, BundleCache(config.cache_dir, 1 << 30))
            stop = threading.Event()
            thread = threading.Thread(target=daemon.run, args=(stop,), name=f"node{index}")
            thread.start()
            nodes.append(NodeThread(daemon, client, thread, stop))
        yield nodes
    finally:
        for node in nodes:
            node.stop_event.set()
        for node in nodes:
            node.stop()


# --- the checks every fault test ends with ----------------------------------------------------


def assert_books_balance(admin: TesseraClient, db_path: Path, job_id: str) -> None:
    """The ledger check passes; no task was paid twice; every completed tile of the job
    was paid (a duplicate sample of a few pixels may be worth less than a milli-credit);
    every accepted upload is one completed task."""
    check = admin.ledger_check()
    assert check.ok, check.problems
    with closing(sqlite3.connect(db_path)) as conn:
        paid = dict(
            conn.execute(
                "SELECT task_id, COUNT(*) FROM ledger_txns WHERE kind = 'pay' AND job_id = ?"
                " GROUP BY task_id",
                (job_id,),
            ).fetchall()
        )
        completed = dict(
            conn.execute(
                "SELECT id, kind FROM tasks WHERE job_id = ? AND status = 'completed'", (job_id,)
            ).fetchall()
        )
        counted = conn.execute("SELECT COALESCE(SUM(tasks_completed), 0) FROM nodes").fetchone()[0]
    assert all(count == 1 for count in paid.values()), f"paid more than once: {paid}"
    assert set(paid) <= set(completed), "a task was paid but not completed"
    tiles = {task for task, kind in completed.items() if kind == "render"}
    assert tiles and tiles <= set(paid), f"tiles never paid: {sorted(tiles - set(paid))}"
    assert counted == len(completed), f"{counted} uploads accepted, {len(completed)} completed"


def integrity(db_path: Path) -> str:
    """SQLite's own `PRAGMA integrity_check` of the coordinator's database ("ok")."""
    with closing(sqlite3.connect(db_path)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


if __name__ == "__main__":
    _serve_from_args(sys.argv[1:])

"""A whole farm on this machine: one coordinator and N node processes on 127.0.0.1.

`tessera render --nodes N` and `tessera demo` use it; so do the end-to-end tests and the
farm benchmarks. Every piece is a real process started through the `tessera` CLI, so
what runs here is exactly what runs on a studio's machines. Stopping asks each process
to finish (SIGINT) and kills what does not within a grace period. No Qt here.

Every node is a provider of its own: an account named like the node ("local-1", ...)
with a token of its own, so the coordinator's duplicate sampling (which needs another
account) can check one local node against another. `cheats` adds nodes that cheat on
purpose ("cheater-1-samples", ...: ``tessera node --cheat MODE``), each with its own
account too, to demonstrate that verification catches them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import TesseraError

STARTUP_SECONDS = 60.0
#: Polls during start-up (the coordinator's log, the nodes' registration) begin this
#: often and slow down to the second figure: the farm is waited for, not slept past.
POLL_FIRST_SECONDS = 0.005
POLL_MAX_SECONDS = 0.05
#: What each node of a `tessera render`/`demo` (or the app's local) farm asks per work
#: unit, and the credits its requester starts with.
LOCAL_PRICE = 1.0
LOCAL_CREDITS = 1_000_000.0
#: The requester account that submits the farm's jobs.
REQUESTER = "local"


@dataclass(frozen=True, slots=True)
class LocalNode:
    """One node process of a `LocalFarm`: its name, provider account and token."""

    name: str
    account: str
    token: str
    #: The node's `--cheat` mode, or None for an honest node.
    cheat: str | None = None


class LocalFarmError(TesseraError):
    default_hint = "Look at the log files in the farm's folder for what went wrong."


@dataclass
class LocalFarm:
    """Start with `start()` (or use `with`); `url` and `requester_token` reach the farm.

    `nodes` honest nodes ("local-1"...) come first, then one cheating node per entry of
    `cheats` (a `farm_node.cheats.CheatMode` name each: "cheater-1-samples"...). Every
    node has a provider account of its own, named like it (`local_nodes`); `node_names`
    and `node_process(i)` follow the same order. `admin_token` is the coordinator's.
    """

    folder: Path
    nodes: int = 2
    threads_per_node: int = 0
    device: str = "CPU"
    node_env: list[dict[str, str]] = field(default_factory=list)
    coordinator_args: list[str] = field(default_factory=list)
    node_args: list[str] = field(default_factory=list)
    #: Credits per work unit every node asks (0: free), and credits granted to the local
    #: requester, so that a local run shows the ledger at work.
    price: float = 0.0
    credits: float = 0.0
    cheats: list[str] = field(default_factory=list)
    #: A lasting folder for the nodes' benchmark scores (one file per thread count), so
    #: that a farm started afresh each time measures them once; None: each node's own.
    benchmark_cache: Path | None = None
    url: str = ""
    admin_token: str = ""
    requester_token: str = ""
    #: The first node's token (kept for callers from before each node had its own).
    provider_token: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    node_names: list[str] = field(default_factory=list)
    local_nodes: list[LocalNode] = field(default_factory=list)
    #: How each node was started (arguments, extra environment), to restart it.
    _node_launch: list[tuple[list[str], dict[str, str]]] = field(default_factory=list)
    #: When (time.monotonic()) the coordinator was listening and the nodes registered.
    marks: dict[str, float] = field(default_factory=dict)
    _starter: threading.Thread | None = None
    _start_error: BaseException | None = None
    #: Set by `stop`: a start under way gives up waiting at once.
    _stopping: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> LocalFarm:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start_in_background(self) -> None:
        """Start the farm in a thread, so the caller can inspect and pack its scene
        meanwhile; `wait_started` waits for it (and raises what went wrong)."""

        def run() -> None:
            try:
                self.start()
            except BaseException as exc:  # handed to wait_started, in the caller's thread
                self._start_error = exc

        self._starter = threading.Thread(target=run, name="local-farm-start", daemon=True)
        self._starter.start()

    def wait_started(self) -> None:
        """Wait for `start_in_background` to finish; raise its error, if any."""
        if self._starter is not None:
            self._starter.join()
        if self._start_error is not None:
            raise self._start_error

    def start(self) -> None:
        """Start the coordinator and the nodes side by side: each node does its own
        set-up (sandbox, Blender) while the coordinator starts, then reads the URL and
        its token from files (`tessera node --coordinator-file/--token-file`)."""
        # The HTTP client (requests, pydantic) is imported once the processes are
        # spawned, so that their start overlaps this import.
        self.folder.mkdir(parents=True, exist_ok=True)
        self._stopping.clear()
        try:
            log, offset = self._spawn_coordinator(0)
            plans = self._plan_nodes()
            cpus = sorted(os.sched_getaffinity(0))
            threads = self.threads_per_node or max(1, len(cpus) // max(1, len(plans)))
            for index, (name, cheat) in enumerate(plans):
                env = self.node_env[index] if index < len(self.node_env) else {}
                args = self._node_args(name, cheat, threads, index, len(plans), cpus)
                self._node_launch.append((args, env))
                self.processes.append(self._spawn(args, self.folder / f"{name}.log", env))
                self.node_names.append(name)
            from protocol.client import TesseraClient
            from protocol.models import Role

            self.url = self._wait_for_line(log, "listening on ", offset).strip()
            self.marks["coordinator_listening"] = time.monotonic()
            self.admin_token = (self.folder / "coordinator" / "admin.token").read_text().strip()
            with TesseraClient(self.url, self.admin_token) as admin:
                # Each node's token first: the node registers while the requester's
                # account is made.
                self.local_nodes = []
                for name, cheat in plans:
                    node = LocalNode(
                        name, name, admin.create_account(name, Role.PROVIDER).token, cheat
                    )
                    _write_secret(self._token_file(node.name), node.token)
                    self.local_nodes.append(node)
                self.requester_token = admin.create_account(REQUESTER, Role.REQUESTER).token
                if self.credits > 0:
                    admin.grant(REQUESTER, self.credits)
            self.provider_token = self.local_nodes[0].token if self.local_nodes else ""
            self._wait_for_nodes()
            self.marks["nodes_registered"] = time.monotonic()
        except BaseException:
            self.stop()
            raise

    def _node_args(
        self, name: str, cheat: str | None, threads: int, index: int, count: int, cpus: list[int]
    ) -> list[str]:
        args = [
            "node",
            "--coordinator-file",
            str(self.folder / "coordinator" / "coordinator.url"),
            "--token-file",
            str(self._token_file(name)),
            "--name",
            name,
            "--threads",
            str(threads),
            "--device",
            self.device,
            "--data",
            str(self.folder / name),
            *(["--price", f"{self.price:g}"] if self.price > 0 else []),
            *self.node_args,
        ]
        if cheat is not None:
            args += ["--cheat", cheat]
        if self.benchmark_cache is not None:
            cache = self.benchmark_cache / f"benchmark-{threads}-threads.json"
            args += ["--benchmark-cache", str(cache)]
        if threads * count <= len(cpus):
            # Nodes sharing a machine get cores of their own (see worker_main).
            own = cpus[index * threads : (index + 1) * threads]
            args += ["--cpus", ",".join(map(str, own))]
        return args

    def _token_file(self, name: str) -> Path:
        return self.folder / "tokens" / f"{name}.token"

    def _plan_nodes(self) -> list[tuple[str, str | None]]:
        """(name, cheat) of every node: the honest ones, then the cheaters."""
        honest: list[tuple[str, str | None]] = [
            (f"local-{index + 1}", None) for index in range(self.nodes)
        ]
        if not self.cheats:  # farm_node.cheats loads numpy, OpenEXR and the node's runner
            return honest
        from farm_node.cheats import parse_cheat

        modes = [parse_cheat(mode).value for mode in self.cheats]
        cheaters: list[tuple[str, str | None]] = [
            (f"cheater-{index + 1}-{mode}", mode) for index, mode in enumerate(modes)
        ]
        return honest + cheaters

    def start_coordinator(self, port: int = 0) -> None:
        """Start (or, after a crash, restart on `port`) the coordinator process."""
        self._stopping.clear()
        log, offset = self._spawn_coordinator(port)
        self.url = self._wait_for_line(log, "listening on ", offset).strip()

    def _spawn_coordinator(self, port: int) -> tuple[Path, int]:
        """Start the coordinator process; its log and where this start's lines begin."""
        log = self.folder / "coordinator.log"
        offset = log.stat().st_size if log.exists() else 0
        args = [
            "coordinator",
            "--port",
            str(port),
            "--data",
            str(self.folder / "coordinator"),
            *self.coordinator_args,
        ]
        process = self._spawn(args, log)
        if self.processes:
            self.processes[0] = process
        else:
            self.processes.append(process)
        return log, offset

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, grace: float = 20.0, *, together: bool = False) -> None:
        """SIGINT the nodes, then the coordinator (so nodes can hand back their leases);
        kill whatever is still running after `grace` seconds. A start still under way
        in the background is waited for first.

        `together`: signal every process at once, for a farm whose work is over (no
        lease to hand back; the coordinator's shutdown ends the nodes' polls)."""
        self._stopping.set()  # a start under way stops waiting (and stops what it began)
        starter = self._starter
        if starter is not None and starter is not threading.current_thread():
            starter.join()
        nodes, coordinator = self.processes[1:], self.processes[:1]
        groups = [nodes + coordinator] if together else [nodes, coordinator]
        for group in groups:
            for process in group:
                if process.poll() is None:
                    process.send_signal(signal.SIGINT)
            deadline = time.monotonic() + grace
            for process in group:
                try:
                    process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()

    def node_process(self, index: int) -> subprocess.Popen[bytes]:
        return self.processes[1 + index]

    def kill_node(self, index: int) -> None:
        """Kill node `index` at once (SIGKILL, as a crash or a power cut would)."""
        process = self.node_process(index)
        if process.poll() is None:
            process.kill()
            process.wait()

    def restart_node(self, index: int) -> None:
        """Start node `index` again with its own name, token and data folder."""
        args, env = self._node_launch[index]
        log = self.folder / f"{self.node_names[index]}.log"
        self.processes[1 + index] = self._spawn(args, log, env)

    def _spawn(
        self, args: list[str], log: Path, env_extra: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(env_extra or {})
        with log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "app.cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=Path(__file__).resolve().parent.parent,
            )

    def _polls(self) -> Iterator[None]:
        """One step per poll until STARTUP_SECONDS have passed, waiting a few
        milliseconds at first and longer later (POLL_*_SECONDS); a `stop` ends it with
        `LocalFarmError`."""
        deadline = time.monotonic() + STARTUP_SECONDS
        delay = POLL_FIRST_SECONDS
        while time.monotonic() < deadline:
            yield
            if self._stopping.wait(delay):
                raise LocalFarmError("The farm was stopped while it started.")
            delay = min(delay * 1.5, POLL_MAX_SECONDS)

    def _wait_for_line(self, log: Path, marker: str, offset: int = 0) -> str:
        for _ in self._polls():
            text = log.read_bytes()[offset:].decode(errors="replace") if log.exists() else ""
            for line in text.splitlines():
                if marker in line:
                    return line.split(marker, 1)[1]
            if any(p.poll() is not None for p in self.processes):
                raise LocalFarmError(f"A farm process exited during start-up:\n{text[-2000:]}")
        raise LocalFarmError(f"The coordinator did not start within {STARTUP_SECONDS:.0f} s.")

    def _wait_for_nodes(self) -> None:
        from protocol.client import TesseraClient

        with TesseraClient(self.url, self.requester_token) as client:
            for _ in self._polls():
                registered = {node.capabilities.name for node in client.nodes()}
                if set(self.node_names) <= registered:
                    return
                dead = [p for p in self.processes if p.poll() is not None]
                if dead:
                    raise LocalFarmError(
                        f"A node exited during start-up; see the node logs in {self.folder}"
                    )
        raise LocalFarmError(f"The nodes did not register within {STARTUP_SECONDS:.0f} s.")


def _write_secret(path: Path, text: str) -> None:
    """Write `text` and a newline to `path`, readable by this user only, whole or not at
    all (a node waiting for the file reads it once it holds a line)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    handle = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(handle, "w") as out:
        out.write(text + "\n")
    partial.replace(path)

"""A provider node on this machine, for the desktop app's Provide page (no Qt here).

`probe_machine` reports what this machine offers (CPU, memory, NVIDIA GPUs through
NVML); `NodeLaunch` is everything `tessera node` is started with, and `NodeProcess` runs
it as a child process, exactly the command a studio runs, with its log in the node's
data folder; `check_provider_token`, `join_as_provider` and `fetch_provider_stats` ask
the coordinator. Everything here blocks or reads files: call it from background work.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from app.connection import FarmConnection
from common.errors import TesseraError, UsageError
from farm_node.hardware import CPUINFO, MEMINFO, parse_cpuinfo, parse_meminfo, read_proc_file
from protocol.accounts import (
    Wallet,
)
from protocol.client import TesseraClient
from protocol.models import (
    NodeInfo,
    Role,
)
from renderers.devices import NvidiaGpu, probe_nvidia

#: Where nodes keep their cache when the Settings page names no folder, and its limit.
DEFAULT_CACHE_GB = 50.0
#: How long a stopping node may finish or hand back its task before it is killed.
STOP_GRACE_SECONDS = 40.0
LOG_FILE = "node.log"
LOG_LINES = 8


class ProviderTokenError(TesseraError):
    default_hint = (
        "Paste a provider token under 'Provider token' (the farm's admin creates one), or "
        "join the farm's LAN with its name and secret on the Settings page."
    )


# --- plain models ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MachineReport:
    """What this machine offers: its CPU, memory and NVIDIA cards (none: CPU only)."""

    cpu: str
    threads: int
    ram_mib: int
    gpus: tuple[NvidiaGpu, ...] = ()

    @property
    def devices(self) -> list[str]:
        """The devices a node here can render with: the CPU, and OptiX/CUDA with a card."""
        return ["CPU", "OPTIX", "CUDA"] if self.gpus else ["CPU"]


def probe_machine() -> MachineReport:
    """Read /proc and NVML (background only: it reads files and loads a library)."""
    cpu, threads = parse_cpuinfo(read_proc_file(CPUINFO))
    return MachineReport(
        cpu, threads, parse_meminfo(read_proc_file(MEMINFO)), tuple(probe_nvidia())
    )


@dataclass(frozen=True, slots=True)
class ProviderStats:
    """This node as the coordinator sees it (None: not registered yet) and the provider's
    wallet."""

    node: NodeInfo | None
    wallet: Wallet | None


@dataclass(frozen=True, slots=True)
class NodeState:
    """A snapshot of the node process: running or its exit code, and its log's last lines."""

    running: bool
    exit_code: int | None
    log_tail: str


@dataclass(frozen=True, slots=True)
class NodeLaunch:
    """Everything `tessera node` is started with."""

    coordinator: str
    token: str
    name: str
    data_dir: Path
    device: str = "CPU"
    price: float = 0.0
    cache_gb: float = DEFAULT_CACHE_GB
    when: str = "always"
    hours: tuple[int, int] = (22, 7)
    idle_after: float = 300.0
    gpu_temp_max: float = 0.0
    blender: Path | None = None
    extra_args: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        """The command line (the token travels in the environment, not in `ps`)."""
        args = [
            sys.executable,
            "-m",
            "app.cli",
            "node",
            "--coordinator",
            self.coordinator,
            "--name",
            self.name,
            "--device",
            self.device,
            "--price",
            f"{self.price:g}",
            "--data",
            str(self.data_dir),
            "--cache-gb",
            f"{self.cache_gb:g}",
        ]
        if self.when != "always":
            if not node_knows_policies():
                raise UsageError(
                    "This version of Tessera's node renders always: it cannot wait for idle "
                    "time or for hours yet.",
                    hint="Choose 'Always' under 'When to render'.",
                )
            args += ["--when", self.when]
            if self.when == "hours":
                args += ["--hours", f"{self.hours[0]}-{self.hours[1]}"]
            else:
                args += ["--idle-after", f"{self.idle_after:g}"]
        if self.gpu_temp_max > 0:
            args += ["--gpu-temp-max", f"{self.gpu_temp_max:g}"]
        if self.blender is not None:
            args += ["--blender", str(self.blender)]
        return args + list(self.extra_args)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TESSERA_TOKEN")}
        env["TESSERA_TOKEN"] = self.token
        return env


def node_knows_policies() -> bool:
    """Whether `tessera node` has --when (farm_node.availability)."""
    return importlib.util.find_spec("farm_node.availability") is not None


def check_provider_token(connection: FarmConnection) -> str:
    """The account name of a provider token; a requester's or an admin's token is refused
    with what to do (background only: asks the coordinator)."""
    if not connection.token:
        raise ProviderTokenError(f"No token for the coordinator at {connection.url}.")
    with connection.client() as client:
        me = client.me()
    if me.role is not Role.PROVIDER:
        raise ProviderTokenError(
            f"Your token belongs to the {me.role.value} account '{me.account}': a node needs "
            "a provider token."
        )
    return me.account


def join_as_provider(url: str, secret: str, name: str) -> FarmConnection:
    """A provider token for node `name` from a LAN farm's coordinator at `url`, traded
    for the farm's secret (background only)."""
    with TesseraClient(url, retries=1) as anonymous:
        token = anonymous.join_lan_farm(name, secret, role=Role.PROVIDER).token
    return FarmConnection(url, token)


def fetch_provider_stats(connection: FarmConnection, name: str) -> ProviderStats:
    """The node called `name` and the provider's wallet (background only)."""
    with connection.client() as client:
        nodes = client.nodes()
        node = next((n for n in nodes if n.capabilities.name == name), None)
        if node is None:  # a node of several workers (one per GPU): name/gpu0, name/cpu...
            node = combine_workers(
                name, [n for n in nodes if n.capabilities.name.startswith(f"{name}/")]
            )
        return ProviderStats(node, client.wallet())


def combine_workers(name: str, workers: list[NodeInfo]) -> NodeInfo | None:
    """One entry for a node of several workers: each worker's state in `paused` ("gpu0:
    warming up OPTIX ...; gpu1: idle"), tasks and credits added up; None without any."""
    if not workers:
        return None
    states = "; ".join(
        f"{w.capabilities.name.removeprefix(name + '/')}: {w.paused or w.status}" for w in workers
    )
    busy = next((w for w in workers if w.current_task), None)
    first = workers[0]
    return first.model_copy(
        update={
            "capabilities": first.capabilities.model_copy(update={"name": name}),
            "status": "busy" if busy else first.status,
            "paused": states,
            "current_task": None if busy is None else busy.current_task,
            "tasks_completed": sum(w.tasks_completed for w in workers),
            "tasks_failed": sum(w.tasks_failed for w in workers),
            "earned": sum(w.earned for w in workers),
        }
    )


def last_lines(path: Path, count: int = LOG_LINES) -> str:
    """The last `count` lines of a log file ("" when there is none yet)."""
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 8192))
            text = log.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-count:])


class NodeProcess:
    """`tessera node` as a child process. `start` and `stop` block (seconds): call them
    from background work. Stopping asks the node to finish or hand back its task
    (SIGINT), and kills it after `grace` seconds."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def log_path(self) -> Path | None:
        return self._log

    def running(self) -> bool:
        with self._lock:
            return self._process is not None and self._process.poll() is None

    def start(self, launch: NodeLaunch) -> None:
        argv = launch.argv()  # refuses what the node cannot do before anything starts
        launch.data_dir.mkdir(parents=True, exist_ok=True)
        log = launch.data_dir / LOG_FILE
        with self._lock:
            if self._closed:
                raise UsageError("The app is closing: the node was not started.")
            if self._process is not None and self._process.poll() is None:
                raise UsageError("This machine's node is already running.")
            with log.open("ab") as out:
                self._process = subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=launch.env(),
                    cwd=Path(__file__).resolve().parents[1],
                )
            self._log = log

    def state(self) -> NodeState:
        with self._lock:
            process, log = self._process, self._log
        code = process.poll() if process is not None else None
        tail = last_lines(log) if log is not None else ""
        return NodeState(process is not None and code is None, code, tail)

    def close(self) -> NodeState:
        """Stop the node for good: a start still on its way is refused."""
        with self._lock:
            self._closed = True
        return self.stop()

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> NodeState:
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return self.state()

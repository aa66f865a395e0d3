"""What a node is told once, before it starts: `NodeConfig` and the rules for its values.

The CLI builds a `NodeConfig` from its options; tests build their own. Nothing here
reads the environment or settings at import time, starts a thread or touches the disk.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from common.errors import UsageError
from farm_node.availability import ProvidePolicy
from farm_node.bundle_cache import DEFAULT_MAX_FILES, DEFAULT_MAX_UNCOMPRESSED_BYTES
from farm_node.hardware import NO_AVX2_ENV
from farm_node.runner import DEFAULT_MAX_WARM
from farm_node.warmup import DEFAULT_WARMUP_TIMEOUT
from farm_node.workers import GpuSelection
from protocol.client import split_urls
from renderers.devices import normalise_device_name
from renderers.worker import RenderLimits

__all__ = ["CHEAT_MODES", "FORWARDED_ENV", "NodeConfig"]

#: What `NodeConfig.cheat` may be (besides None): the `farm_node.cheats.CheatMode` values.
CHEAT_MODES = ("samples", "copy", "noise", "black", "sometimes")
#: Environment variables of the node's own process that must reach Blender although the
#: render environment is scrubbed (they choose the CPU kernel, see hardware.cpu_kernel).
FORWARDED_ENV = (NO_AVX2_ENV,)


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs, passed in once (the CLI builds it; tests build their own).

    `data_dir` holds ``bundles/`` (the cache), ``results/`` (finished EXRs until
    delivered), ``scratch/`` (Blender's private folders, partial outputs) and
    ``benchmark.json``. `stop_grace`: seconds a running task may take to finish after a
    stop before it is cancelled and released. `heartbeat_grace`: seconds a render goes on
    while no heartbeat gets through (by then the coordinator has re-queued the task); None
    renders on regardless. `retry_initial`/`retry_max` bound the backoff while the
    coordinator is unreachable.
    """

    coordinator_url: str
    data_dir: Path
    token: str | None = None
    name: str = field(default_factory=socket.gethostname)
    device: str = "CPU"
    threads: int = 0
    cache_max_bytes: int = 50 << 30
    stop_grace: float = 30.0
    heartbeat_grace: float | None = 300.0
    poll_wait: float = 5.0  # also bounds how long Ctrl-C waits for an idle poll to end
    task_timeout: float | None = 3600.0
    blender_executables: list[Path] = field(default_factory=list)
    #: Other Blender builds to offer (``tessera blender add``): executables or Pythons
    #: with bpy; a job renders on the build of the series that saved its scene.
    more_builds: list[Path] = field(default_factory=list)
    use_bpy: bool = True
    #: Files to read the coordinator URL and the token from, once they exist (see
    #: `farm_node.connection_files`); they replace `coordinator_url` and `token`.
    coordinator_file: Path | None = None
    token_file: Path | None = None
    #: Where the bpy build is remembered (`renderers.bpy_memo`; `tessera node` keeps it in
    #: `$TESSERA_HOME/bpy-build.json`, as every command does); None: probed each start.
    bpy_memo: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Credits asked per work unit (pixels x samples / 1e6); jobs offering less skip us.
    price: float = 0.0
    #: Pools this node asks to serve (`--pool`); the coordinator keeps those its
    #: account was added to and says which it refused.
    pools: list[str] = field(default_factory=list)
    benchmark: bool = True
    #: Where the benchmark score is kept (default: ``benchmark.json`` in `data_dir`); a
    #: throw-away node (`tessera render`'s) keeps it somewhere lasting, to measure once.
    benchmark_cache: Path | None = None
    max_warm_workers: int = DEFAULT_MAX_WARM
    retry_initial: float = 1.0
    retry_max: float = 60.0
    bundle_max_uncompressed_bytes: int = DEFAULT_MAX_UNCOMPRESSED_BYTES
    bundle_max_files: int = DEFAULT_MAX_FILES
    #: A `farm_node.cheats.CheatMode` name: fake renders to demonstrate verification.
    #: None (the default, and the only value for real work): an honest node.
    cheat: str | None = None
    #: When this node may render (always, idle only, in hours; GPU temperature cap).
    policy: ProvidePolicy = field(default_factory=ProvidePolicy)
    #: Memory, free disk and sandbox of every render (`renderers.worker.RenderLimits`).
    limits: RenderLimits = field(default_factory=RenderLimits)
    #: A JSON file whose readings replace the machine's probes (input idle seconds, GPU
    #: utilisation and temperature): for tests and for scripts that know better.
    machine_state_file: Path | None = None
    #: How often availability is checked while paused and while a task runs (seconds).
    availability_interval: float = 1.0
    #: Seconds without leasing after a task was refused for lack of disk space.
    disk_full_pause: float = 60.0
    #: ``--gpus``: "all", "none" or card indexes; None: "all" when `device` is a GPU
    #: type, else "none". One worker per card (`farm_node.workers.plan_workers`).
    gpus: GpuSelection | None = None
    #: ``--cpu-worker``: a CPU worker beside the GPU workers.
    cpu_worker: bool = False
    #: Set per worker by `farm_node.fleet`: its card's Cycles ids ("" = every device).
    device_ids: tuple[str, ...] = ()
    #: Whether a worker renders a warm-up frame before taking work: None = GPU workers
    #: only; True = every worker (a CPU stand-in in tests); False = none.
    warmup: bool | None = None
    #: The warm-up render's own time limit (seconds): kernel compilation can be long.
    warmup_timeout: float = DEFAULT_WARMUP_TIMEOUT
    #: Whether an idle node keeps a Blender started, confined to an empty slot, for the
    #: next new bundle (`TaskRunner.prestart`): its first frame then skips Blender's start.
    prestart: bool = True

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "bundles"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def scratch_dir(self) -> Path:
        return self.data_dir / "scratch"

    @property
    def benchmark_file(self) -> Path:
        return self.benchmark_cache or self.data_dir / "benchmark.json"

    @property
    def warms_up(self) -> bool:
        """Whether this worker renders a warm-up frame before it takes work."""
        if self.warmup is None:
            return self.device.strip().upper() != "CPU"
        return self.warmup

    def validate(self) -> None:
        """Fail fast, with the option's name, on values that cannot work."""
        problems: list[str] = []
        url: object = self.coordinator_url
        if not url:
            if self.coordinator_file is None:
                problems.append(
                    "no coordinator URL (pass --coordinator or set TESSERA_COORDINATOR)"
                )
        elif not isinstance(url, str) or not all(
            part.startswith(("http://", "https://")) for part in split_urls(url) or [url]
        ):
            problems.append(f"coordinator URL {url!r} is not http(s)://... (or URL1,URL2)")
        if not self.name.strip() or len(self.name) > 100:
            problems.append("the node name must be 1 to 100 characters")
        if self.price < 0:
            problems.append(f"--price must be 0 or more, not {self.price}")
        if self.threads < 0:
            problems.append(f"threads must be 0 (all cores) or more, not {self.threads}")
        if self.cache_max_bytes < 0:
            problems.append("the cache size must not be negative")
        if self.stop_grace < 0 or (self.heartbeat_grace is not None and self.heartbeat_grace <= 0):
            problems.append("grace periods must be positive")
        if not 0 <= self.poll_wait <= 60:
            problems.append(f"poll wait must be 0 to 60 s, not {self.poll_wait}")
        if self.task_timeout is not None and self.task_timeout <= 0:
            problems.append("the task timeout must be positive")
        if self.retry_initial <= 0 or self.retry_max < self.retry_initial:
            problems.append("retry delays must be positive, the maximum at least the first")
        if self.cheat is not None and self.cheat not in CHEAT_MODES:
            problems.append(f"--cheat must be one of {', '.join(CHEAT_MODES)}, not {self.cheat!r}")
        problems.extend(self.policy.problems())
        if not 0.05 <= self.availability_interval <= 60:
            problems.append(
                f"the availability interval must be 0.05 to 60 s, not {self.availability_interval}"
            )
        if self.warmup_timeout <= 0:
            problems.append(f"--warmup-timeout must be positive, not {self.warmup_timeout}")
        if self.disk_full_pause < 0:
            problems.append("the pause after a full disk must not be negative")
        if problems:
            raise UsageError("Invalid node settings: " + "; ".join(problems) + ".")
        normalise_device_name(self.device)


def loopback_url(url: str) -> bool:
    """Whether `url` names this machine (127.0.0.0/8, ::1 or localhost); for several
    replicas ("URL1,URL2"), whether every one does."""
    parts = split_urls(url)
    return bool(parts) and all(_loopback(part) for part in parts)


def _loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def sandbox_refusal(coordinator_url: str, mode: str, sandbox_works: bool) -> str | None:
    """Why a node must not start with this sandbox setting, or None when it may.

    Strangers' scenes render in bubblewrap by default. Without a working bubblewrap the
    default ("auto") still serves a coordinator on this machine (a local farm renders the
    user's own scenes), but refuses any other: only an explicit ``--sandbox off`` takes
    that risk.
    """
    if mode != "auto" or sandbox_works or loopback_url(coordinator_url):
        return None
    return (
        f"No render sandbox: bubblewrap is not installed or cannot run here, and "
        f"{coordinator_url} is not on this machine, so strangers' scenes would run with "
        "this user's rights (reading every file it can, using the network)."
    )

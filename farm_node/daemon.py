"""The provider node daemon: the composition root that turns leases into uploaded EXRs.

`NodeDaemon` owns the parts, each testable alone (the rqd habit): the hardware probe
(`hardware`), the coordinator client (`protocol.client`), the bundle cache
(`bundle_cache`) and the render runner (`runner`). Its loop:

1. deliver results still pending from an earlier attempt (or an earlier run);
2. register with the coordinator (retrying with exponential backoff and jitter while it
   is unreachable, logging a repeated error once);
3. long-poll for a lease; run its task with a heartbeat thread beside it (started and
   joined around the task) that reports progress and cancels the render when the
   coordinator says so or the lease is gone;
4. keep the finished EXR in ``results/`` with a JSON note (lease id, hash) until the
   coordinator has it, so losing the coordinator (or the node) loses no finished work.

Before each lease the node asks its `AvailabilityTracker` (`farm_node.availability`:
idle-only or scheduled providing, a GPU temperature cap) and checks the free disk space
its renders need (`RenderLimits.min_free_disk`); when either says no it does not poll,
and logs the reason once per change. While a task runs the heartbeat thread asks again
every `NodeConfig.availability_interval` seconds: when the user comes back (or the GPU
is too hot) it cancels the render and *releases* the lease, which the coordinator
re-queues without counting a failure. A task refused for lack of disk space (before the
render, or a result that cannot be written) is released the same way, and the node takes
no work for `NodeConfig.disk_full_pause` seconds and until the space is back.

Stopping (the stop event, e.g. Ctrl-C) lets the current task finish within
`NodeConfig.stop_grace`, else cancels it and releases its lease; a second Ctrl-C
cancels at once. `run_node` builds everything from a `NodeConfig` and installs the
signal handlers; the CLI calls it.

A node started with `NodeConfig.cheat` (``tessera node --cheat MODE``) fakes some of its
renders (see `farm_node.cheats`): that exists only to demonstrate verification, is off
by default, and is logged loudly at start-up and on every faked task.

This module must not import Qt or the coordinator, read settings from globals or the
environment at import time, or let a failing task stop the node.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import FrameType

from common.disk_space import no_room_reason
from common.errors import (
    ApiError,
    BlenderNotFoundError,
    CoordinatorUnreachableError,
    CorruptSceneError,
    NoCameraError,
    RenderCancelledError,
    SceneNotFoundError,
    TesseraError,
    UnsupportedEngineError,
    UsageError,
)
from farm_node.availability import Availability, AvailabilityTracker, ProvidePolicy
from farm_node.benchmark import benchmark_score
from farm_node.bundle_cache import (
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_UNCOMPRESSED_BYTES,
    BundleCache,
)
from farm_node.cheats import Cheat, CheatMode
from farm_node.errors import LeaseError, UnsafeBundleError
from farm_node.hardware import NO_AVX2_ENV, probe_capabilities
from farm_node.runner import DEFAULT_MAX_WARM, TaskRunner
from protocol.client import TesseraClient, sha256_file
from protocol.models import (
    Heartbeat,
    Lease,
    LeaseRequest,
    NodeCapabilities,
    NodeRegistration,
    TaskFailure,
    TaskKind,
)
from renderers.builds import BlenderBuild, find_builds, probe_bpy
from renderers.demo_scene import generate_demo_scene
from renderers.devices import GPU_PREFERENCE, normalise_device_name, probe_nvidia, resolve_device
from renderers.worker import (
    InsufficientDiskSpaceError,
    Progress,
    RenderLimits,
    check_free_space,
    format_bytes,
)

__all__ = [
    "Backoff",
    "NodeConfig",
    "NodeDaemon",
    "PendingResult",
    "run_node",
    "select_build",
    "worker_environment",
]

log = logging.getLogger(__name__)

#: Scene errors that every node would meet again: the task fails instead of being retried.
NOT_RETRYABLE: tuple[type[TesseraError], ...] = (
    NoCameraError,
    CorruptSceneError,
    UnsupportedEngineError,
    SceneNotFoundError,
    UnsafeBundleError,
    LeaseError,
)
#: Replies that mean "this lease is over" (expired and re-queued, finished, not ours).
_LEASE_GONE = (403, 404, 409, 410)
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: How often the heartbeat thread looks at the stop event between beats.
_STOP_POLL = 0.1
#: The cancel reason of a task cut short by the node's own stop (its lease is released).
_STOPPING = "the node is stopping"
#: The cancel reason of a task handed back because the machine is no longer available
#: (the user returned, outside hours, GPU too hot): its lease is released, no failure.
_YIELDING = "yielding the machine"
#: How often a paused node reminds the coordinator why (it is offline after 120 s unheard).
PAUSE_REPORT_SECONDS = 30.0
#: The heartbeat message while the finished result is being delivered.
_UPLOADING = "uploading"
#: What `NodeConfig.cheat` may be (besides None).
CHEAT_MODES = tuple(mode.value for mode in CheatMode)
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
    use_bpy: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Credits asked per work unit (pixels x samples / 1e6); jobs offering less skip us.
    price: float = 0.0
    benchmark: bool = True
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
        return self.data_dir / "benchmark.json"

    def validate(self) -> None:
        """Fail fast, with the option's name, on values that cannot work."""
        problems: list[str] = []
        url: object = self.coordinator_url
        if not url:
            problems.append("no coordinator URL (pass --coordinator or set TESSERA_COORDINATOR)")
        elif not isinstance(url, str) or not url.startswith(("http://", "https://")):
            problems.append(f"coordinator URL {url!r} is not http(s)://...")
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
        if self.disk_full_pause < 0:
            problems.append("the pause after a full disk must not be negative")
        if problems:
            raise UsageError("Invalid node settings: " + "; ".join(problems) + ".")
        normalise_device_name(self.device)


class Backoff:
    """Exponential backoff with "equal jitter": each delay is half fixed, half random, so
    many nodes that lost one coordinator do not all come back in the same instant."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        base: float = min(self.maximum, self.initial * 2.0**self._attempt)
        self._attempt = min(self._attempt + 1, 62)
        return base / 2 + self._rng.uniform(0, base / 2)

    def reset(self) -> None:
        self._attempt = 0


class _Poll(Enum):
    """What the loop does when a lease request brought no lease."""

    AGAIN = "again"
    BACK_OFF = "back off"


class _ProblemLog:
    """Logs a repeated problem once as a warning (then at debug) and its end once.

    Problems are told apart by kind (and HTTP status), not by message: a connection
    error's text changes on every attempt (it names a new socket object each time).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._current: tuple[str, int | None] | None = None
        self._lock = threading.Lock()

    def failed(self, error: TesseraError) -> None:
        kind = (type(error).__name__, getattr(error, "status", None))
        with self._lock:
            repeated, self._current = self._current == kind, kind
        text = error.message.splitlines()[0] if error.message else type(error).__name__
        if repeated:
            log.debug("%s still fails: %s", self.what, text)
        else:
            log.warning("%s failed: %s (retrying)", self.what, text)

    def recovered(self) -> None:
        with self._lock:
            was, self._current = self._current, None
        if was is not None:
            log.info("%s works again", self.what)


@dataclass(frozen=True, slots=True)
class PendingResult:
    """A finished task's EXR waiting in ``results/`` to be delivered."""

    lease_id: str
    task_id: str
    sha256: str
    size: int
    path: Path

    @property
    def note(self) -> Path:
        return self.path.with_suffix(".json")

    def save_note(self) -> None:
        """Write the JSON note atomically: a result with a note is complete."""
        data = {
            "lease_id": self.lease_id,
            "task_id": self.task_id,
            "sha256": self.sha256,
            "size": self.size,
            "created_at": time.time(),
        }
        handle, temp = tempfile.mkstemp(prefix=".note-", dir=self.path.parent)
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(data, stream, indent=1)
                stream.flush()
                os.fsync(stream.fileno())
            Path(temp).replace(self.note)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def discard(self) -> None:
        # The note goes first: a crash in between leaves an EXR without a note, which the
        # next start deletes, never a note whose EXR is gone.
        self.note.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)

    @classmethod
    def load(cls, note: Path) -> PendingResult | None:
        """The pending result described by `note`, or None when it is unusable."""
        try:
            data = json.loads(note.read_text())
            result = cls(
                lease_id=str(data["lease_id"]),
                task_id=str(data["task_id"]),
                sha256=str(data["sha256"]),
                size=int(data["size"]),
                path=note.with_suffix(".exr"),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("Dropping unreadable pending result %s (%s)", note.name, exc)
            return None
        if result.path.stem != result.lease_id or not _SAFE_ID.match(result.lease_id):
            log.warning("Dropping pending result %s: it names another lease", note.name)
            return None
        try:
            size = result.path.stat().st_size
        except OSError:
            size = -1
        if size != result.size:
            log.warning("Dropping pending result %s: its EXR is missing or changed", note.name)
            return None
        return result


class _TaskControl:
    """What the task thread and its heartbeat thread share about one lease."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.progress = 0.0
        self.message = "starting"
        self.cancel_reason: str | None = None
        self._lock = threading.Lock()

    def on_progress(self, update: Progress) -> None:
        self.progress = min(1.0, max(0.0, update.fraction))
        self.message = f"rendering: {update.samples_done}/{update.samples_total} samples"

    def raise_if_cancelled(self) -> None:
        """Called between steps: a cancel during a download must not start a render."""
        if self.cancel_reason is not None:
            raise RenderCancelledError(f"Cancelled ({self.cancel_reason}).")

    def claim_cancel(self, reason: str) -> bool:
        """Record why the task is cancelled; False when it already was."""
        with self._lock:
            if self.cancel_reason is not None:
                return False
            self.cancel_reason = reason
            return True


class NodeDaemon:
    """One provider node: registers, leases, renders, uploads, until `run`'s stop is set."""

    def __init__(
        self,
        config: NodeConfig,
        client: TesseraClient,
        runner: TaskRunner,
        cache: BundleCache,
        *,
        rng: random.Random | None = None,
        cheat: Cheat | None = None,
        availability: AvailabilityTracker | None = None,
    ) -> None:
        """`cheat` overrides `config.cheat` (a test passes one with a seeded RNG);
        `availability` overrides the tracker built from `config.policy`."""
        self.config = config
        self.client = client
        self.runner = runner
        self.cache = cache
        if cheat is None and config.cheat is not None:
            cheat = Cheat(config.cheat)
        self.cheat = cheat
        self.node_id: str | None = None
        self.registration: NodeRegistration | None = None
        self._rng = rng or random.Random()
        self._abort = threading.Event()
        self._coordinator = _ProblemLog("Talking to the coordinator")
        self._heartbeats = _ProblemLog("Sending heartbeats")
        self._tasks_dir = config.scratch_dir / "tasks"
        if availability is None:
            availability = AvailabilityTracker(
                config.policy,
                config.machine_state_file,
                renders_on_gpu=config.device.strip().upper() != "CPU",
            )
        self.availability = availability
        self._state_lock = threading.Lock()
        self._shown: tuple[bool, str] | None = None
        self._paused_reason: str | None = None
        self._reported_pause: tuple[str | None, float] = (None, 0.0)
        self._disk_paused_until = 0.0
        self._disk_problem = ""

    # --- public ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Serve the coordinator until `stop` is set; closes the runner on the way out.

        Raises `TesseraError` only for what retrying cannot fix (a refused token, a
        device this machine does not have).
        """
        try:
            self._prepare_folders()
            if self.cheat is not None:
                log.warning(
                    "THIS NODE CHEATS (--cheat %s): it fakes renders on purpose, to "
                    "demonstrate the farm's verification. Never use it for real work.",
                    self.cheat.mode.value,
                )
            capabilities = self.capabilities()
            log.info(
                "Node %r: %s, %d threads, %s, devices %s, Blender %s",
                capabilities.name,
                capabilities.cpu,
                capabilities.cpu_threads,
                capabilities.cpu_kernel,
                ", ".join(capabilities.devices),
                ", ".join(capabilities.blender_versions),
            )
            if self.availability.active:
                log.info("Providing %s", self.config.policy.describe())
            self._serve(stop, capabilities)
        finally:
            self.runner.close()
            log.info("Node stopped")

    def abort(self) -> None:
        """Cancel the task in flight now, without waiting for the stop grace period."""
        self._abort.set()

    @property
    def paused_reason(self) -> str | None:
        """Why the node takes no work right now (in plain words), None when it does."""
        with self._state_lock:
            return self._paused_reason

    def capabilities(self) -> NodeCapabilities:
        """Probe the machine (degrading on failure); raises only for a missing device."""
        wanted = normalise_device_name(self.config.device)
        devices = []
        if wanted != "CPU":
            available = self.runner.devices()
            chosen = resolve_device(wanted, available)  # a GPU asked for must exist
            allowed = set(GPU_PREFERENCE) if wanted == "GPU" else {chosen}
            devices = [device for device in available if device.type in allowed]
        score = self._benchmark(resolve_device(wanted, devices) if devices else "CPU")
        capabilities = probe_capabilities(
            self.config.name,
            self.runner.build,
            devices,
            probe_nvidia(),
            env=self.config.extra_env,
            threads=self.config.threads,
            benchmark_score=score,
        )
        return capabilities.model_copy(update={"price": self.config.price})

    def pending(self) -> list[PendingResult]:
        """Finished results not delivered yet, oldest first."""
        notes = sorted(self.config.results_dir.glob("*.json"), key=_mtime)
        found: list[PendingResult] = []
        for note in notes:
            result = PendingResult.load(note)
            if result is None:
                note.unlink(missing_ok=True)
            else:
                found.append(result)
        return found

    def deliver_pending(self) -> bool:
        """Try to deliver every pending result; False if some must wait (coordinator down)."""
        return all(self._deliver(result) for result in self.pending())

    # --- the loop ---------------------------------------------------------------------------

    def _serve(self, stop: threading.Event, capabilities: NodeCapabilities) -> None:
        backoff = Backoff(self.config.retry_initial, self.config.retry_max, self._rng)
        while not stop.is_set():
            if not self.deliver_pending():
                stop.wait(backoff.next_delay())
                continue
            if self.node_id is None and not self._register(capabilities):
                stop.wait(backoff.next_delay())
                continue
            if not self._may_lease():
                self._report_pause()
                stop.wait(self.config.availability_interval)
                continue
            lease = self._lease()
            if lease is _Poll.BACK_OFF:
                stop.wait(backoff.next_delay())
                continue
            backoff.reset()
            if isinstance(lease, _Poll):
                continue
            if stop.is_set():
                self._release(lease)
                break
            self._run_task(lease, stop)

    def _may_lease(self) -> bool:
        """Whether to ask for work now: the machine is available and has disk space."""
        answer: Availability | None = None
        with self._state_lock:
            if time.monotonic() < self._disk_paused_until:
                answer = Availability(False, f"paused: {self._disk_problem}", "disk")
        if answer is None:
            problem = self._disk_shortage()
            if problem is not None:
                answer = Availability(False, f"paused: {problem}", "disk")
            else:
                answer = self.availability.check()
        self._show(answer)
        return answer.ok

    def _report_pause(self) -> None:
        """Tell the coordinator why this node takes no work (when the reason changes and
        every `PAUSE_REPORT_SECONDS`), so it lists the node as paused, not offline."""
        reason = self.paused_reason
        now = time.monotonic()
        if reason is None or self.node_id is None:
            return
        if (
            reason == self._reported_pause[0]
            and now - self._reported_pause[1] < PAUSE_REPORT_SECONDS
        ):
            return
        self._reported_pause = (reason, now)
        try:
            lease = self.client.lease(self.node_id, LeaseRequest(wait=0, paused=reason[:300]))
        except (ApiError, CoordinatorUnreachableError) as exc:
            log.debug("Could not tell the coordinator this node is paused: %s", exc)
            return
        if lease is not None:  # a coordinator that ignores `paused`: hand it back
            self._release(lease)

    def _disk_shortage(self) -> str | None:
        """What is short of disk space for a render here, None when nothing is."""
        needed = self.config.limits.min_free_disk
        try:
            for folder in (self.config.results_dir, self._tasks_dir):
                check_free_space(folder, needed)
        except InsufficientDiskSpaceError as exc:
            return exc.message
        return None

    def _show(self, answer: Availability) -> None:
        """Log a change of availability once (not every reading) and remember it."""
        key = (answer.ok, answer.cause)
        with self._state_lock:
            changed, self._shown = self._shown != key, key
            was_paused = self._paused_reason is not None
            self._paused_reason = None if answer.ok else answer.reason
        if not changed:
            return
        if not answer.ok:
            # The provider's own choice (idle, hours, heat) is news; a problem is a warning.
            level = logging.WARNING if answer.cause in ("disk", "state") else logging.INFO
            log.log(level, "Not taking work: %s", answer.reason)
        elif was_paused:
            log.info("Taking work again (%s)", answer.reason)

    def _pause_for_disk(self, problem: str) -> None:
        pause = self.config.disk_full_pause
        with self._state_lock:
            self._disk_paused_until = time.monotonic() + pause
            self._disk_problem = f"{problem.splitlines()[0]} (the last task was handed back)"
        log.warning(
            "Not taking work for %g s, and then only with %s free: %s",
            pause,
            format_bytes(self.config.limits.min_free_disk),
            problem.splitlines()[0],
        )

    def _register(self, capabilities: NodeCapabilities) -> bool:
        try:
            registration = self.client.register_node(capabilities)
        except CoordinatorUnreachableError as exc:
            self._coordinator.failed(exc)
            return False
        except ApiError as exc:
            if exc.status < 500:
                raise  # a refused token or bad capabilities: retrying will not help
            self._coordinator.failed(exc)
            return False
        self._coordinator.recovered()
        self.node_id, self.registration = registration.node_id, registration
        log.info("Registered with %s as node %s", self.config.coordinator_url, self.node_id)
        return True

    def _lease(self) -> Lease | _Poll:
        """A lease, or what to do instead: ask again now, or after a backoff."""
        assert self.node_id is not None
        request = LeaseRequest(
            cached_bundles=self.cache.cached()[:1000],
            warm_bundles=self.runner.warm_bundles()[:100],
            wait=self._poll_wait(),
        )
        try:
            lease = self.client.lease(self.node_id, request)
        except CoordinatorUnreachableError as exc:
            self._coordinator.failed(exc)
            return _Poll.BACK_OFF
        except ApiError as exc:
            if exc.status == 404:  # the coordinator forgot this node (a fresh database)
                log.warning(
                    "The coordinator does not know node %s; registering again", self.node_id
                )
                self.node_id = None
                return _Poll.AGAIN
            if exc.status < 500:
                raise
            self._coordinator.failed(exc)
            return _Poll.BACK_OFF
        self._coordinator.recovered()
        return _Poll.AGAIN if lease is None else lease

    def _poll_wait(self) -> float:
        wait = self.config.poll_wait
        if self.registration is not None and self.registration.poll_timeout > 0:
            wait = min(wait, self.registration.poll_timeout)
        return max(0.0, min(wait, 60.0))

    # --- one task ---------------------------------------------------------------------------

    def _run_task(self, lease: Lease, stop: threading.Event) -> None:
        log.info(
            "Lease %s: %s task %s of %r",
            lease.lease_id,
            lease.task.kind,
            lease.task.id,
            lease.job_name,
        )
        control = _TaskControl()
        heartbeat = threading.Thread(
            target=self._heartbeat_loop,
            args=(lease, control, stop),
            name=f"tessera-heartbeat-{lease.lease_id[:12]}",
            daemon=True,
        )
        settled = False
        heartbeat.start()
        try:
            try:
                _check_id(lease.lease_id, "lease id")
                if lease.task.kind is TaskKind.DENOISE:
                    output = self._denoise(lease, control)
                else:
                    output = self._render(lease, control)
            except (TesseraError, OSError) as exc:
                settled = self._task_failed(lease, control, exc)
                return
            if control.cancel_reason not in (None, _STOPPING, _YIELDING):
                # Cancelled or lost as the render ended: the coordinator wants none of it.
                # (A node stopping or yielding as it finished still delivers what it has.)
                settled = self._task_cancelled(lease, control)
                return
            try:
                result = self._keep_result(lease, output)
            except OSError as exc:
                settled = self._result_not_kept(lease, exc)
                return
            settled = True
            control.progress, control.message = 1.0, _UPLOADING
            self._deliver(result)
        finally:
            control.done.set()
            heartbeat.join()
            if _SAFE_ID.match(lease.lease_id):
                (self._tasks_dir / f"{lease.lease_id}.exr").unlink(missing_ok=True)
            if not settled:
                # Guard, reserve, always release: a bug here must not hold the task
                # until its lease expires.
                self._release(lease)

    def _render(self, lease: Lease, control: _TaskControl) -> Path:
        """Render a render or verify lease (faked as planned when this node cheats)."""
        plan = self.cheat.plan(lease) if self.cheat is not None else None
        sha = lease.bundle
        with self.cache.pin(sha):
            control.message = "fetching the scene bundle"
            folder = self.cache.ensure(sha, lambda target: self.client.download_bundle(sha, target))
            scene = _scene_in_bundle(folder, lease.scene_path)
            output = self._tasks_dir / f"{lease.lease_id}.exr"
            control.raise_if_cancelled()
            control.message = "rendering"
            result = self.runner.render(
                lease if plan is None else plan.lease,
                scene,
                output,
                on_progress=control.on_progress,
            )
        log.info("Lease %s rendered in %.1f s", lease.lease_id, result.seconds)
        if self.cheat is not None and plan is not None:
            self.cheat.finish(plan, result.output)
        return result.output

    def _denoise(self, lease: Lease, control: _TaskControl) -> Path:
        source = self._tasks_dir / f"{lease.lease_id}.denoise-input.exr"
        output = self._tasks_dir / f"{lease.lease_id}.exr"
        try:
            control.message = "fetching the merged frame"
            self.client.download_denoise_input(lease.lease_id, source)
            control.raise_if_cancelled()
            control.message = "denoising"
            self.runner.denoise(lease, source, output)
        finally:
            source.unlink(missing_ok=True)
        return output

    def _task_failed(self, lease: Lease, control: _TaskControl, error: Exception) -> bool:
        if control.cancel_reason is not None:
            return self._task_cancelled(lease, control)
        shortage = _disk_full(error) or self._disk_shortage()
        if shortage is not None:
            # A full disk is this node's problem, not the task's: hand it back unharmed
            # (no attempt counted), and stop taking work this node cannot finish.
            log.warning(
                "Lease %s refused for lack of disk space (%s): %s",
                lease.lease_id,
                type(error).__name__,
                shortage.splitlines()[0],
            )
            self._pause_for_disk(shortage)
            self._release(lease)
            return True
        retryable = not isinstance(error, NOT_RETRYABLE)
        text = str(error).strip() or type(error).__name__
        log.warning(
            "Lease %s failed (%s, %s): %s",
            lease.lease_id,
            type(error).__name__,
            "retryable" if retryable else "not retryable",
            text.splitlines()[0],
        )
        failure = TaskFailure(
            kind=type(error).__name__[:60], message=text[:4000], retryable=retryable
        )
        try:
            self.client.report_failure(lease.lease_id, failure)
        except (ApiError, CoordinatorUnreachableError) as exc:
            # The lease then expires and the coordinator re-queues the task itself.
            log.warning("Could not report the failure of lease %s: %s", lease.lease_id, exc.message)
        return True

    def _task_cancelled(self, lease: Lease, control: _TaskControl) -> bool:
        reason = control.cancel_reason
        if reason in (_STOPPING, _YIELDING):
            self._release(lease)
        else:
            log.info("Lease %s cancelled (%s)", lease.lease_id, reason)
        return True

    def _release(self, lease: Lease) -> None:
        try:
            self.client.release(lease.lease_id)
        except ApiError as exc:
            if exc.status not in _LEASE_GONE:
                log.warning("Could not release lease %s: %s", lease.lease_id, exc.message)
                return
        except CoordinatorUnreachableError as exc:
            log.warning("Could not release lease %s: %s", lease.lease_id, exc.message)
            return
        log.info("Released lease %s", lease.lease_id)

    # --- heartbeats ---------------------------------------------------------------------------

    def _heartbeat_loop(self, lease: Lease, control: _TaskControl, stop: threading.Event) -> None:
        interval = max(0.05, lease.heartbeat_interval)
        last_ok = time.monotonic()
        next_beat = last_ok + interval
        # The first check comes at once: the user may have come back during the poll.
        next_check = last_ok
        stop_seen: float | None = None
        while not control.done.is_set():
            now = time.monotonic()
            if stop.is_set() and stop_seen is None:
                stop_seen = now
                log.info("Stopping: the current task has %g s to finish", self.config.stop_grace)
            if stop_seen is not None and (
                self._abort.is_set() or now >= stop_seen + self.config.stop_grace
            ):
                self._cancel(control, _STOPPING, "the node is stopping")
            if control.cancel_reason is not None:
                # Again and again until the task ends: a cancel that came just before the
                # runner started its task would otherwise be lost.
                self.runner.cancel()
            elif now >= next_beat:
                next_beat = now + interval
                if self._beat(lease, control):
                    last_ok = time.monotonic()
                grace = self.config.heartbeat_grace
                if grace is not None and time.monotonic() - last_ok > grace:
                    self._cancel(
                        control,
                        "lease lost",
                        f"no heartbeat got through for {grace:g} s; the coordinator has "
                        "given the task to another node by now",
                    )
            if (
                control.cancel_reason is None
                and self.availability.active
                and time.monotonic() >= next_check
            ):
                next_check = time.monotonic() + self.config.availability_interval
                answer = self.availability.check(rendering=True)
                self._show(answer)
                if not answer.ok:
                    self._cancel(control, _YIELDING, f"{answer.reason}; handing the task back")
            pause = _STOP_POLL
            if control.cancel_reason is None:
                pause = max(0.0, min(pause, next_beat - time.monotonic()))
            control.done.wait(pause)

    def _beat(self, lease: Lease, control: _TaskControl) -> bool:
        beat = Heartbeat(progress=control.progress, message=control.message[:500])
        try:
            reply = self.client.heartbeat(lease.lease_id, beat)
        except ApiError as exc:
            if exc.status in _LEASE_GONE and control.message == _UPLOADING:
                # The upload was accepted and ended the lease while this beat was on its
                # way: nothing to cancel.
                return False
            if exc.status in _LEASE_GONE:
                self._cancel(
                    control, "lease lost", f"the coordinator ended the lease: {exc.message}"
                )
            else:
                self._heartbeats.failed(exc)
            return False
        except CoordinatorUnreachableError as exc:
            self._heartbeats.failed(exc)
            return False
        self._heartbeats.recovered()
        if reply.cancel:
            self._cancel(control, "cancelled by the coordinator", "the job was cancelled")
        return True

    def _cancel(self, control: _TaskControl, reason: str, why: str) -> None:
        if control.claim_cancel(reason):
            log.warning("Cancelling the current task: %s", why)
            self.runner.cancel()

    # --- results ------------------------------------------------------------------------------

    def _keep_result(self, lease: Lease, output: Path) -> PendingResult:
        target = self.config.results_dir / f"{lease.lease_id}.exr"
        output.replace(target)
        try:
            result = PendingResult(
                lease_id=lease.lease_id,
                task_id=lease.task.id,
                sha256=sha256_file(target),
                size=target.stat().st_size,
                path=target,
            )
            result.save_note()
        except BaseException:
            target.unlink(missing_ok=True)  # an EXR without its note is not a result
            raise
        return result

    def _result_not_kept(self, lease: Lease, error: OSError) -> bool:
        """A rendered EXR that could not be kept in ``results/`` (a full disk, most
        likely): nothing was delivered, so nothing accepted is lost; the task goes back."""
        shortage = _disk_full(error)
        log.error(
            "Could not keep the result of lease %s in %s (%s); handing the task back",
            lease.lease_id,
            self.config.results_dir,
            error,
        )
        if shortage is not None:
            self._pause_for_disk(shortage)
        self._release(lease)
        return True

    def _deliver(self, result: PendingResult) -> bool:
        """Upload one result; True when it is settled (delivered, or refused for good)."""
        try:
            receipt = self.client.upload_result(result.lease_id, result.path, result.sha256)
        except CoordinatorUnreachableError as exc:
            self._coordinator.failed(exc)
            log.info("Keeping the result of lease %s to deliver later", result.lease_id)
            return False
        except ApiError as exc:
            if exc.status >= 500 or exc.status == 429:
                self._coordinator.failed(exc)
                log.info("Keeping the result of lease %s to deliver later", result.lease_id)
                return False
            log.warning(
                "The coordinator refused the result of lease %s (%d): %s; dropping it",
                result.lease_id,
                exc.status,
                exc.message,
            )
            result.discard()
            return True
        self._coordinator.recovered()
        log.info(
            "Delivered lease %s (task %s): %s",
            result.lease_id,
            receipt.task_id,
            "accepted" if receipt.accepted else "not accepted",
        )
        result.discard()
        return True

    # --- setup --------------------------------------------------------------------------------

    def _prepare_folders(self) -> None:
        for folder in (self.config.results_dir, self._tasks_dir):
            folder.mkdir(parents=True, exist_ok=True)
        # Partial outputs of a node that died mid-task; their leases have expired.
        for leftover in self._tasks_dir.iterdir():
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
        notes = {note.stem for note in self.config.results_dir.glob("*.json")}
        for leftover in self.config.results_dir.iterdir():
            if leftover.is_file() and leftover.suffix != ".json" and leftover.stem not in notes:
                leftover.unlink(missing_ok=True)  # an EXR whose note was never written

    def _benchmark(self, device: str) -> float | None:
        if not self.config.benchmark:
            return None
        scene = self.config.data_dir / "benchmark" / "demo.blend"

        def make_scene() -> Path:
            if not scene.exists():
                generate_demo_scene(self.runner.build, scene)
            return scene

        try:
            return benchmark_score(
                self.runner, make_scene, self.config.benchmark_file, device=device
            )
        except (TesseraError, OSError) as exc:
            log.warning("The benchmark failed (%s); registering without a score", exc)
            return None


def _disk_full(error: BaseException) -> str | None:
    """What says `error` (or an error it was raised from) is a full disk, else None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, InsufficientDiskSpaceError):
            return current.message
        current = current.__cause__ or current.__context__
    return no_room_reason(error)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _check_id(value: str, what: str) -> str:
    if not _SAFE_ID.match(value):
        raise LeaseError(f"The coordinator sent a {what} that is not a safe file name: {value!r}")
    return value


def _scene_in_bundle(folder: Path, scene_path: str) -> Path:
    parts = scene_path.split("/")
    if not scene_path or scene_path.startswith("/") or "\\" in scene_path or ".." in parts:
        raise LeaseError(f"The scene path {scene_path!r} leaves its bundle.")
    scene = folder.joinpath(*parts)
    if not scene.resolve().is_relative_to(folder.resolve()):
        raise LeaseError(f"The scene path {scene_path!r} leaves its bundle.")
    if not scene.is_file():
        raise SceneNotFoundError(f"The bundle has no file {scene_path!r}.")
    return scene


# --- building a node ------------------------------------------------------------------------


def worker_environment(extra_env: Mapping[str, str], node_env: Mapping[str, str]) -> dict[str, str]:
    """The variables every Blender of this node gets on top of the scrubbed environment.

    Render processes inherit nothing, so `FORWARDED_ENV` variables set for the node itself
    (``CYCLES_CPU_NO_AVX2=1 tessera node``) are forwarded explicitly; `extra_env` wins.
    """
    forwarded = {name: node_env[name] for name in FORWARDED_ENV if name in node_env}
    return {**forwarded, **extra_env}


def select_build(config: NodeConfig) -> BlenderBuild:
    """The Blender this node renders with: the first executable named, else this
    interpreter's bpy module (when `use_bpy`), else ``blender`` on PATH."""
    if config.blender_executables:
        return find_builds(config.blender_executables, search_path=False, include_bpy=False)[0]
    if config.use_bpy:
        build = probe_bpy()
        if build is not None:
            return build
    builds = find_builds(search_path=True, include_bpy=False)
    if not builds:
        raise BlenderNotFoundError("No Blender to render with: no bpy module, no blender on PATH.")
    return builds[0]


def run_node(config: NodeConfig) -> int:
    """Build a node from `config` and run it until SIGINT/SIGTERM; the exit status.

    The first signal stops after the current task (within `stop_grace`); a second one
    cancels it at once. Returns 0 after a clean stop, 1 when the node could not go on.
    """
    try:
        config.validate()
        config = dataclasses.replace(
            config, extra_env=worker_environment(config.extra_env, os.environ)
        )
        build = select_build(config)
    except TesseraError as exc:
        log.error("The node cannot start: %s", exc)
        return 1
    log.info("Rendering with %s", build.label)
    client = TesseraClient(config.coordinator_url, config.token)
    runner = TaskRunner(
        build,
        config.scratch_dir,
        config.device,
        config.threads,
        task_timeout=config.task_timeout,
        extra_env=config.extra_env,
        max_warm=config.max_warm_workers,
        limits=config.limits,
    )
    stop = threading.Event()
    daemon = NodeDaemon(config, client, runner, _cache(config))
    previous = _install_signal_handlers(stop, daemon)
    try:
        daemon.run(stop)
    except TesseraError as exc:
        log.error("The node stopped: %s", exc)
        return 1
    finally:
        _restore_signal_handlers(previous)
        runner.close()
        client.close()
    return 0


def _cache(config: NodeConfig) -> BundleCache:
    return BundleCache(
        config.cache_dir,
        config.cache_max_bytes,
        max_uncompressed_bytes=config.bundle_max_uncompressed_bytes,
        max_files=config.bundle_max_files,
    )


_Handler = Callable[[int, FrameType | None], object] | int | None


def _install_signal_handlers(
    stop: threading.Event, daemon: NodeDaemon
) -> dict[signal.Signals, _Handler]:
    if threading.current_thread() is not threading.main_thread():
        log.debug("Not in the main thread: no signal handlers (the caller sets the stop event)")
        return {}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning("Second %s: cancelling the current task now", signal.Signals(signum).name)
            daemon.abort()
        else:
            log.info("%s: finishing the current task, then stopping", signal.Signals(signum).name)
            stop.set()

    previous: dict[signal.Signals, _Handler] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, on_signal)
    return previous


def _restore_signal_handlers(previous: Mapping[signal.Signals, _Handler]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)

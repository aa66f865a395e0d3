"""The client side of the warm render worker: starts Blender, talks JSON lines, and cleans up.

A `RenderWorker` owns one Blender process (bpy module or `blender` executable) that keeps
a scene open between requests, so a tile costs a render, not a Blender start. The
process runs in its own process group with a scrubbed environment and private
config/scratch folders; a timeout or `cancel()` kills the whole group, and a crash is
reported as a failed render, after which the next request starts a fresh process.

`RenderLimits` bounds each process: a memory ceiling (RLIMIT_DATA, set by worker_main
before Blender loads), a free-disk check before every render, and, where bubblewrap is
installed, a sandbox with no network in which only the worker's scratch folder is
writable (Blender writes there; this side moves finished files to where they were asked
for). See docs/provider-safety.md.

This module never imports bpy (that happens in `worker_main.py`, in the child) and never
touches the network.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import (
    CorruptSceneError,
    DeviceUnavailableError,
    NoCameraError,
    RenderCancelledError,
    RenderFailedError,
    RenderTimeoutError,
    TesseraError,
    UnsupportedEngineError,
    UsageError,
    WorkerCrashedError,
    WorkerError,
    WorkerStartError,
)
from renderers.builds import BlenderBuild
from renderers.regions import BorderFractions

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("worker_main.py")

#: Variables a render may need from the parent (GPU drivers, BLAS workarounds); all
#: others, PYTHONPATH and BLENDER_* included, are dropped so a scene sees a clean slate.
PASSTHROUGH_ENV = (
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
)


class RenderMemoryLimitError(RenderFailedError):
    """Blender needed more memory than this node's limit allows (`RenderLimits.memory`).

    Retrying on the same node will fail the same way; a node with a higher limit may not.
    """

    default_hint = (
        "Raise the node's memory limit, or let a node with more memory render this task "
        "(lower the resolution or split the frame into more tiles to need less)."
    )


class InsufficientDiskSpaceError(WorkerError):
    """Too little free disk space to start a render (checked before Blender runs)."""

    default_hint = "Free some disk space there, or lower the node's minimum free space."


class SandboxUnavailableError(WorkerStartError):
    """The sandbox was required (`sandbox="bwrap"`) but cannot run on this machine."""

    default_hint = (
        "Install bubblewrap (`apt install bubblewrap`) and allow unprivileged user "
        "namespaces, or use sandbox 'auto' to fall back to process isolation."
    )


SANDBOX_MODES = ("auto", "bwrap", "off")
#: What Blender leaves in its log when it could not get memory under the limit.
_OUT_OF_MEMORY_MARKERS = (
    "Malloc returns null",
    "std::bad_alloc",
    "Cannot allocate memory",
    "MemoryError",
    "failed to map segment",
    "out_of_memory",
    # A thread whose stack cannot be mapped (std::system_error from std::thread).
    "Resource temporarily unavailable",
)


def default_memory_limit() -> int | None:
    """80% of this machine's physical memory (None when it cannot be read): a ceiling
    generous enough for any render the machine could finish, low enough that a runaway
    scene fails cleanly instead of pushing the desktop into swap or the OOM killer."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    if pages <= 0 or page_size <= 0:
        return None
    return int(pages * page_size * 0.8)


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """What one Blender process may use.

    `memory`: bytes of private memory (RLIMIT_DATA: heap and anonymous maps, not shared
    libraries or GPU memory) or None for no limit; default 80% of physical RAM.
    `min_free_disk`: bytes that must be free in the scratch and output folders before a
    render starts (default 1 GiB). `sandbox`: "auto" runs Blender inside bubblewrap when
    it is installed and works (else process isolation only, logged once), "bwrap"
    requires it, "off" never uses it.
    """

    memory: int | None = field(default_factory=default_memory_limit)
    min_free_disk: int = 1 << 30
    sandbox: str = "auto"

    def __post_init__(self) -> None:
        if self.sandbox not in SANDBOX_MODES:
            raise UsageError(
                f"sandbox must be one of {', '.join(SANDBOX_MODES)}, not {self.sandbox!r}."
            )
        if self.memory is not None and self.memory < 64 << 20:
            raise UsageError(f"a memory limit of {self.memory} bytes is below 64 MiB.")
        if self.min_free_disk < 0:
            raise UsageError("the minimum free disk space must not be negative.")


_ERROR_KINDS: dict[str, type[TesseraError]] = {
    "no_camera": NoCameraError,
    "unsupported_engine": UnsupportedEngineError,
    "corrupt_scene": CorruptSceneError,
    "device_unavailable": DeviceUnavailableError,
    "render_failed": RenderFailedError,
    "denoise_failed": RenderFailedError,
    "bad_request": WorkerError,
    "out_of_memory": RenderMemoryLimitError,
}


@dataclass(frozen=True, slots=True)
class RenderRequest:
    """One render of one frame or one region of it, written to `output` as multilayer EXR."""

    scene: Path
    frame: int
    output: Path
    border: BorderFractions | None = None
    samples: int | None = None
    percentage: int | None = None
    seed: int | None = None
    adaptive_sampling: bool | None = None
    denoise_data: bool = False
    denoise: bool = False
    device: str = "CPU"
    threads: int = 0

    def to_message(self) -> dict[str, Any]:
        border = None
        if self.border is not None:
            border = {
                "min_x": self.border.min_x,
                "max_x": self.border.max_x,
                "min_y": self.border.min_y,
                "max_y": self.border.max_y,
            }
        return {
            "op": "render",
            "scene": str(self.scene),
            "frame": self.frame,
            "output": str(self.output),
            "border": border,
            "samples": self.samples,
            "percentage": self.percentage,
            "seed": self.seed,
            "adaptive_sampling": self.adaptive_sampling,
            "denoise_data": self.denoise_data,
            "denoise": self.denoise,
            "device": self.device,
            "threads": self.threads,
        }


@dataclass(frozen=True, slots=True)
class RenderResult:
    output: Path
    seconds: float
    frame_width: int
    frame_height: int
    device: str


@dataclass(frozen=True, slots=True)
class Progress:
    samples_done: int
    samples_total: int

    @property
    def fraction(self) -> float:
        return self.samples_done / self.samples_total if self.samples_total else 0.0


ProgressCallback = Callable[[Progress], None]


class _WorkerGoneError(Exception):
    """The child closed its end of the protocol pipe (it exited or was killed)."""


class _DeadlineError(Exception):
    """The request ran past its time limit."""


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]; UsageError naming the bad part otherwise."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise UsageError(f"'{text}' is not a CPU list: use numbers and ranges like 0-3,6.")
        first, last = int(low), int(high or low)
        if last < first:
            raise UsageError(f"'{part}' in the CPU list runs backwards.")
        cpus.update(range(first, last + 1))
    available = os.sched_getaffinity(0)
    if not cpus <= available:
        missing = sorted(cpus - available)
        raise UsageError(
            f"CPUs {missing} are not available here (this process may use {sorted(available)})."
        )
    return sorted(cpus)


def cpu_pinning_env(cpus: list[int]) -> dict[str, str]:
    """The worker environment that pins Blender to `cpus` (see worker_main)."""
    return {"TESSERA_CPUS": ",".join(map(str, cpus))}


def scrubbed_environment(scratch: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a render process: private HOME/config, nothing inherited
    but the GPU and BLAS variables in `PASSTHROUGH_ENV`."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        # Blender reads user add-ons, startup files and preferences from these folders.
        "BLENDER_USER_RESOURCES": str(scratch / "blender-user"),
        "BLENDER_USER_CONFIG": str(scratch / "blender-user" / "config"),
        "BLENDER_USER_SCRIPTS": str(scratch / "blender-user" / "scripts"),
        "BLENDER_USER_DATAFILES": str(scratch / "blender-user" / "datafiles"),
        "BLENDER_USER_EXTENSIONS": str(scratch / "blender-user" / "extensions"),
    }
    for name in PASSTHROUGH_ENV:
        if name in os.environ:
            env[name] = os.environ[name]
    if extra:
        env.update(extra)
    return env


def format_bytes(count: float) -> str:
    """1536 -> '1.5 KiB': sizes in messages a person reads."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # pragma: no cover (the loop always returns)


def check_free_space(folder: Path, needed: int) -> None:
    """Raise InsufficientDiskSpaceError unless `needed` bytes are free where `folder` is
    (or would be: the nearest existing parent is measured)."""
    if needed <= 0:
        return
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # unmeasurable (a vanished mount): let the render say what is wrong
    if free < needed:
        raise InsufficientDiskSpaceError(
            f"Only {format_bytes(free)} free in {folder}; a render needs at least "
            f"{format_bytes(needed)} free there, so it was not started."
        )


@functools.cache
def find_bwrap() -> str | None:
    """The path of a bubblewrap that can actually build our sandbox here, else None.

    Being on PATH is not enough: containers and hardened kernels refuse the namespaces,
    so a tiny sandbox is tried once per process.
    """
    path = shutil.which("bwrap")
    if path is None:
        return None
    probe = [path, *_BWRAP_BASE, "true"]
    try:
        completed = subprocess.run(probe, capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("bubblewrap probe failed: %s", exc)
        return None
    if completed.returncode != 0:
        log.debug("bubblewrap cannot sandbox here: %s", completed.stderr.decode(errors="replace"))
        return None
    return path


#: The sandbox every render runs in: every namespace unshared (so no network: only a
#: private loopback), the whole filesystem read-only, fresh /dev, /proc and /dev/shm,
#: killed with its parent, in its own session (no terminal to inject input into).
_BWRAP_BASE = (
    "--unshare-all",
    "--die-with-parent",
    "--new-session",
    "--ro-bind",
    "/",
    "/",
    "--dev",
    "/dev",
    "--proc",
    "/proc",
    "--tmpfs",
    "/dev/shm",
)
#: GPU device nodes passed into the sandbox when they exist (NVIDIA, DRM, ROCm, WSL).
_GPU_DEVICE_GLOBS = ("/dev/nvidia*", "/dev/dri", "/dev/kfd", "/dev/dxg")
_NO_SANDBOX_WARNED = threading.Event()


def resolve_sandbox(mode: str) -> str | None:
    """The bwrap to use for `mode` ("auto", "bwrap", "off"), or None for no sandbox.

    "auto" without a working bubblewrap logs a warning once per process; "bwrap"
    without one raises SandboxUnavailableError.
    """
    if mode == "off":
        return None
    path = find_bwrap()
    if path is not None:
        return path
    if mode == "bwrap":
        where = shutil.which("bwrap")
        raise SandboxUnavailableError(
            "The render sandbox was required, but "
            + (
                f"{where} cannot create namespaces on this machine."
                if where
                else "bubblewrap (bwrap) is not installed."
            )
        )
    if not _NO_SANDBOX_WARNED.is_set():
        _NO_SANDBOX_WARNED.set()
        log.warning(
            "No render sandbox: bubblewrap (bwrap) is %s; Blender runs with scripts "
            "disabled, a scrubbed environment and its own process group only.",
            "not usable here" if shutil.which("bwrap") else "not installed",
        )
    return None


def sandbox_command(bwrap: str, writable: Path, command: list[str]) -> list[str]:
    """`command` wrapped in bubblewrap with only `writable` writable (see _BWRAP_BASE)."""
    argv = [bwrap, *_BWRAP_BASE]
    for pattern in _GPU_DEVICE_GLOBS:
        for device in sorted(Path("/").glob(pattern.lstrip("/"))):
            argv += ["--dev-bind-try", str(device), str(device)]
    folder = str(writable.resolve())
    return [*argv, "--bind", folder, folder, "--chdir", folder, *command]


class RenderWorker:
    """A persistent Blender process that renders on request.

    Use it as a context manager. Requests are serialised; `cancel()` may be called from
    any thread and aborts the request in flight by killing the process group. `limits`
    (default `RenderLimits()`) bounds memory and disk and picks the sandbox.
    """

    def __init__(
        self,
        build: BlenderBuild,
        *,
        scratch_dir: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        start_timeout: float = 120.0,
        limits: RenderLimits | None = None,
    ) -> None:
        self.build = build
        self.limits = limits if limits is not None else RenderLimits()
        self._extra_env = dict(extra_env or {})
        self._start_timeout = start_timeout
        self._own_scratch = scratch_dir is None
        self._scratch = scratch_dir or Path(tempfile.mkdtemp(prefix="tessera-worker-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._buffer = b""
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._next_id = 0
        self._sandboxed = False
        self._blender_pid: int | None = None
        #: Inside bubblewrap: Blender and the sandbox's init, which are not our children.
        self._inner_pids: list[int] = []
        self._log_start = 0
        self._request_log_start = 0
        self.starts = 0

    # --- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> RenderWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """Blender's process id (inside a sandbox: its id as seen from here)."""
        if self._proc is None:
            return None
        return self._blender_pid or self._proc.pid

    @property
    def sandboxed(self) -> bool:
        """Whether the running (or last started) Blender runs inside bubblewrap."""
        return self._sandboxed

    @property
    def log_path(self) -> Path:
        return self._scratch / "blender.log"

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start Blender (if not running) and wait until it is ready for requests."""
        with self._lock:
            self._ensure_started()

    def close(self) -> None:
        """Ask Blender to quit, kill its process group if it does not, free the scratch dir."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                try:
                    self._send({"op": "quit", "id": "quit"})
                    self._proc.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            self._discard_process()
            if self._own_scratch:
                shutil.rmtree(self._scratch, ignore_errors=True)

    def cancel(self) -> None:
        """Abort the request in flight (thread-safe): kills the whole process group."""
        self._cancelled.set()
        proc, inner = self._proc, self._blender_pid
        if proc is not None and proc.poll() is None:
            _kill_group(proc, [] if inner is None else [inner])

    def rss_bytes(self) -> int:
        """Resident memory of the Blender process (Linux), 0 when not running."""
        if self.pid is None:
            return 0
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    # --- requests -----------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        return self._call({"op": "hello"}, timeout=30)

    def devices(self) -> list[dict[str, str]]:
        """Cycles devices as raw dicts ({type, name, id}); parse with renderers.devices."""
        reply = self._call({"op": "devices"}, timeout=120)
        devices: list[dict[str, str]] = reply["devices"]
        return devices

    def inspect(self, scene: Path, timeout: float = 120) -> dict[str, Any]:
        """Open `scene` (scripts disabled) and describe it; see renderers.scene_info."""
        reply = self._call({"op": "inspect", "scene": str(scene)}, timeout=timeout)
        description: dict[str, Any] = reply["scene"]
        return description

    def render(
        self,
        request: RenderRequest,
        *,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> RenderResult:
        """Render one frame or region; raises a WorkerError subclass on any failure.

        Refuses to start (InsufficientDiskSpaceError) when the scratch or the output
        folder has less than `limits.min_free_disk` free.
        """
        self._check_disk(request.output.parent)
        message = request.to_message()
        with self._staged(request.output) as staged:
            message["output"] = str(staged)
            reply = self._call(
                message,
                on_progress=on_progress,
                timeout=timeout,
                what=f"frame {request.frame} of {request.scene.name}",
            )
        return RenderResult(
            output=request.output,
            seconds=float(reply["seconds"]),
            frame_width=int(reply["frame_width"]),
            frame_height=int(reply["frame_height"]),
            device=str(reply["device"]),
        )

    def denoise(self, source: Path, output: Path, timeout: float | None = None) -> Path:
        """Run Cycles' OpenImageDenoise on a single-part multilayer EXR (see denoise.py)."""
        self._check_disk(output.parent)
        with self._staged(output) as staged:
            self._call(
                {"op": "denoise", "input": str(source), "output": str(staged)},
                timeout=timeout,
                what=f"denoising {source.name}",
            )
        return output

    # --- internals ------------------------------------------------------------------------

    def _check_disk(self, output_folder: Path) -> None:
        needed = self.limits.min_free_disk
        check_free_space(self._scratch, needed)
        check_free_space(output_folder, needed)

    @contextlib.contextmanager
    def _staged(self, target: Path) -> Iterator[Path]:
        """A path in the scratch folder (the only place a sandboxed Blender may write)
        that becomes `target` when the block succeeds; removed when it fails."""
        folder = self._scratch / "outputs"
        folder.mkdir(parents=True, exist_ok=True)
        staged = folder / f"{os.getpid()}-{threading.get_ident()}-{target.name}"
        try:
            yield staged
            if not staged.exists():
                raise RenderFailedError(f"Blender reported success but wrote no file {target}.")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(staged, target)
        finally:
            staged.unlink(missing_ok=True)

    def _call(
        self,
        message: dict[str, Any],
        *,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        what: str = "the request",
    ) -> dict[str, Any]:
        with self._lock:
            self._cancelled.clear()
            self._ensure_started()
            self._next_id += 1
            request_id = str(self._next_id)
            deadline = time.monotonic() + timeout if timeout else None
            self._request_log_start = self._log_size()
            try:
                self._send({**message, "id": request_id})
                while True:
                    event = self._read_event(deadline)
                    if event.get("id") != request_id:
                        continue
                    kind = event.get("event")
                    if kind == "progress" and on_progress is not None:
                        on_progress(
                            Progress(int(event["samples_done"]), int(event["samples_total"]))
                        )
                    elif kind == "result":
                        return event
                    elif kind == "error":
                        error = self._error_from_event(event)
                        if isinstance(error, RenderMemoryLimitError):
                            # A process that was refused memory is not trusted again.
                            self._discard_process()
                        raise error
            except _DeadlineError:
                self._discard_process()
                raise RenderTimeoutError(
                    f"Blender took longer than {timeout:g} s for {what} and was stopped."
                ) from None
            except (_WorkerGoneError, BrokenPipeError) as exc:
                code = self._discard_process()
                if self._cancelled.is_set():
                    raise RenderCancelledError(f"Cancelled {what}.") from None
                if self._ran_out_of_memory():
                    raise self._memory_error(f"during {what}") from exc
                raise WorkerCrashedError(
                    f"Blender exited unexpectedly ({_describe_exit(code, self._sandboxed)}) "
                    f"during {what}."
                    f"{self._log_tail()}"
                ) from exc

    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._discard_process()
        self._scratch.mkdir(parents=True, exist_ok=True)
        bwrap = resolve_sandbox(self.limits.sandbox)
        self._log_file = self.log_path.open("ab")
        self._log_start = self._log_file.tell()
        command = self.build.worker_command(WORKER_SCRIPT)
        if bwrap is not None:
            command = sandbox_command(bwrap, self._scratch, command)
        env = scrubbed_environment(self._scratch, self._extra_env)
        if self.limits.memory is not None:
            env["TESSERA_MEMORY_LIMIT"] = str(self.limits.memory)
        try:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log_file,
                cwd=self._scratch,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            self._discard_process()
            raise WorkerStartError(f"Could not start Blender ({command[0]}): {exc}") from exc
        self._sandboxed = bwrap is not None
        self.starts += 1
        try:
            event = self._read_event(time.monotonic() + self._start_timeout)
        except (_WorkerGoneError, _DeadlineError):
            code = self._discard_process()
            if self._ran_out_of_memory():
                raise self._memory_error("while starting") from None
            raise WorkerStartError(
                f"Blender did not start ({_describe_exit(code, self._sandboxed)})."
                f"{self._log_tail()}"
            ) from None
        if event.get("event") != "ready":
            self._discard_process()
            raise WorkerStartError(f"Blender worker sent {event!r} instead of 'ready'.")
        if self._sandboxed:
            self._blender_pid = _host_pid(self._proc.pid, int(event.get("pid") or 0))
            if self._blender_pid is not None:
                init = _parent(self._blender_pid)
                self._inner_pids = [self._blender_pid, *(set(init) - {1, self._proc.pid})]
        log.debug(
            "render worker %s ready%s: Blender %s",
            self.pid,
            " (sandboxed)" if self._sandboxed else "",
            event.get("version"),
        )

    def _send(self, message: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write((json.dumps(message) + "\n").encode())
        self._proc.stdin.flush()

    def _read_event(self, deadline: float | None) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while True:
            while b"\n" not in self._buffer:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise _DeadlineError
                ready, _, _ = select.select([fd], [], [], remaining)
                if not ready:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise _WorkerGoneError
                self._buffer += chunk
            line, _, self._buffer = self._buffer.partition(b"\n")
            # A `blender` executable prints its banner before worker_main takes over stdout.
            if line.startswith(b"{"):
                event: dict[str, Any] = json.loads(line)
                return event
            log.debug("blender: %s", line.decode(errors="replace"))

    def _error_from_event(self, event: Mapping[str, Any]) -> TesseraError:
        error_type = _ERROR_KINDS.get(str(event.get("kind")), WorkerError)
        message = str(event.get("message") or "Blender reported an error.")
        if event.get("traceback"):
            log.debug("worker traceback:\n%s", event["traceback"])
        # Blender often reports a refused allocation as a plain error ("Error writing
        # tile to file") and leaves the real cause (std::bad_alloc) in its log.
        if error_type is RenderMemoryLimitError or (
            error_type is RenderFailedError and self._ran_out_of_memory(self._request_log_start)
        ):
            return self._memory_error(f"({message.strip()})")
        return error_type(message)

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _ran_out_of_memory(self, since: int | None = None) -> bool:
        """Whether the log since `since` (default: this process's start) shows an
        allocation refused under our limit."""
        if self.limits.memory is None:
            return False
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self._log_start if since is None else since)
                text = handle.read().decode(errors="replace")
        except OSError:
            return False
        return any(marker in text for marker in _OUT_OF_MEMORY_MARKERS)

    def _memory_error(self, when: str) -> RenderMemoryLimitError:
        limit = format_bytes(self.limits.memory or 0)
        return RenderMemoryLimitError(
            f"Blender ran out of memory {when}: this node limits a render to {limit} "
            f"(RLIMIT_DATA) and the process needed more.{self._log_tail(600)}"
        )

    def _discard_process(self) -> int | None:
        """Kill the process group (if any), reap it, close pipes; returns the exit code."""
        code = None
        proc, self._proc = self._proc, None
        inner, self._inner_pids = self._inner_pids, []
        self._blender_pid = None
        self._buffer = b""
        if proc is not None:
            if proc.poll() is None:
                _kill_group(proc, inner)
            code = proc.wait()
            for pid in inner:
                _wait_gone(pid)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def _log_tail(self, limit: int = 1200) -> str:
        try:
            data = self.log_path.read_bytes()[-limit:].decode(errors="replace").strip()
        except OSError:
            return ""
        return f"\nLast Blender output:\n{data}" if data else ""


def _kill_group(proc: subprocess.Popen[bytes], inner: list[int] | None = None) -> None:
    # Blender may have spawned helpers (denoiser threads are in-process, but OSL or
    # custom tools are not): the whole group goes. Inside bubblewrap Blender runs in a
    # session of its own: it is killed directly (and by --die-with-parent besides).
    for pid in inner or ():
        if pid != proc.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    """Wait until `pid` has exited (a zombie counts as gone), at most `timeout` s: the
    sandbox's Blender is not our child, so no wait() reaps it for us."""
    deadline = time.monotonic() + timeout
    stat = Path(f"/proc/{pid}/stat")
    while time.monotonic() < deadline:
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in {"Z", "X"}:
            return
        time.sleep(0.01)
    log.warning("sandboxed Blender %s is still running %g s after it was killed", pid, timeout)


def _parent(pid: int) -> list[int]:
    try:
        return [int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])]
    except (OSError, IndexError, ValueError):
        return []


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(child) for child in children.read_text().split()]
            except (OSError, ValueError):
                continue
            found.extend(kids)
            pending.extend(kids)
    return found


def _host_pid(sandbox_pid: int, inner_pid: int) -> int | None:
    """The pid, as seen here, of the descendant of `sandbox_pid` whose pid inside its
    namespace is `inner_pid` (None if it cannot be found)."""
    for candidate in _descendants(sandbox_pid):
        try:
            status = Path(f"/proc/{candidate}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                if len(ids) > 1 and int(ids[-1]) == inner_pid:
                    return candidate
    return None


def _describe_exit(code: int | None, sandboxed: bool = False) -> str:
    if code is None:
        return "no exit status"
    if sandboxed and code > 128:
        code = 128 - code  # bubblewrap exits 128+N when its child dies of signal N
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"

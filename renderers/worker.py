"""The client side of the warm render worker: starts Blender, talks JSON lines, and cleans up.

A `RenderWorker` owns one Blender process (bpy module or `blender` executable) that keeps
a scene open between requests, so a tile costs a render, not a Blender start. The
process runs in its own process group with a scrubbed environment and private
config/scratch folders; a timeout or `cancel()` kills the whole group, and a crash is
reported as a failed render, after which the next request starts a fresh process.

This module never imports bpy (that happens in `worker_main.py`, in the child) and never
touches the network.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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

_ERROR_KINDS: dict[str, type[TesseraError]] = {
    "no_camera": NoCameraError,
    "unsupported_engine": UnsupportedEngineError,
    "corrupt_scene": CorruptSceneError,
    "device_unavailable": DeviceUnavailableError,
    "render_failed": RenderFailedError,
    "denoise_failed": RenderFailedError,
    "bad_request": WorkerError,
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


class RenderWorker:
    """A persistent Blender process that renders on request.

    Use it as a context manager. Requests are serialised; `cancel()` may be called from
    any thread and aborts the request in flight by killing the process group.
    """

    def __init__(
        self,
        build: BlenderBuild,
        *,
        scratch_dir: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        self.build = build
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
        self.starts = 0

    # --- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> RenderWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

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
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _kill_group(proc)

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
        """Render one frame or region; raises a WorkerError subclass on any failure."""
        reply = self._call(
            request.to_message(),
            on_progress=on_progress,
            timeout=timeout,
            what=f"frame {request.frame} of {request.scene.name}",
        )
        return RenderResult(
            output=Path(reply["output"]),
            seconds=float(reply["seconds"]),
            frame_width=int(reply["frame_width"]),
            frame_height=int(reply["frame_height"]),
            device=str(reply["device"]),
        )

    def denoise(self, source: Path, output: Path, timeout: float | None = None) -> Path:
        """Run Cycles' OpenImageDenoise on a single-part multilayer EXR (see denoise.py)."""
        reply = self._call(
            {"op": "denoise", "input": str(source), "output": str(output)},
            timeout=timeout,
            what=f"denoising {source.name}",
        )
        return Path(reply["output"])

    # --- internals ------------------------------------------------------------------------

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
                        raise self._error_from_event(event)
            except _DeadlineError:
                self._discard_process()
                raise RenderTimeoutError(
                    f"Blender took longer than {timeout:g} s for {what} and was stopped."
                ) from None
            except (_WorkerGoneError, BrokenPipeError) as exc:
                code = self._discard_process()
                if self._cancelled.is_set():
                    raise RenderCancelledError(f"Cancelled {what}.") from None
                raise WorkerCrashedError(
                    f"Blender exited unexpectedly ({_describe_exit(code)}) during {what}."
                    f"{self._log_tail()}"
                ) from exc

    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._discard_process()
        self._scratch.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        command = self.build.worker_command(WORKER_SCRIPT)
        try:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log_file,
                cwd=self._scratch,
                env=scrubbed_environment(self._scratch, self._extra_env),
                start_new_session=True,
            )
        except OSError as exc:
            self._discard_process()
            raise WorkerStartError(f"Could not start Blender ({command[0]}): {exc}") from exc
        self.starts += 1
        try:
            event = self._read_event(time.monotonic() + self._start_timeout)
        except (_WorkerGoneError, _DeadlineError):
            code = self._discard_process()
            raise WorkerStartError(
                f"Blender did not start ({_describe_exit(code)}).{self._log_tail()}"
            ) from None
        if event.get("event") != "ready":
            self._discard_process()
            raise WorkerStartError(f"Blender worker sent {event!r} instead of 'ready'.")
        log.debug("render worker %s ready: Blender %s", self.pid, event.get("version"))

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
        return error_type(message)

    def _discard_process(self) -> int | None:
        """Kill the process group (if any), reap it, close pipes; returns the exit code."""
        code = None
        proc, self._proc = self._proc, None
        self._buffer = b""
        if proc is not None:
            if proc.poll() is None:
                _kill_group(proc)
            code = proc.wait()
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


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # Blender may have spawned helpers (denoiser threads are in-process, but OSL or
    # custom tools are not): the whole group goes.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"

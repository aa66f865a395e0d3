"""The client side of the warm render worker: starts Blender, talks JSON lines, and cleans up.

A `RenderWorker` owns one Blender process (bpy module or `blender` executable) that keeps
a scene open between requests, so a tile costs a render, not a Blender start. The
process runs in its own process group with a scrubbed environment and private
config/scratch folders; a timeout or `cancel()` kills the whole group, and a crash is
reported as a failed render, after which the next request starts a fresh process.

`RenderLimits` (renderers.limits) bounds each process: a memory ceiling (RLIMIT_DATA,
set by worker_main before Blender loads), a free-disk check before every render, and,
where bubblewrap is installed, a sandbox (renderers.sandbox) with no network in which
only the worker's scratch folder is writable (Blender writes there; this side moves
finished files to where they were asked for).

A request with `confine_to` (every render of a stranger's bundle) is confined to that
folder: its scene is traced before Blender opens it (renderers.scene_paths), checked
again inside Blender after loading, and the sandbox shows Blender nothing but its own
install, that folder and the scratch folder. See docs/provider-safety.md.

This module never imports bpy (that happens in `worker_main.py`, in the child) and never
touches the network. The limits' and sandbox's public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from common.errors import (
    CorruptSceneError,
    DeviceUnavailableError,
    ExternalPathError,
    NoCameraError,
    RenderCancelledError,
    RenderFailedError,
    RenderTimeoutError,
    TesseraError,
    UnsupportedEngineError,
    WorkerCrashedError,
    WorkerError,
    WorkerStartError,
)
from renderers.builds import BlenderBuild
from renderers.exr_header import read_exr_header
from renderers.finish import (
    FINISH_ERROR_KINDS,
    FinishRequest,
    FinishResult,
    deliver_finished,
    finish_message,
)
from renderers.limits import (
    OUT_OF_MEMORY_MARKERS,
    PASSTHROUGH_ENV,
    SANDBOX_MODES,
    InsufficientDiskSpaceError,
    RenderLimits,
    RenderMemoryLimitError,
    check_free_space,
    cpu_pinning_env,
    default_memory_limit,
    format_bytes,
    parse_cpu_list,
    scrubbed_environment,
)
from renderers.render_request import Progress, ProgressCallback, RenderRequest, RenderResult
from renderers.sandbox import (
    SandboxUnavailableError,
    describe_exit,
    find_bwrap,
    host_pid,
    install_folders,
    kill_group,
    parent_pid,
    resolve_sandbox,
    sandbox_command,
    wait_gone,
)
from renderers.scene_paths import check_scene_paths

__all__ = [
    "PASSTHROUGH_ENV",
    "SANDBOX_MODES",
    "WORKER_SCRIPT",
    "FinishRequest",
    "FinishResult",
    "InsufficientDiskSpaceError",
    "Progress",
    "ProgressCallback",
    "RenderLimits",
    "RenderMemoryLimitError",
    "RenderRequest",
    "RenderResult",
    "RenderWorker",
    "SandboxUnavailableError",
    "check_free_space",
    "cpu_pinning_env",
    "default_memory_limit",
    "find_bwrap",
    "format_bytes",
    "parse_cpu_list",
    "resolve_sandbox",
    "sandbox_command",
    "scrubbed_environment",
]

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("worker_main.py")
#: Loaded by worker_main from beside it; a confined sandbox must show them too.
HELPER_SCRIPTS = tuple(
    Path(__file__).with_name(f"{name}.py")
    for name in ("worker_finish", "worker_confine", "worker_devices")
)
#: `_call`'s default: the request runs in whatever sandbox view the process has.
_ANY_VIEW = object()
#: The one thread every Blender process is started from (see `_ensure_started`); an
#: executor's idle thread waits for the next start for the life of the process.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blender-start")

_ERROR_KINDS: dict[str, type[TesseraError]] = {
    "no_camera": NoCameraError,
    "unsupported_engine": UnsupportedEngineError,
    "corrupt_scene": CorruptSceneError,
    "device_unavailable": DeviceUnavailableError,
    "render_failed": RenderFailedError,
    "denoise_failed": RenderFailedError,
    "bad_request": WorkerError,
    "out_of_memory": RenderMemoryLimitError,
    "external_path": ExternalPathError,
    **FINISH_ERROR_KINDS,
}


class _WorkerGoneError(Exception):
    """The child closed its end of the protocol pipe (it exited or was killed)."""


class _DeadlineError(Exception):
    """The request ran past its time limit."""


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
        #: What the running sandbox shows Blender: None for the whole filesystem, else
        #: the folders of the confined render it was started for.
        self._view: tuple[Path, ...] | None = None
        #: Scenes already traced clean: (scene, root) -> (mtime_ns, size).
        self._traced: dict[tuple[Path, Path], tuple[int, int]] = {}
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

    def start(self, confine_to: Path | None = None) -> None:
        """Start Blender (if not running) and wait until it is ready for requests.

        `confine_to`: start it with the sandbox view that renders confined to that folder
        need (`RenderRequest.confine_to`), replacing a running sandbox that shows something
        else, so that the first such render finds Blender started (files added to the
        folder later are seen in there too: it is a bind mount of the folder itself)."""
        with self._lock:
            if confine_to is None:
                self._ensure_started()
                return
            view = (confine_to.absolute(),)
            if view != self._view and self._sandboxed:
                self._discard_process()
            self._ensure_started(view)

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
            kill_group(proc, [] if inner is None else [inner])

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

    def inspect(
        self, scene: Path, timeout: float = 120, *, confine_to: Path | None = None
    ) -> dict[str, Any]:
        """Open `scene` (scripts disabled) and describe it; see renderers.scene_info.

        `confine_to` confines it as `render` does (ExternalPathError before opening)."""
        message = {"op": "inspect", "scene": str(scene), "confine_to": None}
        view = self._confine(scene, confine_to, message)
        reply = self._call(message, timeout=timeout, view=view)
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
        folder has less than `limits.min_free_disk` free. With `request.confine_to`, a
        scene that reads any file outside that folder (traced before Blender opens it,
        checked again in Blender after loading) raises ExternalPathError, and the
        sandbox shows Blender only its install, that folder and the scratch folder.
        """
        self._check_disk(request.output.parent)
        message = request.to_message()
        view = self._confine(request.scene, request.confine_to, message)
        with self._staged(request.output) as staged:
            message["output"] = str(staged)
            reply = self._call(
                message,
                on_progress=on_progress,
                timeout=timeout,
                what=f"frame {request.frame} of {request.scene.name}",
                view=view,
            )
        return RenderResult(
            output=request.output,
            seconds=float(reply["seconds"]),
            frame_width=int(reply["frame_width"]),
            frame_height=int(reply["frame_height"]),
            device=str(reply["device"]),
            peak_memory=int(reply.get("peak_memory", 0)),
            stages={str(k): float(v) for k, v in dict(reply.get("stages") or {}).items()},
        )

    def denoise(self, source: Path, output: Path, timeout: float | None = None) -> Path:
        """Run Cycles' OpenImageDenoise on a single-part multilayer EXR (see denoise.py)."""
        self._check_disk(output.parent)
        # A confined sandbox shows Blender no folder of ours but the scratch folder.
        inputs = self._scratch / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        copy = inputs / f"{os.getpid()}-{threading.get_ident()}-{source.name}"
        with contextlib.ExitStack() as cleanup, self._staged(output) as staged:
            cleanup.callback(copy.unlink, missing_ok=True)
            shutil.copyfile(source, copy)
            self._call(
                {"op": "denoise", "input": str(copy), "output": str(staged)},
                timeout=timeout,
                what=f"denoising {source.name}",
            )
        return output

    def finish(self, request: FinishRequest) -> FinishResult:
        """Composite `request.merged_exr` with the scene's compositor, colour management
        and output settings, writing Blender's own files for the frame into
        `request.output_dir` (see renderers.finish for names, paths and movies). Raises
        OutputPathError, UnsupportedOutputFormatError or FinishRefusedError for what
        cannot be finished; nothing is written outside `output_dir`."""
        started = time.monotonic()
        self._check_disk(request.output_dir)
        header = read_exr_header(request.merged_exr).parts[0]  # ExrError if not an EXR
        message = finish_message(request, (header.width, header.height))
        view = self._confine(request.scene, request.confine_to, message)
        key = f"{os.getpid()}-{threading.get_ident()}"
        inputs, staged = self._scratch / "inputs", self._scratch / "outputs" / f"finish-{key}"
        inputs.mkdir(parents=True, exist_ok=True)
        copy = inputs / f"{key}-{request.merged_exr.name}"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        try:
            shutil.copyfile(request.merged_exr, copy)  # a confined sandbox shows only scratch
            message.update(scene=str(request.scene), merged_exr=str(copy), output_dir=str(staged))
            what = f"finishing frame {request.frame} of {request.scene.name}"
            reply = self._call(message, timeout=request.timeout, what=what, view=view)
            return deliver_finished(reply, staged, copy, request, time.monotonic() - started)
        finally:
            copy.unlink(missing_ok=True)
            shutil.rmtree(staged, ignore_errors=True)

    # --- internals ------------------------------------------------------------------------

    def _confine(
        self, scene: Path, root: Path | None, message: dict[str, Any]
    ) -> tuple[Path, ...] | None:
        """Check a confined scene's paths (BAT, once per version of the file) and return
        the sandbox view its request needs (None: the whole filesystem)."""
        if root is None:
            return None
        root = root.absolute()
        message["confine_to"] = str(root)
        try:
            stat = scene.stat()
        except OSError:
            return (root,)  # Blender reports the missing scene as it always has
        key, version = (scene.absolute(), root), (stat.st_mtime_ns, stat.st_size)
        if self._traced.get(key) != version:
            check_scene_paths(scene, root)
            self._traced[key] = version
        return (root,)

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
        view: object = _ANY_VIEW,
    ) -> dict[str, Any]:
        """Send `message` and wait for its result. `view`: what the sandbox must show
        Blender (None: everything, read-only; folders: a confined render's); a running
        sandbox that shows something else is replaced first. Any view will do by default."""
        with self._lock:
            self._cancelled.clear()
            wanted = self._view if view is _ANY_VIEW else cast("tuple[Path, ...] | None", view)
            if wanted != self._view and self._sandboxed:
                self._discard_process()
            self._ensure_started(wanted)
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
                    f"Blender exited unexpectedly ({describe_exit(code, self._sandboxed)}) "
                    f"during {what}."
                    f"{self._log_tail()}"
                ) from exc

    def _ensure_started(self, view: tuple[Path, ...] | None = None) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._discard_process()
        self._scratch.mkdir(parents=True, exist_ok=True)
        bwrap = resolve_sandbox(self.limits.sandbox)
        self._log_file = self.log_path.open("ab")
        self._log_start = self._log_file.tell()
        command = self.build.worker_command(WORKER_SCRIPT)
        if bwrap is not None:
            install: tuple[Path, ...] = ()
            if view is not None:
                install = (*install_folders(self.build.kind, str(self.build.path)), *HELPER_SCRIPTS)
            for shared in self.limits.shared_dirs:
                shared.mkdir(parents=True, exist_ok=True)
            command = sandbox_command(
                bwrap,
                self._scratch,
                command,
                readable=view,
                install=install,
                shared=self.limits.shared_dirs,
            )
        self._view = view
        env = scrubbed_environment(self._scratch, self._extra_env)
        if self.limits.memory is not None:
            env["TESSERA_MEMORY_LIMIT"] = str(self.limits.memory)
        try:
            # Started from a thread that lives as long as this process: a sandbox dies
            # with the *thread* that started it (bubblewrap's --die-with-parent uses the
            # kernel's parent-death signal), and callers' threads come and go.
            self._proc = _SPAWNER.submit(
                subprocess.Popen,
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log_file,
                cwd=self._scratch,
                env=env,
                start_new_session=True,
            ).result()
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
                f"Blender did not start ({describe_exit(code, self._sandboxed)}).{self._log_tail()}"
            ) from None
        if event.get("event") != "ready":
            self._discard_process()
            raise WorkerStartError(f"Blender worker sent {event!r} instead of 'ready'.")
        if self._sandboxed:
            self._blender_pid = host_pid(self._proc.pid, int(event.get("pid") or 0))
            if self._blender_pid is not None:
                init = parent_pid(self._blender_pid)
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
        return any(marker in text for marker in OUT_OF_MEMORY_MARKERS)

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
                kill_group(proc, inner)
            code = proc.wait()
            for pid in inner:
                wait_gone(pid)
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

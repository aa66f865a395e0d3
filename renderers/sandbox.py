"""The bubblewrap sandbox a render runs in, and the process bookkeeping it needs.

`find_bwrap` finds a bubblewrap that works here, `resolve_sandbox` turns a
`RenderLimits.sandbox` mode into one (or None, with one warning saying what is then
left unprotected), and `sandbox_command` wraps Blender's argv: no network, every
namespace unshared, only the worker's scratch folder writable, and, for a confined
render, a filesystem holding nothing but Blender's own install, the bundle and the
scratch folder (`SandboxView`). The helpers at the end find and kill a sandboxed
Blender, which is not this process's child.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from common.errors import WorkerStartError

log = logging.getLogger(__name__)


class SandboxUnavailableError(WorkerStartError):
    """The sandbox was required (`sandbox="bwrap"`) but cannot run on this machine."""

    default_hint = (
        "Install bubblewrap (`apt install bubblewrap`) and allow unprivileged user "
        "namespaces, or use sandbox 'auto' to fall back to process isolation."
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
#: private loopback), killed with its parent, in its own session (no terminal to inject
#: input into). The filesystem comes after these (`sandbox_command`).
_BWRAP_NAMESPACES = ("--unshare-all", "--die-with-parent", "--new-session")
#: Fresh /dev, /proc and /dev/shm (after the filesystem binds, which they cover).
_BWRAP_SPECIAL = ("--dev", "/dev", "--proc", "/proc", "--tmpfs", "/dev/shm")
#: The whole filesystem read-only: the view of an unconfined render (a person's own
#: scene, which may read their files anywhere), and of the probe in `find_bwrap`.
_BWRAP_BASE = (*_BWRAP_NAMESPACES, "--ro-bind", "/", "/", *_BWRAP_SPECIAL)
#: What a confined Blender sees of the system besides its own install: programs and
#: shared libraries, the loader's and fontconfig's settings, and /sys (CPU topology,
#: GPU drivers). No /home, /root, /srv, /mnt, /media, /opt, /var, /tmp, /run.
_SYSTEM_PATHS = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/fonts",
    "/etc/localtime",
    "/etc/OpenCL",
    "/etc/vulkan",
    "/etc/glvnd",
    "/etc/nvidia",
    "/sys",
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
            "No render sandbox: bubblewrap (bwrap) is %s. Blender runs with scripts "
            "disabled, a scrubbed environment and its own process group only; it can "
            "reach the network and read every file this user can. Scene paths outside "
            "a confined render's bundle are still refused before and after loading, but "
            "nothing stops a file Blender opens any other way.",
            "not usable here" if shutil.which("bwrap") else "not installed",
        )
    return None


def sandbox_command(
    bwrap: str,
    writable: Path,
    command: list[str],
    *,
    readable: Sequence[Path] | None = None,
    install: Sequence[Path] = (),
    shared: Sequence[Path] = (),
) -> list[str]:
    """`command` wrapped in bubblewrap, with only `writable` writable.

    `readable` None shows the whole filesystem read-only (an unconfined render). A list
    makes the render confined: Blender then sees only the system's programs and
    libraries (`_SYSTEM_PATHS`), its own `install` folders, the files of `command`
    (the worker script), the `readable` folders (the bundle) and `writable`, all at the
    paths the worker names them by; nothing else of the machine exists in there.
    `shared` folders (kernel caches kept across renders) are writable too.
    """
    argv = [bwrap, *_BWRAP_NAMESPACES]
    if readable is None:
        argv += ["--ro-bind", "/", "/"]
    else:
        for system in _SYSTEM_PATHS:
            argv += _read_only(Path(system))
        argv += ["--symlink", "/proc/self/mounts", "/etc/mtab"]
        files = [Path(arg) for arg in command if Path(arg).is_file()]
        for shown in _outermost([*install, *files]):
            argv += _read_only(shown)
        for path in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
            if path.startswith("/"):
                argv += _read_only(Path(path))
        for shown in readable:
            argv += _read_only(shown)
    argv += _BWRAP_SPECIAL
    for pattern in _GPU_DEVICE_GLOBS:
        for device in sorted(Path("/").glob(pattern.lstrip("/"))):
            argv += ["--dev-bind-try", str(device), str(device)]
    for cache in shared:
        argv += ["--bind", str(cache.resolve()), str(cache.absolute())]
    folder = str(writable.resolve())
    argv += ["--bind", folder, folder]
    named = str(writable.absolute())
    if readable is not None and named != folder:
        argv += ["--bind", folder, named]
    return [*argv, "--chdir", folder, *command]


def _outermost(paths: Sequence[Path]) -> list[Path]:
    """`paths` less those inside another of them (by the name given or the real path):
    a mount point cannot be made inside a read-only bind, and need not be."""
    keys = [(p, {str(p.absolute()), str(p.resolve())}) for p in paths]
    kept: list[Path] = []
    for path, names in keys:
        inside = any(
            other is not path
            and any(
                name != outer and name.startswith(outer.rstrip("/") + "/")
                for name in names
                for outer in outers
            )
            for other, outers in keys
        )
        if not inside and path not in kept:
            kept.append(path)
    return kept


def _read_only(path: Path) -> list[str]:
    """Binds that show `path` read-only at the path it is named by and at the path it
    really is (a symlinked venv or bundle folder works either way)."""
    path = path.absolute()
    named, real = str(path), str(path.resolve())
    if path.is_symlink() and path.parent == Path("/"):
        # /bin -> usr/bin on merged-/usr systems: the link, not a second copy.
        return ["--symlink", str(path.readlink()), named]
    binds = ["--ro-bind-try", real, real]
    if named != real:
        binds += ["--ro-bind-try", real, named]
    return binds


@functools.cache
def install_folders(kind: str, executable: str) -> tuple[Path, ...]:
    """The folders Blender needs to run from `executable`: for the bpy module, the
    Python prefixes of that interpreter (its venv and its base install); for a
    `blender` executable, the folder it was unpacked in."""
    if kind != "bpy":
        return (Path(os.path.realpath(executable)).parent,)
    probe = (
        "import json, sys; print(json.dumps(sorted({sys.prefix, sys.base_prefix,"
        " sys.exec_prefix, sys.base_exec_prefix})))"
    )
    try:
        completed = subprocess.run(
            [executable, "-I", "-c", probe], capture_output=True, timeout=30, check=True
        )
        folders = [Path(p) for p in json.loads(completed.stdout)]
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("cannot ask %s where its Python lives (%s)", executable, exc)
        folders = []
    # The interpreter is usually a link into the base install; keep both ends visible.
    return (*folders, Path(executable).parent, Path(os.path.realpath(executable)).parent)


def kill_group(proc: subprocess.Popen[bytes], inner: list[int] | None = None) -> None:
    # Blender may have spawned helpers (denoiser threads are in-process, but OSL or
    # custom tools are not): the whole group goes. Inside bubblewrap Blender runs in a
    # session of its own: it is killed directly (and by --die-with-parent besides).
    for pid in inner or ():
        if pid != proc.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def wait_gone(pid: int, timeout: float = 5.0) -> None:
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


def parent_pid(pid: int) -> list[int]:
    try:
        return [int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])]
    except (OSError, IndexError, ValueError):
        return []


def descendants(pid: int) -> list[int]:
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


def host_pid(sandbox_pid: int, inner_pid: int) -> int | None:
    """The pid, as seen here, of the descendant of `sandbox_pid` whose pid inside its
    namespace is `inner_pid` (None if it cannot be found)."""
    for candidate in descendants(sandbox_pid):
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


def describe_exit(code: int | None, sandboxed: bool = False) -> str:
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

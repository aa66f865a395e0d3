"""What one render process may use, and the environment it starts in.

`RenderLimits` (memory ceiling, minimum free disk, sandbox mode), the checks made before
a render starts (`check_free_space`), the scrubbed environment every Blender gets
(`scrubbed_environment`, `cpu_pinning_env`, `parse_cpu_list`) and the errors a limit
raises. The sandbox itself is `renderers.sandbox`; the worker that applies all of this
is `renderers.worker`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import RenderFailedError, UsageError, WorkerError

__all__ = [
    "OUT_OF_MEMORY_MARKERS",
    "PASSTHROUGH_ENV",
    "SANDBOX_MODES",
    "InsufficientDiskSpaceError",
    "RenderLimits",
    "RenderMemoryLimitError",
    "check_free_space",
    "cpu_pinning_env",
    "default_memory_limit",
    "format_bytes",
    "parse_cpu_list",
    "scrubbed_environment",
]

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


SANDBOX_MODES = ("auto", "bwrap", "off")
#: What Blender leaves in its log when it could not get memory under the limit.
OUT_OF_MEMORY_MARKERS = (
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
    requires it, "off" never uses it. `shared_dirs`: folders every render may write and
    that outlive it (the GPU kernel caches of `farm_node.workers.gpu_cache_env`), made
    writable inside the sandbox too.
    """

    memory: int | None = field(default_factory=default_memory_limit)
    min_free_disk: int = 1 << 30
    sandbox: str = "auto"
    shared_dirs: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.sandbox not in SANDBOX_MODES:
            raise UsageError(
                f"sandbox must be one of {', '.join(SANDBOX_MODES)}, not {self.sandbox!r}."
            )
        if self.memory is not None and self.memory < 64 << 20:
            raise UsageError(f"a memory limit of {self.memory} bytes is below 64 MiB.")
        if self.min_free_disk < 0:
            raise UsageError("the minimum free disk space must not be negative.")


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

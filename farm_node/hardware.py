"""What this machine offers the farm: CPU, memory, Cycles devices, GPUs, Blender build.

The `/proc` readers are PURE parsers (`parse_cpuinfo`, `parse_cpu_flags`,
`parse_meminfo`) tested on captured output in tests/fixtures/node; `probe_capabilities`
puts their answers together with what the render worker and NVML reported into the
`NodeCapabilities` the node registers with.

A probe that fails (no /proc, an unreadable file, no NVML) degrades to a conservative
answer with a logged warning and never crashes the node. This module must not start
Blender (the caller passes the worker's device report in), touch the network, or read
settings from globals.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from protocol.models import GpuInfo, NodeCapabilities
from renderers.builds import BlenderBuild
from renderers.devices import DEVICE_TYPES, ComputeDevice, NvidiaGpu, summarise

__all__ = [
    "CPUINFO",
    "MEMINFO",
    "NO_AVX2_ENV",
    "cpu_kernel",
    "parse_cpu_flags",
    "parse_cpuinfo",
    "parse_meminfo",
    "probe_capabilities",
    "read_proc_file",
]

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")
MEMINFO = Path("/proc/meminfo")

#: Cycles checks only that this variable EXISTS (``getenv(...) != NULL``): any value,
#: even "0", makes it use the SSE4.2 kernel instead of AVX2 (util/debug.cpp).
NO_AVX2_ENV = "CYCLES_CPU_NO_AVX2"

_UNKNOWN_CPU = "unknown CPU"
# x86 says "model name"; other architectures use one of these (first match wins).
_MODEL_KEYS = ("model name", "cpu model", "hardware", "processor name", "cpu")
_KEY_VALUE = re.compile(r"^\s*([^:]+?)\s*:\s*(.*?)\s*$")
_MEMTOTAL = re.compile(r"^MemTotal:\s*(\d+)\s*(kB)?\s*$", re.MULTILINE | re.IGNORECASE)
_ARM_PARTS = {
    "0xd0c": "Neoverse-N1",
    "0xd40": "Neoverse-V1",
    "0xd49": "Neoverse-N2",
    "0xd4f": "Neoverse-V2",
    "0xd08": "Cortex-A72",
    "0xd0b": "Cortex-A76",
}


def _fields(text: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for line in text.splitlines():
        match = _KEY_VALUE.match(line)
        if match is not None:
            pairs.append((match.group(1).lower(), match.group(2)))
    return pairs


def parse_cpuinfo(text: str) -> tuple[str, int]:
    """``(model name, hardware threads)`` from the text of ``/proc/cpuinfo``.

    Threads are the ``processor`` entries (logical CPUs, every socket and hyperthread).
    arm64 kernels print no model name: the CPU part number is named when known. Text
    without any entry gives ``("unknown CPU", 1)``; a machine has at least one thread.
    """
    pairs = _fields(text)
    threads = sum(1 for key, value in pairs if key == "processor" and value.isdigit())
    values: dict[str, str] = {}
    for key, value in pairs:
        values.setdefault(key, value)
    model = next((values[key] for key in _MODEL_KEYS if values.get(key)), "")
    if not model and "cpu part" in values:
        part = values["cpu part"].lower()
        model = f"ARM {_ARM_PARTS.get(part, f'part {part}')}"
    return (" ".join(model.split()) or _UNKNOWN_CPU, max(threads, 1))


def parse_cpu_flags(text: str) -> frozenset[str]:
    """The instruction-set flags of the first CPU (x86 ``flags``, arm64 ``Features``)."""
    for key, value in _fields(text):
        if key in ("flags", "features"):
            return frozenset(value.lower().split())
    return frozenset()


def parse_meminfo(text: str) -> int:
    """Total memory in MiB from the text of ``/proc/meminfo`` (``MemTotal``); 0 if absent."""
    match = _MEMTOTAL.search(text)
    if match is None:
        return 0
    return int(match.group(1)) // 1024


def read_proc_file(path: Path) -> str:
    """The text of a /proc file, or "" with a warning when it cannot be read."""
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        log.warning("Could not read %s (%s); reporting conservative hardware figures", path, exc)
        return ""


def cpu_kernel(cpuinfo: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The Cycles CPU kernel a render process will use: "AVX2", "SSE4.2", "NEON" or "generic".

    `cpuinfo` is the text of /proc/cpuinfo (read when None). `env` is the environment the
    RENDER process gets (default: this process's): `CYCLES_CPU_NO_AVX2` there forces the
    SSE4.2 kernel, exactly as Cycles does. Pixels of different kernels differ slightly,
    so the coordinator compares duplicate samples exactly only within one kernel.
    """
    text = read_proc_file(CPUINFO) if cpuinfo is None else cpuinfo
    environment = os.environ if env is None else env
    flags = parse_cpu_flags(text)
    if "sse4_2" in flags:
        if "avx2" in flags and NO_AVX2_ENV not in environment:
            return "AVX2"
        return "SSE4.2"
    if "asimd" in flags:
        return "NEON"
    return "generic"


def probe_capabilities(
    name: str,
    build: BlenderBuild,
    worker_devices: Sequence[ComputeDevice] | None,
    gpus: Sequence[NvidiaGpu],
    *,
    cpuinfo: str | None = None,
    meminfo: str | None = None,
    env: Mapping[str, str] | None = None,
    threads: int = 0,
    benchmark_score: float | None = None,
    hostname: str | None = None,
    more_builds: Sequence[BlenderBuild] = (),
) -> NodeCapabilities:
    """What this node can render with, as it registers with the coordinator.

    `worker_devices` is the render worker's parsed Cycles report, already limited to the
    devices this node agrees to render with (``None`` when probing failed: CPU only).
    `gpus` comes from `renderers.devices.probe_nvidia`; the VRAM of CUDA/OptiX devices is
    taken from the matching NVML card. `cpuinfo`/`meminfo` default to /proc; `env` is the
    render process's environment (see `cpu_kernel`); `threads` > 0 caps the threads
    reported to what the node is configured to use. `more_builds` are the other Blender
    builds the node offers (``tessera blender add``), listed after `build`'s version.
    """
    cpu_text = read_proc_file(CPUINFO) if cpuinfo is None else cpuinfo
    mem_text = read_proc_file(MEMINFO) if meminfo is None else meminfo
    model, hardware_threads = parse_cpuinfo(cpu_text)
    if model == _UNKNOWN_CPU:
        log.warning("No CPU model in /proc/cpuinfo; reporting %r", model)
    ram_mib = parse_meminfo(mem_text)
    if ram_mib == 0:
        log.warning("No MemTotal in /proc/meminfo; reporting 0 MiB of memory")
    devices = list(worker_devices or [])
    present = {device.type for device in devices} | {"CPU"}
    gpu_rows = [row for row in summarise(devices, gpus) if row["is_gpu"]]
    return NodeCapabilities(
        name=name,
        hostname=(socket.gethostname() if hostname is None else hostname)[:255],
        cpu=model,
        cpu_threads=min(threads, hardware_threads) if threads > 0 else hardware_threads,
        ram_mib=ram_mib,
        devices=[dev_type for dev_type in DEVICE_TYPES if dev_type in present],
        gpus=[
            GpuInfo(
                type=str(row["type"]),
                name=str(row["name"]),
                vram_mib=_int_or_none(row["memory_total_mib"]),
            )
            for row in gpu_rows
        ],
        blender_versions=list(dict.fromkeys([build.version, *(b.version for b in more_builds)])),
        benchmark_score=benchmark_score,
        cpu_kernel=cpu_kernel(cpu_text, env),
    )


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None

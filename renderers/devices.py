"""Which compute devices this machine offers Cycles, and which one a render should use.

Two sources, both reduced to plain data by PURE parsers that are tested on captured output:

- the render worker's report of Cycles devices (`parse_cycles_devices`): a list of
  ``{"type", "name", "id"}`` rows, one per device of every compute type, captured in the
  Blender process (this process never imports ``bpy``);
- NVIDIA's management library (`nvml_snapshot` reads it, `parse_nvml_snapshot` parses it)
  for VRAM, driver and load figures that Cycles does not report.

`resolve_device` turns what a user asked for ("CPU", "GPU", "OPTIX"...) into the Cycles
device type to render with, and fails loudly when it is absent: Cycles itself silently
falls back to the CPU when ``scene.cycles.device = 'GPU'`` finds no GPU.

This module must not import ``bpy``, touch the network or crash on a machine without a
GPU: `nvml_snapshot` is the only impure function and degrades to ``None`` (no GPU) with
one logged warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common.errors import DeviceUnavailableError, UsageError

__all__ = [
    "DEVICE_TYPES",
    "GPU_PREFERENCE",
    "ComputeDevice",
    "NvidiaGpu",
    "normalise_device_name",
    "nvml_snapshot",
    "parse_cycles_devices",
    "parse_nvml_snapshot",
    "probe_nvidia",
    "resolve_device",
    "summarise",
]

log = logging.getLogger(__name__)

#: Every Cycles device type Tessera knows ("NONE" in Cycles' list means "no compute type").
DEVICE_TYPES: tuple[str, ...] = ("CPU", "CUDA", "OPTIX", "HIP", "METAL", "ONEAPI")
#: The order in which "GPU" picks a type: OptiX is CUDA plus RT cores, so it comes first.
GPU_PREFERENCE: tuple[str, ...] = ("OPTIX", "CUDA", "HIP", "METAL", "ONEAPI")
#: Cycles types that run on NVIDIA cards (and so can carry NVML details).
_NVIDIA_TYPES = frozenset({"CUDA", "OPTIX"})
_GPU_ALIAS = "GPU"

# Cycles ids for NVIDIA cards end in the PCI location: "CUDA_<name>_0000:01:00[_OptiX]".
_CYCLES_PCI_RE = re.compile(r"_([0-9A-Fa-f]{4,8}):([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2})(?:_OptiX)?$")
# NVML writes "00000000:01:00.0" (domain:bus:device.function).
_NVML_PCI_RE = re.compile(
    r"^([0-9A-Fa-f]{4,8}):([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2})(?:\.[0-9A-Fa-f])?$"
)


@dataclass(frozen=True, slots=True)
class ComputeDevice:
    """One device as Cycles lists it."""

    type: str  # one of DEVICE_TYPES
    name: str
    id: str

    @property
    def is_gpu(self) -> bool:
        return self.type != "CPU"


@dataclass(frozen=True, slots=True)
class NvidiaGpu:
    """One NVIDIA card as NVML describes it."""

    index: int
    name: str
    uuid: str
    memory_total_mib: int
    memory_used_mib: int
    utilization_percent: int | None
    temperature_c: int | None
    power_w: float | None
    driver_version: str
    cuda_driver_version: str | None
    compute_capability: str | None
    #: "domain:bus:device" as integers, to match Cycles ids on multi-GPU machines.
    pci_location: tuple[int, int, int] | None = None


# --- Cycles ------------------------------------------------------------------------------


def parse_cycles_devices(raw: Sequence[Mapping[str, object]]) -> list[ComputeDevice]:
    """Parse the worker's device report into `ComputeDevice`s, in report order.

    Cycles lists the CPU again after the GPUs of every type, so the same device can come
    several times: rows are de-duplicated by (type, id). Rows of unknown type or without
    a string name/id are dropped with a warning (a newer Blender may add a type).
    """
    devices: list[ComputeDevice] = []
    seen: set[tuple[str, str]] = set()
    for row in raw:
        if not isinstance(row, Mapping):
            log.warning("Ignoring a Cycles device entry that is not a mapping: %r", row)
            continue
        dev_type, name, dev_id = row.get("type"), row.get("name"), row.get("id")
        if (
            not isinstance(dev_type, str)
            or not isinstance(name, str)
            or not isinstance(dev_id, str)
        ):
            log.warning("Ignoring a Cycles device entry without type/name/id: %r", dict(row))
            continue
        dev_type = dev_type.upper()
        if dev_type not in DEVICE_TYPES:
            log.warning("Ignoring Cycles device %r of unknown type %r", name, dev_type)
            continue
        key = (dev_type, dev_id)
        if key in seen:
            continue
        seen.add(key)
        devices.append(ComputeDevice(type=dev_type, name=name, id=dev_id))
    return devices


def normalise_device_name(text: str) -> str:
    """Upper-case a user's device name ("optix" -> "OPTIX"); "GPU" means the best GPU type.

    Raises `UsageError` naming the valid choices for anything else.
    """
    name = text.strip().upper()
    valid = (*DEVICE_TYPES, _GPU_ALIAS)
    if name not in valid:
        raise UsageError(
            f"Unknown device {text!r}; choose one of {', '.join(valid)}",
            hint="GPU picks the best GPU type Cycles finds (OPTIX, then CUDA, HIP, METAL, ONEAPI).",
        )
    return name


def _types_present(available: Sequence[ComputeDevice]) -> list[str]:
    present = {device.type for device in available}
    return [dev_type for dev_type in DEVICE_TYPES if dev_type in present]


def resolve_device(requested: str, available: Sequence[ComputeDevice]) -> str:
    """The Cycles device type to render with, for a user's request.

    "CPU" always works. "GPU" picks the first type of `GPU_PREFERENCE` that Cycles lists.
    A GPU type that is absent raises `DeviceUnavailableError` naming it and what Cycles
    does see: a render asked for a GPU must never quietly run on the CPU.
    """
    wanted = normalise_device_name(requested)
    if wanted == "CPU":
        return "CPU"
    present = _types_present(available)
    if wanted == _GPU_ALIAS:
        for dev_type in GPU_PREFERENCE:
            if dev_type in present:
                return dev_type
    elif wanted in present:
        return wanted
    sees = ", ".join(present) if present else "no devices"
    raise DeviceUnavailableError(f"No {wanted} device on this machine (Cycles sees: {sees})")


# --- NVML --------------------------------------------------------------------------------

_nvml_warned = False


def _warn_nvml_once(message: str, *args: object) -> None:
    global _nvml_warned  # noqa: PLW0603 - "log once" is process-wide by design
    if not _nvml_warned:
        _nvml_warned = True
        log.warning(message, *args)
    else:
        log.debug(message, *args)


def _text(value: object) -> str:
    # pynvml returns str in recent versions and bytes in old ones.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def nvml_snapshot() -> dict[str, object] | None:
    """Read NVIDIA's management library once; ``None`` when there is no NVIDIA GPU.

    This is the only impure NVML code: it returns plain data for `parse_nvml_snapshot`.
    A missing library or driver (ImportError, OSError, any ``pynvml.NVMLError``) logs one
    warning per process and returns ``None``. A figure a card does not support (power,
    utilisation on some models) is ``None`` in that card's entry.
    """
    try:
        import pynvml
    except ImportError as exc:
        _warn_nvml_once("NVML unavailable (pynvml not installed: %s); assuming no NVIDIA GPU", exc)
        return None
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as exc:
        _warn_nvml_once("NVML unavailable (%s); assuming no NVIDIA GPU", exc)
        return None
    try:
        return _read_nvml(pynvml)
    except (pynvml.NVMLError, OSError) as exc:
        _warn_nvml_once("Reading NVML failed (%s); assuming no NVIDIA GPU", exc)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except (pynvml.NVMLError, OSError) as exc:
            log.debug("nvmlShutdown failed: %s", exc)


def _read_nvml(nvml: Any) -> dict[str, object]:
    def optional(name: str, *args: object) -> Any:
        # A figure one card does not support must not hide the others.
        try:
            return getattr(nvml, name)(*args)
        except nvml.NVMLError as exc:
            log.debug("NVML %s not available: %s", name, exc)
            return None

    gpus: list[dict[str, object]] = []
    for index in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        utilization = optional("nvmlDeviceGetUtilizationRates", handle)
        pci = optional("nvmlDeviceGetPciInfo", handle)
        capability = optional("nvmlDeviceGetCudaComputeCapability", handle)
        gpus.append(
            {
                "index": index,
                "name": _text(nvml.nvmlDeviceGetName(handle)),
                "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
                "pci_bus_id": None if pci is None else _text(pci.busId),
                "memory_total_bytes": int(memory.total),
                "memory_used_bytes": int(memory.used),
                "utilization_gpu_percent": None if utilization is None else int(utilization.gpu),
                "temperature_c": optional(
                    "nvmlDeviceGetTemperature", handle, nvml.NVML_TEMPERATURE_GPU
                ),
                "power_usage_mw": optional("nvmlDeviceGetPowerUsage", handle),
                "compute_capability": None if capability is None else list(capability),
            }
        )
    return {
        "driver_version": _text(nvml.nvmlSystemGetDriverVersion()),
        "cuda_driver_version": optional("nvmlSystemGetCudaDriverVersion"),
        "nvml_version": _text(optional("nvmlSystemGetNVMLVersion") or ""),
        "gpus": gpus,
    }


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _cuda_version(value: object) -> str | None:
    # NVML encodes CUDA 13.0 as 13000 and 12.8 as 12080.
    if isinstance(value, str):
        return value or None
    number = _int_or_none(value)
    if number is None or number <= 0:
        return None
    return f"{number // 1000}.{(number % 1000) // 10}"


def _capability(value: object) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, Sequence) and len(value) == 2:
        major, minor = _int_or_none(value[0]), _int_or_none(value[1])
        if major is not None and minor is not None:
            return f"{major}.{minor}"
    return None


def _pci_location(value: object, pattern: re.Pattern[str]) -> tuple[int, int, int] | None:
    if not isinstance(value, str):
        return None
    match = pattern.search(value.strip())
    if match is None:
        return None
    domain, bus, device = (int(part, 16) for part in match.groups())
    return domain, bus, device


def parse_nvml_snapshot(raw: Mapping[str, object] | None) -> list[NvidiaGpu]:
    """Turn `nvml_snapshot`'s plain data into `NvidiaGpu`s; ``None`` or ``{}`` gives ``[]``.

    Pure. Entries without a name or memory figures are skipped with a warning.
    """
    if not raw:
        return []
    driver = _text(raw.get("driver_version") or "unknown")
    cuda = _cuda_version(raw.get("cuda_driver_version"))
    entries = raw.get("gpus")
    if not isinstance(entries, Sequence) or isinstance(entries, str | bytes):
        log.warning("NVML snapshot without a GPU list; assuming no NVIDIA GPU")
        return []
    gpus: list[NvidiaGpu] = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            log.warning("Ignoring NVML entry that is not a mapping: %r", entry)
            continue
        name = entry.get("name")
        total = _int_or_none(entry.get("memory_total_bytes"))
        used = _int_or_none(entry.get("memory_used_bytes"))
        if not isinstance(name, str) or total is None or used is None:
            log.warning("Ignoring NVML entry without name or memory figures: %r", dict(entry))
            continue
        index = _int_or_none(entry.get("index"))
        power_mw = _int_or_none(entry.get("power_usage_mw"))
        gpus.append(
            NvidiaGpu(
                index=position if index is None else index,
                name=name,
                uuid=_text(entry.get("uuid") or ""),
                memory_total_mib=total // (1024 * 1024),
                memory_used_mib=used // (1024 * 1024),
                utilization_percent=_int_or_none(entry.get("utilization_gpu_percent")),
                temperature_c=_int_or_none(entry.get("temperature_c")),
                power_w=None if power_mw is None else power_mw / 1000.0,
                driver_version=driver,
                cuda_driver_version=cuda,
                compute_capability=_capability(entry.get("compute_capability")),
                pci_location=_pci_location(entry.get("pci_bus_id"), _NVML_PCI_RE),
            )
        )
    return gpus


def probe_nvidia() -> list[NvidiaGpu]:
    """The NVIDIA cards of this machine; ``[]`` without NVML or without a card."""
    return parse_nvml_snapshot(nvml_snapshot())


# --- Report ------------------------------------------------------------------------------


def _match_gpu(device: ComputeDevice, gpus: Sequence[NvidiaGpu]) -> NvidiaGpu | None:
    if device.type not in _NVIDIA_TYPES:
        return None
    location = _pci_location(device.id, _CYCLES_PCI_RE)
    if location is not None:
        for gpu in gpus:
            if gpu.pci_location == location:
                return gpu
    # No PCI location on one side: fall back to the name (ambiguous only on machines with
    # several identical cards, where the PCI location is normally there).
    for gpu in gpus:
        if gpu.name == device.name:
            return gpu
    return None


def summarise(
    devices: Sequence[ComputeDevice], gpus: Sequence[NvidiaGpu]
) -> list[dict[str, object]]:
    """JSON-ready rows for ``tessera devices --json``, one per Cycles device.

    CUDA/OptiX rows carry the matching NVML card's VRAM, load and driver figures; every
    row has the same keys (``None`` where nothing is known).
    """
    rows: list[dict[str, object]] = []
    for device in devices:
        gpu = _match_gpu(device, gpus)
        rows.append(
            {
                "type": device.type,
                "name": device.name,
                "id": device.id,
                "is_gpu": device.is_gpu,
                "nvml_index": None if gpu is None else gpu.index,
                "uuid": None if gpu is None else gpu.uuid,
                "memory_total_mib": None if gpu is None else gpu.memory_total_mib,
                "memory_used_mib": None if gpu is None else gpu.memory_used_mib,
                "utilization_percent": None if gpu is None else gpu.utilization_percent,
                "temperature_c": None if gpu is None else gpu.temperature_c,
                "power_w": None if gpu is None else gpu.power_w,
                "driver_version": None if gpu is None else gpu.driver_version,
                "cuda_driver_version": None if gpu is None else gpu.cuda_driver_version,
                "compute_capability": None if gpu is None else gpu.compute_capability,
            }
        )
    return rows

"""Which render workers a node runs: one per GPU it may use, and a CPU worker when asked.

A node with N GPUs runs N workers, each bound to one card (its Cycles device ids, see
`renderers.worker_devices`), each registering with the coordinator as its own node
(``host/gpu0``, ``host/gpu1``, ``host/cpu``) so that each leases, renders and reports
its device class on its own. `plan_workers` decides this from the worker's Cycles device
report, the node's `--device` and `--gpus` and `--cpu-worker`; it is PURE and tested on
captured device lists. `gpu_cache_env` places the GPU kernel caches under the node's
data folder so that a compiled kernel survives worker restarts.

This module must not start Blender, touch the network or read the environment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import DeviceUnavailableError, UsageError
from renderers.devices import ComputeDevice, normalise_device_name, resolve_device

__all__ = [
    "CUDA_CACHE_MAXSIZE",
    "GpuSelection",
    "WorkerPlan",
    "gpu_cache_dirs",
    "gpu_cache_env",
    "parse_gpu_selection",
    "plan_workers",
    "worker_name",
]

#: `--gpus`: "all", "none", or the indexes of the cards to use.
GpuSelection = str | tuple[int, ...]
#: The CUDA driver's largest JIT cache (4 GiB; its default, 256 MiB, is too small for
#: Cycles' kernels compiled from PTX, which then recompile on every start).
CUDA_CACHE_MAXSIZE = 4 << 30
_OPTIX_SUFFIX = "_OptiX"


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """One worker of a node: what it renders with."""

    #: "gpu0", "gpu1"... (the card's index among the chosen type's cards) or "cpu".
    label: str
    #: The Cycles device type: "CPU", "OPTIX", "CUDA"...
    device: str
    #: The Cycles ids of this worker's card, of every type Cycles lists it under (CUDA
    #: and OptiX name one card twice); empty for the CPU.
    device_ids: tuple[str, ...] = ()
    #: The card's name as Cycles reports it ("CPU" for the CPU worker).
    card: str = "CPU"

    @property
    def is_gpu(self) -> bool:
        return self.device != "CPU"

    def describe(self) -> str:
        return "CPU" if not self.is_gpu else f"{self.label} {self.device} ({self.card})"


def parse_gpu_selection(text: str) -> GpuSelection:
    """``--gpus``: "all", "none" or a list of card indexes such as "0,2".

    Raises `UsageError` naming the bad part.
    """
    value = text.strip().lower()
    if value in ("all", "none"):
        return value
    indexes: list[int] = []
    for raw in value.split(","):
        part = raw.strip()
        if not part.isdigit():
            raise UsageError(
                f"--gpus {text!r}: {part!r} is not a GPU index",
                hint="Pass all, none, or card indexes such as 0,2 (see `tessera devices`).",
            )
        if int(part) not in indexes:
            indexes.append(int(part))
    return tuple(indexes)


def _card_key(device: ComputeDevice) -> str:
    # Cycles names a card's OptiX device by its CUDA id plus "_OptiX".
    return device.id.removesuffix(_OPTIX_SUFFIX)


def _cards(devices: Sequence[ComputeDevice], device_type: str) -> list[WorkerPlan]:
    """The cards Cycles lists for `device_type`, in its order, each with all its ids."""
    ids: dict[str, list[str]] = {}
    for device in devices:
        if device.is_gpu:
            ids.setdefault(_card_key(device), []).append(device.id)
    return [
        WorkerPlan(
            label=f"gpu{index}",
            device=device_type,
            device_ids=tuple(ids[_card_key(device)]),
            card=device.name,
        )
        for index, device in enumerate(d for d in devices if d.type == device_type)
    ]


def plan_workers(
    devices: Sequence[ComputeDevice],
    *,
    device: str = "CPU",
    gpus: GpuSelection | None = None,
    cpu_worker: bool = False,
) -> list[WorkerPlan]:
    """The workers a node runs, GPU workers first.

    `devices` is the Cycles report. `device` is ``--device``: "CPU" keeps the node on the
    CPU unless `gpus` names cards; "GPU" (or a type) makes `gpus` default to "all". A
    GPU type that is absent, or a card index that does not exist, raises
    (`DeviceUnavailableError`, `UsageError`): a GPU asked for never becomes a CPU render.
    """
    wanted = normalise_device_name(device)
    if gpus is None:
        gpus = "none" if wanted == "CPU" else "all"
    cpu = WorkerPlan(label="cpu", device="CPU")
    if gpus == "none":
        return [cpu]
    device_type = resolve_device("GPU" if wanted == "CPU" else wanted, devices)
    cards = _cards(devices, device_type)
    if gpus == "all":
        chosen = cards
    else:
        assert isinstance(gpus, tuple)
        missing = [index for index in gpus if index >= len(cards)]
        if missing:
            listed = ", ".join(f"{i}: {card.card}" for i, card in enumerate(cards))
            raise UsageError(
                f"--gpus names GPU {', '.join(map(str, missing))}, but Cycles lists "
                f"{len(cards)} {device_type} GPU{'s' if len(cards) != 1 else ''} here ({listed}).",
                hint="Pass indexes from 0 to the number of GPUs minus one, or --gpus all.",
            )
        if not gpus:
            raise UsageError("--gpus names no GPU.", hint="Pass all, none, or indexes like 0,2.")
        chosen = [cards[index] for index in gpus]
    if not chosen:
        raise DeviceUnavailableError(f"No {device_type} GPU on this machine.")
    return [*chosen, cpu] if cpu_worker else chosen


def worker_name(node_name: str, plan: WorkerPlan, workers: int) -> str:
    """The name a worker registers under: the node's own when it is the only worker,
    else ``node/gpu0``, ``node/cpu``... (one provider account, one entry per worker)."""
    return node_name if workers == 1 else f"{node_name}/{plan.label}"


def gpu_cache_dirs(data_dir: Path) -> tuple[Path, Path]:
    """The CUDA JIT cache and the OptiX cache folders of a node's data folder."""
    root = data_dir / "gpu-cache"
    return root / "cuda", root / "optix"


def gpu_cache_env(data_dir: Path) -> dict[str, str]:
    """Variables that keep compiled GPU kernels under the node's data folder, large
    enough for Cycles: the first start of a card without a prebuilt kernel (an H100 with
    bpy 5.0.1) compiles for minutes; later starts read the cache."""
    cuda, optix = gpu_cache_dirs(data_dir)
    return {
        "CUDA_CACHE_PATH": str(cuda),
        "CUDA_CACHE_MAXSIZE": str(CUDA_CACHE_MAXSIZE),
        "CUDA_CACHE_DISABLE": "0",
        "OPTIX_CACHE_PATH": str(optix),
        "OPTIX_CACHE_MAXSIZE": str(CUDA_CACHE_MAXSIZE),
    }

"""Matching: whether a node meets a job's requirements, and why no node does.

A job asks for a device class, a Blender version, and optionally a pool, a GPU name,
GPU memory and node memory (`protocol.models.JobRequirements`). `unmet` names the first
requirement a node fails; `why_none` turns a farm's nodes into the sentence a waiting
job shows its owner, naming the requirement that no node meets. What nodes declare is
a bounded claim (the models bound every number); it is checked here on every lease.
A node that reports no figure (RAM 0, a GPU's VRAM None: a machine whose memory could
not be read) is not held to that requirement: locking it out of every probed job would
be worse than a render that runs out of memory there and goes to another node.

Pure: no database, no clock. Pool membership is looked up by `coordinator.pools` and
passed in as the pools a node may serve.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from common.blender_versions import offers_series
from protocol.models import GpuInfo, JobSpec, NodeCapabilities
from protocol.requirements import format_mib

__all__ = ["Candidate", "job_gpus", "node_meets", "unmet", "why_none"]

#: The requirements in the order they are checked (and named when no node meets one).
CHECKS = ("device", "pool", "gpu", "vram", "ram", "blender")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A node as matching sees it: what it declares and the pools it may serve (the
    ones it claims that its owner was added to)."""

    caps: NodeCapabilities
    pools: frozenset[str] = frozenset()


def _device_ok(caps: NodeCapabilities, spec: JobSpec) -> bool:
    if "CYCLES" not in caps.engines:
        return False
    if spec.device in ("ANY", "CPU"):
        return "CPU" in caps.devices
    if spec.device == "GPU":
        return any(d != "CPU" for d in caps.devices)
    return spec.device in caps.devices


def _on_gpu(spec: JobSpec) -> bool:
    return spec.device not in ("ANY", "CPU")


def job_gpus(caps: NodeCapabilities, spec: JobSpec) -> list[GpuInfo]:
    """The node's GPUs the job could render on: its device class's (any for 'GPU')."""
    if not _on_gpu(spec):
        return []
    return [g for g in caps.gpus if spec.device in ("GPU", g.type)]


def _gpu_named(gpu: GpuInfo, spec: JobSpec) -> bool:
    wanted = spec.requirements.gpu.casefold()
    return not wanted or wanted in gpu.name.casefold()


def _vram_ok(gpu: GpuInfo, spec: JobSpec) -> bool:
    # A GPU that reports no memory figure is not held to one (see the module docstring).
    need = spec.requirements.min_vram_mib
    return need == 0 or gpu.vram_mib is None or gpu.vram_mib >= need


def _passes(check: str, node: Candidate, spec: JobSpec) -> bool:
    caps, need = node.caps, spec.requirements
    if check == "device":
        return _device_ok(caps, spec)
    if check == "pool":
        return not need.pool or need.pool in node.pools
    if check == "gpu":
        return not need.gpu or any(_gpu_named(g, spec) for g in job_gpus(caps, spec))
    if check == "vram":
        # One GPU must have both the name asked for and the memory.
        if not _on_gpu(spec) or need.min_vram_mib == 0:
            return True
        return any(_gpu_named(g, spec) and _vram_ok(g, spec) for g in job_gpus(caps, spec))
    if check == "ram":
        return need.min_ram_mib == 0 or caps.ram_mib == 0 or caps.ram_mib >= need.min_ram_mib
    # A scene saved by 5.0 renders on 5.0.x builds only (unless the job allows any).
    return not spec.blender_version or offers_series(spec.blender_version, caps.blender_versions)


def unmet(node: Candidate, spec: JobSpec) -> str | None:
    """The first requirement of `spec` that `node` fails (a name of CHECKS), or None."""
    for check in CHECKS:
        if not _passes(check, node, spec):
            return check
    return None


def node_meets(node: Candidate, spec: JobSpec) -> bool:
    """Whether the node may be leased the job's tasks (its price aside)."""
    return unmet(node, spec) is None


def why_none(nodes: Sequence[Candidate], spec: JobSpec, which: str = "connected") -> str:
    """Why none of `nodes` meets `spec` ('' when one does), naming the requirement at
    which the last candidates fall away and what the nodes offer instead. `which` says
    what nodes these are ('connected', 'registered')."""
    left = list(nodes)
    for check in CHECKS:
        passing = [node for node in left if _passes(check, node, spec)]
        if not passing:
            return f"No {which} node can run this job: " + _reason(check, left, spec, which)
        left = passing
    return ""


def _reason(check: str, nodes: Iterable[Candidate], spec: JobSpec, which: str) -> str:
    need = spec.requirements
    nodes = list(nodes)
    if check == "device":
        offered = sorted({d for n in nodes for d in n.caps.devices})
        return (
            f"it needs {spec.device}"
            + (f" and Blender {spec.blender_version}" if spec.blender_version else "")
            + f"; nodes offer {', '.join(offered) or 'nothing'}."
        )
    if check == "pool":
        return (
            f"it runs only in pool '{need.pool}' and no {which} node serves that pool"
            " (its owner adds providers with `tessera pool add`)."
        )
    if check == "gpu":
        names = sorted({g.name for n in nodes for g in job_gpus(n.caps, spec)})
        return (
            f"it needs a {spec.device} GPU whose name contains '{need.gpu}' (--gpu);"
            f" {which} nodes have {', '.join(names) or 'no such GPU'}."
        )
    if check == "vram":
        sizes = [
            g.vram_mib
            for n in nodes
            for g in job_gpus(n.caps, spec)
            if _gpu_named(g, spec) and g.vram_mib is not None
        ]
        most = (
            f"the most a {which} node's GPU has is {format_mib(max(sizes))}"
            if sizes
            else f"no {which} node reports its GPU memory"
        )
        return f"it needs {format_mib(need.min_vram_mib)} of VRAM on one GPU (--min-vram); {most}."
    if check == "ram":
        ram = max((n.caps.ram_mib for n in nodes), default=0)
        return (
            f"it needs {format_mib(need.min_ram_mib)} of RAM (--min-ram); the most a {which}"
            f" node has is {format_mib(ram)}."
        )
    versions = sorted({v for n in nodes for v in n.caps.blender_versions})
    return (
        f"it needs Blender {spec.blender_version}; nodes offer"
        f" {', '.join(versions) or 'no version'}."
    )

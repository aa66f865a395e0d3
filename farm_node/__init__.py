"""The provider node: renders the farm's tasks on this machine.

One job per module (the rqd shape), each testable alone:

- `config`: `NodeConfig`, everything a node is told once, and its checks;
- `hardware`: pure /proc parsers and the capabilities a node registers with;
- `benchmark`: the node's speed relative to a reference machine, measured once;
- `bundle_cache`: fetched, verified, safely extracted scene bundles, evicted LRU;
- `runner`: leases turned into renders/denoises on warm Blender workers;
- `availability`: when the node may render (always, when idle, in chosen hours, below a
  GPU temperature cap), decided from plain readings;
- `gate`: whether to take work now (availability, free disk), logged once per change;
- `retry`: backoff and quiet logging while the coordinator does not answer;
- `outbox`: finished EXRs kept crash-safe until the coordinator has them;
- `heartbeat`: the thread beside each task (progress, cancels, stop grace, yielding);
- `failures`: an exception turned into a `TaskFailure` (wire kind, bounded, no paths);
- `cheats`: deliberately dishonest renders (a wrapper runner), only to demo verification;
- `daemon`: the loop: register, lease, run the task, deliver, report failures;
- `workers`: which workers a node runs (one per GPU, a CPU worker), from Cycles' list;
- `warmup`: a GPU worker's warm-up render (kernels compiled before it takes work);
- `fleet`: the workers side by side, each its own daemon, a crashed one restarted;
- `main`: the composition root and signal handling; `run_node` is ``tessera node``.

Importing this package imports none of them: the names below load on first use, so the
CLI's lazy imports stay lazy. The node may import `renderers`, `protocol` and `common`;
never Qt, never `coordinator`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from farm_node.availability import ProvidePolicy
    from farm_node.bundle_cache import BundleCache
    from farm_node.config import NodeConfig
    from farm_node.daemon import NodeDaemon
    from farm_node.hardware import probe_capabilities
    from farm_node.main import run_node
    from farm_node.runner import TaskRunner

__all__ = [
    "BundleCache",
    "NodeConfig",
    "NodeDaemon",
    "ProvidePolicy",
    "TaskRunner",
    "probe_capabilities",
    "run_node",
]

_HOMES = {
    "BundleCache": "farm_node.bundle_cache",
    "NodeConfig": "farm_node.config",
    "NodeDaemon": "farm_node.daemon",
    "ProvidePolicy": "farm_node.availability",
    "TaskRunner": "farm_node.runner",
    "probe_capabilities": "farm_node.hardware",
    "run_node": "farm_node.main",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

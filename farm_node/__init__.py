"""The provider node: renders the farm's tasks on this machine.

One job per module, composed by `daemon.NodeDaemon` (the rqd shape):

- `hardware`: pure /proc parsers and the capabilities a node registers with;
- `bundle_cache`: fetched, verified, safely extracted scene bundles, evicted LRU;
- `runner`: leases turned into renders/denoises on warm Blender workers;
- `benchmark`: the node's speed relative to a reference machine, measured once;
- `availability`: when the node may render (always, when idle, in chosen hours, below a
  GPU temperature cap), decided from plain readings;
- `cheats`: deliberately dishonest renders, only to demonstrate verification;
- `daemon`: register, lease, heartbeat, upload, deliver pending results; `run_node` is
  what ``tessera node`` calls.

The node may import `renderers`, `protocol` and `common`; never Qt, never `coordinator`.
"""

from farm_node.availability import ProvidePolicy
from farm_node.bundle_cache import BundleCache
from farm_node.daemon import NodeConfig, NodeDaemon, run_node
from farm_node.hardware import probe_capabilities
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

"""`tessera node`'s worker options: which GPUs get a worker, a CPU worker beside them, and
the warm-up's time limit (`farm_node.workers`, `farm_node.warmup`), and the extra Blender
builds registered with ``tessera blender add``.

Kept apart from `app.cli.farm` (one job: these options and their values). Nothing here
starts Blender or talks to the coordinator.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from app.cli.blender import registry_file
from app.cli.options import positive
from common.settings import Settings

__all__ = ["add_worker_options", "worker_options"]


def add_worker_options(node: argparse.ArgumentParser) -> None:
    """Add --gpus, --cpu-worker and --warmup-timeout to `tessera node`."""
    node.add_argument(
        "--gpus",
        default=None,
        metavar="all|none|LIST",
        help="run one worker per GPU: all (the default with --device GPU or a GPU type), "
        "none, or card indexes such as 0,2 (see `tessera devices`); each worker registers "
        "as NAME/gpuN and leases on its own",
    )
    node.add_argument(
        "--cpu-worker",
        action="store_true",
        help="also run a CPU worker (NAME/cpu) beside the GPU workers",
    )
    node.add_argument(
        "--warmup-timeout",
        type=positive,
        default=None,
        metavar="SECONDS",
        help="time limit of a GPU worker's warm-up render, which compiles its kernels "
        "before it takes work (default 1800)",
    )


def worker_options(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """`NodeConfig` fields of these options and of the registered Blender builds
    (``tessera blender add``); `UsageError` names a bad --gpus."""
    from farm_node.workers import parse_gpu_selection
    from renderers.build_registry import registered

    fields: dict[str, Any] = {
        "cpu_worker": bool(args.cpu_worker),
        "more_builds": [Path(e["path"]) for e in registered(registry_file(settings))],
    }
    if args.gpus is not None:
        fields["gpus"] = parse_gpu_selection(args.gpus)
    if args.warmup_timeout is not None:
        fields["warmup_timeout"] = args.warmup_timeout
    return fields

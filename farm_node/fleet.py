"""A node's workers run side by side: one `NodeDaemon` per `WorkerPlan`, supervised.

Each worker gets its own configuration (`worker_config`: its name ``host/gpu0``, its
device and card ids, its own results/scratch folder, the shared GPU kernel caches), its
own coordinator client and task runner, and its own thread; the bundle cache is shared
(it is thread-safe). A worker whose daemon dies of an unexpected error is started again
after `restart_delay` without touching the others; one that stops for a reason retrying
cannot fix (a refused token, a missing device) stays stopped, logged. A crashed Blender
is restarted by its own `RenderWorker` on the next request, which touches no other
worker either.

This module must not import Qt or the coordinator.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence

from common.errors import TesseraError
from farm_node.bundle_cache import BundleCache
from farm_node.config import NodeConfig
from farm_node.daemon import NodeDaemon
from farm_node.runner import TaskRunner
from farm_node.workers import WorkerPlan, gpu_cache_dirs, gpu_cache_env, worker_name
from protocol.client import TesseraClient

__all__ = ["Fleet", "worker_config"]

log = logging.getLogger(__name__)

#: Builds a worker's (client, runner) from its configuration.
PartsFactory = Callable[[NodeConfig], tuple[TesseraClient, TaskRunner]]


def worker_config(config: NodeConfig, plan: WorkerPlan, workers: int) -> NodeConfig:
    """The configuration of one worker of a node of `workers` workers.

    A node of one worker keeps its name and data folder. Several workers get names
    ``NAME/gpu0``... and results/scratch folders ``DATA/workers/gpu0``...; the bundle
    cache stays at ``DATA/bundles``. GPU workers get the kernel cache variables (caches
    under ``DATA/gpu-cache``, writable inside the sandbox).
    """
    data_dir = config.data_dir if workers == 1 else config.data_dir / "workers" / plan.label
    extra_env = dict(config.extra_env)
    limits = config.limits
    if plan.is_gpu:
        extra_env = {**gpu_cache_env(config.data_dir), **extra_env}
        shared = (*limits.shared_dirs, *gpu_cache_dirs(config.data_dir))
        limits = dataclasses.replace(limits, shared_dirs=shared)
    return dataclasses.replace(
        config,
        name=worker_name(config.name, plan, workers),
        data_dir=data_dir,
        device=plan.device,
        device_ids=plan.device_ids,
        extra_env=extra_env,
        limits=limits,
    )


class Fleet:
    """Runs a node's workers until `run`'s stop is set (see the module docstring)."""

    def __init__(
        self,
        config: NodeConfig,
        plans: Sequence[WorkerPlan],
        parts: PartsFactory,
        cache: BundleCache,
        *,
        restart_delay: float = 5.0,
    ) -> None:
        if not plans:
            raise ValueError("a fleet needs at least one worker")
        self.config = config
        self.plans = list(plans)
        self.configs = [worker_config(config, plan, len(plans)) for plan in plans]
        self.cache = cache
        self.restart_delay = restart_delay
        self._parts = parts
        self._lock = threading.Lock()
        #: The running daemon of each worker, by label (replaced on a restart).
        self.daemons: dict[str, NodeDaemon] = {}
        #: How many times each worker's daemon was started.
        self.starts: dict[str, int] = {plan.label: 0 for plan in plans}
        #: Why a worker stopped for good, by label.
        self.stopped: dict[str, str] = {}
        self._aborted = threading.Event()

    def run(self, stop: threading.Event) -> int:
        """Run every worker; 0 when all stopped cleanly, 1 when one stopped for good."""
        for plan in self.plans:
            log.info("Worker %s", plan.describe())
        if len(self.plans) == 1:
            self._supervise(self.plans[0], self.configs[0], stop)
        else:
            threads = [
                threading.Thread(
                    target=self._supervise,
                    args=(plan, worker, stop),
                    name=f"tessera-worker-{plan.label}",
                    daemon=True,
                )
                for plan, worker in zip(self.plans, self.configs, strict=True)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        return 1 if self.stopped else 0

    def abort(self) -> None:
        """Cancel every worker's task in flight now (a second Ctrl-C)."""
        self._aborted.set()
        with self._lock:
            daemons = list(self.daemons.values())
        for daemon in daemons:
            daemon.abort()

    def _supervise(self, plan: WorkerPlan, config: NodeConfig, stop: threading.Event) -> None:
        while not stop.is_set():
            client, runner = self._parts(config)
            daemon = NodeDaemon(config, client, runner, self.cache)
            with self._lock:
                self.daemons[plan.label] = daemon
                self.starts[plan.label] += 1
            if self._aborted.is_set():
                daemon.abort()
            try:
                daemon.run(stop)
                return
            except TesseraError as exc:
                log.error("Worker %s stopped: %s", config.name, exc)
                with self._lock:
                    self.stopped[plan.label] = str(exc)
                return
            except Exception:  # any: one worker's bug must not stop the others
                log.exception(
                    "Worker %s crashed; starting it again in %g s", config.name, self.restart_delay
                )
                stop.wait(self.restart_delay)
            finally:
                client.close()

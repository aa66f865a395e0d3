"""The node's composition root: a `NodeConfig` in, a running node out (``tessera node``).

`run_node` validates the configuration, forwards the node's own CPU-kernel variables to
Blender (`worker_environment`), chooses the Blender to render with (`select_build`),
plans the workers (one per GPU, `plan_node_workers`), builds the bundle cache and, per
worker, a coordinator client and a task runner, hands them to a `Fleet` of
`NodeDaemon`s, and installs the SIGINT/SIGTERM handlers: the first signal stops after the
current task (within `NodeConfig.stop_grace`), a second one cancels it at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from types import FrameType

from common.blender_versions import blender_series
from common.errors import BlenderNotFoundError, TesseraError, UsageError
from farm_node.bundle_cache import BundleCache
from farm_node.config import FORWARDED_ENV, NodeConfig, sandbox_refusal
from farm_node.connection_files import read_connection_files
from farm_node.fleet import Fleet
from farm_node.runner import TaskRunner
from farm_node.workers import WorkerPlan, plan_workers
from protocol.client import TesseraClient
from renderers.bpy_memo import probe_bpy_remembered
from renderers.build_registry import identify_build
from renderers.builds import BlenderBuild, find_builds
from renderers.devices import normalise_device_name
from renderers.sandbox import find_bwrap

__all__ = ["more_builds", "plan_node_workers", "run_node", "select_build", "worker_environment"]

log = logging.getLogger(__name__)


def worker_environment(extra_env: Mapping[str, str], node_env: Mapping[str, str]) -> dict[str, str]:
    """The variables every Blender of this node gets on top of the scrubbed environment.

    Render processes inherit nothing, so `FORWARDED_ENV` variables set for the node itself
    (``CYCLES_CPU_NO_AVX2=1 tessera node``) are forwarded explicitly; `extra_env` wins.
    """
    forwarded = {name: node_env[name] for name in FORWARDED_ENV if name in node_env}
    return {**forwarded, **extra_env}


def select_build(config: NodeConfig) -> BlenderBuild:
    """The Blender this node renders with: the first executable named, else this
    interpreter's bpy module (when `use_bpy`), else ``blender`` on PATH."""
    if config.blender_executables:
        return find_builds(config.blender_executables, search_path=False, include_bpy=False)[0]
    if config.use_bpy:
        build = probe_bpy_remembered(config.bpy_memo)
        if build is not None:
            return build
    builds = find_builds(search_path=True, include_bpy=False)
    if not builds:
        raise BlenderNotFoundError("No Blender to render with: no bpy module, no blender on PATH.")
    return builds[0]


def run_node(config: NodeConfig) -> int:
    """Build a node from `config` and run it until SIGINT/SIGTERM; the exit status.

    The node runs one worker per GPU it may use (and a CPU worker when asked, see
    `farm_node.workers.plan_workers`), each leasing on its own (`farm_node.fleet`).
    The first signal stops after the current tasks (within `stop_grace`); a second one
    cancels them at once. Returns 0 after a clean stop, 1 when the node could not go on.
    """
    try:
        config.validate()
        # A node started beside its coordinator (`tessera render`) has its imports done
        # by now; the sandbox rule below depends on where the coordinator is.
        config = read_connection_files(config)
        config.validate()
        config = dataclasses.replace(
            config, extra_env=worker_environment(config.extra_env, os.environ)
        )
        _check_sandbox(config)
        build = select_build(config)
        log.info("Rendering with %s", build.label)
        more = more_builds(config, build)
        plans = plan_node_workers(config, build)
        log.info(
            "%d worker%s: %s",
            len(plans),
            "s" * (len(plans) > 1),
            "; ".join(plan.describe() for plan in plans),
        )
    except TesseraError as exc:
        log.error("The node cannot start: %s", exc)
        return 1

    def parts(worker: NodeConfig) -> tuple[TesseraClient, TaskRunner]:
        return TesseraClient(worker.coordinator_url, worker.token), make_runner(worker, build, more)

    stop = threading.Event()
    fleet = Fleet(config, plans, parts, _cache(config))
    previous = _install_signal_handlers(stop, fleet)
    try:
        return fleet.run(stop)
    finally:
        _restore_signal_handlers(previous)


def plan_node_workers(config: NodeConfig, build: BlenderBuild) -> list[WorkerPlan]:
    """The node's workers; Cycles' device list is asked (in a Blender) only when a GPU is."""
    if normalise_device_name(config.device) == "CPU" and config.gpus in (None, "none"):
        return [WorkerPlan(label="cpu", device="CPU")]
    probe = make_runner(config, build)
    try:
        devices = probe.devices()
    finally:
        probe.close()
    plans = plan_workers(
        devices, device=config.device, gpus=config.gpus, cpu_worker=config.cpu_worker
    )
    return plans


def more_builds(config: NodeConfig, main: BlenderBuild) -> list[BlenderBuild]:
    """The registered builds of other Blender series than `main`'s, one per series (a
    broken one is skipped with a warning: the node starts with what works)."""
    series = {blender_series(main.version)}
    builds: list[BlenderBuild] = []
    for path in config.more_builds:
        try:
            build = identify_build(path)
        except BlenderNotFoundError as exc:
            log.warning("Not offering the Blender at %s: %s", path, exc.message)
            continue
        if blender_series(build.version) in series:
            log.info("Not offering %s: a %s build is offered already", build.label, build.version)
            continue
        series.add(blender_series(build.version))
        builds.append(build)
        log.info("Also offering %s", build.label)
    return builds


def make_runner(
    config: NodeConfig, build: BlenderBuild, more: Sequence[BlenderBuild] = ()
) -> TaskRunner:
    """A worker's task runner, bound to its card (`NodeConfig.device_ids`)."""
    return TaskRunner(
        build,
        config.scratch_dir,
        config.device,
        config.threads,
        task_timeout=config.task_timeout,
        extra_env=config.extra_env,
        max_warm=config.max_warm_workers,
        limits=config.limits,
        device_ids=config.device_ids,
        more_builds=more,
    )


def _check_sandbox(config: NodeConfig) -> None:
    """Refuse to serve strangers without a sandbox unless told so (`sandbox_refusal`)."""
    works = config.limits.sandbox != "auto" or find_bwrap() is not None
    refusal = sandbox_refusal(config.coordinator_url, config.limits.sandbox, works)
    if refusal is not None:
        raise UsageError(
            refusal,
            hint="Install bubblewrap (e.g. `apt install bubblewrap`), or pass `--sandbox off` "
            "to render without it at your own risk.",
        )


def _cache(config: NodeConfig) -> BundleCache:
    return BundleCache(
        config.cache_dir,
        config.cache_max_bytes,
        max_uncompressed_bytes=config.bundle_max_uncompressed_bytes,
        max_files=config.bundle_max_files,
    )


_Handler = Callable[[int, FrameType | None], object] | int | None


def _install_signal_handlers(
    stop: threading.Event, daemon: Fleet
) -> dict[signal.Signals, _Handler]:
    if threading.current_thread() is not threading.main_thread():
        log.debug("Not in the main thread: no signal handlers (the caller sets the stop event)")
        return {}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning("Second %s: cancelling the current task now", signal.Signals(signum).name)
            daemon.abort()
        else:
            log.info("%s: finishing the current task, then stopping", signal.Signals(signum).name)
            stop.set()

    previous: dict[signal.Signals, _Handler] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, on_signal)
    return previous


def _restore_signal_handlers(previous: Mapping[signal.Signals, _Handler]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)

"""The provider node's loop: leases in, uploaded EXRs (or failure reports) out.

`NodeDaemon` is handed its parts (the rqd habit: each testable alone) and runs

1. deliver results still pending from an earlier attempt or run (`outbox`);
2. register with the coordinator, retrying with backoff while it is unreachable
   (`retry`); a GPU worker then renders its warm-up frame (`warmup`) and, until it
   succeeded, reports "warming" (or "failed", with the reason) and leases nothing;
3. ask the `gate` whether to take work (availability, free disk); when it says no, do not
   poll, and tell the coordinator why now and then;
4. long-poll for a lease and run its task with a `heartbeat` thread beside it; while
   idle (before the first poll, after a poll that brought nothing), keep a Blender
   pre-started for the next new bundle (`TaskRunner.prestart`, `NodeConfig.prestart`);
5. keep the finished EXR in the outbox until the coordinator has it, so losing the
   coordinator (or the node) loses no finished work.

A task's outcome is one of: delivered; *released* (the node is stopping, the machine is
no longer available, the disk is full: the coordinator re-queues it and counts nothing);
dropped (the coordinator cancelled it or gave it away); or *failed*. Any exception while
fetching, extracting, rendering or denoising a task (a scene's, a bundle's, a library's,
a bug's) fails that task with a `TaskFailure` (`failures.failure_report`: a wire kind, a
bounded message without local paths, not retryable for scene and bundle faults) and the
node goes on to its next lease: bad input never stops a node.

Cheating (`farm_node.cheats`) is a wrapper around the runner, chosen here once; the
render path below is the same for every node. Configuration is `config.NodeConfig`;
building a node from it, and signal handling, are `main`'s.

This module must not import Qt or the coordinator, or read settings from globals or the
environment at import time.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from enum import Enum
from pathlib import Path

from common.errors import ApiError, CoordinatorUnreachableError, SceneNotFoundError, TesseraError
from farm_node.availability import AvailabilityTracker
from farm_node.benchmark import benchmark_score
from farm_node.bundle_cache import BundleCache
from farm_node.cheats import Cheat, CheatingRunner
from farm_node.config import NodeConfig
from farm_node.errors import LeaseError
from farm_node.failures import failure_report
from farm_node.gate import Gate, disk_full
from farm_node.hardware import probe_capabilities
from farm_node.heartbeat import (
    LEASE_GONE,
    STOPPING,
    UPLOADING,
    YIELDING,
    HeartbeatThread,
    TaskControl,
)
from farm_node.outbox import SAFE_ID, Outbox, PendingResult
from farm_node.retry import Backoff, ProblemLog
from farm_node.runner import TaskRunner
from farm_node.warmup import WarmUp
from protocol.client import TesseraClient
from protocol.models import Lease, LeaseRequest, NodeCapabilities, NodeRegistration, TaskKind
from renderers.demo_scene import generate_demo_scene
from renderers.devices import GPU_PREFERENCE, normalise_device_name, probe_nvidia, resolve_device

__all__ = [
    "Backoff",
    "NodeConfig",
    "NodeDaemon",
    "PendingResult",
]

log = logging.getLogger(__name__)

#: How often a warming (or failed) worker tells the coordinator so; it stays listed.
_READINESS_REPORT_SECONDS = 5.0
#: How often the thread that ends the long poll on stop checks that the node still runs.
STOP_CHECK_SECONDS = 0.05


class _Poll(Enum):
    """What the loop does when a lease request brought no lease."""

    AGAIN = "again"
    BACK_OFF = "back off"


class NodeDaemon:
    """One provider node: registers, leases, renders, uploads, until `run`'s stop is set."""

    def __init__(
        self,
        config: NodeConfig,
        client: TesseraClient,
        runner: TaskRunner,
        cache: BundleCache,
        *,
        rng: random.Random | None = None,
        cheat: Cheat | None = None,
        availability: AvailabilityTracker | None = None,
    ) -> None:
        """`cheat` overrides `config.cheat` (a test passes one with a seeded RNG);
        `availability` overrides the tracker built from `config.policy`."""
        self.config = config
        self.client = client
        self.runner = runner
        self.cache = cache
        if cheat is None and config.cheat is not None:
            cheat = Cheat(config.cheat)
        self.cheat = cheat
        #: What renders and denoises tasks: the runner, or a cheat wrapped around it.
        self.tasks: TaskRunner | CheatingRunner = (
            runner if cheat is None else CheatingRunner(runner, cheat)
        )
        self.node_id: str | None = None
        self.registration: NodeRegistration | None = None
        self._rng = rng or random.Random()
        self._abort = threading.Event()
        #: Set when `run` returns (ends the thread that wakes the long poll on stop).
        self._served = threading.Event()
        self._coordinator = ProblemLog("Talking to the coordinator")
        self._heartbeats = ProblemLog("Sending heartbeats")
        self._tasks_dir = config.scratch_dir / "tasks"
        self.outbox = Outbox(config.results_dir, client, self._coordinator)
        if availability is None:
            availability = AvailabilityTracker(
                config.policy,
                config.machine_state_file,
                renders_on_gpu=config.device.strip().upper() != "CPU",
            )
        self.availability = availability
        self.gate = Gate(config, availability, (config.results_dir, self._tasks_dir))
        #: The warm-up render of a GPU worker (None: this worker takes work at once).
        self.warmup: WarmUp | None = None
        #: No lease since the last poll that brought none (or since the start): a
        #: Blender may be pre-started without taking CPU from a render.
        self._idle = True

    # --- public ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Serve the coordinator until `stop` is set; closes the runner on the way out.

        Raises `TesseraError` only for what retrying cannot fix (a refused token, a
        device this machine does not have).
        """
        try:
            self._prepare_folders()
            if self.cheat is not None:
                log.warning(
                    "THIS NODE CHEATS (--cheat %s): it fakes renders on purpose, to "
                    "demonstrate the farm's verification. Never use it for real work.",
                    self.cheat.mode.value,
                )
            if self.config.warms_up:
                self.warmup = self._start_warmup()
            capabilities = self.capabilities()
            log.info(
                "Node %r: %s, %d threads, %s, devices %s, Blender %s",
                capabilities.name,
                capabilities.cpu,
                capabilities.cpu_threads,
                capabilities.cpu_kernel,
                ", ".join(capabilities.devices),
                ", ".join(capabilities.blender_versions),
            )
            if self.availability.active:
                log.info("Providing %s", self.config.policy.describe())
            if self.config.prestart and self.warmup is None:
                # Start Blender while registering: a job already queued (`tessera render`
                # submits as its nodes come up) is leased at once.
                self.runner.prestart()
            waker = threading.Thread(
                target=self._end_poll_on_stop, args=(stop,), name="end-poll", daemon=True
            )
            waker.start()
            self._serve(stop, capabilities)
        finally:
            if self.warmup is not None:
                self.warmup.stop()
            self._served.set()
            self.runner.close()
            log.info("Node stopped")

    def abort(self) -> None:
        """Cancel the task in flight now, without waiting for the stop grace period."""
        self._abort.set()

    @property
    def paused_reason(self) -> str | None:
        """Why the node takes no work right now (in plain words), None when it does."""
        return self.gate.paused_reason

    def capabilities(self) -> NodeCapabilities:
        """Probe the machine (degrading on failure); raises only for a missing device."""
        wanted = normalise_device_name(self.config.device)
        devices = []
        if wanted != "CPU":
            available = self.runner.devices()
            chosen = resolve_device(wanted, available)  # a GPU asked for must exist
            allowed = set(GPU_PREFERENCE) if wanted == "GPU" else {chosen}
            devices = [device for device in available if device.type in allowed]
            if self.config.device_ids:  # one worker per GPU: this worker's card only
                devices = [d for d in devices if d.id in self.config.device_ids]
        score = None
        if self.warmup is None or self.warmup.state == "ready":
            # A GPU worker measures itself once warm (else the kernel compilation counts).
            score = self._benchmark(resolve_device(wanted, devices) if devices else "CPU")
        capabilities = probe_capabilities(
            self.config.name,
            self.runner.build,
            devices,
            probe_nvidia(),
            env=self.config.extra_env,
            threads=self.config.threads,
            benchmark_score=score,
            more_builds=self.runner.more_builds,
        )
        return capabilities.model_copy(
            update={"price": self.config.price, "pools": list(self.config.pools)}
        )

    def pending(self) -> list[PendingResult]:
        """Finished results not delivered yet, oldest first."""
        return self.outbox.pending()

    def deliver_pending(self) -> bool:
        """Try to deliver every pending result; False if some must wait (coordinator down)."""
        return self.outbox.deliver_all()

    # --- the loop ---------------------------------------------------------------------------

    def _end_poll_on_stop(self, stop: threading.Event) -> None:
        """Once `stop` is set, ask the coordinator to end this node's long poll, so an
        idle node stops at once instead of waiting out the poll (`poll_wait`)."""
        while not stop.wait(STOP_CHECK_SECONDS):
            if self._served.is_set():
                return
        node_id = self.node_id
        if node_id is None or self._served.is_set():
            return
        try:
            self.client.stop_polling(node_id)
        except (ApiError, CoordinatorUnreachableError) as exc:
            # An older coordinator, or none: the poll ends when its wait runs out.
            log.debug("Could not end the long poll early: %s", exc)

    def _serve(self, stop: threading.Event, capabilities: NodeCapabilities) -> None:
        backoff = Backoff(self.config.retry_initial, self.config.retry_max, self._rng)
        while not stop.is_set():
            if not self.deliver_pending():
                stop.wait(backoff.next_delay())
                continue
            if self.node_id is None and not self._register(capabilities):
                stop.wait(backoff.next_delay())
                continue
            if self.warmup is not None:
                if self.warmup.state != "ready":
                    self._report_readiness(self.warmup, stop)
                    continue
                # Warm now: measure the benchmark on the warm device and register again.
                self.warmup = None
                capabilities = self.capabilities()
                self.node_id = None
                continue
            if not self.gate.may_lease():
                self.gate.report_pause(self.client, self.node_id, self._release)
                stop.wait(self.config.availability_interval)
                continue
            if self._idle and self.config.prestart:
                self.runner.prestart()  # in the background; a no-op when one is ready
            lease = self._lease()
            if lease is _Poll.BACK_OFF:
                stop.wait(backoff.next_delay())
                continue
            backoff.reset()
            if isinstance(lease, _Poll):
                self._idle = True
                continue
            self._idle = False
            if stop.is_set():
                self._release(lease)
                break
            self._run_task(lease, stop)

    def _start_warmup(self) -> WarmUp:
        device = self.runner.resolve(self.config.device)  # a GPU asked for must exist
        warmup = WarmUp(
            self.runner,
            self._demo_scene,
            self._tasks_dir / "warm-up.exr",
            device=device,
            label=self.config.name,
            timeout=self.config.warmup_timeout,
        )
        warmup.start()
        return warmup

    def _report_readiness(self, warmup: WarmUp, stop: threading.Event) -> None:
        """Tell the coordinator this worker is warming up (or failed to): it leases
        nothing, and lists the worker with the progress or the reason."""
        warmup.log_progress()
        assert self.node_id is not None
        request = LeaseRequest(wait=0, paused=warmup.message(), readiness=warmup.state)
        try:
            lease = self.client.lease(self.node_id, request)
        except (ApiError, CoordinatorUnreachableError) as exc:
            log.debug("Could not report the warm-up to the coordinator: %s", exc)
        else:
            if lease is not None:  # a coordinator that ignores readiness: hand it back
                self._release(lease)
        deadline = time.monotonic() + _READINESS_REPORT_SECONDS
        while not warmup.done.is_set() and not stop.is_set() and time.monotonic() < deadline:
            warmup.done.wait(0.1)  # a warm-up that ends is reported at once
        if warmup.state == "failed":
            stop.wait(max(0.0, deadline - time.monotonic()))

    def _register(self, capabilities: NodeCapabilities) -> bool:
        try:
            registration = self.client.register_node(capabilities)
        except CoordinatorUnreachableError as exc:
            self._coordinator.failed(exc)
            return False
        except ApiError as exc:
            if exc.status < 500:
                raise  # a refused token or bad capabilities: retrying will not help
            self._coordinator.failed(exc)
            return False
        self._coordinator.recovered()
        self.node_id, self.registration = registration.node_id, registration
        log.info("Registered with %s as node %s", self.config.coordinator_url, self.node_id)
        for notice in registration.notices:  # a pool the coordinator refused
            log.warning("%s", notice)
        return True

    def _lease(self) -> Lease | _Poll:
        """A lease, or what to do instead: ask again now, or after a backoff."""
        assert self.node_id is not None
        request = LeaseRequest(
            cached_bundles=self.cache.cached()[:1000],
            warm_bundles=self.runner.warm_bundles()[:100],
            wait=self._poll_wait(),
        )
        try:
            lease = self.client.lease(self.node_id, request)
        except CoordinatorUnreachableError as exc:
            self._coordinator.failed(exc)
            return _Poll.BACK_OFF
        except ApiError as exc:
            if exc.status == 404:  # the coordinator forgot this node (a fresh database)
                log.warning(
                    "The coordinator does not know node %s; registering again", self.node_id
                )
                self.node_id = None
                return _Poll.AGAIN
            if exc.status < 500:
                raise
            self._coordinator.failed(exc)
            return _Poll.BACK_OFF
        self._coordinator.recovered()
        return _Poll.AGAIN if lease is None else lease

    def _poll_wait(self) -> float:
        wait = self.config.poll_wait
        if self.registration is not None and self.registration.poll_timeout > 0:
            wait = min(wait, self.registration.poll_timeout)
        return max(0.0, min(wait, 60.0))

    # --- one task ---------------------------------------------------------------------------

    def _run_task(self, lease: Lease, stop: threading.Event) -> None:
        log.info(
            "Lease %s: %s task %s of %r",
            lease.lease_id,
            lease.task.kind,
            lease.task.id,
            lease.job_name,
        )
        settled = False
        heartbeat = HeartbeatThread(
            lease,
            TaskControl(),
            config=self.config,
            client=self.client,
            gate=self.gate,
            cancel_render=self.tasks.cancel,
            stop=stop,
            abort=self._abort,
            problems=self._heartbeats,
        )
        try:
            with heartbeat as control:
                try:
                    _check_id(lease.lease_id, "lease id")
                    if lease.task.kind is TaskKind.DENOISE:
                        output = self._denoise(lease, control)
                    elif lease.task.kind is TaskKind.FINISH:
                        output = self._finish(lease, control)
                    else:
                        output = self._render(lease, control)
                except Exception as exc:  # any: bad input must never stop a node
                    settled = self._task_failed(lease, control, exc)
                    return
                if control.cancel_reason not in (None, STOPPING, YIELDING):
                    # Cancelled or lost as the render ended: the coordinator wants none of
                    # it. (A node stopping or yielding as it finished delivers what it has.)
                    settled = self._task_cancelled(lease, control)
                    return
                try:
                    result = self.outbox.keep(lease.lease_id, lease.task.id, output)
                except OSError as exc:
                    settled = self._result_not_kept(lease, exc)
                    return
                settled = True
                control.progress, control.message = 1.0, UPLOADING
                self.outbox.deliver(result, keep=_feeds_a_finish(lease))
        finally:
            if SAFE_ID.match(lease.lease_id):
                (self._tasks_dir / f"{lease.lease_id}.exr").unlink(missing_ok=True)
            if not settled:
                # Guard, reserve, always release: a bug here must not hold the task
                # until its lease expires.
                self._release(lease)

    def _render(self, lease: Lease, control: TaskControl) -> Path:
        """Render a render or verify lease with the bundle's scene."""
        sha = lease.bundle
        with self.cache.pin(sha):
            control.message = "fetching the scene bundle"
            folder = self.cache.ensure(sha, lambda target: self.client.download_bundle(sha, target))
            scene = _scene_in_bundle(folder, lease.scene_path)
            output = self._tasks_dir / f"{lease.lease_id}.exr"
            control.raise_if_cancelled()
            control.message = "rendering"
            result = self.tasks.render(lease, scene, output, on_progress=control.on_progress)
        log.info("Lease %s rendered in %.1f s", lease.lease_id, result.seconds)
        return result.output

    def _denoise(self, lease: Lease, control: TaskControl) -> Path:
        source = self._tasks_dir / f"{lease.lease_id}.denoise-input.exr"
        output = self._tasks_dir / f"{lease.lease_id}.exr"
        try:
            control.message = "fetching the merged frame"
            self.client.download_denoise_input(lease.lease_id, source)
            control.raise_if_cancelled()
            control.message = "denoising"
            self.tasks.denoise(lease, source, output)
        finally:
            source.unlink(missing_ok=True)
        return output

    def _finish(self, lease: Lease, control: TaskControl) -> Path:
        """Make a final frame into the scene's own files (a zip of them)."""
        sha = lease.bundle
        source = self._tasks_dir / f"{lease.lease_id}.finish-input.exr"
        output = self._tasks_dir / f"{lease.lease_id}.exr"
        with self.cache.pin(sha):
            control.message = "fetching the scene bundle"
            folder = self.cache.ensure(sha, lambda target: self.client.download_bundle(sha, target))
            scene = _scene_in_bundle(folder, lease.scene_path)
            # The frame this node has just delivered (a whole frame, a denoise) is the
            # finish's input: same SHA-256, same bytes, no download.
            own = self.outbox.take_delivered(lease.denoise_input or "")
            try:
                if own is not None:
                    source = own
                else:
                    control.message = "fetching the frame"
                    self.client.download_denoise_input(lease.lease_id, source)
                control.raise_if_cancelled()
                control.message = "finishing"
                self.tasks.finish(lease, scene, source, output)
            finally:
                source.unlink(missing_ok=True)
        return output

    def _task_failed(self, lease: Lease, control: TaskControl, error: Exception) -> bool:
        if control.cancel_reason is not None:
            return self._task_cancelled(lease, control)
        shortage = disk_full(error) or self.gate.disk_shortage()
        if shortage is not None:
            # A full disk is this node's problem, not the task's: hand it back unharmed
            # (no attempt counted), and stop taking work this node cannot finish.
            log.warning(
                "Lease %s refused for lack of disk space (%s): %s",
                lease.lease_id,
                type(error).__name__,
                shortage.splitlines()[0],
            )
            self.gate.pause_for_disk(shortage)
            self._release(lease)
            return True
        failure = failure_report(error, self._private_places(lease))
        if isinstance(error, TesseraError | OSError):
            log.warning(
                "Lease %s failed (%s, %s, %s): %s",
                lease.lease_id,
                failure.kind.value,
                type(error).__name__,
                "retryable" if failure.retryable else "not retryable",
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
            )
        else:  # not an error the node knows: a bug or a library's surprise, with its trace
            log.error(
                "Lease %s failed unexpectedly (%s); reporting it and going on",
                lease.lease_id,
                failure.kind.value,
                exc_info=error,
            )
        try:
            self.client.report_failure(lease.lease_id, failure)
        except (ApiError, CoordinatorUnreachableError) as exc:
            # The lease then expires and the coordinator re-queues the task itself.
            log.warning("Could not report the failure of lease %s: %s", lease.lease_id, exc.message)
        return True

    def _private_places(self, lease: Lease) -> list[tuple[Path, str]]:
        """The node's own folders as they may appear in a message, and what replaces them."""
        config = self.config
        places = [
            (config.data_dir, "<node>"),
            (config.cache_dir, "<cache>"),
            (config.scratch_dir, "<scratch>"),
            (config.results_dir, "<results>"),
            (Path.home(), "~"),
            (self.cache.path(lease.bundle), "<bundle>"),  # a Sha256: always a valid name
        ]
        # A pre-started worker renders the bundle from its slot folder.
        places += [(slot, "<bundle>") for slot in self.runner.bundle_folders(lease.bundle)]
        return places

    def _task_cancelled(self, lease: Lease, control: TaskControl) -> bool:
        reason = control.cancel_reason
        if reason in (STOPPING, YIELDING):
            self._release(lease)
        else:
            log.info("Lease %s cancelled (%s)", lease.lease_id, reason)
        return True

    def _release(self, lease: Lease) -> None:
        try:
            self.client.release(lease.lease_id)
        except ApiError as exc:
            if exc.status not in LEASE_GONE:
                log.warning("Could not release lease %s: %s", lease.lease_id, exc.message)
                return
        except CoordinatorUnreachableError as exc:
            log.warning("Could not release lease %s: %s", lease.lease_id, exc.message)
            return
        log.info("Released lease %s", lease.lease_id)

    def _result_not_kept(self, lease: Lease, error: OSError) -> bool:
        """A rendered EXR that could not be kept in ``results/`` (a full disk, most
        likely): nothing was delivered, so nothing accepted is lost; the task goes back."""
        shortage = disk_full(error)
        log.error(
            "Could not keep the result of lease %s in %s (%s); handing the task back",
            lease.lease_id,
            self.config.results_dir,
            error,
        )
        if shortage is not None:
            self.gate.pause_for_disk(shortage)
        self._release(lease)
        return True

    # --- setup --------------------------------------------------------------------------------

    def _prepare_folders(self) -> None:
        self.outbox.prepare()
        self._tasks_dir.mkdir(parents=True, exist_ok=True)
        # Partial outputs of a node that died mid-task; their leases have expired.
        for leftover in self._tasks_dir.iterdir():
            if leftover.is_file():
                leftover.unlink(missing_ok=True)

    def _demo_scene(self) -> Path:
        scene = self.config.data_dir / "benchmark" / "demo.blend"
        if not scene.exists():
            generate_demo_scene(self.runner.build, scene)
        return scene

    def _benchmark(self, device: str) -> float | None:
        if not self.config.benchmark:
            return None
        try:
            return benchmark_score(
                self.runner, self._demo_scene, self.config.benchmark_file, device=device
            )
        except (TesseraError, OSError) as exc:
            log.warning("The benchmark failed (%s); registering without a score", exc)
            return None


def _feeds_a_finish(lease: Lease) -> bool:
    """Whether the task's result may be the input of a finish task as it is: a frame
    rendered whole, or a denoised frame (kept after delivery for `_finish`)."""
    kind = lease.task.kind
    if kind is TaskKind.DENOISE:
        return True
    whole = lease.assignment is not None and lease.assignment.whole_frame
    return whole and kind in (TaskKind.RENDER, TaskKind.BACKUP)


def _check_id(value: str, what: str) -> str:
    if not SAFE_ID.match(value):
        raise LeaseError(f"The coordinator sent a {what} that is not a safe file name: {value!r}")
    return value


def _scene_in_bundle(folder: Path, scene_path: str) -> Path:
    parts = scene_path.split("/")
    if not scene_path or scene_path.startswith("/") or "\\" in scene_path or ".." in parts:
        raise LeaseError(f"The scene path {scene_path!r} leaves its bundle.")
    scene = folder.joinpath(*parts)
    if not scene.resolve().is_relative_to(folder.resolve()):
        raise LeaseError(f"The scene path {scene_path!r} leaves its bundle.")
    if not scene.is_file():
        raise SceneNotFoundError(f"The bundle has no file {scene_path!r}.")
    return scene

"""Run leased tasks through warm Blender workers: one per (bundle, device), at most a few.

`TaskRunner` turns a `Lease` into a `renderers.worker.RenderRequest` (pixel-exact border
from the assignment's render region, samples, percentage, seed, denoising data passes,
the device resolved against what Cycles reports) and renders it with a worker that
already has the bundle's scene open when one does. Workers of other bundles are closed
beyond `max_warm`. `denoise` denoises a merged frame through the same workers, and
`finish` makes a final frame into the scene's own files (a zip with its manifest).

`prestart` starts, in the background, a Blender of the main build confined to an empty
*slot* folder (`farm_node.slots`), so that the first frame of the next new bundle does
not wait for Blender to start: the bundle's files are linked into the slot, the scene is
rendered from there, and that worker is the bundle's warm worker from then on.

Every Blender it starts gets the runner's `RenderLimits` (memory ceiling, free disk
checked before each render, sandbox); a render refused for lack of disk space raises
`InsufficientDiskSpaceError` before Blender starts, and the daemon hands the task back.

`cancel()` may be called from any thread (the heartbeat thread does) and stops the
render in flight by killing its Blender process group. This module never touches the
network, the bundle cache or the coordinator: the daemon passes files in and takes
files out.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from common.blender_versions import blender_series
from common.errors import (
    RenderCancelledError,
    RenderFailedError,
    TesseraError,
    WorkerError,
)
from farm_node.errors import LeaseError
from farm_node.slots import fill_slot, make_slot, remove_slot
from protocol.models import (
    Lease,
)
from protocol.output import (
    FINISH_MANIFEST,
    FinishedEntry,
    FinishManifest,
)
from renderers.builds import BlenderBuild
from renderers.denoise import denoise_frame
from renderers.devices import ComputeDevice, parse_cycles_devices, resolve_device
from renderers.exr import read_exr, write_exr
from renderers.finish import FinishRequest, FinishResult
from renderers.regions import PixelRect, border_fractions
from renderers.scene_paths import bundle_root
from renderers.worker import (
    Progress,
    ProgressCallback,
    RenderLimits,
    RenderRequest,
    RenderResult,
    RenderWorker,
)

__all__ = [
    "DEFAULT_MAX_WARM",
    "TaskRunner",
    "WorkerFactory",
    "lease_resolution",
    "pack_finished",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_WARM = 2
#: A lease's device that leaves the choice to the node.
_ANY_DEVICE = ("", "ANY")
_T = TypeVar("_T")

#: Builds a worker from (build, scratch folder, extra environment); a custom factory
#: chooses its workers' limits itself.
WorkerFactory = Callable[[BlenderBuild, Path, Mapping[str, str]], RenderWorker]


class TaskRunner:
    """Renders and denoises leased tasks with warm `RenderWorker`s (thread-safe `cancel`).

    `device` is the node's own choice ("CPU", "GPU", "OPTIX"...), used when a lease leaves
    the device to the node; `threads` = 0 means all cores. `extra_env` reaches every
    Blender process (e.g. ``{"CYCLES_CPU_NO_AVX2": "1"}``). `limits` bound every render
    (default `RenderLimits()`: 80% of RAM, 1 GiB free disk, the sandbox when it works).
    """

    def __init__(
        self,
        build: BlenderBuild,
        scratch: Path,
        device: str = "CPU",
        threads: int = 0,
        *,
        task_timeout: float | None = None,
        extra_env: Mapping[str, str] | None = None,
        max_warm: int = DEFAULT_MAX_WARM,
        limits: RenderLimits | None = None,
        worker_factory: WorkerFactory | None = None,
        device_ids: tuple[str, ...] = (),
        more_builds: Sequence[BlenderBuild] = (),
    ) -> None:
        if max_warm < 1:
            raise ValueError("max_warm must be at least 1")
        self.build = build
        #: Builds of other Blender series this node offers (``tessera blender add``): a
        #: lease naming a series renders on a build of it (`build_for`).
        self.more_builds = list(more_builds)
        self.scratch = scratch
        self.device = device
        #: The Cycles ids of this runner's GPU (one worker per GPU); empty: every device
        #: of the type. Every GPU render it sends turns on these devices only.
        self.device_ids = tuple(device_ids)
        self.threads = threads
        self.task_timeout = task_timeout
        self.extra_env = dict(extra_env or {})
        self.max_warm = max_warm
        self.limits = limits if limits is not None else RenderLimits()
        self._factory = worker_factory or self._limited_worker
        self._workers: OrderedDict[tuple[str, str, Path], RenderWorker] = OrderedDict()
        # A started worker not yet tied to a bundle (the device probe's or the
        # benchmark's): the next new bundle takes it instead of starting Blender again.
        self._spare: RenderWorker | None = None
        # A worker started (or starting, in a background thread) confined to an empty slot
        # folder: the next new bundle of the main build is linked into its slot.
        self._prestarted: RenderWorker | None = None
        #: The background starts not over yet (close() cuts them short and joins them).
        self._prestarters: dict[RenderWorker, threading.Thread] = {}
        #: The slot folder of each worker started confined to one (one bundle per slot).
        self._slots: dict[RenderWorker, Path] = {}
        self._devices: list[ComputeDevice] | None = None
        self._serial = 0
        self._state_lock = threading.Lock()
        self._current: RenderWorker | None = None
        self._in_task = False
        self._cancelled = threading.Event()
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> TaskRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Quit every warm Blender (a pre-start in progress is cut short) and delete the
        workers' scratch and slot folders."""
        with self._state_lock:
            self._closed = True
            workers = list(self._workers.values())
            self._workers.clear()
            for unbound in (self._spare, self._prestarted):
                if unbound is not None:
                    workers.append(unbound)
            self._spare = self._prestarted = None
            starting = dict(self._prestarters)
        for worker in starting:
            worker.cancel()  # kills a Blender still starting; the start then fails
        for worker in workers:
            self._close_worker(worker)
        for thread in starting.values():
            thread.join()

    def prestart(self) -> bool:
        """Start a Blender of the main build in the background, confined to an empty slot
        folder, for the next lease of a bundle no warm worker has. It takes over the spare
        worker (the benchmark's, the device probe's) when there is one; outside a
        sandbox that one is simply kept. Returns False (and does nothing) when one is
        pre-started already, or the runner is closed. Best effort: a failed start is
        logged and the next new bundle starts its own Blender, as without it."""
        with self._state_lock:
            if self._closed or self._prestarted is not None:
                return False
            worker = self._spare if self._spare is not None else self._new_worker()
            self._spare = None
            self._serial += 1
            try:
                slot = make_slot(self.scratch / f"slot-{self._serial}")
            except OSError as exc:
                log.warning("Cannot make a slot folder to pre-start Blender in: %s", exc)
                self._spare = worker
                return False
            self._prestarted = worker
            self._slots[worker] = slot
            # A plain background start (renderers.worker starts every Blender from a
            # lasting thread of its own, so this thread may end when the start does).
            thread = threading.Thread(
                target=self._prestart_one, args=(worker, slot), name="prestart", daemon=True
            )
            self._prestarters[worker] = thread
            thread.start()
        return True

    def _prestart_one(self, worker: RenderWorker, slot: Path) -> None:
        try:
            worker.start(confine_to=slot)
        except (TesseraError, OSError) as exc:
            with self._state_lock:
                unused = self._prestarted is worker and not self._closed
                if unused:
                    self._prestarted = None
            if unused:  # else a task took it (and starts it again) or the runner closes
                log.warning("Could not pre-start Blender (%s); starting it when needed", exc)
                self._close_worker(worker)
        else:
            log.debug("Blender %s pre-started in %s for the next bundle", worker.pid, slot)
        finally:
            with self._state_lock:
                self._prestarters.pop(worker, None)

    def warm_bundles(self) -> list[str]:
        """Hashes of bundles whose scene a live worker has open, most recent first."""
        with self._state_lock:
            return list(
                dict.fromkeys(
                    sha
                    for (sha, *_), worker in reversed(self._workers.items())
                    if worker.is_alive()
                )
            )

    def bundle_folders(self, bundle: str) -> list[Path]:
        """The slot folders `bundle` was linked into (its scene renders from there): the
        daemon hides them in failure messages, as it hides the bundle cache."""
        with self._state_lock:
            return [
                self._slots[worker]
                for (sha, *_), worker in self._workers.items()
                if sha == bundle and worker in self._slots
            ]

    @property
    def worker_starts(self) -> int:
        """Blender processes started by every worker this runner holds (for tests, stats)."""
        return sum(worker.starts for worker in self._held())

    def worker_pids(self) -> list[int]:
        """Process ids of this runner's running Blenders, the bundles' warm workers first
        (for tests and stats)."""
        return [
            pid for worker in self._held() if worker.is_alive() and (pid := worker.pid) is not None
        ]

    @property
    def prestarted_pid(self) -> int | None:
        """The process id of the pre-started Blender once it is ready (for tests)."""
        with self._state_lock:
            worker = self._prestarted
            if worker is None or worker in self._prestarters:
                return None
        return worker.pid if worker.is_alive() else None

    def _held(self) -> list[RenderWorker]:
        with self._state_lock:
            unbound = [w for w in (self._spare, self._prestarted) if w is not None]
            return [*self._workers.values(), *unbound]

    # --- devices ------------------------------------------------------------------------------

    def devices(self) -> list[ComputeDevice]:
        """The Cycles devices of this build on this machine (probed once, in a worker).

        A failed probe logs a warning and reports the CPU alone.
        """
        if self._devices is None:
            worker = self._any_worker()
            try:
                self._devices = parse_cycles_devices(worker.devices())
            except WorkerError as exc:
                log.warning("Could not list Cycles devices (%s); assuming CPU only", exc.message)
                self._devices = [ComputeDevice(type="CPU", name="CPU", id="CPU")]
        return list(self._devices)

    def resolve(self, requested: str | None = None) -> str:
        """The Cycles device type for a lease's device ("ANY"/"" = this node's choice)."""
        wanted = self.device if requested is None or requested.upper() in _ANY_DEVICE else requested
        if wanted.strip().upper() == "CPU":
            return "CPU"  # needs no probe: Cycles always has the CPU
        return resolve_device(wanted, self.devices())

    # --- tasks --------------------------------------------------------------------------------

    def render(
        self,
        lease: Lease,
        scene: Path,
        output: Path,
        on_progress: ProgressCallback | None = None,
    ) -> RenderResult:
        """Render `lease`'s assignment of `scene` to `output` (multilayer EXR).

        Raises `LeaseError` for a lease without an assignment, `RenderCancelledError` when
        `cancel()` stopped it, and the worker's errors otherwise.
        """
        assignment = lease.assignment
        if assignment is None:
            raise LeaseError(f"Lease {lease.lease_id} is a render task without an assignment.")
        region = assignment.render_region
        border = (
            None
            if assignment.whole_frame
            else border_fractions(
                PixelRect(region.x0, region.y0, region.x1, region.y1),
                assignment.width,
                assignment.height,
            )
        )
        with self._task():
            device = self.resolve(lease.device)
            worker, scene, root = self._worker_for(lease, device, scene)
            request = RenderRequest(
                scene=scene,
                frame=assignment.frame,
                output=output,
                border=border,
                samples=assignment.samples,
                percentage=assignment.percentage,
                # What the requester paid for, whatever the .blend itself says.
                resolution=(assignment.resolution_x, assignment.resolution_y),
                seed=assignment.seed,
                denoise_data=assignment.denoise_data,
                denoise=assignment.denoise_in_render,
                device=device,
                device_ids=self._ids_for(device),
                threads=self.threads,
                # A stranger's scene sees its own bundle and nothing else of this machine.
                confine_to=root,
            )
            result = self._run(worker, lambda: self._render_on(worker, request, on_progress))
        if (result.frame_width, result.frame_height) != (assignment.width, assignment.height):
            raise RenderFailedError(
                f"The scene renders {result.frame_width}x{result.frame_height} pixels on this "
                f"node, but the task was planned for {assignment.width}x{assignment.height}.",
                hint="The bundle's scene differs from the one the job was planned on.",
            )
        return result

    def denoise(
        self, lease: Lease, input_exr: Path, output: Path, samples: int | None = None
    ) -> Path:
        """Denoise the merged frame `input_exr` into `output` with a warm worker.

        `samples` (what the frame was rendered with) defaults to the lease's.
        """
        with self._task():
            merged = read_exr(input_exr)
            count = lease.samples if samples is None else samples
            # The denoiser needs no scene: any warm Blender will do.
            worker = self._any_worker()
            denoised = self._run(
                worker,
                lambda: denoise_frame(worker, merged, samples=count, timeout=self.task_timeout),
            )
        output.parent.mkdir(parents=True, exist_ok=True)
        write_exr(output, denoised)
        return output

    def finish(self, lease: Lease, scene: Path, input_exr: Path, output: Path) -> Path:
        """Finish the frame `input_exr` (merged passes) of `scene` into the scene's own
        files, packed with their manifest into the zip `output` (what the coordinator
        unpacks as the frame's deliverables)."""
        staged = output.with_name(output.name + ".files")
        shutil.rmtree(staged, ignore_errors=True)
        try:
            with self._task():
                device = self.resolve(lease.device)
                worker, scene, root = self._worker_for(lease, device, scene)
                request = FinishRequest(
                    scene=scene,
                    merged_exr=input_exr,
                    frame=lease.task.frame,
                    output_dir=staged,
                    confine_to=root,
                    timeout=self.task_timeout,
                    resolution=lease_resolution(lease),
                    percentage=lease.percentage,
                )
                result = self._run(worker, lambda: worker.finish(request))
            pack_finished(result, output)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return output

    def render_request(self, request: RenderRequest, timeout: float | None = None) -> RenderResult:
        """Render a raw request (the benchmark's, the warm-up's) on the spare worker, keeping
        it warm; a GPU request without device ids gets this runner's."""
        if not request.device_ids and self._ids_for(request.device):
            request = dataclasses.replace(request, device_ids=self._ids_for(request.device))
        with self._task():
            worker = self._any_worker()
            return self._run(worker, lambda: worker.render(request, timeout=timeout))

    def cancel(self) -> None:
        """Stop the task in flight, if any (thread-safe; a no-op between tasks)."""
        with self._state_lock:
            if not self._in_task:
                return
            self._cancelled.set()
            worker = self._current
        if worker is not None:
            worker.cancel()

    def build_for(self, series: str | None) -> BlenderBuild:
        """The build for a lease naming a Blender series ("5.0"; None: the main build).

        Raises `LeaseError` when this node has no build of it (the coordinator matches
        jobs to the versions a node offers, so this means a mismatch)."""
        if series is None or blender_series(self.build.version) == blender_series(series):
            return self.build
        for build in self.more_builds:
            if blender_series(build.version) == blender_series(series):
                return build
        offered = ", ".join(b.version for b in (self.build, *self.more_builds))
        raise LeaseError(f"This node has no Blender {series} build (it offers {offered}).")

    # --- internals ------------------------------------------------------------------------------

    def _ids_for(self, device: str) -> tuple[str, ...]:
        return () if device.upper() == "CPU" else self.device_ids

    def _task(self) -> _TaskScope:
        return _TaskScope(self)

    def _render_on(
        self, worker: RenderWorker, request: RenderRequest, on_progress: ProgressCallback | None
    ) -> RenderResult:
        def progress(update: Progress) -> None:
            # A cancel that came while the worker was (re)starting reached no process:
            # progress events give it another chance.
            if self._cancelled.is_set():
                worker.cancel()
            elif on_progress is not None:
                on_progress(update)

        return worker.render(request, on_progress=progress, timeout=self.task_timeout)

    def _run(self, worker: RenderWorker, call: Callable[[], _T]) -> _T:
        with self._state_lock:
            self._current = worker
        try:
            if self._cancelled.is_set():
                raise RenderCancelledError("Cancelled before Blender started rendering.")
            return call()
        except WorkerError as exc:
            if self._cancelled.is_set() and not isinstance(exc, RenderCancelledError):
                raise RenderCancelledError(f"Cancelled ({exc.message.splitlines()[0]}).") from exc
            raise
        finally:
            with self._state_lock:
                self._current = None

    def _worker_for(
        self, lease: Lease, device: str, scene: Path
    ) -> tuple[RenderWorker, Path, Path]:
        """The worker for `lease`'s bundle on `device`, and the scene and bundle folder it
        renders from: the bundle's own, or its slot's when the worker was pre-started
        (a new bundle takes the pre-started worker and is linked into its slot)."""
        build = self.build_for(lease.blender_version)
        root = bundle_root(scene, lease.scene_path)
        key = (lease.bundle, device, build.path)
        retired: list[RenderWorker] = []
        fill = False
        with self._state_lock:
            if self._closed:
                raise WorkerError("The task runner is closed.")
            worker = self._workers.get(key)
            if worker is not None:
                self._workers.move_to_end(key)
            else:
                if self._prestarted is not None and self._takes(build, root):
                    worker, self._prestarted, fill = self._prestarted, None, True
                elif self._spare is not None and build == self.build:
                    worker, self._spare = self._spare, None
                else:
                    worker = self._new_worker(build)
                self._workers[key] = worker
                while len(self._workers) > self.max_warm:
                    _, old = self._workers.popitem(last=False)
                    retired.append(old)
            slot = self._slots.get(worker)
        for old in retired:
            self._close_worker(old)
        if slot is None:
            return worker, scene, root
        if fill:
            try:
                fill_slot(slot, root)
            except BaseException:
                # A half-filled slot never serves: its worker goes with it.
                with self._state_lock:
                    if self._workers.get(key) is worker:
                        del self._workers[key]
                self._close_worker(worker)
                raise
            log.debug("Bundle %s linked into %s for the pre-started Blender", key[0][:12], slot)
        return worker, slot / scene.relative_to(root), slot

    def _takes(self, build: BlenderBuild, root: Path) -> bool:
        """Whether the pre-started worker may take a bundle of `build` in `root`: the main
        build only, and never a folder that holds its slot (linking it would recurse)."""
        assert self._prestarted is not None
        slot = self._slots[self._prestarted]
        return build == self.build and not slot.resolve().is_relative_to(root.resolve())

    def _any_worker(self) -> RenderWorker:
        with self._state_lock:
            if self._closed:
                raise WorkerError("The task runner is closed.")
            if self._workers:
                return next(reversed(self._workers.values()))
            if self._spare is None and self._prestarted is not None:
                return self._prestarted  # e.g. a denoise, which needs no scene
            if self._spare is None:
                self._spare = self._new_worker()
            return self._spare

    def _new_worker(self, build: BlenderBuild | None = None) -> RenderWorker:
        self._serial += 1
        folder = self.scratch / f"worker-{self._serial}"
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        return self._factory(build or self.build, folder, self.extra_env)

    def _limited_worker(
        self, build: BlenderBuild, scratch: Path, env: Mapping[str, str]
    ) -> RenderWorker:
        return RenderWorker(build, scratch_dir=scratch, extra_env=env, limits=self.limits)

    def _close_worker(self, worker: RenderWorker) -> None:
        scratch = worker.log_path.parent
        worker.close()
        shutil.rmtree(scratch, ignore_errors=True)
        with self._state_lock:
            slot = self._slots.pop(worker, None)
        if slot is not None:
            remove_slot(slot)  # a slot holds one bundle for its worker's life only


class _TaskScope:
    """Marks a task in flight, so `cancel()` between tasks cancels nothing later."""

    def __init__(self, runner: TaskRunner) -> None:
        self._runner = runner

    def __enter__(self) -> None:
        with self._runner._state_lock:
            if self._runner._in_task:
                raise WorkerError("The task runner runs one task at a time.")
            self._runner._in_task = True
            self._runner._cancelled.clear()

    def __exit__(self, *exc_info: object) -> None:
        with self._runner._state_lock:
            self._runner._in_task = False
            self._runner._cancelled.clear()


def lease_resolution(lease: Lease) -> tuple[int, int] | None:
    """The scene resolution a lease without an assignment works at, if it names one."""
    if lease.resolution_x is None or lease.resolution_y is None:
        return None
    return lease.resolution_x, lease.resolution_y


def pack_finished(result: FinishResult, target: Path) -> Path:
    """A finish's files and their `FinishManifest` as one zip (deflated, no links)."""
    manifest = FinishManifest(
        files=[FinishedEntry(path=f.path.as_posix(), kind=f.kind) for f in result.files],
        warnings=[w[:1000] for w in result.warnings[:50]],
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr(FINISH_MANIFEST, manifest.model_dump_json())
        for entry in result.files:
            archive.write(result.output_dir / entry.path, entry.path.as_posix())
    return target

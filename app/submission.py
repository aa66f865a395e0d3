"""Submitting a scene to the farm and bringing its frames home: the library under the
`tessera submit` command and the desktop app's submit and monitor views.

Three steps, each callable alone and reporting through callbacks (nothing here prints):

1. `prepare_submission` inspects the scene in Blender (a scene that cannot render fails
   here, before anything is packed or uploaded), checks the job spec against it, probes
   the scene (its cost relative to the benchmark scene and tiny previews of its frames,
   `renderers.scene_probe`), then packs the scene into a bundle (`app.packing`).
2. `submit` uploads the bundle (skipped when the coordinator already has its hash) and
   submits the job.
3. `follow_job` follows the job's live event stream (SSE), downloads every finished
   frame as it finishes and returns when the job is completed, failed or canceled. If
   the stream breaks it polls the job every second instead, and rides out a coordinator
   restart for `patience` seconds.

Frames land in `<out_dir>/<scene file stem>/frame_####.exr` plus a `.png` preview,
numbered as Blender's `####` does (printf `%04d`): frame 7 is `frame_0007`, frame -1 is
`frame_-001`, frame 12345 is `frame_12345`. Downloads are atomic (the client writes
`<name>.part` and renames it), so a file that exists is complete.

No Qt and no printing here; Blender runs only inside the render worker process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import cast

import numpy as np
import numpy.typing as npt
import requests
import urllib3
from pydantic import ValidationError

from app.packing import PackProgress, PackResult, pack_scene
from common.errors import BundleError, CoordinatorUnreachableError, TesseraError, UsageError
from protocol.client import TesseraClient
from protocol.models import (
    FINISHED_JOB_STATES,
    Event,
    FramePreview,
    FrameRange,
    Job,
    JobSpec,
    SceneSummary,
)
from renderers.exr import read_exr
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.scene_probe import PreviewImage, SceneProbe, preview_frames, probe_scene
from renderers.worker import RenderRequest, RenderWorker

log = logging.getLogger(__name__)

FRAME_KINDS = ("exr", "png")
#: A placeholder hash for checking a spec before the bundle exists.
_NO_BUNDLE = "0" * 64
#: Longer than the coordinator's 15 s keep-alive, so only a dead stream times out.
STREAM_READ_TIMEOUT = 30.0
#: Task events refresh the job's progress at most this often.
TASK_REFRESH_INTERVAL = 0.5


class FrameDownloadError(TesseraError):
    """A finished frame could not be written to the output folder."""

    default_hint = "Check that the output folder is writable and the disk is not full."


# --- prepare -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepared:
    """A scene inspected, packed and described by a job spec, ready to submit."""

    info: SceneInfo
    bundle: PackResult
    spec: JobSpec
    #: Files the scene refers to that do not exist (Blender's and BAT's findings).
    missing: tuple[Path, ...]
    #: Everything worth telling the user before submitting (missing files included).
    warnings: tuple[str, ...]
    #: The submit-time probe (None when `probe=False`); its cost and previews are in `spec`.
    probe: SceneProbe | None = None


@dataclass(frozen=True, slots=True)
class Described:
    """A scene inspected, probed and described by a job spec whose bundle is not packed
    yet (its `bundle` is a placeholder): enough to ask the coordinator for an estimate."""

    info: SceneInfo
    spec: JobSpec
    probe: SceneProbe | None = None


def bundle_folder(bundles: Path) -> tempfile.TemporaryDirectory[str]:
    """A folder of this submission's own under `bundles` for packing, deleted after use
    (the coordinator keeps the bundle; a local copy would only fill the disk)."""
    # We list missing files ourselves; BAT would also log each one, several times.
    logging.getLogger("blender_asset_tracer").setLevel(logging.ERROR)
    try:
        bundles.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix="submit-", dir=bundles)
    except OSError as exc:
        raise UsageError(
            f"Cannot create a folder for the bundle in {bundles}: {exc.strerror or exc}.",
            hint="Point TESSERA_HOME at a writable folder.",
        ) from exc


def describe_job(
    worker: RenderWorker,
    scene: Path,
    *,
    frames: str | None = None,
    tiles: tuple[int, int] = (1, 1),
    samples: int | None = None,
    percentage: int | None = None,
    priority: int = 50,
    denoise: bool | None = None,
    device: str = "ANY",
    name: str | None = None,
    max_price: float = 0.0,
    max_credits: float | None = None,
    probe: bool = True,
    benchmark_scene: Path | None = None,
    measured: SceneProbe | None = None,
) -> Described:
    """Inspect `scene`, check the job it makes and probe it (nothing is packed).

    The options are `prepare_submission`'s. `measured` is a probe made before (the
    desktop app probes a scene when it is chosen): it is reused when its previews are of
    the frames this job previews and at no more samples than the job renders, else the
    scene is probed again.
    """
    info = inspect_scene(worker, scene)
    make_spec = functools.partial(
        job_spec_for,
        info,
        frames=frames,
        tiles=tiles,
        samples=samples,
        percentage=percentage,
        priority=priority,
        denoise=denoise,
        device=device,
        name=name,
        max_price=max_price,
        max_credits=max_credits,
    )
    # Check the spec before probing and packing: a bad option fails in a second.
    spec = make_spec()
    if not probe:
        return Described(info, spec, None)
    if measured is None or not probe_fits(measured, spec.frames, samples or info.samples):
        measured = probe_scene(
            worker,
            info.path,
            spec.frames.frames(),
            samples=samples,
            info=info,
            benchmark_scene=benchmark_scene,
        )
    return Described(info, make_spec(measured=measured), measured)


def job_spec_for(
    info: SceneInfo,
    *,
    frames: str | None = None,
    tiles: tuple[int, int] = (1, 1),
    samples: int | None = None,
    percentage: int | None = None,
    priority: int = 50,
    denoise: bool | None = None,
    device: str = "ANY",
    name: str | None = None,
    max_price: float = 0.0,
    max_credits: float | None = None,
    measured: SceneProbe | None = None,
    bundle: str = _NO_BUNDLE,
    scene_path: str = "scene.blend",
) -> JobSpec:
    """The job spec of an inspected scene with these options (no Blender, no I/O): the
    scene's cost and previews from `measured` when given (else cost 1.0, no previews),
    and a placeholder bundle unless one is named. Raises `UsageError` for options that
    do not fit the scene."""
    options: dict[str, object] = {
        "name": name or info.path.stem,
        "frames": _frame_range(frames, info),
        "tiles": {"columns": tiles[0], "rows": tiles[1]},
        "samples": samples,
        "percentage": percentage,
        "denoise": denoise,
        "priority": priority,
        "device": device.upper(),
        "max_price": max_price,
        "max_credits": max_credits,
    }
    if measured is not None:
        options["scene_cost"] = round(measured.cost, 4)
        options["previews"] = [frame_preview(image) for image in measured.previews]
    return _job_spec(info, bundle, scene_path, options)


def probe_fits(measured: SceneProbe, frames: FrameRange, samples: int) -> bool:
    """Whether a probe made before serves a job of `frames` at `samples`: its previews
    are of the frames the job would preview, at no more samples than the job renders."""
    wanted = preview_frames(frames.frames())
    shown = [image.frame for image in measured.previews]
    return shown == wanted and all(image.samples <= samples for image in measured.previews)


def prepare_submission(
    worker: RenderWorker,
    scene: Path,
    *,
    bundle_dir: Path,
    frames: str | None = None,
    tiles: tuple[int, int] = (1, 1),
    samples: int | None = None,
    percentage: int | None = None,
    priority: int = 50,
    denoise: bool | None = None,
    device: str = "ANY",
    name: str | None = None,
    on_pack: Callable[[PackProgress], None] | None = None,
    max_price: float = 0.0,
    max_credits: float | None = None,
    probe: bool = True,
    benchmark_scene: Path | None = None,
    measured: SceneProbe | None = None,
) -> Prepared:
    """Inspect `scene`, check the job it makes, probe it, and pack it into
    `bundle_dir/<sha>.zip`.

    `frames` is "N", "A-B" or "A-BxSTEP" (default: the scene's own range); `None` for
    samples, percentage and denoise keeps the scene's settings. The probe (skipped with
    `probe=False`, leaving the spec's defaults: cost 1.0, no previews) renders with the
    same worker and sets the spec's `scene_cost` and `previews`; `benchmark_scene` is
    the scene it compares against (default: the demo scene); `measured`, a probe made
    before, is reused when it fits (`describe_job`). Raises a `SceneError` for a scene
    that cannot render, `UsageError` for options that do not fit it, the worker's
    errors when a probe render fails, and `BundleError` when packing fails; nothing is
    uploaded here.
    """
    described = describe_job(
        worker,
        scene,
        frames=frames,
        tiles=tiles,
        samples=samples,
        percentage=percentage,
        priority=priority,
        denoise=denoise,
        device=device,
        name=name,
        max_price=max_price,
        max_credits=max_credits,
        probe=probe,
        benchmark_scene=benchmark_scene,
        measured=measured,
    )
    info = described.info
    bundle = pack_scene(scene, bundle_dir, on_progress=on_pack)
    spec = _job_spec(
        info,
        bundle.sha256,
        bundle.scene_path,
        described.spec.model_dump(exclude={"bundle", "scene_path", "scene"}),
    )
    missing = _merge_missing(info.missing_files, bundle.missing)
    warnings = [w for w in info.warnings if not w.startswith("Missing file: ")]
    warnings.extend(w for w in bundle.warnings if not w.startswith("Missing file: "))
    warnings.extend(f"Missing file: {path}" for path in missing)
    return Prepared(info, bundle, spec, missing, tuple(warnings), described.probe)


#: The Submit page's colour preview fits this many pixels on each side...
COLOUR_PREVIEW_SIDE = 160
#: ...and has at most this many samples per pixel (it shows the framing, not the noise).
COLOUR_PREVIEW_SAMPLES = 8


@dataclass(frozen=True, slots=True)
class ColourPreview:
    """A small render of one frame: 8-bit sRGB, RGB888 rows, row 0 at the top."""

    frame: int
    width: int
    height: int
    rgb: bytes


def render_colour_preview(
    worker: RenderWorker,
    info: SceneInfo,
    frame: int | None = None,
    *,
    max_side: int = COLOUR_PREVIEW_SIDE,
    samples: int = COLOUR_PREVIEW_SAMPLES,
    timeout: float | None = 120.0,
) -> ColourPreview:
    """Render `frame` (default: the scene's first) of the inspected scene small enough to
    fit `max_side` pixels, at few samples, seed 0, no denoising, through `worker`.
    Raises the worker's errors when the render fails."""
    side = max(info.resolution_x, info.resolution_y)
    percentage = max(1, min(100, max_side * 100 // side))
    shown = info.frame_start if frame is None else frame
    with tempfile.TemporaryDirectory(prefix="tessera-preview-") as scratch:
        result = worker.render(
            RenderRequest(
                scene=info.path,
                frame=shown,
                output=Path(scratch) / "preview.exr",
                samples=max(1, min(samples, info.samples)),
                percentage=percentage,
                seed=0,
                adaptive_sampling=False,
                denoise=False,
                device="CPU",
            ),
            timeout=timeout,
        )
        linear = read_exr(result.output).combined_rgba()[..., :3].astype(np.float64)
    height, width = linear.shape[:2]
    return ColourPreview(shown, width, height, _to_srgb8(linear).tobytes())


def _to_srgb8(linear: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    """Scene-linear RGB to 8-bit sRGB (clipped; not Blender's view transform)."""
    clipped = np.clip(np.nan_to_num(linear, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    encoded = np.where(
        clipped <= 0.0031308, clipped * 12.92, 1.055 * np.power(clipped, 1 / 2.4) - 0.055
    )
    result: npt.NDArray[np.uint8] = np.ascontiguousarray(np.round(encoded * 255).astype(np.uint8))
    return result


def frame_preview(image: PreviewImage) -> FramePreview:
    """A probe's preview as the job spec carries it."""
    return FramePreview(
        frame=image.frame, width=image.width, height=image.height, luminance=image.luminance
    )


def _frame_range(frames: str | None, info: SceneInfo) -> FrameRange:
    try:
        if frames is None:
            return FrameRange(
                start=info.frame_start, end=info.frame_end, step=max(1, info.frame_step)
            )
        return FrameRange.parse(frames)
    except ValidationError as exc:
        detail = describe_validation_error(exc)
        if not detail.lower().startswith("frames"):
            detail = f"frames {frames or 'of the scene'}: {detail}"
        raise UsageError(
            detail[:1].upper() + detail[1:],
            hint='Write frames as "N", "A-B" or "A-BxSTEP", e.g. "1-24" or "1-24x2".',
        ) from exc
    except ValueError as exc:
        raise UsageError(
            str(exc), hint='Write frames as "N", "A-B" or "A-BxSTEP", e.g. "1-24".'
        ) from exc


def _job_spec(info: SceneInfo, bundle: str, scene_path: str, options: dict[str, object]) -> JobSpec:
    fields = {**options, "bundle": bundle, "scene_path": scene_path, "scene": scene_summary(info)}
    try:
        return JobSpec.model_validate(fields)
    except ValidationError as exc:
        raise UsageError(
            f"This job does not fit {info.path.name}: {describe_validation_error(exc)}",
            hint="Change the option named above (see `tessera submit --help`).",
        ) from exc


def scene_summary(info: SceneInfo) -> SceneSummary:
    """What the coordinator is told about the scene (it checks the spec against it)."""
    return SceneSummary(
        name=info.name,
        frame_start=info.frame_start,
        frame_end=info.frame_end,
        resolution_x=info.resolution_x,
        resolution_y=info.resolution_y,
        resolution_percentage=info.resolution_percentage,
        samples=info.samples,
        adaptive_sampling=info.adaptive_sampling,
        denoising=info.denoising,
        camera=info.camera,
        engine=info.engine,
        blender_version=info.blender_version,
    )


def describe_validation_error(error: ValidationError) -> str:
    """pydantic's errors as one readable sentence: 'samples: must be >= 1; ...'."""
    parts = []
    for item in error.errors():
        message = str(item.get("msg", "")).removeprefix("Value error, ")
        where = ".".join(str(part) for part in item.get("loc", ()))
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def _merge_missing(from_blender: tuple[str, ...], from_bat: tuple[Path, ...]) -> tuple[Path, ...]:
    paths = {Path(p).absolute() for p in from_blender if p} | {p.absolute() for p in from_bat}
    return tuple(sorted(paths))


# --- submit --------------------------------------------------------------------------------


def submit(
    client: TesseraClient,
    prepared: Prepared,
    on_upload: Callable[[int, int], None] | None = None,
) -> Job:
    """Upload the bundle unless the coordinator has it (then `on_upload` is never called),
    and submit the job. Raises `ApiError` if the coordinator refuses the job."""
    bundle = prepared.bundle
    try:
        client.upload_bundle(bundle.zip_path, bundle.sha256, on_progress=on_upload)
    except requests.RequestException as exc:  # (an OSError too) broke off mid-upload
        raise CoordinatorUnreachableError(
            f"Uploading the bundle to {client.base_url} failed ({exc})."
        ) from exc
    except OSError as exc:  # the bundle vanished or cannot be read
        raise BundleError(
            f"Cannot read the bundle {bundle.zip_path}: {exc.strerror or exc}.",
            hint="Pack the scene again (run the submit again).",
        ) from exc
    return client.submit_job(prepared.spec)


# --- follow and deliver ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FrameFiles:
    """One finished frame, downloaded."""

    frame: int
    files: tuple[Path, ...]


@dataclass(frozen=True, slots=True)
class FollowResult:
    """How following a job ended."""

    job: Job
    folder: Path
    #: The frames written by this call, in the order they were downloaded.
    frames: tuple[FrameFiles, ...]
    #: True when `stop()` ended the follow before the job finished.
    stopped: bool = False
    #: True when the event stream broke and the job was polled instead.
    polled: bool = False

    @property
    def frame_numbers(self) -> list[int]:
        return sorted(f.frame for f in self.frames)


def frame_folder(out_dir: Path, job: Job) -> Path:
    """Where a job's frames go: `out_dir/<stem of the scene's .blend>`."""
    stem = PurePosixPath(job.spec.scene_path).stem
    safe = "".join(c if c.isalnum() or c in "-_. " else "_" for c in stem).strip(" .")
    return out_dir / (safe or "scene")


def frame_file_name(frame: int, kind: str) -> str:
    """`frame_0007.exr`: four digits as Blender's `####` (so `frame_-001` for -1)."""
    return f"frame_{frame:04d}.{kind}"


@dataclass
class _Follower:
    client: TesseraClient
    job_id: str
    out_dir: Path
    on_event: Callable[[Event], None] | None
    on_frame: Callable[[FrameFiles], None] | None
    on_job: Callable[[Job], None] | None
    stop: Callable[[], bool]
    poll_interval: float
    patience: float
    kinds: tuple[str, ...]
    folder: Path = Path()
    written: list[FrameFiles] = field(default_factory=list)
    done: set[int] = field(default_factory=set)
    last_seq: int = 0
    polled: bool = False
    last_refresh: float = 0.0
    read_timeout: float = STREAM_READ_TIMEOUT
    connections: int = 0

    def run(self) -> FollowResult:
        job = self._refresh()
        self.folder = frame_folder(self.out_dir, job)
        job = self._sync(job)
        while job.status not in FINISHED_JOB_STATES and not self.stop():
            job = self._poll(job) if self.polled else self._stream(job)
        if job.status in FINISHED_JOB_STATES:
            job = self._sync(job)
        return FollowResult(
            job=job,
            folder=self.folder,
            frames=tuple(self.written),
            stopped=job.status not in FINISHED_JOB_STATES,
            polled=self.polled,
        )

    def _stream(self, job: Job) -> Job:
        """Follow the SSE stream until the job finishes, stop() says so, the stream goes
        quiet for `read_timeout` (the caller reconnects) or breaks (then `polled` is set
        and the caller polls instead)."""
        try:
            if self.connections:
                # Between two connections events may have been missed: catch up first.
                job = self._sync(self._refresh())
                if job.status in FINISHED_JOB_STATES or self.stop():
                    return job
            self.connections += 1
            events = cast(
                "Generator[Event, None, None]",
                self.client.events(self.job_id, after=self.last_seq, timeout=self.read_timeout),
            )
        except (CoordinatorUnreachableError, requests.RequestException) as exc:
            log.info("no event stream for job %s (%s); polling", self.job_id, exc)
            self.polled = True
            return job
        with contextlib.closing(events):  # closes the HTTP response when we leave early
            while True:
                try:
                    event = next(events)
                except StopIteration:
                    log.info("the event stream of job %s ended; polling", self.job_id)
                    break
                except requests.ConnectionError as exc:
                    if _is_read_timeout(exc):
                        return job  # quiet, not broken: check stop() and reconnect
                    log.info("the event stream of job %s broke (%s); polling", self.job_id, exc)
                    break
                except (CoordinatorUnreachableError, requests.RequestException, ValueError) as exc:
                    # ValueError: a garbled event (bad JSON or an unknown shape)
                    log.info("the event stream of job %s broke (%s); polling", self.job_id, exc)
                    break
                self.last_seq = event.seq
                if self.on_event is not None:
                    self.on_event(event)
                try:
                    job = self._on_stream_event(event, job)
                except CoordinatorUnreachableError as exc:
                    log.info("lost the coordinator (%s); polling", exc)
                    break
                if job.status in FINISHED_JOB_STATES or self.stop():
                    return job
        self.polled = True
        return job

    def _on_stream_event(self, event: Event, job: Job) -> Job:
        if event.type == "frame" and event.status == "done" and event.frame is not None:
            self._download(event.frame)
            return self._refresh()
        if event.type in ("job", "frame"):
            return self._refresh()
        if time.monotonic() - self.last_refresh >= TASK_REFRESH_INTERVAL:
            return self._refresh()
        return job

    def _poll(self, job: Job) -> Job:
        deadline = time.monotonic() + self.poll_interval
        while time.monotonic() < deadline:
            if self.stop():
                return job
            time.sleep(min(0.1, self.poll_interval))
        unreachable_since = time.monotonic()
        while True:
            try:
                return self._sync(self._refresh())
            except CoordinatorUnreachableError:
                if time.monotonic() - unreachable_since > self.patience or self.stop():
                    raise
                time.sleep(self.poll_interval)

    def _refresh(self) -> Job:
        job = self.client.job(self.job_id)
        self.last_refresh = time.monotonic()
        if self.on_job is not None:
            self.on_job(job)
        return job

    def _sync(self, job: Job) -> Job:
        """Download every finished frame not downloaded yet."""
        for frame in sorted(set(job.frames_done) - self.done):
            self._download(frame)
        return job

    def _download(self, frame: int) -> None:
        if frame in self.done:
            return
        paths = []
        for kind in self.kinds:
            target = self.folder / frame_file_name(frame, kind)
            try:
                paths.append(self.client.download_frame(self.job_id, frame, target, kind=kind))
            except requests.RequestException as exc:
                # The body broke off mid-way: drop the partial file; a later sync retries.
                target.with_name(target.name + ".part").unlink(missing_ok=True)
                raise CoordinatorUnreachableError(
                    f"Lost the connection while downloading frame {frame} of job "
                    f"{self.job_id} from {self.client.base_url} ({exc})."
                ) from exc
            except OSError as exc:
                raise FrameDownloadError(
                    f"Cannot write frame {frame} to {target}: {exc.strerror or exc}."
                ) from exc
        files = FrameFiles(frame, tuple(paths))
        self.done.add(frame)
        self.written.append(files)
        if self.on_frame is not None:
            self.on_frame(files)


def _is_read_timeout(error: requests.ConnectionError) -> bool:
    """requests reports a read timeout inside a streamed body as a ConnectionError."""
    return any(isinstance(arg, urllib3.exceptions.ReadTimeoutError) for arg in error.args)


def download_finished_frames(
    client: TesseraClient,
    job: Job,
    out_dir: Path,
    on_frame: Callable[[FrameFiles], None] | None = None,
    *,
    kinds: tuple[str, ...] = FRAME_KINDS,
) -> FollowResult:
    """Download every frame `job` has finished into `frame_folder(out_dir, job)`, as
    `follow_job` does, without waiting for the rest; frames whose files are all there
    already are skipped (downloads are atomic, so a file that exists is complete).
    `result.frames` lists the frames written by this call. Raises what `follow_job` does."""
    follower = _Follower(
        client=client,
        job_id=job.id,
        out_dir=out_dir,
        on_event=None,
        on_frame=on_frame,
        on_job=None,
        stop=lambda: True,
        poll_interval=1.0,
        patience=0.0,
        kinds=kinds,
        folder=frame_folder(out_dir, job),
    )
    follower.done = {
        frame
        for frame in job.frames_done
        if all((follower.folder / frame_file_name(frame, kind)).is_file() for kind in kinds)
    }
    follower._sync(job)
    return FollowResult(job=job, folder=follower.folder, frames=tuple(follower.written))


def follow_job(
    client: TesseraClient,
    job_id: str,
    out_dir: Path,
    on_event: Callable[[Event], None] | None = None,
    on_frame: Callable[[FrameFiles], None] | None = None,
    stop: Callable[[], bool] | None = None,
    *,
    on_job: Callable[[Job], None] | None = None,
    poll_interval: float = 1.0,
    patience: float = 60.0,
    kinds: tuple[str, ...] = FRAME_KINDS,
) -> FollowResult:
    """Follow job `job_id` until it is completed, failed or canceled (or `stop()` says so),
    downloading each finished frame into `frame_folder(out_dir, job)` as it finishes.

    `on_event` sees every stream event, `on_frame` every frame written, `on_job` every
    fresh copy of the job (for progress). Frames finished before the call are downloaded
    first. `stop` is checked after each event, each poll, and at least every
    `max(1, poll_interval)` seconds while the stream is quiet. Raises `ApiError` for an
    unknown job, `CoordinatorUnreachableError` after `patience` seconds without reaching
    the coordinator, and `FrameDownloadError` when a frame cannot be written.
    """
    unknown = [kind for kind in kinds if kind not in FRAME_KINDS]
    if unknown:
        raise UsageError(f"Frames come as {' and '.join(FRAME_KINDS)}, not {unknown[0]}.")
    follower = _Follower(
        client=client,
        job_id=job_id,
        out_dir=out_dir,
        on_event=on_event,
        on_frame=on_frame,
        on_job=on_job,
        stop=stop or (lambda: False),
        poll_interval=poll_interval,
        patience=patience,
        kinds=kinds,
        # Without stop() a healthy stream never times out (keep-alives come every 15 s);
        # with it, a quiet stream is reopened often enough to ask stop() in time.
        read_timeout=STREAM_READ_TIMEOUT if stop is None else max(1.0, poll_interval),
    )
    return follower.run()

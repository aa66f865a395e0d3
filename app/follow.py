"""Following a submitted job and bringing its frames home.

`follow_job` follows the job's live event stream (SSE), downloads every finished frame
as it finishes and returns when the job is completed, failed or canceled. If the stream
breaks it polls the job every second instead, and rides out a coordinator restart for
`patience` seconds. `download_finished_frames` fetches what is done without waiting.

Everything lands in `<out_dir>/<scene file stem>/`. A job finished on the farm (the
default) delivers the scene's own files under the names Blender gives them (sub-folders
of its output path kept: `render/shot_0001.png`), File Output nodes' files, the raw
multilayer EXR of every pass as `frame_####.exr`, and at the end the scene's movie and
the preview video. A raw job (no finish) delivers `frame_####.exr` plus a `.png`
preview. Frames are numbered as Blender's `####` does (printf `%04d`): frame 7 is
`frame_0007`, frame -1 is `frame_-001`, frame 12345 is `frame_12345`. Downloads are
atomic (the client writes `<name>.part` and renames it), so a file that exists is
complete, and a file already there with the coordinator's hash is not fetched again.
No Qt, no printing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import cast

import requests
import urllib3

from common.errors import CoordinatorUnreachableError, TesseraError, UsageError
from protocol.client import TesseraClient, sha256_file
from protocol.models import (
    FINISHED_JOB_STATES,
    Event,
    FrameStatus,
    Job,
    JobStatus,
)
from protocol.output import (
    Deliverable,
)

log = logging.getLogger(__name__)

FRAME_KINDS = ("exr", "png")
#: Longer than the coordinator's 15 s keep-alive, so only a dead stream times out.
STREAM_READ_TIMEOUT = 30.0
#: Task events refresh the job's progress at most this often.
TASK_REFRESH_INTERVAL = 0.5


class FrameDownloadError(TesseraError):
    """A finished frame could not be written to the output folder."""

    default_hint = "Check that the output folder is writable and the disk is not full."


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
    #: The job is finished on the farm: its deliverables are fetched, not raw frames.
    finished_on_farm: bool = False

    def run(self) -> FollowResult:
        job = self._refresh()
        self.folder = frame_folder(self.out_dir, job)
        self.finished_on_farm = job.spec.finish
        job = self._sync(job)
        while job.status not in FINISHED_JOB_STATES and not self.stop():
            job = self._poll(job) if self.polled else self._stream(job)
        if job.status in FINISHED_JOB_STATES:
            job = self._sync(job)
        if job.status is JobStatus.COMPLETED and self.finished_on_farm:
            # The movie and the preview video come once the last frame is done.
            fetch_deliverables(self.client, job.id, self.folder, frame=None)
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
        if self.finished_on_farm:
            fetched = fetch_deliverables(self.client, self.job_id, self.folder, frame=frame)
            paths = [path for path, _ in fetched]
        for kind in () if self.finished_on_farm else self.kinds:
            target = self.folder / frame_file_name(frame, kind)
            _fetch_frame(self.client, self.job_id, frame, kind, target, None)
            paths.append(target)
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
        finished_on_farm=job.spec.finish,
    )
    follower.done = {
        frame
        for frame in job.frames_done
        if not job.spec.finish
        and all((follower.folder / frame_file_name(frame, kind)).is_file() for kind in kinds)
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


@dataclass(frozen=True, slots=True)
class DownloadSummary:
    """What `download_job` did: files fetched, files already there, frames not finished."""

    job: Job
    folder: Path
    downloaded: tuple[Path, ...]
    present: tuple[Path, ...]
    unfinished: tuple[int, ...]


def download_job(
    client: TesseraClient,
    job_id: str,
    out_dir: Path,
    on_file: Callable[[Path, bool], None] | None = None,
    *,
    kinds: tuple[str, ...] = FRAME_KINDS,
) -> DownloadSummary:
    """Fetch every finished frame of a job into `frame_folder(out_dir, job)`: a file that
    is there already with the coordinator's SHA-256 is skipped (so a broken-off download
    resumes where it stopped), any other is downloaded (atomically, its hash checked).
    `on_file(path, downloaded)` is called for each file. Raises what `follow_job` does."""
    job = client.job(job_id)
    folder = frame_folder(out_dir, job)
    downloaded: list[Path] = []
    present: list[Path] = []
    unfinished: list[int] = []
    states = client.frames(job_id)
    if job.spec.finish:
        unfinished = [s.frame for s in states if s.status is not FrameStatus.DONE]
        for path, fetched in fetch_deliverables(client, job_id, folder, on_file=on_file):
            (downloaded if fetched else present).append(path)
        return DownloadSummary(job, folder, tuple(downloaded), tuple(present), tuple(unfinished))
    for state in states:
        if state.status is not FrameStatus.DONE:
            unfinished.append(state.frame)
            continue
        for kind in kinds:
            expected = state.files.get(kind)
            target = folder / frame_file_name(state.frame, kind)
            if expected is not None and target.is_file() and sha256_file(target) == expected:
                present.append(target)
                fetched = False
            else:
                _fetch_frame(client, job_id, state.frame, kind, target, expected)
                downloaded.append(target)
                fetched = True
            if on_file is not None:
                on_file(target, fetched)
    return DownloadSummary(job, folder, tuple(downloaded), tuple(present), tuple(unfinished))


#: `fetch_deliverables(frame=ALL)`: every file of the job, of every frame and none.
ALL = "all"


def fetch_deliverables(
    client: TesseraClient,
    job_id: str,
    folder: Path,
    *,
    frame: int | str | None = ALL,
    on_file: Callable[[Path, bool], None] | None = None,
) -> list[tuple[Path, bool]]:
    """Fetch a job's deliverables into `folder` under their own relative paths: those of
    one `frame`, those of no frame (`None`: the movie and preview video), or `ALL`. A
    file already there with the coordinator's hash is kept. Returns (path, downloaded)."""
    listing = client.deliverables(job_id)
    done: list[tuple[Path, bool]] = []
    for file in listing.files:
        if frame not in (ALL, file.frame):
            continue
        target = _inside(folder, file)
        fetched = not (target.is_file() and sha256_file(target) == file.sha256)
        if fetched:
            _fetch_deliverable(client, job_id, file, target)
        done.append((target, fetched))
        if on_file is not None:
            on_file(target, fetched)
    return done


def _inside(folder: Path, file: Deliverable) -> Path:
    """Where a deliverable goes; never outside `folder` (its path was checked by the
    model already: this also refuses a link planted in the folder)."""
    target = folder / file.path
    root = folder.resolve()
    if os.path.commonpath([root, target.resolve()]) != str(root):
        raise FrameDownloadError(f"Refusing to write {file.path}: it leads outside {folder}.")
    return target


def _fetch_deliverable(client: TesseraClient, job_id: str, file: Deliverable, target: Path) -> None:
    with _download(client, job_id, file.path, target):
        client.download_deliverable(job_id, file, target)


def _fetch_frame(
    client: TesseraClient, job_id: str, frame: int, kind: str, target: Path, sha: str | None
) -> None:
    """Download one file of a finished frame (checked against `sha` when given)."""
    with _download(client, job_id, f"frame {frame}", target):
        client.download_frame(job_id, frame, target, kind=kind, expected_sha256=sha)


@contextlib.contextmanager
def _download(client: TesseraClient, job_id: str, what: str, target: Path) -> Iterator[None]:
    """A download's errors as the user's: a body that broke off mid-way (the partial file
    dropped; a later sync or run retries) or a file that cannot be written."""
    try:
        yield
    except requests.RequestException as exc:
        target.with_name(target.name + ".part").unlink(missing_ok=True)
        raise CoordinatorUnreachableError(
            f"Lost the connection while downloading {what} of job {job_id} from "
            f"{client.base_url} ({exc})."
        ) from exc
    except OSError as exc:
        raise FrameDownloadError(
            f"Cannot write {what} to {target}: {exc.strerror or exc}."
        ) from exc

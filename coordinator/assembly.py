"""Frame assembly: when every tile of a frame is accepted, merge them into the frame.

Runs in one background thread so uploads return quickly. A frame whose scene asks for
denoising is merged, stored, and handed to a node as a `denoise` task (the coordinator
never runs Blender); its result is the frame's final passes (the raw EXR). Those go to
a node as a `finish` task, whose files (the scene's own output, File Output nodes') are
unpacked into the store as the frame's deliverables, with a colour-managed thumbnail of
the frame file as its preview. With the job's last frame, its movie and preview video
are encoded here (ffmpeg from imageio-ffmpeg). Every step is recorded in the `frames`
table, and `recover()` re-queues frames and encodes that a crash interrupted, so a
restart never loses or repeats accepted work. A frame that cannot be written because the
disk (or the database) is full waits and is assembled again every `retry_seconds`, with
the reason in its job's message: a full disk delays a job, it never fails it.

Merge and encode only: states are written by `coordinator.frame_states`.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.disk_space import no_room_reason
from coordinator.deliverables import Deliverables, StoredFile, raw_exr_name, unpack_finish
from coordinator.errors import StorageFullError
from coordinator.frame_states import FrameStates
from coordinator.planning import plan_of_tasks
from coordinator.task_states import RUNNABLE_JOBS, TaskStates
from protocol.models import FrameStatus, JobSpec, RenderAssignment, TaskKind, TaskStatus
from renderers.exr import ExrImage, read_exr, write_exr
from renderers.merge import merge_tiles
from renderers.preview import ThumbnailError, write_preview_png, write_thumbnail
from renderers.video import MovieSpec, VideoError, encode_movie, encode_preview

log = logging.getLogger(__name__)
PREVIEW_SIZE = 1024
#: Seconds a frame that met a full disk waits before it is assembled again.
STORAGE_RETRY_SECONDS = 30.0


#: Frame files a preview video is made from directly (others: their thumbnails).
_VIDEO_READABLE = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp"})


@dataclass(frozen=True, slots=True)
class _Encode:
    """Queue item: encode a job's movie and preview video."""

    job_id: str


class Assembler:
    def __init__(self, states: TaskStates, retry_seconds: float = STORAGE_RETRY_SECONDS) -> None:
        self.states = states
        self.frames = FrameStates(states)
        self.deliverables = Deliverables(states.core)
        self.db = states.core.db
        self.store = states.core.store
        self.retry_seconds = retry_seconds
        #: Frames waiting for disk space: (when to try again, job, frame).
        self._waiting: list[tuple[float, str, int]] = []
        self._queue: queue.Queue[tuple[str, int] | _Encode | threading.Event] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="frame-assembly", daemon=True)
        self._thread.start()
        self.recover()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, job_id: str, frame: int) -> None:
        self._queue.put((job_id, frame))

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Block until queued assemblies are done (tests and benchmarks)."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def recover(self) -> None:
        """Queue frames a crash interrupted: all tiles in but no final frame yet."""
        rows = self.db.query(
            "SELECT f.job_id, f.frame FROM frames f JOIN jobs j ON j.id = f.job_id WHERE"
            " f.status != ? AND j.status IN (?, ?) AND NOT EXISTS (SELECT 1"
            " FROM tasks t WHERE t.job_id = f.job_id AND t.frame = f.frame AND t.kind = ? AND"
            " t.status != ?)",
            (
                FrameStatus.DONE.value,
                *RUNNABLE_JOBS,
                TaskKind.RENDER.value,
                TaskStatus.COMPLETED.value,
            ),
        )
        for row in rows:
            self.submit(row["job_id"], row["frame"])
        for job_id in self.frames.jobs_awaiting_videos():
            self._queue.put(_Encode(job_id))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._requeue_due()
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, threading.Event):
                item.set()
                continue
            if isinstance(item, _Encode):
                self._encode_claimed(item.job_id)
                continue
            job_id, frame = item
            try:
                self._assemble_claimed(job_id, frame)
            except Exception as exc:
                reason = _storage_full(exc)
                if reason is not None:
                    self._wait_for_room(job_id, frame, reason)
                    continue
                log.exception("assembling frame %s of job %s failed", frame, job_id)
                try:
                    self._fail_job(job_id, frame)
                except Exception:
                    # The job stays active: recover() assembles the frame at the next start.
                    log.exception("could not record that job %s failed", job_id)

    def _requeue_due(self) -> None:
        now = time.monotonic()
        due = [entry for entry in self._waiting if entry[0] <= now]
        self._waiting = [entry for entry in self._waiting if entry[0] > now]
        for _, job_id, frame in due:
            self.submit(job_id, frame)

    def _wait_for_room(self, job_id: str, frame: int, reason: str) -> None:
        log.warning(
            "frame %s of job %s waits for disk space (%s); trying again in %.0f s",
            frame,
            job_id,
            reason,
            self.retry_seconds,
        )
        self._waiting.append((time.monotonic() + self.retry_seconds, job_id, frame))
        message = (
            f"Frame {frame} waits for disk space on the coordinator ({reason}); it is "
            f"assembled again every {self.retry_seconds:.0f} s."
        )
        try:
            self.states.job_message(job_id, message)
        except Exception:
            log.warning("could not record the wait in job %s's message", job_id)

    def _assemble_claimed(self, job_id: str, frame: int) -> None:
        """Assemble, unless another replica on the database is assembling this frame now
        (it finishes it; if it dies, a sweep's `recover` queues the frame again)."""
        with self.db.claim(f"frame:{job_id}:{frame}") as mine:
            if mine:
                self.assemble(job_id, frame)

    def assemble(self, job_id: str, frame: int) -> None:
        job = self.db.query_one("SELECT spec, status FROM jobs WHERE id = ?", (job_id,))
        state = self.db.query_one(
            "SELECT * FROM frames WHERE job_id = ? AND frame = ?", (job_id, frame)
        )
        if job is None or state is None or state["status"] == FrameStatus.DONE.value:
            return
        spec = JobSpec.model_validate_json(job["spec"])
        if state["status"] == FrameStatus.DENOISING.value:
            denoised = self._completed(job_id, frame, TaskKind.DENOISE)
            if denoised is not None:
                self._final(job_id, frame, spec, None, exr_sha=denoised)
            return
        if state["status"] == FrameStatus.FINISHING.value:
            finished = self._completed(job_id, frame, TaskKind.FINISH)
            if finished is not None:
                self._finished(job_id, frame, spec, dict(state), finished)
            return
        tiles = self.db.query(
            "SELECT tile_index, result_sha, status, assignment FROM tasks"
            " WHERE job_id = ? AND frame = ?"
            " AND kind = ?",
            (job_id, frame, TaskKind.RENDER.value),
        )
        if any(t["status"] != TaskStatus.COMPLETED.value for t in tiles):
            return
        plan = plan_of_tasks(
            spec,
            {
                t["tile_index"]: RenderAssignment.model_validate_json(t["assignment"])
                for t in tiles
                if t["assignment"]
            },
        )
        if plan.is_whole_frame:
            # One tile is the frame (denoised in-render if asked): keep the node's file,
            # read only when a preview is made of it here (not for a finish job).
            sha = tiles[0]["result_sha"]
            self._final(job_id, frame, spec, None, exr_sha=sha)
            return
        merged = merge_tiles(
            plan, {t["tile_index"]: self.store.path(t["result_sha"]) for t in tiles}
        )
        if spec.wants_denoise:
            self._start_denoise(job_id, frame, merged)
        else:
            self._final(job_id, frame, spec, merged)

    def _completed(self, job_id: str, frame: int, kind: TaskKind) -> str | None:
        """The result of the frame's completed denoise or finish task, if it is in."""
        row = self.db.query_one(
            "SELECT result_sha FROM tasks WHERE job_id = ? AND frame = ? AND kind = ? AND"
            " status = ?",
            (job_id, frame, kind.value, TaskStatus.COMPLETED.value),
        )
        return None if row is None else str(row["result_sha"])

    def _store_exr(self, image: ExrImage) -> str:
        with tempfile.TemporaryDirectory(dir=self.store.tmp) as scratch:
            path = Path(scratch) / "frame.exr"
            write_exr(path, image)
            return self.store.put_file(path)

    def _start_denoise(self, job_id: str, frame: int, merged: ExrImage) -> None:
        self.frames.denoising(job_id, frame, self._store_exr(merged))

    def _final(
        self,
        job_id: str,
        frame: int,
        spec: JobSpec,
        image: ExrImage | None,
        exr_sha: str | None = None,
    ) -> None:
        """The frame's final passes: to its finish task, or done as they are. `image`
        None: read from `exr_sha` when needed.

        A frame to be finished is handed to its finish at once, with no preview: its
        node's poll is held for that task (`coordinator.followups`), and its preview
        is the finished frame's thumbnail (`_finished`), the raw passes' only when that
        cannot be made."""
        if image is None and exr_sha is None:
            raise ValueError("a final frame needs its image or its stored EXR")
        if exr_sha is None:
            assert image is not None
            exr_sha = self._store_exr(image)
        if spec.finish:
            self.frames.finishing(job_id, frame, exr_sha, "")
            return
        png_sha = self._raw_preview(exr_sha, image)
        self._done(job_id, frame, exr_sha, png_sha, [])

    def _raw_preview(self, exr_sha: str, image: ExrImage | None = None) -> str:
        """The stored preview PNG of a frame's raw passes (tone-mapped Combined)."""
        if image is None:
            image = read_exr(self.store.path(exr_sha))
        with tempfile.TemporaryDirectory(dir=self.store.tmp) as scratch:
            png = write_preview_png(image, Path(scratch) / "frame.png")
            return self.store.put_file(png)

    def _finished(
        self, job_id: str, frame: int, spec: JobSpec, state: dict[str, object], upload: str
    ) -> None:
        """The finish task's files: stored, the frame file (colour-managed, as the artist
        will see it) made the frame's preview."""
        files = unpack_finish(self.store, self.store.path(upload), frame)
        exr_sha = str(state["exr_sha"])
        main = next(f for f in files if f.kind == "frame")
        with tempfile.TemporaryDirectory(dir=self.store.tmp) as scratch:
            try:
                thumbnail = write_thumbnail(
                    self.store.path(main.sha256),
                    Path(scratch) / "thumb.png",
                    max_size=max(spec.effective_size()),
                )
                png_sha = self.store.put_file(thumbnail)
            except ThumbnailError as exc:
                log.info("frame %s of job %s gets its raw preview: %s", frame, job_id, exc)
                # A frame handed to its finish before this change has its raw one.
                png_sha = str(state["png_sha"] or "") or self._raw_preview(exr_sha)
        self._done(job_id, frame, exr_sha, png_sha, files)

    def _done(
        self, job_id: str, frame: int, exr_sha: str, png_sha: str, files: list[StoredFile]
    ) -> None:
        taken = {f.path for f in files}
        raw_name = raw_exr_name(frame)
        if raw_name in taken:  # the scene itself writes frame_####.exr at the top
            raw_name = raw_name.replace(".exr", ".passes.exr")
        raw = StoredFile(raw_name, "raw_exr", exr_sha, self.store.size(exr_sha), frame)
        if self.frames.done(job_id, frame, exr_sha, png_sha, [*files, raw]):
            self._queue.put(_Encode(job_id))

    def _encode_claimed(self, job_id: str) -> None:
        """Encode a job's videos once: on one replica, and only while the job waits for
        them (a repeated request after its completion does nothing). An unexpected error
        completes the job without them, saying so: the frames stand."""
        with self.db.claim(f"videos:{job_id}") as mine:
            if not mine or job_id not in self.frames.jobs_awaiting_videos():
                return
            try:
                self._encode_videos(job_id)
            except Exception:
                log.exception("encoding the videos of job %s failed", job_id)
                self.frames.videos_done(
                    job_id, [], "The movie and preview video could not be made; see the log."
                )

    def _encode_videos(self, job_id: str) -> None:
        """The job's movie (a movie scene's) and preview video, then its completion. A
        video that cannot be made is said in the job's message; the frames stand."""
        spec = self.states.core.spec(job_id)
        files: list[StoredFile] = []
        problems: list[str] = []
        frames = self.deliverables.frames_of_kind(job_id, "frame")
        movie = spec.scene.movie if spec.finish else None
        with tempfile.TemporaryDirectory(dir=self.store.tmp) as scratch:
            folder = Path(scratch)
            if movie is not None:
                try:
                    sources = self._linked(folder / "movie", frames)
                    settings = MovieSpec(
                        name=movie.name,
                        container=movie.container,
                        codec=movie.codec,
                        fps=movie.fps,
                        frame_start=spec.frames.start,
                        frame_end=spec.frames.end,
                        crf=movie.crf,
                        preset=movie.preset,
                        gop=movie.gop,
                        bitrate_kbps=movie.bitrate_kbps,
                        color_mode=movie.color_mode,
                    )
                    out = encode_movie(sources, settings, folder / "movie.out")
                    files.append(self._stored(out, movie.name, "movie"))
                except VideoError as exc:
                    problems.append(f"The scene's movie could not be encoded: {exc.message}")
            if spec.preview_video:
                try:
                    sources = self._preview_sources(job_id, folder / "preview", frames)
                    fps = movie.fps if movie is not None else spec.scene.fps
                    out = encode_preview(sources, folder / "preview.mp4", fps=fps)
                    name = f"preview_{spec.frames.start:04d}-{spec.frames.end:04d}.mp4"
                    files.append(self._stored(out, name, "preview_video"))
                except VideoError as exc:
                    problems.append(f"The preview video could not be encoded: {exc.message}")
        self.frames.videos_done(job_id, files, " ".join(problems))

    def _stored(self, path: Path, name: str, kind: str) -> StoredFile:
        sha = self.store.put_file(path)
        return StoredFile(name, kind, sha, self.store.size(sha), None)  # type: ignore[arg-type]

    def _linked(self, folder: Path, frames: list[StoredFile]) -> list[Path]:
        """Stored frames under names with their suffix (ffmpeg reads by extension)."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, stored in enumerate(frames):
            link = folder / f"{index:06d}{Path(stored.path).suffix.lower()}"
            link.symlink_to(self.store.path(stored.sha256))
            paths.append(link)
        return paths

    def _preview_sources(self, job_id: str, folder: Path, frames: list[StoredFile]) -> list[Path]:
        """The frame files when ffmpeg reads them, else each frame's preview PNG."""
        if frames and all(Path(f.path).suffix.lower() in _VIDEO_READABLE for f in frames):
            return self._linked(folder, frames)
        rows = self.db.query(
            "SELECT frame, png_sha FROM frames WHERE job_id = ? ORDER BY frame", (job_id,)
        )
        previews = [StoredFile(f"{r['frame']}.png", "frame", r["png_sha"], 0, None) for r in rows]
        return self._linked(folder, previews)

    def _fail_job(self, job_id: str, frame: int) -> None:
        self.states.fail_job_now(
            job_id, f"Frame {frame} could not be assembled; see the coordinator log."
        )


def _storage_full(error: BaseException) -> str | None:
    """Why `error` means the coordinator's disk or database is full, else None."""
    if isinstance(error, StorageFullError):
        return error.message
    return no_room_reason(error)

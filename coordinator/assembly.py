"""Frame assembly: when every tile of a frame is accepted, merge them into the frame.

Runs in one background thread so uploads return quickly. A frame whose scene asks for
denoising is merged, stored, and handed to a node as a `denoise` task (the coordinator
never runs Blender); its result becomes the final frame. Every step is recorded in the
`frames` table, and `recover()` re-queues frames that a crash interrupted, so a restart
never loses or repeats accepted work. A frame that cannot be written because the disk
(or the database) is full waits and is assembled again every `retry_seconds`, with the
reason in its job's message: a full disk delays a job, it never fails it.

Merge only: the frame's and its job's states are written by `coordinator.task_states`.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from pathlib import Path

from common.disk_space import no_room_reason
from coordinator.errors import StorageFullError
from coordinator.planning import plan_of_tasks
from coordinator.task_states import RUNNABLE_JOBS, TaskStates
from protocol.models import FrameStatus, JobSpec, RenderAssignment, TaskKind, TaskStatus
from renderers.exr import ExrImage, read_exr, write_exr
from renderers.merge import merge_tiles
from renderers.preview import write_preview_png

log = logging.getLogger(__name__)
PREVIEW_SIZE = 1024
#: Seconds a frame that met a full disk waits before it is assembled again.
STORAGE_RETRY_SECONDS = 30.0


class Assembler:
    def __init__(self, states: TaskStates, retry_seconds: float = STORAGE_RETRY_SECONDS) -> None:
        self.states = states
        self.db = states.core.db
        self.store = states.core.store
        self.retry_seconds = retry_seconds
        #: Frames waiting for disk space: (when to try again, job, frame).
        self._waiting: list[tuple[float, str, int]] = []
        self._queue: queue.Queue[tuple[str, int] | threading.Event] = queue.Queue()
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
            job_id, frame = item
            try:
                self.assemble(job_id, frame)
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

    def assemble(self, job_id: str, frame: int) -> None:
        job = self.db.query_one("SELECT spec, status FROM jobs WHERE id = ?", (job_id,))
        state = self.db.query_one(
            "SELECT * FROM frames WHERE job_id = ? AND frame = ?", (job_id, frame)
        )
        if job is None or state is None or state["status"] == FrameStatus.DONE.value:
            return
        spec = JobSpec.model_validate_json(job["spec"])
        if state["status"] == FrameStatus.DENOISING.value:
            denoised = self.db.query_one(
                "SELECT result_sha FROM tasks WHERE job_id = ? AND frame = ? AND kind = ? AND"
                " status = ?",
                (job_id, frame, TaskKind.DENOISE.value, TaskStatus.COMPLETED.value),
            )
            if denoised is not None:
                image = read_exr(self.store.path(denoised["result_sha"]))
                self._finish(job_id, frame, image, exr_sha=denoised["result_sha"])
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
            # One tile is the frame (denoised in-render if asked): keep the node's file.
            sha = tiles[0]["result_sha"]
            self._finish(job_id, frame, read_exr(self.store.path(sha)), exr_sha=sha)
            return
        merged = merge_tiles(
            plan, {t["tile_index"]: self.store.path(t["result_sha"]) for t in tiles}
        )
        if spec.wants_denoise:
            self._start_denoise(job_id, frame, merged)
        else:
            self._finish(job_id, frame, merged)

    def _store_exr(self, image: ExrImage) -> str:
        with tempfile.TemporaryDirectory(dir=self.store.root / "tmp") as scratch:
            path = Path(scratch) / "frame.exr"
            write_exr(path, image)
            return self.store.put_file(path)

    def _start_denoise(self, job_id: str, frame: int, merged: ExrImage) -> None:
        self.states.frame_denoising(job_id, frame, self._store_exr(merged))

    def _finish(self, job_id: str, frame: int, image: ExrImage, exr_sha: str | None = None) -> None:
        exr_sha = exr_sha or self._store_exr(image)
        with tempfile.TemporaryDirectory(dir=self.store.root / "tmp") as scratch:
            png = write_preview_png(image, Path(scratch) / "frame.png")
            png_sha = self.store.put_file(png)
        self.states.frame_done(job_id, frame, exr_sha, png_sha)

    def _fail_job(self, job_id: str, frame: int) -> None:
        self.states.fail_job_now(
            job_id, f"Frame {frame} could not be assembled; see the coordinator log."
        )


def _storage_full(error: BaseException) -> str | None:
    """Why `error` means the coordinator's disk or database is full, else None."""
    if isinstance(error, StorageFullError):
        return error.message
    return no_room_reason(error)

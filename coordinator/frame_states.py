"""The frame state machine: a frame's status, and the job completion it brings.

A frame is pending while its tiles render; once merged it is denoising (a denoise task
holds it), then finishing (a finish task makes the scene's own files), then done. The
job completes with its last frame, or, when it asks for a movie or a preview video,
once those are encoded (`videos_done`). Sibling of `coordinator.task_states` (the two
are the only modules that write a status: a test greps for it); tasks are inserted
through it, deliverables recorded through `coordinator.deliverables`.
"""

from __future__ import annotations

import sqlite3

from coordinator.db import now_iso
from coordinator.deliverables import Deliverables, StoredFile
from coordinator.planning import denoise_task, finish_task
from coordinator.task_states import RUNNABLE_JOBS, Changes, TaskStates
from protocol.models import FrameStatus, JobSpec, JobStatus

__all__ = ["ENCODING_MESSAGE", "FrameStates", "needs_videos"]

#: The job's message while its movie or preview video is encoded.
ENCODING_MESSAGE = "Every frame is done; encoding the movie and preview video."


def needs_videos(spec: JobSpec) -> bool:
    """Whether the job ends with an encode: the scene's movie or a preview video."""
    return spec.preview_video or (spec.finish and spec.scene.movie is not None)


class FrameStates:
    def __init__(self, states: TaskStates) -> None:
        self.states = states
        self.core = states.core

    def denoising(self, job_id: str, frame: int, merged_sha: str) -> None:
        """The frame's tiles are merged: queue its denoise task."""
        with self.core.db.transaction() as conn:
            self.states.insert(conn, [denoise_task(job_id, frame, merged_sha)], or_ignore=True)
            conn.execute(
                "UPDATE frames SET status = ?, merged_sha = ? WHERE job_id = ? AND frame = ?",
                (FrameStatus.DENOISING.value, merged_sha, job_id, frame),
            )
        self._announce(job_id, frame, FrameStatus.DENOISING)

    def finishing(self, job_id: str, frame: int, exr_sha: str, png_sha: str) -> None:
        """The frame's final passes are in: queue the finish that makes its files."""
        with self.core.db.transaction() as conn:
            self.states.insert(conn, [finish_task(job_id, frame, exr_sha)], or_ignore=True)
            conn.execute(
                "UPDATE frames SET status = ?, exr_sha = ?, png_sha = ? WHERE job_id = ? AND"
                " frame = ?",
                (FrameStatus.FINISHING.value, exr_sha, png_sha, job_id, frame),
            )
        self._announce(job_id, frame, FrameStatus.FINISHING)

    def done(
        self, job_id: str, frame: int, exr_sha: str, png_sha: str, files: list[StoredFile]
    ) -> bool:
        """The frame is final with its deliverables. The job completes (and settles) with
        its last frame, unless videos must be encoded first: True then."""
        changes = Changes()
        encode = False
        with self.core.db.transaction() as conn:
            conn.execute(
                "UPDATE frames SET status = ?, exr_sha = ?, png_sha = ? WHERE"
                " job_id = ? AND frame = ?",
                (FrameStatus.DONE.value, exr_sha, png_sha, job_id, frame),
            )
            Deliverables.record(conn, job_id, files)
            pending = conn.execute(
                "SELECT COUNT(*) FROM frames WHERE job_id = ? AND status != ?",
                (job_id, FrameStatus.DONE.value),
            ).fetchone()[0]
            if pending:
                conn.execute(
                    "UPDATE jobs SET message = '' WHERE id = ? AND message LIKE ?",
                    (job_id, "Frame % waits for disk space%"),
                )
            elif needs_videos(self.core.spec_in(conn, job_id)):
                encode = True
                conn.execute(
                    "UPDATE jobs SET message = ?, updated_at = ? WHERE id = ?",
                    (ENCODING_MESSAGE, now_iso(), job_id),
                )
            else:
                self._complete(conn, job_id, "", changes)
        self._announce(job_id, frame, FrameStatus.DONE)
        self.states.announce(changes)
        return encode

    def videos_done(self, job_id: str, files: list[StoredFile], message: str = "") -> None:
        """The job's movie and preview video are stored (or could not be: `message`)."""
        changes = Changes()
        with self.core.db.transaction() as conn:
            Deliverables.record(conn, job_id, files)
            self._complete(conn, job_id, message, changes)
        self.states.announce(changes)

    def jobs_awaiting_videos(self) -> list[str]:
        """Runnable jobs whose frames are all done (a crash interrupted their encode)."""
        rows = self.core.db.query(
            "SELECT j.id FROM jobs j WHERE j.status IN (?, ?) AND EXISTS (SELECT 1 FROM"
            " frames f WHERE f.job_id = j.id) AND NOT EXISTS (SELECT 1 FROM frames f WHERE"
            " f.job_id = j.id AND f.status != ?)",
            (*RUNNABLE_JOBS, FrameStatus.DONE.value),
        )
        return [row["id"] for row in rows]

    def _complete(
        self, conn: sqlite3.Connection, job_id: str, message: str, changes: Changes
    ) -> None:
        updated = conn.execute(
            "UPDATE jobs SET status = ?, message = ?, updated_at = ? WHERE id = ? AND"
            " status IN (?, ?, ?)",
            (
                JobStatus.COMPLETED.value,
                message[:4000],
                now_iso(),
                job_id,
                *RUNNABLE_JOBS,
                JobStatus.PAUSED.value,
            ),
        ).rowcount
        if updated:
            self.states.credits.settle(conn, job_id)  # the bill follows the measurement
            changes.jobs.append((job_id, JobStatus.COMPLETED))

    def _announce(self, job_id: str, frame: int, status: FrameStatus) -> None:
        bus = self.core.bus
        if status is FrameStatus.DONE:
            url = f"/api/v1/jobs/{job_id}/frames/{frame}.exr"
            bus.publish("frame", job_id=job_id, frame=frame, status=status.value, url=url)
        else:
            bus.publish("frame", job_id=job_id, frame=frame, status=status.value)
        bus.work_changed()

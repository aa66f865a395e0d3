"""The task state machine: the only place a task's or a job's status changes.

Every transition of a task (queued, active, checking, completed, soft-failed, failed,
rejected, canceled) and of a job (queued, active, paused, completed, failed, canceled)
is a method here (a frame's, in its sibling `coordinator.frame_states`), together
with what ripples from it: the node it frees, the frame
it completes, the job it fails or finishes, the payment or refund it makes, and the
events it broadcasts. Tasks are inserted here too, as `coordinator.planning` describes
them. Methods that take `conn` run inside the caller's transaction and note what they
did in a `Changes`; `announce` broadcasts it once the transaction has committed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from coordinator.core import Core, TaskRow
from coordinator.credits import Credits
from coordinator.db import now_iso
from coordinator.errors import LeaseOverError
from coordinator.planning import NewTask
from coordinator.verify import claims
from coordinator.verify.reputation import Reputation
from protocol.models import FrameStatus, JobStatus, TaskKind, TaskStatus

__all__ = ["LEASABLE", "RUNNABLE_JOBS", "Changes", "FrameReady", "TaskStates"]

LEASABLE = (TaskStatus.QUEUED.value, TaskStatus.SOFT_FAILED.value)
RUNNABLE_JOBS = (JobStatus.QUEUED.value, JobStatus.ACTIVE.value)
#: Called with (job_id, frame) once every tile of a frame is accepted (or its denoise).
FrameReady = Callable[[str, int], None]


@dataclass
class Changes:
    """What one transaction changed, announced after it commits."""

    tasks: list[tuple[TaskRow, TaskStatus]] = field(default_factory=list)
    #: Frames whose tiles are all in: handed to assembly.
    frames: list[tuple[str, int]] = field(default_factory=list)
    jobs: list[tuple[str, JobStatus]] = field(default_factory=list)
    #: Leasable work may have appeared (wakes long-polling nodes).
    work: bool = False


class TaskStates:
    def __init__(self, core: Core, credits: Credits, reputation: Reputation) -> None:
        self.core = core
        self.credits = credits
        self.reputation = reputation
        self.on_frame_ready: list[FrameReady] = []

    # --- announcing ------------------------------------------------------------------------

    def announce(self, changes: Changes) -> None:
        bus = self.core.bus
        for row, status in changes.tasks:
            bus.publish(
                "task",
                job_id=row["job_id"],
                task_id=row["id"],
                frame=row["frame"],
                status=status.value,
                url=f"/api/v1/tasks/{row['id']}/preview.png"
                if status is TaskStatus.COMPLETED and row["kind"] != TaskKind.VERIFY.value
                else None,
            )
        for job_id, job_status in changes.jobs:
            bus.publish("job", job_id=job_id, status=job_status.value)
        for job_id, frame in changes.frames:
            for callback in self.on_frame_ready:
                callback(job_id, frame)
        if changes.work or any(
            status in (TaskStatus.QUEUED, TaskStatus.SOFT_FAILED) for _, status in changes.tasks
        ):
            bus.work_changed()

    # --- tasks -----------------------------------------------------------------------------

    def insert(
        self, conn: sqlite3.Connection, tasks: Iterable[NewTask], *, or_ignore: bool = False
    ) -> None:
        """Queue new tasks (from `coordinator.planning`)."""
        stamp = now_iso()
        conn.executemany(
            f"INSERT {'OR IGNORE ' if or_ignore else ''}INTO tasks (id, job_id, kind, frame,"
            " tile_index, status, assignment, denoise_input, verifies, excluded_owners,"
            " backs_up, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                (
                    t.id,
                    t.job_id,
                    t.kind.value,
                    t.frame,
                    t.tile_index,
                    TaskStatus.QUEUED.value,
                    t.assignment,
                    t.denoise_input,
                    t.verifies,
                    t.excluded_owners,
                    t.backs_up,
                    stamp,
                )
                for t in tasks
            ],
        )

    def lease(
        self,
        conn: sqlite3.Connection,
        task_id: str,
        job_id: str,
        node_id: str,
        lease_id: str,
        expires: float,
    ) -> sqlite3.Row | None:
        """queued -> active on `node_id`; its job becomes active. Returns the task row, or
        None when the task is no longer leasable (another replica leased it since the
        search): the one conditional UPDATE checks, locks and changes it."""
        row: sqlite3.Row | None = conn.execute(
            "UPDATE tasks SET status = ?, lease_id = ?, node_id = ?, lease_expires = ?,"
            " leased_at = ?, updated_at = ? WHERE id = ? AND status IN (?, ?) RETURNING *",
            (
                TaskStatus.ACTIVE.value,
                lease_id,
                node_id,
                expires,
                time.time(),
                now_iso(),
                task_id,
                *LEASABLE,
            ),
        ).fetchone()
        if row is None:
            return None
        conn.execute(
            "UPDATE jobs SET status = ?, updated_at = ? WHERE id = ? AND status = ?",
            (JobStatus.ACTIVE.value, now_iso(), job_id, JobStatus.QUEUED.value),
        )
        conn.execute(
            "UPDATE nodes SET current_task = ?, last_seen = ? WHERE id = ?",
            (task_id, time.time(), node_id),
        )
        return row

    @staticmethod
    def extend_lease(conn: sqlite3.Connection, lease_id: str, expires: float) -> None:
        conn.execute("UPDATE tasks SET lease_expires = ? WHERE lease_id = ?", (expires, lease_id))

    def requeue(
        self,
        conn: sqlite3.Connection,
        row: TaskRow,
        changes: Changes,
        *,
        expired: bool = False,
    ) -> None:
        """active -> queued: the node gave the task back, or its lease ran out (`expired`,
        which counts as a failed attempt of that node)."""
        if expired:
            self.record_failure(
                conn,
                row["id"],
                row["job_id"],
                row["node_id"],
                "lease_expired",
                "The node stopped sending heartbeats.",
            )
        conn.execute(
            "UPDATE tasks SET status = ?, lease_id = NULL, node_id = NULL, lease_expires = NULL,"
            " updated_at = ? WHERE id = ?",
            (TaskStatus.QUEUED.value, now_iso(), row["id"]),
        )
        self._free_node(conn, row["node_id"], row["id"] if expired else None)
        changes.tasks.append((row, TaskStatus.QUEUED))

    @staticmethod
    def record_failure(
        conn: sqlite3.Connection,
        task_id: str,
        job_id: str,
        node_id: str | None,
        kind: str,
        message: str,
        lease_id: str | None = None,
        *,
        final: bool = False,
    ) -> None:
        conn.execute(
            "INSERT INTO failures (seconds, task_id, at, job_id, node_id, kind, message, lease_id,"
            " final) VALUES ((SELECT COALESCE(render_seconds, ? - leased_at) FROM tasks WHERE"
            " id = ?), ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                time.time(),
                task_id,
                task_id,
                now_iso(),
                job_id,
                node_id,
                kind,
                message[:2000],
                lease_id,
                final,
            ),
        )

    def fail_attempt(
        self,
        conn: sqlite3.Connection,
        row: sqlite3.Row,
        kind: str,
        message: str,
        changes: Changes,
        *,
        retryable: bool,
        penalise: bool = False,
        reported: bool = False,
    ) -> None:
        """Record a failed attempt and end its lease, once: a lease that ended meanwhile
        (another report or upload on it won) raises LeaseOverError and changes nothing.

        Nothing one provider says fails a job. A failure the node calls final (not
        `retryable`), or the last of `max_attempts` attempts, keeps that provider's
        account off the task and queues it for another (soft-failed); the task fails, and
        fails its job, only when a provider of another account reports it final too (or
        the attempts were spread over two accounts), or when no other provider came to
        try it within `verify_wait_seconds` (`fail_unconfirmable`, from the sweeper). A
        node that fails a job's tasks too often is kept off the job. A duplicate sample
        that cannot be rendered never fails the job: its tile is accepted as if it had
        not been sampled; a backup copy that cannot be done is dropped.

        `penalise`: the node's own result was wrong (not a crash), which counts against
        its provider's reputation. `reported`: `message` is the node's own free text,
        kept and shown only as a quote (`claims.quoted_report`).
        """
        current = conn.execute(
            "SELECT status, lease_id, attempts, excluded_owners FROM tasks WHERE id = ?",
            (row["id"],),
        ).fetchone()
        if (
            current is None
            or row["lease_id"] is None
            or current["status"] != TaskStatus.ACTIVE.value
            or current["lease_id"] != row["lease_id"]
        ):
            raise LeaseOverError(
                "The lease is over: its task moved on while this report or upload came in.",
                hint="Drop this task and ask for a new lease.",
            )
        job_id, node_id = row["job_id"], row["node_id"]
        attempts = current["attempts"] + 1
        if penalise and row["node_owner"]:
            self.reputation.count(conn, row["node_owner"], rejected=1)
        if reported:
            message = claims.quoted_report(message)
        self.record_failure(
            conn, row["id"], job_id, node_id, kind, message, row["lease_id"], final=not retryable
        )
        final, why, excluded = claims.verdict(
            conn,
            row,
            current["excluded_owners"],
            attempts,
            self.core.config.max_attempts,
            retryable,
        )
        if row["kind"] == TaskKind.VERIFY.value and final:
            self._give_up_sample(conn, row, message, changes)
            return
        if row["kind"] == TaskKind.BACKUP.value and final:
            # The original still renders: a backup that cannot be done is dropped.
            self._cancel(conn, row["id"], message[:2000])
            self._free_node(conn, node_id, row["id"], failed=True)
            changes.tasks.append((row, TaskStatus.CANCELED))
            return
        status = TaskStatus.FAILED if final else TaskStatus.SOFT_FAILED
        conn.execute(
            "UPDATE tasks SET status = ?, attempts = ?, lease_id = NULL, node_id = NULL,"
            " lease_expires = NULL, message = ?, excluded_owners = ?, updated_at = ?"
            " WHERE id = ?",
            (
                status.value,
                attempts,
                message[:2000],
                ",".join(sorted(excluded)),
                now_iso(),
                row["id"],
            ),
        )
        self._free_node(conn, node_id, failed=True)
        node_failures = conn.execute(
            "SELECT COUNT(*) FROM failures WHERE job_id = ? AND node_id = ?", (job_id, node_id)
        ).fetchone()[0]
        if node_failures >= self.core.config.blocklist_after:
            self.block(conn, job_id, node_id, f"{node_failures} failed tasks on this job")
        changes.tasks.append((row, status))
        changes.work = True
        if final:
            self._fail_job_for_task(conn, row["id"], job_id, why, changes)

    def _fail_job_for_task(
        self, conn: sqlite3.Connection, task_id: str, job_id: str, why: str, changes: Changes
    ) -> None:
        """The task failed for good: fail its job, saying why (`claims.failure_summary`)."""
        self.fail_job(conn, job_id, claims.failure_summary(conn, task_id, why), changes)

    def fail_unconfirmable(self, conn: sqlite3.Connection, row: TaskRow, changes: Changes) -> bool:
        """A soft-failed task whose providers so far are kept off it (one called it
        impossible, or failed every attempt), with still no other provider that could try
        it: it fails, and its job, with the reasons collected. False if one could now, or
        the task or its job moved on."""
        excluded = set(filter(None, row["excluded_owners"].split(",")))
        job = conn.execute("SELECT status FROM jobs WHERE id = ?", (row["job_id"],)).fetchone()
        if job is None or job["status"] not in RUNNABLE_JOBS:
            return False
        if claims.provider_online(self.core, conn, row["job_id"], excluded):
            return False
        moved = conn.execute(
            "UPDATE tasks SET status = ?, updated_at = ? WHERE id = ? AND status = ?",
            (TaskStatus.FAILED.value, now_iso(), row["id"], TaskStatus.SOFT_FAILED.value),
        ).rowcount
        if not moved:
            return False
        changes.tasks.append((row, TaskStatus.FAILED))
        self._fail_job_for_task(
            conn, row["id"], row["job_id"], "no other provider came to try it", changes
        )
        return True

    def _give_up_sample(
        self, conn: sqlite3.Connection, row: sqlite3.Row, message: str, changes: Changes
    ) -> None:
        """A sample failed on every try: settle its tile without it."""
        conn.execute(
            "UPDATE tasks SET status = ?, lease_id = NULL, lease_expires = NULL, message = ?,"
            " updated_at = ? WHERE id = ?",
            (TaskStatus.FAILED.value, message[:2000], now_iso(), row["id"]),
        )
        self._free_node(conn, row["node_id"])
        # The tile, and a first sample waiting for this arbiter, get the benefit of the
        # doubt: nobody could show them wrong.
        for other in conn.execute(
            "SELECT id FROM tasks WHERE (id = ? OR verifies = ?) AND status = ?",
            (row["verifies"], row["verifies"], TaskStatus.CHECKING.value),
        ).fetchall():
            self.complete(conn, other["id"], changes)
        changes.tasks.append((row, TaskStatus.FAILED))

    @staticmethod
    def block(conn: sqlite3.Connection, job_id: str, node_id: str, reason: str) -> None:
        """Keep a node off a job from now on."""
        conn.execute(
            "INSERT OR IGNORE INTO blocklist (job_id, node_id, reason) VALUES (?,?,?)",
            (job_id, node_id, reason),
        )

    def record_result(
        self, conn: sqlite3.Connection, row: TaskRow, lease_id: str, sha256: str
    ) -> None:
        """Record an upload that passed its checks and end the lease (status unchanged).
        One conditional UPDATE checks that the lease still holds and records the result."""
        # Lease to accepted upload, measured here rather than claimed by the node.
        seconds = max(0.0, time.time() - (row["leased_at"] or time.time()))
        recorded = conn.execute(
            "UPDATE tasks SET result_sha = ?, lease_expires = NULL, render_seconds = ?,"
            " updated_at = ? WHERE id = ? AND status = ? AND lease_id = ?",
            (sha256, seconds, now_iso(), row["id"], TaskStatus.ACTIVE.value, lease_id),
        ).rowcount
        if not recorded:
            raise LeaseOverError("The lease ended while the result was uploading.")
        self._free_node(conn, row["node_id"], seconds=seconds)

    def checking(
        self, conn: sqlite3.Connection, row: TaskRow, changes: Changes, message: str | None = None
    ) -> None:
        """Hold an uploaded result while a duplicate sample checks it."""
        if message is None:
            conn.execute(
                "UPDATE tasks SET status = ? WHERE id = ?", (TaskStatus.CHECKING.value, row["id"])
            )
        else:
            conn.execute(
                "UPDATE tasks SET status = ?, message = ? WHERE id = ?",
                (TaskStatus.CHECKING.value, message[:2000], row["id"]),
            )
        changes.tasks.append((row, TaskStatus.CHECKING))

    def complete(
        self, conn: sqlite3.Connection, task_id: str, changes: Changes, *, confirmed: bool = False
    ) -> None:
        """Accept a stored result for good and pay for it; note the frame, if now complete.
        Only a `confirmed` result (a sample agreed) contradicts a provider that called the
        task impossible: an unchecked one may come from the requester's partner."""
        row = conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        conn.execute(
            "UPDATE tasks SET status = ?, updated_at = ? WHERE id = ?",
            (TaskStatus.COMPLETED.value, now_iso(), task_id),
        )
        conn.execute(
            "UPDATE nodes SET tasks_completed = tasks_completed + 1 WHERE id = ?",
            (row["node_id"],),
        )
        self.credits.pay_task(conn, row)
        if confirmed:
            claims.contradict(conn, self.reputation, row)
        changes.tasks.append((row, TaskStatus.COMPLETED))
        if row["kind"] in (TaskKind.DENOISE.value, TaskKind.FINISH.value):
            changes.frames.append((row["job_id"], row["frame"]))
            return
        if row["kind"] != TaskKind.RENDER.value:
            return
        remaining = conn.execute(
            "SELECT COUNT(*) FROM tasks WHERE job_id = ? AND frame = ? AND kind = ? AND"
            " status != ?",
            (row["job_id"], row["frame"], TaskKind.RENDER.value, TaskStatus.COMPLETED.value),
        ).fetchone()[0]
        if remaining == 0:
            changes.frames.append((row["job_id"], row["frame"]))

    def reject(self, conn: sqlite3.Connection, row: TaskRow, reason: str, changes: Changes) -> None:
        """A sample that lost its comparison: never paid."""
        conn.execute(
            "UPDATE tasks SET status = ?, message = ?, updated_at = ? WHERE id = ?",
            (TaskStatus.REJECTED.value, reason[:2000], now_iso(), row["id"]),
        )
        changes.tasks.append((row, TaskStatus.REJECTED))

    def requeue_rejected(
        self,
        conn: sqlite3.Connection,
        tile: sqlite3.Row,
        reason: str,
        changes: Changes,
        *,
        block_node: bool,
    ) -> None:
        """The tile was wrong: forget its result, keep its node off this job if it is to
        blame (`block_node`), render it again."""
        self.record_failure(
            conn, tile["id"], tile["job_id"], tile["node_id"], "verification", reason
        )
        if block_node:
            self.block(conn, tile["job_id"], tile["node_id"], "a result failed duplicate sampling")
        conn.execute(
            "UPDATE tasks SET status = ?, result_sha = NULL, lease_id = NULL, node_id = NULL,"
            " render_seconds = NULL, doubt = NULL, message = ?, updated_at = ? WHERE id = ?",
            (TaskStatus.QUEUED.value, reason[:2000], now_iso(), tile["id"]),
        )
        conn.execute("DELETE FROM previews WHERE task_id = ?", (tile["id"],))
        changes.tasks.append((tile, TaskStatus.QUEUED))

    def drop_sample(self, conn: sqlite3.Connection, sample: sqlite3.Row, why: str) -> bool:
        """Cancel a waiting first sample whose tile is still checking; False if it moved."""
        return bool(
            conn.execute(
                "UPDATE tasks SET status = ?, message = ?, updated_at = ? WHERE id = ? AND"
                " status IN (?, ?) AND EXISTS (SELECT 1 FROM tasks t WHERE t.id = ? AND"
                " t.status = ?)",
                (
                    TaskStatus.CANCELED.value,
                    why,
                    now_iso(),
                    sample["id"],
                    *LEASABLE,
                    sample["verifies"],
                    TaskStatus.CHECKING.value,
                ),
            ).rowcount
        )

    def take_backup(
        self, conn: sqlite3.Connection, backup: sqlite3.Row, sha256: str, changes: Changes
    ) -> dict[str, Any] | None:
        """A backup's result came in: the backup task ends (canceled). If the original
        is still unfinished, the result becomes the original tile's, whose slow lease
        ends (that node's next heartbeat or upload is refused); returns that tile.
        None if the original finished first."""
        original = conn.execute(
            "SELECT * FROM tasks WHERE id = ?", (backup["backs_up"],)
        ).fetchone()
        changes.tasks.append((backup, TaskStatus.CANCELED))
        # The slow node may have lost its lease meanwhile (re-queued): the result still
        # stands.
        if original is None or original["status"] not in (TaskStatus.ACTIVE.value, *LEASABLE):
            self._cancel(conn, backup["id"], "the original render finished first")
            return None
        self._cancel(conn, backup["id"], f"finished first: its result is task {original['id']}'s")
        self._free_node(conn, original["node_id"], original["id"])
        conn.execute(
            "UPDATE tasks SET node_id = ?, result_sha = ?, lease_id = NULL, lease_expires = NULL,"
            " render_seconds = ?, message = ?, updated_at = ? WHERE id = ?",
            (
                backup["node_id"],
                sha256,
                conn.execute(
                    "SELECT render_seconds FROM tasks WHERE id = ?", (backup["id"],)
                ).fetchone()[0],
                "rendered by a backup node: the first node was too slow",
                now_iso(),
                original["id"],
            ),
        )
        tile = dict(conn.execute("SELECT * FROM tasks WHERE id = ?", (original["id"],)).fetchone())
        tile["node_owner"] = backup["node_owner"]
        return tile

    def cancel_backups(self, conn: sqlite3.Connection, task_id: str, why: str) -> None:
        for row in conn.execute(
            "SELECT id, node_id FROM tasks WHERE backs_up = ? AND status IN (?, ?, ?)",
            (task_id, *LEASABLE, TaskStatus.ACTIVE.value),
        ).fetchall():
            self._cancel(conn, row["id"], why)
            self._free_node(conn, row["node_id"], row["id"])

    @staticmethod
    def _cancel(conn: sqlite3.Connection, task_id: str, why: str) -> None:
        conn.execute(
            "UPDATE tasks SET status = ?, message = ?, updated_at = ? WHERE id = ?",
            (TaskStatus.CANCELED.value, why, now_iso(), task_id),
        )

    @staticmethod
    def _free_node(
        conn: sqlite3.Connection,
        node_id: str | None,
        only_task: str | None = None,
        *,
        failed: bool = False,
        seconds: float | None = None,
    ) -> None:
        """The node no longer works on a task (on `only_task`, if it still does): the
        one way a node is freed. `failed` counts a failed task, `seconds` render time."""
        sets = ["current_task = NULL"]
        params: list[Any] = []
        if failed:
            sets.append("tasks_failed = tasks_failed + 1")
        if seconds is not None:
            sets.append("render_seconds = render_seconds + ?")
            params.append(seconds)
        where = "id = ?"
        params.append(node_id)
        if only_task is not None:
            where += " AND current_task = ?"
            params.append(only_task)
        conn.execute(f"UPDATE nodes SET {', '.join(sets)} WHERE {where}", params)

    # --- jobs ------------------------------------------------------------------------------

    def create_job(
        self,
        conn: sqlite3.Connection,
        job: dict[str, Any],
        tasks: Iterable[NewTask],
        frames: Iterable[int],
        changes: Changes,
    ) -> None:
        """A new job, queued, with its render tasks and pending frames."""
        stamp = now_iso()
        conn.execute(
            "INSERT INTO jobs (id, owner, name, status, priority, spec, bundle, created_at,"
            " updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                job["id"],
                job["owner"],
                job["name"],
                JobStatus.QUEUED.value,
                job["priority"],
                job["spec"],
                job["bundle"],
                stamp,
                stamp,
            ),
        )
        self.insert(conn, tasks)
        conn.executemany(
            "INSERT INTO frames (job_id, frame, status) VALUES (?,?,?)",
            [(job["id"], frame, FrameStatus.PENDING.value) for frame in frames],
        )
        changes.jobs.append((job["id"], JobStatus.QUEUED))
        changes.work = True

    def set_job_status(self, job_id: str, status: JobStatus, message: str) -> None:
        """Pause or resume a job (its tasks keep their states)."""
        with self.core.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET status = ?, message = ?, updated_at = ? WHERE id = ? AND status"
                " NOT IN ('completed', 'failed', 'canceled')",
                (status.value, message, now_iso(), job_id),
            )
        self.announce(Changes(jobs=[(job_id, status)], work=status is JobStatus.QUEUED))

    def cancel_job(self, job_id: str) -> None:
        """Cancel every unfinished task and refund what the job has not spent."""
        with self.core.db.transaction() as conn:
            conn.execute(
                "UPDATE tasks SET status = ?, updated_at = ? WHERE job_id = ? AND status NOT IN"
                " (?, ?)",
                (
                    TaskStatus.CANCELED.value,
                    now_iso(),
                    job_id,
                    TaskStatus.COMPLETED.value,
                    TaskStatus.FAILED.value,
                ),
            )
            conn.execute(
                "UPDATE jobs SET status = ?, message = ?, updated_at = ? WHERE id = ?",
                (JobStatus.CANCELED.value, "Canceled by its owner.", now_iso(), job_id),
            )
            self.credits.settle(conn, job_id)
        self.announce(Changes(jobs=[(job_id, JobStatus.CANCELED)]))

    def fail_job(
        self, conn: sqlite3.Connection, job_id: str, message: str, changes: Changes
    ) -> None:
        """The job failed: its unfinished tasks are canceled (their nodes hear it at the
        next heartbeat) and the escrow is refunded now, so nothing after could be paid."""
        conn.execute(
            "UPDATE jobs SET status = ?, message = ?, updated_at = ? WHERE id = ?",
            (JobStatus.FAILED.value, message[:4000], now_iso(), job_id),
        )
        conn.execute(
            "UPDATE tasks SET status = ? WHERE job_id = ? AND status IN (?, ?, ?, ?)",
            (
                TaskStatus.CANCELED.value,
                job_id,
                *LEASABLE,
                TaskStatus.ACTIVE.value,
                TaskStatus.CHECKING.value,
            ),
        )
        conn.execute(
            "UPDATE nodes SET current_task = NULL WHERE current_task IN (SELECT id FROM"
            " tasks WHERE job_id = ? AND status = ?)",
            (job_id, TaskStatus.CANCELED.value),
        )
        self.credits.settle(conn, job_id)
        changes.jobs.append((job_id, JobStatus.FAILED))

    def fail_job_now(self, job_id: str, message: str) -> None:
        changes = Changes()
        with self.core.db.transaction() as conn:
            self.fail_job(conn, job_id, message, changes)
        self.announce(changes)

    def job_message(self, job_id: str, message: str) -> None:
        """Say why a job waits (its status unchanged)."""
        with self.core.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET message = ?, updated_at = ? WHERE id = ?",
                (message, now_iso(), job_id),
            )

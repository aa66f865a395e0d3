"""Results: what a node hands back for its lease. An upload is adopted into the store,
checked (`coordinator.verify.upload_checks`), and then held for a duplicate sample or
accepted; a failure report counts an attempt. Every accepted upload leaves a receipt,
so a node whose reply was lost and that sends the same result again gets the same
answer, never a second payment."""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterable
from pathlib import Path

from coordinator.accounts import Principal
from coordinator.core import Core, TaskRow
from coordinator.db import now_iso
from coordinator.deliverables import check_finish_upload
from coordinator.errors import (
    BadUploadError,
    InvalidRequestError,
    LeaseOverError,
    NotAllowedError,
    UploadTooLargeError,
)
from coordinator.followups import expects_follow_up
from coordinator.scheduler import Scheduler
from coordinator.store import SpooledUpload, TooLargeError
from coordinator.task_states import Changes, TaskStates
from coordinator.verify import claims
from coordinator.verify.samples import Samples
from coordinator.verify.upload_checks import Doubt, inspect_result
from protocol.models import RenderAssignment, Role, TaskFailure, TaskKind, TaskStatus, UploadReceipt
from renderers.exr import read_exr
from renderers.preview import write_preview_png

__all__ = ["Results"]


class Results:
    def __init__(
        self, core: Core, states: TaskStates, scheduler: Scheduler, samples: Samples
    ) -> None:
        self.core = core
        self.states = states
        self.scheduler = scheduler
        self.samples = samples

    @property
    def max_bytes(self) -> int:
        return self.core.config.max_result_bytes

    @staticmethod
    def too_large(exc: TooLargeError) -> UploadTooLargeError:
        return UploadTooLargeError(
            exc.message, hint="A tile this large means a wrong render region."
        )

    def spool(self, chunks: Iterable[bytes]) -> SpooledUpload:
        """Spool an in-memory upload (the HTTP layer spools its request body itself)."""
        try:
            return self.core.store.spool_chunks(chunks, self.max_bytes)
        except TooLargeError as exc:
            raise self.too_large(exc) from None

    def check_upload(self, who: Principal, lease_id: str) -> sqlite3.Row | None:
        """Refuse an upload to a lease that is not this provider's, before any of its body
        is stored. A lease whose result was accepted takes a repeat.

        Returns the lease's row when its task is still running (the common case), for
        `accept` to use rather than read it again; None otherwise (`accept` then looks
        for a receipt first). The row may be stale by the time the body is in: `accept`
        decides inside its transaction (the receipt, the lease still held), never on it.
        """
        db = self.core.db
        row = db.query_one(self.scheduler.LEASE_ROW_SQL, (lease_id,))
        if row is not None and row["status"] == TaskStatus.ACTIVE.value:
            self.scheduler.check_holder(who, row)
            return row
        receipt = db.query_one(
            "SELECT n.owner FROM receipts r LEFT JOIN nodes n ON n.id = r.node_id"
            " WHERE r.lease_id = ?",
            (lease_id,),
        )
        if receipt is None:
            self.scheduler.lease_row(who, lease_id)
        elif receipt["owner"] != who.account and who.role is not Role.ADMIN:
            raise NotAllowedError("This lease is held by another provider's node.")
        return None

    def accept(
        self,
        who: Principal,
        lease_id: str,
        claimed_sha256: str | None,
        upload: SpooledUpload | Iterable[bytes],
        checked: sqlite3.Row | None = None,
    ) -> UploadReceipt:
        """Store, check and accept a task's EXR from the node that holds its lease.
        `checked`: the lease's row as `check_upload` returned it for this caller."""
        if not isinstance(upload, SpooledUpload):
            upload = self.spool(upload)
        try:
            return self._accept(who, lease_id, claimed_sha256, upload, checked)
        finally:
            upload.path.unlink(missing_ok=True)

    def _accept(
        self,
        who: Principal,
        lease_id: str,
        claimed_sha256: str | None,
        upload: SpooledUpload,
        checked: sqlite3.Row | None,
    ) -> UploadReceipt:
        if not claimed_sha256:
            raise BadUploadError(
                "The upload has no X-Content-SHA256 header.",
                hint="Send the SHA-256 of the EXR with the upload.",
            )
        if checked is not None and checked["lease_id"] == lease_id:
            row = checked  # a running lease: a receipt is looked for inside the transaction
        else:
            receipt = self._receipt(who, lease_id, claimed_sha256)
            if receipt is not None:
                return receipt
            row = self.scheduler.lease_row(who, lease_id)
        if row["status"] == TaskStatus.COMPLETED.value and row["result_sha"] == claimed_sha256:
            # A retried upload of a result accepted before receipts were kept.
            return UploadReceipt(task_id=row["id"], sha256=claimed_sha256, accepted=True)
        if row["status"] != TaskStatus.ACTIVE.value:
            raise LeaseOverError(
                f"The task is {row['status']}; this lease no longer accepts results.",
                hint="Drop the result and ask for a new lease.",
            )
        sha256 = self.core.store.adopt(upload, claimed_sha256)
        problem, doubt = self._check(row, sha256)
        if problem:
            changes = Changes()
            # fail_attempt re-checks the lease inside the transaction: of several bad
            # uploads racing on one lease, one ends it and the others are told it is over.
            with self.core.db.transaction() as conn:
                self.states.fail_attempt(
                    conn, row, "bad_result", problem, changes, retryable=True, penalise=True
                )
            self.states.announce(changes)
            raise InvalidRequestError(
                f"The result was refused: {problem}", hint="The task goes back to the queue."
            )
        if row["kind"] == TaskKind.VERIFY.value:
            return self._accept_sample(who, row, lease_id, sha256)
        changes = Changes()
        with self.core.db.transaction() as conn:
            repeat = self._receipt_in(conn, who, lease_id, sha256)
            if repeat is not None:
                return repeat  # the same upload, sent twice at once, was accepted meanwhile
            self.states.record_result(conn, row, lease_id, sha256)
            accepted = True
            if row["kind"] == TaskKind.BACKUP.value:
                tile = self.states.take_backup(conn, row, sha256, changes)
                if tile is None:
                    accepted = False
                else:
                    self._settle(conn, tile, changes, doubt)
            else:
                self.states.cancel_backups(conn, row["id"], "the original render finished first")
                self._settle(conn, row, changes, doubt)
            self._write_receipt(conn, row, lease_id, sha256, accepted, bool(changes.frames))
        if accepted and changes.frames:
            self._hold_for_follow_ups(row, changes.frames)
        self.states.announce(changes)
        if not accepted:
            return UploadReceipt(task_id=row["id"], sha256=sha256, accepted=False)
        return UploadReceipt(
            task_id=row["id"], sha256=sha256, accepted=True, frame_completed=bool(changes.frames)
        )

    def _settle(
        self, conn: sqlite3.Connection, row: TaskRow, changes: Changes, doubt: Doubt | None
    ) -> None:
        """A checked tile or denoised frame: hold it for a sample, or accept it now. A
        doubted tile always gets a sample when another provider can take one, and so does
        a tile another provider called impossible: its word against this one's."""
        if doubt is None and claims.accounts(conn, row["id"], final_only=True):
            doubt = Doubt("another provider reported that this task cannot be done")
        if row["kind"] == TaskKind.RENDER.value and self.samples.start(conn, row, changes, doubt):
            message = None if doubt is None else f"checked by another provider: {doubt.reason}"
            self.states.checking(conn, row, changes, message)
        else:
            self.states.complete(conn, row["id"], changes)

    def _accept_sample(
        self, who: Principal, row: sqlite3.Row, lease_id: str, sha256: str
    ) -> UploadReceipt:
        """A verify task's window came back: judge it against the tile (and a first sample)."""
        tile, verdict = self.samples.judge(row, sha256)
        changes = Changes()
        with self.core.db.transaction() as conn:
            repeat = self._receipt_in(conn, who, lease_id, sha256)
            if repeat is not None:
                return repeat
            self.states.record_result(conn, row, lease_id, sha256)
            current = conn.execute(
                "SELECT status FROM tasks WHERE id = ?", (row["verifies"],)
            ).fetchone()
            if (
                verdict is None
                or tile is None
                or current is None
                or current["status"] != TaskStatus.CHECKING.value
            ):
                # The tile was settled meanwhile: this sample was still honest work.
                self.states.complete(conn, row["id"], changes)
            else:
                self.samples.apply(conn, tile, row, verdict, changes)
            self._write_receipt(conn, row, lease_id, sha256, True, bool(changes.frames))
        self.states.announce(changes)
        return UploadReceipt(
            task_id=row["id"], sha256=sha256, accepted=True, frame_completed=bool(changes.frames)
        )

    def _hold_for_follow_ups(self, row: TaskRow, frames: Iterable[tuple[str, int]]) -> None:
        """The uploading node takes the next step of the frames it completed, when there is
        one (`coordinator.followups`); set before the frames go to the assembler."""
        if row["node_id"] is None:
            return
        whole = row["assignment"] is None or (
            RenderAssignment.model_validate_json(row["assignment"]).whole_frame
        )
        if expects_follow_up(TaskKind(row["kind"]), self.core.spec(row["job_id"]), whole):
            for job_id, frame in frames:
                self.scheduler.followups.completed(row["node_id"], job_id, frame)

    def _check(self, row: sqlite3.Row, sha256: str) -> tuple[str | None, Doubt | None]:
        """Structure and values of an uploaded EXR against its task (why it is refused),
        and whether the job's previews doubt it (never a refusal: see `_settle`)."""
        spec = self.core.spec(row["job_id"])
        if row["kind"] == TaskKind.FINISH.value:
            return check_finish_upload(self.core.store.path(sha256), spec, self.max_bytes), None
        assignment = (
            RenderAssignment.model_validate_json(row["assignment"])
            if row["kind"] != TaskKind.DENOISE.value
            else None
        )
        return inspect_result(
            self.core.store.path(sha256),
            TaskKind(row["kind"]),
            assignment,
            spec,
            previews=bool(row["previews_trusted"]),
        )

    def _receipt(self, who: Principal, lease_id: str, claimed_sha256: str) -> UploadReceipt | None:
        with self.core.db.lock:
            return self._receipt_in(self.core.db.conn, who, lease_id, claimed_sha256)

    @staticmethod
    def _receipt_in(
        conn: sqlite3.Connection, who: Principal, lease_id: str, claimed_sha256: str
    ) -> UploadReceipt | None:
        """The receipt given for this lease's accepted upload, if there is one. Another
        hash for a lease already delivered is a conflict."""
        row = conn.execute(
            "SELECT r.*, n.owner AS node_owner FROM receipts r LEFT JOIN nodes n"
            " ON n.id = r.node_id WHERE r.lease_id = ?",
            (lease_id,),
        ).fetchone()
        if row is None:
            return None
        if row["node_owner"] != who.account and who.role is not Role.ADMIN:
            raise NotAllowedError("This lease is held by another provider's node.")
        if row["sha256"] != claimed_sha256:
            raise LeaseOverError(
                "This lease's result was already delivered, with another SHA-256.",
                hint="Drop this result and ask for a new lease.",
            )
        return UploadReceipt(
            task_id=row["task_id"],
            sha256=row["sha256"],
            accepted=bool(row["accepted"]),
            frame_completed=bool(row["frame_completed"]),
        )

    @staticmethod
    def _write_receipt(
        conn: sqlite3.Connection,
        row: TaskRow,
        lease_id: str,
        sha256: str,
        accepted: bool,
        frame_completed: bool,
    ) -> None:
        conn.execute(
            "INSERT INTO receipts (lease_id, task_id, node_id, sha256, accepted,"
            " frame_completed, at) VALUES (?,?,?,?,?,?,?)",
            (
                lease_id,
                row["id"],
                row["node_id"],
                sha256,
                int(accepted),
                int(frame_completed),
                now_iso(),
            ),
        )

    def report_failure(self, who: Principal, lease_id: str, failure: TaskFailure) -> None:
        """Record a node's failed attempt; a repeat of a report already recorded (its
        reply was lost and the node sent it again, or both copies came at once) changes
        nothing. A node's word never fails a job alone: a failure it calls final (a fault
        of the scene) is confirmed by another provider first (`TaskStates.fail_attempt`),
        and its free text reaches the requester only as a bounded quote."""
        if self._reported(who, lease_id):
            return
        row = self.scheduler.lease_row(who, lease_id)
        if row["status"] != TaskStatus.ACTIVE.value:
            raise LeaseOverError(f"The task is {row['status']}; this lease is over.")
        changes = Changes()
        try:
            with self.core.db.transaction() as conn:
                self.states.fail_attempt(
                    conn,
                    row,
                    failure.kind.value,
                    failure.message,
                    changes,
                    retryable=failure.retryable and not failure.kind.scene_fault,
                    reported=True,
                )
        except LeaseOverError:
            if self._reported(who, lease_id):
                return  # the same report, sent twice at once: the other copy was recorded
            raise
        self.states.announce(changes)

    def _reported(self, who: Principal, lease_id: str) -> bool:
        done = self.core.db.query_one(
            "SELECT n.owner FROM failures f LEFT JOIN nodes n ON n.id = f.node_id"
            " WHERE f.lease_id = ? LIMIT 1",
            (lease_id,),
        )
        return done is not None and done["owner"] == who.account

    def preview(self, task_id: str, result_sha: str) -> Path:
        """A PNG of the task's result, made once and kept."""
        store, db = self.core.store, self.core.db
        row = db.query_one("SELECT png_sha FROM previews WHERE task_id = ?", (task_id,))
        if row is not None and store.exists(row["png_sha"]):
            return store.path(row["png_sha"])
        with tempfile.TemporaryDirectory(dir=store.tmp) as scratch:
            png = write_preview_png(read_exr(store.path(result_sha)), Path(scratch) / "tile.png")
            png_sha = store.put_file(png)
        with db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO previews (task_id, png_sha) VALUES (?, ?)",
                (task_id, png_sha),
            )
        return store.path(png_sha)

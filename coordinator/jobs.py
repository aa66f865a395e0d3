"""Jobs: submitting (with its escrow), estimating, listing and steering them, and what
a job's owner may read of it (tasks, frames and their files, previews)."""

from __future__ import annotations

import re
import sqlite3
import uuid
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError

from coordinator import ledger
from coordinator.accounts import Principal, require
from coordinator.bundles import Bundles
from coordinator.core import Core
from coordinator.costs import job_bill
from coordinator.db import now_iso
from coordinator.deliverables import Deliverables as DeliverableFiles
from coordinator.errors import ConflictError, InvalidRequestError, JobNotFoundError, NotFoundError
from coordinator.planning import plan_assignments, render_tasks, task_count
from coordinator.pools import Pools
from coordinator.pricing import estimate_milli, over_max_credits
from coordinator.results import Results
from coordinator.scheduler import Scheduler, task_model
from coordinator.task_states import RUNNABLE_JOBS, Changes, TaskStates
from protocol.models import (
    FINISHED_JOB_STATES,
    MAX_FRAME,
    MIN_FRAME,
    FrameState,
    FrameStatus,
    Job,
    JobEstimate,
    JobProgress,
    JobSpec,
    JobStatus,
    Role,
    Task,
    TaskKind,
    TaskStatus,
)
from protocol.output import (
    Deliverables,
)

__all__ = ["Jobs"]

#: Task states that no longer wait for a node.
_DONE_TASKS = (
    TaskStatus.COMPLETED,
    TaskStatus.REJECTED,
    TaskStatus.FAILED,
    TaskStatus.CANCELED,
)


#: The longest message a job or task shows its owner (a provider's report may be long).
MAX_MESSAGE = 300
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
#: An absolute path on a provider's machine: POSIX ("/home/x/...") or Windows ("C:\\...").
_ABSOLUTE_PATH = re.compile(
    r"(?<![\w.:/])(?:/|[A-Za-z]:[\\/])(?:[^\s'\"/\\]+[/\\])+(?=[^\s'\"/\\])"
)


def public_message(message: str) -> str:
    """A job's or task's message as its owner sees it: one line, no absolute path of a
    provider's machine (only the file's name is kept), at most MAX_MESSAGE characters."""
    text = _ABSOLUTE_PATH.sub("…/", _CONTROL.sub(" ", message))
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def _storable(spec: JobSpec) -> str:
    """The spec as it is stored, after checking that it reads back as itself: a spec
    that would not survive its own storage is refused before anything is committed."""
    stored = spec.model_dump_json()
    try:
        same = JobSpec.model_validate_json(stored) == spec
    except ValidationError:
        same = False
    if not same:
        raise InvalidRequestError(
            "The job spec does not survive being stored (a value JSON cannot hold).",
            hint="Send finite numbers only.",
        )
    return stored


class Jobs:
    def __init__(
        self,
        core: Core,
        states: TaskStates,
        bundles: Bundles,
        scheduler: Scheduler,
        results: Results,
        pools: Pools,
    ) -> None:
        self.core = core
        self.states = states
        self.bundles = bundles
        self.scheduler = scheduler
        self.results = results
        self.pools = pools

    def submit(self, who: Principal, spec: JobSpec) -> Job:
        """Queue the job and escrow its estimate. Every check, the stored spec's and the
        reply's included, happens before the commit: a job is either refused whole or
        queued with a reply."""
        require(who, Role.REQUESTER)
        stored = _storable(spec)
        if spec.requirements.pool:
            self.pools.check_submit(who, spec.requirements.pool)
        self.bundles.check(spec)
        have = ledger.balance(self.core.db, ledger.user(who.account))
        too_many = self._too_many_tasks(who, spec, have)
        if too_many is not None:
            raise too_many
        estimate = estimate_milli(spec, self.core.config)
        too_dear = over_max_credits(spec, estimate)
        if too_dear is not None:
            raise too_dear
        job_id = uuid.uuid4().hex[:12]
        job = {
            "id": job_id,
            "owner": who.account,
            "name": spec.name,
            "priority": spec.priority,
            "spec": stored,
            "bundle": spec.bundle,
        }
        changes = Changes()
        tasks = render_tasks(job_id, plan_assignments(spec))
        with self.core.db.transaction() as conn:
            self.states.create_job(conn, job, tasks, spec.frames.frames(), changes)
            ledger.escrow(conn, job_id, who.account, estimate)
            # The reply is built before the commit: if it cannot be, nothing was queued.
            reply = self.job(who, job_id)
        self.states.announce(changes)
        warning = self.scheduler.unmatched_warning(spec)
        return reply.model_copy(update={"warning": public_message(warning)}) if warning else reply

    def estimate(self, who: Principal, spec: JobSpec) -> JobEstimate:
        """What `submit(who, spec)` would escrow, and why it would refuse the job (a dry
        run: the bundle need not exist yet and nothing is held). A plan over the farm's
        per-job task limit is refused outright (its work is bounded by arithmetic)."""
        require(who, Role.REQUESTER)
        _storable(spec)
        if spec.requirements.pool:
            self.pools.check_submit(who, spec.requirements.pool)
        have = ledger.balance(self.core.db, ledger.user(who.account))
        too_many = self._too_many_tasks(who, spec, have)
        if too_many is not None and task_count(spec) > self.core.config.max_tasks_per_job:
            raise too_many
        estimate = estimate_milli(spec, self.core.config)
        refusal = (
            too_many or over_max_credits(spec, estimate) or ledger.unaffordable(estimate, have)
        )
        return JobEstimate(
            credits=ledger.credits(estimate),
            balance=ledger.credits(have),
            max_credits=spec.max_credits,
            refusal=refusal.message if refusal is not None else "",
            refusal_hint=refusal.hint if refusal is not None else "",
            warning=public_message(self.scheduler.unmatched_warning(spec)),
        )

    def jobs(self, who: Principal) -> list[Job]:
        """The caller's jobs (every job for an admin). A job whose stored spec no longer
        reads is left out (and logged), never the whole listing."""
        db = self.core.db
        if who.role is Role.ADMIN:
            rows = db.query("SELECT * FROM jobs ORDER BY created_at")
        else:
            rows = db.query(
                "SELECT * FROM jobs WHERE owner = ? ORDER BY created_at", (who.account,)
            )
        models = (self._job_model(row) for row in rows)
        return [job for job in models if job is not None]

    def job(self, who: Principal, job_id: str) -> Job:
        job = self._job_model(self._job_row(who, job_id))
        if job is None:
            raise ConflictError(
                f"Job {job_id} was stored with a spec this coordinator cannot read.",
                hint="Cancel it and submit it again.",
            )
        return job

    def owned_job_ids(self, who: Principal) -> set[str]:
        rows = self.core.db.query("SELECT id FROM jobs WHERE owner = ?", (who.account,))
        return {row["id"] for row in rows}

    def tasks(self, who: Principal, job_id: str) -> list[Task]:
        self._job_row(who, job_id)
        rows = self.core.db.query(
            "SELECT * FROM tasks WHERE job_id = ? ORDER BY frame, kind, tile_index", (job_id,)
        )
        tasks = (task_model(row) for row in rows)
        return [t.model_copy(update={"message": public_message(t.message)}) for t in tasks]

    def frames(self, who: Principal, job_id: str) -> list[FrameState]:
        """Where each frame of the job stands, with its tiles accepted so far."""
        self._job_row(who, job_id)
        rows = self.core.db.query(
            "SELECT f.frame, f.status, f.exr_sha, f.png_sha, COUNT(t.id) AS tiles,"
            " COALESCE(SUM(t.status = ?), 0)"
            " AS tiles_done FROM frames f LEFT JOIN tasks t ON t.job_id = f.job_id AND"
            " t.frame = f.frame AND t.kind = ? WHERE f.job_id = ? GROUP BY f.job_id, f.frame"
            " ORDER BY f.frame",
            (TaskStatus.COMPLETED.value, TaskKind.RENDER.value, job_id),
        )
        return [
            FrameState(
                frame=row["frame"],
                status=FrameStatus(row["status"]),
                tiles_done=row["tiles_done"],
                tiles=row["tiles"],
                files={kind: row[f"{kind}_sha"] for kind in ("exr", "png") if row[f"{kind}_sha"]},
            )
            for row in rows
        ]

    def frame_file(self, who: Principal, job_id: str, frame: int, kind: str) -> Path:
        """A finished frame's EXR or PNG."""
        self._job_row(who, job_id)
        if kind not in ("exr", "png"):
            raise NotFoundError(f"Frames come as .exr or .png, not .{kind}.")
        if not MIN_FRAME <= frame <= MAX_FRAME:
            raise NotFoundError(f"Job {job_id} has no frame {frame}.")
        row = self.core.db.query_one(
            "SELECT * FROM frames WHERE job_id = ? AND frame = ?", (job_id, frame)
        )
        if row is None or row["status"] != FrameStatus.DONE.value:
            raise NotFoundError(
                f"Frame {frame} of job {job_id} is not finished.",
                hint="Follow /api/v1/events or poll the job until it is.",
            )
        return self.core.store.path(row["exr_sha"] if kind == "exr" else row["png_sha"])

    def deliverables(self, who: Principal, job_id: str) -> Deliverables:
        """Every file of the job so far, named as Blender names them, for DIR/<scene>/."""
        row = self._job_row(who, job_id)
        spec = self.core.readable_spec(job_id, row["spec"])
        scene = Path(spec.scene_path).stem if spec is not None else row["name"]
        return Deliverables(scene=scene, files=DeliverableFiles(self.core).of_job(job_id))

    def deliverable_file(self, who: Principal, job_id: str, sha256: str) -> Path:
        """One deliverable's bytes (the job's own: a hash of another job's is unknown)."""
        self._job_row(who, job_id)
        if not DeliverableFiles(self.core).has(job_id, sha256):
            raise NotFoundError(f"Job {job_id} has no deliverable {sha256[:16]}.")
        return self.core.store.path(sha256)

    def task_preview(self, who: Principal, task_id: str) -> Path:
        row = self.core.db.query_one(
            "SELECT job_id, result_sha FROM tasks WHERE id = ?", (task_id,)
        )
        if row is None:
            raise NotFoundError(f"No task {task_id}.")
        self._job_row(who, row["job_id"])
        if not row["result_sha"]:
            raise NotFoundError(f"Task {task_id} has no result yet.")
        return self.results.preview(task_id, row["result_sha"])

    def set_priority(self, who: Principal, job_id: str, priority: int) -> Job:
        self._job_row(who, job_id)
        with self.core.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET priority = ?, updated_at = ? WHERE id = ?",
                (priority, now_iso(), job_id),
            )
        self.core.bus.work_changed()
        return self.job(who, job_id)

    def pause(self, who: Principal, job_id: str) -> Job:
        row = self._job_row(who, job_id)
        if row["status"] in RUNNABLE_JOBS:
            self.states.set_job_status(
                job_id, JobStatus.PAUSED, "Paused: running tiles finish, no new tiles start."
            )
        elif row["status"] != JobStatus.PAUSED.value:
            raise ConflictError(
                f"Job {job_id} is {row['status']}; only a queued or active job can be paused."
            )
        return self.job(who, job_id)

    def resume(self, who: Principal, job_id: str) -> Job:
        row = self._job_row(who, job_id)
        if row["status"] == JobStatus.PAUSED.value:
            self.states.set_job_status(job_id, JobStatus.QUEUED, "")
        elif row["status"] not in RUNNABLE_JOBS:
            raise ConflictError(f"Job {job_id} is {row['status']} and cannot be resumed.")
        return self.job(who, job_id)

    def cancel(self, who: Principal, job_id: str) -> Job:
        row = self._job_row(who, job_id)
        if row["status"] not in {s.value for s in FINISHED_JOB_STATES}:
            self.states.cancel_job(job_id)
        return self.job(who, job_id)

    def _job_row(self, who: Principal, job_id: str) -> sqlite3.Row:
        row = self.core.db.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None or (row["owner"] != who.account and who.role is not Role.ADMIN):
            raise JobNotFoundError(f"No job {job_id}.")
        return row

    def _too_many_tasks(
        self, who: Principal, spec: JobSpec, have: int
    ) -> InvalidRequestError | None:
        """Why the job has too many tasks (from arithmetic: nothing is built), or None.

        A job may have at most `max_tasks_per_job` render tasks. And a requester may have
        at most `free_queued_tasks` plus `queued_tasks_per_credit` per credit of balance
        render tasks unfinished at once, free jobs included: queueing work costs the farm
        even when nobody is paid for it.
        """
        config = self.core.config
        count = task_count(spec)
        shape = (
            f"{count} tasks ({len(spec.frames.frames())} frames x {spec.tiles.columns}x"
            f"{spec.tiles.rows} tiles)"
        )
        if count > config.max_tasks_per_job:
            return InvalidRequestError(
                f"This job has {shape}; the farm takes at most {config.max_tasks_per_job}"
                " tasks per job (max_tasks_per_job).",
                hint="Use fewer tiles, or split the frames into several jobs.",
            )
        balance = max(0, have) // 1000
        allowed = config.free_queued_tasks + balance * config.queued_tasks_per_credit
        queued = self._unfinished_tasks(who.account)
        if queued + count <= allowed:
            return None
        waiting = f" and {queued} of yours are still unfinished" if queued else ""
        return InvalidRequestError(
            f"This job has {shape}{waiting}; with a balance of {balance} credits you may"
            f" have at most {allowed} tasks queued ({config.free_queued_tasks} plus"
            f" {config.queued_tasks_per_credit} per credit held).",
            hint="Use fewer tiles or frames, wait for your jobs to finish, or ask an admin"
            " for credits (`tessera grant`).",
        )

    def _unfinished_tasks(self, owner: str) -> int:
        row = self.core.db.fetch_one(
            "SELECT COUNT(*) FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE j.owner = ?"
            f" AND j.status NOT IN ({', '.join('?' * len(FINISHED_JOB_STATES))}) AND t.kind = ?"
            f" AND t.status NOT IN ({', '.join('?' * len(_DONE_TASKS))})",
            (owner, *FINISHED_JOB_STATES, TaskKind.RENDER.value, *_DONE_TASKS),
        )
        return int(row[0])

    def _job_model(self, row: sqlite3.Row) -> Job | None:
        db = self.core.db
        spec = self.core.readable_spec(row["id"], row["spec"])
        if spec is None:
            return None
        counts = db.fetch_one(
            "SELECT COUNT(*) AS total, SUM(status = ?) AS done FROM tasks WHERE job_id = ?"
            " AND kind = ?",
            (TaskStatus.COMPLETED.value, row["id"], TaskKind.RENDER.value),
        )
        frames = db.query(
            "SELECT frame FROM frames WHERE job_id = ? AND status = ? ORDER BY frame",
            (row["id"], FrameStatus.DONE.value),
        )
        message = row["message"]
        if row["status"] in RUNNABLE_JOBS and not message:
            message = self.scheduler.no_node_message(spec)
        escrowed, paid = ledger.job_credits(db, row["id"])
        bill = job_bill(db, row["id"], row["owner"], len(frames))
        return Job(
            id=row["id"],
            name=row["name"],
            owner=row["owner"],
            status=JobStatus(row["status"]),
            priority=row["priority"],
            spec=spec,
            progress=JobProgress(
                tasks_total=counts["total"] or 0,
                tasks_done=counts["done"] or 0,
                frames_total=len(spec.frames.frames()),
                frames_done=len(frames),
            ),
            created_at=datetime.fromisoformat(row["created_at"]),
            updated_at=datetime.fromisoformat(row["updated_at"]),
            message=public_message(message),
            frames_done=[r["frame"] for r in frames],
            credits_escrowed=ledger.credits(escrowed),
            credits_spent=ledger.credits(paid),
            cost=bill.cost,
            measured_scene_cost=bill.measured_scene_cost,
            verification_credits=bill.verification,
        )

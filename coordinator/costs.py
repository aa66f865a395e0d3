"""Cost figures: what a job cost per successful frame and how much work it wasted, and
each provider's success rate and accepted work. Read-only views for `coordinator.jobs`
and `coordinator.scheduler`; nothing here pays or changes a status.

A *delivered* result is one that reached the coordinator's checks: accepted (the task
completed) or rejected (refused by the upload checks, or shown wrong by a duplicate
sample). *Wasted* work is the render time of rejected results, of failed attempts and
expired leases (from the lease to the failure, `failures.seconds`), of backup renders
that lost the race, and of slow originals a backup replaced. Duplicate samples that
agreed are not waste: they are the farm's cost of verification, shown on their own.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime

from coordinator import ledger
from coordinator.db import Database
from coordinator.metering import measure
from protocol.models import JobCost, TaskKind, TaskStatus

__all__ = ["JobBill", "NodeWork", "job_bill", "node_work"]

#: Failure kinds that mean the node's result came in and was refused.
REFUSED_KINDS = ("bad_result", "verification")


@dataclass(frozen=True, slots=True)
class JobBill:
    cost: JobCost
    #: The scene cost measured from the providers' renders (None before any tile).
    measured_scene_cost: float | None
    #: Credits paid for duplicate samples: the price of verification.
    verification: float


def _wasted_seconds(conn: sqlite3.Connection, job_id: str) -> float:
    failed = conn.execute(
        "SELECT COALESCE(SUM(MAX(seconds, 0)), 0) FROM failures WHERE job_id = ?", (job_id,)
    ).fetchone()[0]
    rejected = conn.execute(
        "SELECT COALESCE(SUM(render_seconds), 0) FROM tasks WHERE job_id = ? AND status = ?",
        (job_id, TaskStatus.REJECTED.value),
    ).fetchone()[0]
    # Backups that lost: their whole render when it came in late, else until canceled
    # (read here, not in SQL: the two engines tell time from an ISO stamp differently).
    backups = 0.0
    for row in conn.execute(
        "SELECT render_seconds, updated_at, leased_at FROM tasks WHERE job_id = ? AND"
        " kind = ? AND status = ? AND leased_at IS NOT NULL AND message NOT LIKE"
        " 'finished first%'",
        (job_id, TaskKind.BACKUP.value, TaskStatus.CANCELED.value),
    ).fetchall():
        seconds = row[0]
        if seconds is None:
            seconds = datetime.fromisoformat(row[1]).timestamp() - float(row[2])
        backups += max(float(seconds), 0.0)
    # Originals a backup replaced: the slow node rendered until the backup's result came.
    replaced = conn.execute(
        "SELECT COALESCE(SUM(MAX(b.leased_at + b.render_seconds - o.leased_at, 0)), 0) FROM"
        " tasks b JOIN tasks o ON o.id = b.backs_up WHERE b.job_id = ? AND b.message LIKE"
        " 'finished first%' AND b.render_seconds IS NOT NULL AND o.leased_at IS NOT NULL",
        (job_id,),
    ).fetchone()[0]
    return float(failed) + float(rejected) + float(backups) + float(replaced)


def job_bill(db: Database, job_id: str, owner: str, frames_done: int) -> JobBill:
    """The job's cost figures now (final once the job has finished)."""
    with db.lock:
        conn = db.conn
        accepted = conn.execute(
            "SELECT COUNT(*) FROM tasks WHERE job_id = ? AND status = ?",
            (job_id, TaskStatus.COMPLETED.value),
        ).fetchone()[0]
        refused = conn.execute(
            f"SELECT COUNT(*) FROM failures WHERE job_id = ? AND kind IN"
            f" ({', '.join('?' * len(REFUSED_KINDS))})",
            (job_id, *REFUSED_KINDS),
        ).fetchone()[0]
        refused += conn.execute(
            "SELECT COUNT(*) FROM tasks WHERE job_id = ? AND status = ?",
            (job_id, TaskStatus.REJECTED.value),
        ).fetchone()[0]
        wasted = _wasted_seconds(conn, job_id)
        estimate = conn.execute(
            "SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE txn = ? AND amount > 0",
            (f"escrow:{job_id}",),
        ).fetchone()[0]
        verification = conn.execute(
            "SELECT COALESCE(SUM(-e.amount), 0) FROM ledger_entries e JOIN ledger_txns t ON"
            " t.id = e.txn JOIN tasks k ON k.id = t.task_id WHERE t.job_id = ? AND t.kind IN"
            " ('pay', 'adjust') AND k.kind = ? AND e.account = ?",
            (job_id, TaskKind.VERIFY.value, ledger.escrow_account(job_id)),
        ).fetchone()[0]
        measured = measure(conn, job_id, owner)
    _, paid = ledger.job_credits(db, job_id)
    delivered = accepted + refused
    cost = JobCost(
        credits_per_frame=ledger.credits(paid) / frames_done if frames_done else None,
        success_rate=accepted / delivered if delivered else None,
        wasted_seconds=round(wasted, 3),
        estimate=ledger.credits(int(estimate)),
        final=ledger.credits(paid),
    )
    return JobBill(
        cost=cost,
        measured_scene_cost=None if measured is None else measured.scene_cost,
        verification=ledger.credits(int(verification)),
    )


@dataclass(frozen=True, slots=True)
class NodeWork:
    accepted: int
    accepted_seconds: float
    refused: int

    @property
    def success_rate(self) -> float | None:
        delivered = self.accepted + self.refused
        return self.accepted / delivered if delivered else None


def node_work(db: Database) -> dict[str, NodeWork]:
    """Every node's accepted results (and their render time) and refused results."""
    accepted = {
        r["node_id"]: (int(r["n"]), float(r["seconds"] or 0.0))
        for r in db.query(
            "SELECT node_id, COUNT(*) AS n, SUM(render_seconds) AS seconds FROM tasks WHERE"
            " status = ? AND node_id IS NOT NULL GROUP BY node_id",
            (TaskStatus.COMPLETED.value,),
        )
    }
    refused: dict[str, int] = {}
    for r in db.query(
        f"SELECT node_id, COUNT(*) AS n FROM failures WHERE node_id IS NOT NULL AND kind IN"
        f" ({', '.join('?' * len(REFUSED_KINDS))}) GROUP BY node_id"
        " UNION ALL SELECT node_id, COUNT(*) AS n FROM tasks WHERE status = ? AND node_id IS"
        " NOT NULL GROUP BY node_id",
        (*REFUSED_KINDS, TaskStatus.REJECTED.value),
    ):
        refused[r["node_id"]] = refused.get(r["node_id"], 0) + int(r["n"])
    return {
        node: NodeWork(
            accepted=accepted.get(node, (0, 0.0))[0],
            accepted_seconds=accepted.get(node, (0, 0.0))[1],
            refused=refused.get(node, 0),
        )
        for node in {*accepted, *refused}
    }

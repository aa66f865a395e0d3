"""Duplicate samples in the farm: queue a window of a freshly uploaded tile for another
provider, judge what comes back (`coordinator.verify.judge`), apply the verdict, and
settle tiles whose sample nobody could take in time. Status changes go through
`coordinator.task_states`; the pixels are compared by the judge."""

from __future__ import annotations

import random
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

from coordinator.core import Core
from coordinator.db import now_iso
from coordinator.planning import lease_device, verify_task
from coordinator.task_states import LEASABLE, Changes, TaskStates
from coordinator.verify import claims
from coordinator.verify import judge as judging
from coordinator.verify.policy import should_verify
from coordinator.verify.reputation import Reputation
from coordinator.verify.upload_checks import Doubt
from protocol.models import JobSpec, NodeCapabilities, RenderAssignment, TaskKind, TaskStatus

__all__ = ["Samples"]


class Samples:
    def __init__(self, core: Core, states: TaskStates, reputation: Reputation) -> None:
        self.core = core
        self.states = states
        self.reputation = reputation
        self.rng = random.Random()

    def start(
        self,
        conn: sqlite3.Connection,
        row: Any,
        changes: Changes,
        doubt: Doubt | None = None,
    ) -> bool:
        """Maybe queue a duplicate sample of this freshly uploaded tile; True if queued.

        A `doubt` (the tile is flat where the requester's preview is not) always asks for
        a sample, of a window where the preview differs, whatever the provider's record:
        only another provider's render, never the requester's preview, judges the tile.
        With nobody else to ask, the tile is accepted as it is, like any unsampled tile.
        """
        policy = self.core.config.verification
        owner = row["node_owner"]
        if owner is None or (not policy.enabled and doubt is None):
            return False
        assignment = RenderAssignment.model_validate_json(row["assignment"])
        if assignment.denoise_in_render:
            return False  # a denoised whole frame has no noisy pixels to compare windows of
        sampled = doubt is not None or should_verify(
            self.reputation.record(conn, owner), policy, self.rng
        )
        if not sampled:
            return False
        spec = self.core.spec_in(conn, row["job_id"])
        # Neither side of a dispute judges it: a provider that called the task impossible
        # does not check the result that says otherwise.
        excluded = {owner} | claims.accounts(conn, row["id"], final_only=True)
        if not self.verifier_online(conn, spec, row["job_id"], excluded):
            return False  # nobody else could check it: accept it as it is
        around = self.rng.choice(doubt.points) if doubt is not None and doubt.points else None
        window = judging.window_assignment(assignment, spec, policy, self.rng, around)
        if doubt is not None:
            conn.execute("UPDATE tasks SET doubt = ? WHERE id = ?", (doubt.reason, row["id"]))
        self._queue(conn, row, window, excluded, changes)
        return True

    def _queue(
        self,
        conn: sqlite3.Connection,
        tile: Any,
        window: RenderAssignment,
        excluded_owners: set[str],
        changes: Changes,
    ) -> None:
        count = conn.execute(
            "SELECT COUNT(*) FROM tasks WHERE verifies = ?", (tile["id"],)
        ).fetchone()[0]
        self.states.insert(conn, [verify_task(tile, count + 1, window, excluded_owners)])
        changes.work = True

    def verifier_online(
        self, conn: sqlite3.Connection, spec: JobSpec, job_id: str, excluded: set[str]
    ) -> bool:
        """Whether a connected node of another, unsuspended account could take a sample."""
        return claims.provider_online(self.core, conn, job_id, excluded, spec)

    def judge(
        self, row: sqlite3.Row, sha256: str
    ) -> tuple[sqlite3.Row | None, judging.Verdict | None]:
        """A verify task's window came back (not yet recorded): the tile it checks and the
        verdict against it (and a first sample), or None if the tile is settled."""
        db = self.core.db
        tile = db.query_one(
            "SELECT t.*, n.owner AS node_owner, n.capabilities AS node_caps FROM tasks t"
            " LEFT JOIN nodes n ON n.id = t.node_id WHERE t.id = ?",
            (row["verifies"],),
        )
        if tile is None or tile["status"] != TaskStatus.CHECKING.value:
            return tile, None
        pending = db.query(
            "SELECT t.*, n.owner AS node_owner, n.capabilities AS node_caps FROM tasks t"
            " LEFT JOIN nodes n ON n.id = t.node_id WHERE t.verifies = ? AND t.status = ?"
            " ORDER BY t.id",
            (row["verifies"], TaskStatus.CHECKING.value),
        )
        spec = self.core.spec(row["job_id"])
        node = db.query_one("SELECT capabilities FROM nodes WHERE id = ?", (row["node_id"],))
        sample = dict(row) | {
            "result_sha": sha256,
            "node_caps": node["capabilities"] if node else None,
        }
        samples = [_result(dict(r)) for r in pending if r["id"] != row["id"]]
        samples.append(_result(sample))
        verdict = judging.judge(_result(dict(tile)), samples, lease_device(spec), self.core.store)
        return tile, verdict

    def apply(
        self,
        conn: sqlite3.Connection,
        tile: sqlite3.Row,
        sample: sqlite3.Row,
        verdict: judging.Verdict,
        changes: Changes,
    ) -> None:
        """Record the comparisons and move the tile and its samples as the verdict says."""
        for check in verdict.comparisons:
            outcome = check.outcome
            conn.execute(
                "INSERT INTO verifications (task_id, sample_task_id, other_task_id, mode, agree,"
                " statistic, threshold, detail, at) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    check.task_id,
                    check.sample_task_id,
                    check.other_task_id,
                    outcome.mode,
                    int(outcome.agree),
                    float(outcome.statistic),
                    float(outcome.threshold),
                    outcome.detail[:2000],
                    now_iso(),
                ),
            )
        rows = {
            r["id"]: r
            for r in conn.execute(
                "SELECT * FROM tasks WHERE id = ? OR verifies = ?", (tile["id"], tile["id"])
            )
        }
        if verdict.arbitrate:
            self.states.checking(conn, sample, changes, verdict.reason)
            excluded = {tile["node_owner"], sample["node_owner"]} - {None}
            window = RenderAssignment.model_validate_json(sample["assignment"])
            self._queue(conn, tile, window, excluded, changes)
        for task_id in verdict.confirmed:
            self.states.complete(conn, task_id, changes, confirmed=True)
        doubt = conn.execute("SELECT doubt FROM tasks WHERE id = ?", (tile["id"],)).fetchone()
        if tile["id"] in verdict.confirmed and doubt is not None and doubt[0]:
            # Another provider's render agrees with a tile the requester's preview
            # doubted: the previews are wrong, and doubt no more tiles of this job.
            conn.execute("UPDATE jobs SET previews_trusted = 0 WHERE id = ?", (tile["job_id"],))
        for task_id in verdict.rejected:
            self.states.reject(conn, rows[task_id], verdict.reason, changes)
        if verdict.requeue_tile:
            self.states.requeue_rejected(
                conn,
                tile,
                verdict.reason,
                changes,
                block_node=tile["node_owner"] in verdict.penalised,
            )
        for owner in verdict.verified:
            self.reputation.count(conn, owner, verified=1)
        for owner in verdict.penalised:
            self.reputation.count(conn, owner, rejected=1)

    def resolve_stale(self) -> int:
        """Accept tiles whose first sample no other provider could take in time.

        Only first samples: a disagreement waits for a third provider, since accepting
        either side without one could accept wrong pixels.
        """
        config = self.core.config
        cutoff = datetime.fromtimestamp(time.time() - config.verify_wait_seconds, UTC)
        stale = [
            row
            for row in self.core.db.query(
                "SELECT v.*, j.spec FROM tasks v JOIN jobs j ON j.id = v.job_id WHERE"
                " v.kind = ? AND v.status IN (?, ?) AND NOT EXISTS (SELECT 1 FROM tasks o"
                " WHERE o.verifies = v.verifies AND o.status = ?)",
                (TaskKind.VERIFY.value, *LEASABLE, TaskStatus.CHECKING.value),
            )
            if datetime.fromisoformat(row["updated_at"]) < cutoff
        ]
        settled = 0
        for row in stale:
            spec = self.core.spec(row["job_id"], row["spec"])
            excluded = set(filter(None, row["excluded_owners"].split(",")))
            changes = Changes()
            with self.core.db.transaction() as conn:
                if self.verifier_online(conn, spec, row["job_id"], excluded):
                    continue
                if not self.states.drop_sample(conn, row, "no other provider could check it"):
                    continue
                self.states.complete(conn, row["verifies"], changes)
            settled += 1
            self.states.announce(changes)
        return settled


def _result(row: dict[str, Any]) -> judging.Result:
    caps = row.get("node_caps")
    return judging.Result(
        task_id=row["id"],
        owner=row.get("node_owner") or "",
        capabilities=NodeCapabilities.model_validate_json(caps) if caps else None,
        sha256=row["result_sha"],
        assignment=RenderAssignment.model_validate_json(row["assignment"]),
    )

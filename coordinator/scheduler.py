"""Scheduling: nodes, matching tasks to them, leases, heartbeats, backups and expiry.

A lease is a task on loan to one node until it expires; heartbeats extend it, and the
sweeper (`requeue_expired`) puts the tasks of silent nodes back in the queue. An idle
node may get a backup copy of a tile that holds its frame up on a slow node. Status
changes themselves go through `coordinator.task_states`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from coordinator import ledger
from coordinator.accounts import Principal, require
from coordinator.core import Core, TaskRow, node_caps
from coordinator.costs import NodeWork, node_work
from coordinator.db import now_iso
from coordinator.errors import (
    LeaseNotFoundError,
    LeaseOverError,
    NodeNotFoundError,
    NotAllowedError,
    NotFoundError,
)
from coordinator.followups import FrameFollowUps
from coordinator.lease_query import best_leasable
from coordinator.matching import Candidate, why_none
from coordinator.planning import backup_task, lease_device, node_can_run
from coordinator.pools import granted
from coordinator.task_states import LEASABLE, RUNNABLE_JOBS, Changes, TaskStates
from coordinator.verify.policy import ProviderRecord, reputation
from coordinator.verify.reputation import Reputation
from protocol.models import (
    Heartbeat,
    HeartbeatReply,
    JobSpec,
    JobStatus,
    Lease,
    LeaseRequest,
    NodeCapabilities,
    NodeInfo,
    NodeRegistration,
    RenderAssignment,
    Role,
    Task,
    TaskKind,
    TaskStatus,
)

__all__ = ["HEARTBEATS_PER_SECOND", "NODE_TOUCH_SECONDS", "Scheduler", "task_model"]

NODE_TOUCH_SECONDS = 5.0
#: Heartbeats a second a farm is asked for at most: a farm with more nodes than this
#: times `heartbeat_interval` is told to beat less often, down to a quarter of a lease.
#: At 1,000 nodes beating every 5 s heartbeats took 40% of the coordinator's CPU
#: (docs/load-test.md).
HEARTBEATS_PER_SECOND = 100.0
#: Searches for a free task per lease request when other replicas take the found ones.
LEASE_ATTEMPTS = 3


class Scheduler:
    def __init__(self, core: Core, states: TaskStates, reputation: Reputation) -> None:
        self.core = core
        self.states = states
        self.reputation = reputation
        self._touched: dict[str, float] = {}  # node -> last seen, not yet written
        self._touch_written = 0.0
        self._nodes_seen = 0  # nodes that polled or beat in the last NODE_TOUCH_SECONDS
        self._touch_lock = threading.Lock()
        #: node -> why it takes no work now (reported with its polls; memory only: a
        #: paused node reports again within seconds of a restart).
        self._paused: dict[str, str] = {}
        #: node -> "warming"/"failed": a GPU worker whose warm-up render has not
        #: succeeded (memory only, like `_paused`; its reason is in `_paused`).
        self._unready: dict[str, str] = {}
        #: Nodes that are stopping: their open long poll answers "no task" at once.
        self._poll_ended: set[str] = set()
        #: Nodes whose result completed a frame wait for its next step (merge, then
        #: denoise or finish) before new work.
        self.followups = FrameFollowUps(core.db)

    # --- nodes -----------------------------------------------------------------------------

    def register_node(self, who: Principal, caps: NodeCapabilities) -> NodeRegistration:
        require(who, Role.PROVIDER)
        db = self.core.db
        existing = db.query_one(
            "SELECT id FROM nodes WHERE owner = ? AND name = ?", (who.account, caps.name)
        )
        node_id = existing["id"] if existing else uuid.uuid4().hex[:12]
        with db.lock:
            allowed = granted(db.conn, who.account)
        notices = [
            f"Pool '{pool}' refused: account '{who.account}' was not added to it, so this"
            f" node serves no job of that pool (the pool's owner runs `tessera pool add"
            f" {pool} {who.account}`)."
            for pool in dict.fromkeys(caps.pools)
            if pool not in allowed
        ]
        with db.transaction() as conn:
            if existing:
                conn.execute(
                    "UPDATE nodes SET capabilities = ?, last_seen = ?, current_task ="
                    " NULL WHERE id = ?",
                    (caps.model_dump_json(), time.time(), node_id),
                )
            else:
                conn.execute(
                    "INSERT INTO nodes (id, owner, name, capabilities, registered_at, last_seen)"
                    " VALUES (?,?,?,?,?,?)",
                    (
                        node_id,
                        who.account,
                        caps.name,
                        caps.model_dump_json(),
                        now_iso(),
                        time.time(),
                    ),
                )
        with self._touch_lock:
            self._poll_ended.discard(node_id)
        self.core.bus.publish("node", node=node_id, status="idle")
        return NodeRegistration(
            node_id=node_id,
            heartbeat_interval=self.heartbeat_interval(),
            poll_timeout=self.core.config.poll_timeout,
            notices=notices,
        )

    def nodes(self, who: Principal) -> list[NodeInfo]:
        """An admin sees every node; a provider its own; a requester the farm's nodes,
        but only the tasks of its own jobs on them."""
        db = self.core.db
        rows = db.query(
            "SELECT n.*, p.verified, p.rejected, p.suspended FROM nodes n LEFT JOIN providers p"
            " ON p.account = n.owner ORDER BY n.name"
        )
        if who.role is not Role.ADMIN and who.role is not Role.REQUESTER:
            rows = [row for row in rows if row["owner"] == who.account]
        work = node_work(db)
        infos = [self._node_model(row, work.get(row["id"])) for row in rows]
        if who.role is not Role.REQUESTER:
            return infos
        own = {
            row["id"]
            for row in db.query(
                "SELECT t.id FROM tasks t JOIN jobs j ON j.id = t.job_id"
                " WHERE j.owner = ? AND t.lease_id IS NOT NULL",
                (who.account,),
            )
        }
        return [
            info if info.current_task in own else info.model_copy(update={"current_task": None})
            for info in infos
        ]

    def end_poll(self, who: Principal, node_id: str) -> None:
        """The node is stopping: its open long poll (or its next one) ends with no task
        now, rather than when its wait runs out (a stopping node waited out the poll)."""
        self._node_row(who, node_id)
        with self._touch_lock:
            self._poll_ended.add(node_id)
        self.core.bus.wake_pollers()

    def poll_ended(self, node_id: str) -> bool:
        """Whether the node asked to end its long poll (answered once: memory only)."""
        with self._touch_lock:
            if node_id not in self._poll_ended:
                return False
            self._poll_ended.discard(node_id)
            return True

    def _node_row(
        self, who: Principal, node_id: str, *, with_suspension: bool = False
    ) -> sqlite3.Row:
        """The caller's node (`with_suspension`: and its provider's `suspended` reason)."""
        require(who, Role.PROVIDER)
        sql = "SELECT * FROM nodes WHERE id = ?"
        if with_suspension:
            sql = (
                "SELECT n.*, p.suspended AS suspended FROM nodes n LEFT JOIN providers p"
                " ON p.account = n.owner WHERE n.id = ?"
            )
        row = self.core.db.query_one(sql, (node_id,))
        if row is None:
            raise NodeNotFoundError(f"Unknown node {node_id}.")
        if row["owner"] != who.account and who.role is not Role.ADMIN:
            raise NotAllowedError(f"Node {node_id} belongs to another account.")
        return row

    def no_node_message(self, spec: JobSpec) -> str:
        """Why no connected node takes a runnable job's tasks ('' when one can): the
        requirement no node meets (coordinator.matching), else the price."""
        cutoff = time.time() - self.core.config.node_offline_after
        nodes = self._candidates("WHERE last_seen >= ?", (cutoff,))
        if not nodes:
            return "Waiting for a node: none is connected."
        unmet = why_none(nodes, spec)
        if unmet:
            return unmet
        able = [n.caps for n in nodes if node_can_run(n.caps, spec, n.pools)]
        if any(c.price <= spec.max_price for c in able):
            return ""
        cheapest = min(c.price for c in able)
        return (
            f"Waiting for a node at {spec.max_price:g} credits per work unit or less: the"
            f" cheapest connected node that can run this job asks {cheapest:g}."
        )

    def unmatched_warning(self, spec: JobSpec) -> str:
        """Why no registered node, connected or not, meets the job's requirements ('' when
        one does, or when no node registered yet): what submit warns of."""
        nodes = self._candidates()
        return why_none(nodes, spec, "registered") if nodes else ""

    def _candidates(self, where: str = "", params: tuple[Any, ...] = ()) -> list[Candidate]:
        """The nodes (of `where`) as matching sees them, with the pools each may serve."""
        db = self.core.db
        with db.lock:
            rows = db.conn.execute(f"SELECT owner, capabilities FROM nodes {where}", params)
            owners: dict[str, frozenset[str]] = {}
            nodes = []
            for row in rows.fetchall():
                caps = node_caps(row["capabilities"])
                if not caps.pools:  # serves no pool: its owner's pools do not matter
                    nodes.append(Candidate(caps, frozenset()))
                    continue
                if row["owner"] not in owners:
                    owners[row["owner"]] = granted(db.conn, row["owner"])
                nodes.append(Candidate(caps, owners[row["owner"]] & frozenset(caps.pools)))
        return nodes

    def _node_model(self, row: sqlite3.Row, work: NodeWork | None = None) -> NodeInfo:
        record = ProviderRecord(row["verified"] or 0, row["rejected"] or 0)
        offline = time.time() - row["last_seen"] > self.core.config.node_offline_after
        with self._touch_lock:
            paused = None if offline or row["current_task"] else self._paused.get(row["id"])
            unready = self._unready.get(row["id"]) if paused else None
        status: Literal["idle", "busy", "paused", "warming", "failed", "offline"] = (
            "offline"
            if offline
            else "busy"
            if row["current_task"]
            else "warming"
            if unready == "warming"
            else "failed"
            if unready == "failed"
            else "paused"
            if paused
            else "idle"
        )
        return NodeInfo(
            id=row["id"],
            owner=row["owner"],
            capabilities=NodeCapabilities.model_validate_json(row["capabilities"]),
            status=status,
            paused=paused,
            current_task=row["current_task"],
            last_seen=datetime.fromtimestamp(row["last_seen"], UTC),
            tasks_completed=row["tasks_completed"],
            tasks_failed=row["tasks_failed"],
            render_seconds=row["render_seconds"],
            earned=ledger.credits(row["earned_milli"]),
            reputation=reputation(record),
            verified=record.verified,
            rejected=record.rejected,
            suspended=row["suspended"],
            success_rate=None if work is None else work.success_rate,
            accepted_seconds=0.0 if work is None else round(work.accepted_seconds, 3),
        )

    def _touch_node(self, node_id: str) -> None:
        """Record that the node is alive. Idle nodes poll and busy ones beat all the time:
        the times are gathered here and written for every node at once, at most every few
        seconds (one commit for 1,000 nodes rather than 200 a second, see the load test)."""
        now = time.time()
        with self._touch_lock:
            self._touched[node_id] = now
            if now - self._touch_written < NODE_TOUCH_SECONDS:
                return
            touched, self._touched, self._touch_written = self._touched, {}, now
            self._nodes_seen = len(touched)
        with self.core.db.transaction() as conn:
            conn.executemany(
                "UPDATE nodes SET last_seen = MAX(last_seen, ?) WHERE id = ?",
                [(seen, node) for node, seen in touched.items()],
            )

    def heartbeat_interval(self) -> float:
        """The configured interval, longer when more nodes were seen in the last few
        seconds than HEARTBEATS_PER_SECOND allows (never past a quarter of a lease)."""
        config = self.core.config
        wanted = self._nodes_seen / HEARTBEATS_PER_SECOND
        return max(config.heartbeat_interval, min(wanted, config.lease_seconds / 4))

    # --- leasing ---------------------------------------------------------------------------

    def try_lease(self, who: Principal, node_id: str, request: LeaseRequest) -> Lease | None:
        """Lease the best matching task to the node, or None if nothing fits now.

        The search is read-only; only a grant writes. Both happen under the database
        lock, so no other request of this process takes the chosen task in between; the
        grant checks again, inside its transaction, that the task is still free (another
        replica on the same database may have leased it), and searches again if not.
        (Expired leases are re-queued by the sweeper thread, not here: hundreds of idle
        nodes poll.)
        """
        # The node and its provider's suspension in one statement (a lease's reads are
        # most of its cost on PostgreSQL, where each is a round trip).
        node = self._node_row(who, node_id, with_suspension=True)
        suspended = node["suspended"]
        if suspended is not None:
            raise NotAllowedError(
                f"The provider account '{node['owner']}' is suspended: {suspended}.",
                hint="Check the node's renders; the farm's admin can lift the suspension"
                " (`tessera provider reinstate`).",
            )
        self._touch_node(node_id)
        with self._touch_lock:
            if request.paused is not None or request.readiness != "ready":
                # Paused, or a GPU worker still warming up (or whose warm-up failed).
                self._paused[node_id] = request.paused or f"warm-up {request.readiness}"
                self._unready[node_id] = request.readiness
                return None
            self._paused.pop(node_id, None)
            self._unready.pop(node_id, None)
        if request.wait > 0 and self.followups.holds(node_id):
            return None  # its frame's next step is moments away (coordinator.followups)
        caps = node_caps(node["capabilities"])
        db = self.core.db
        with db.lock:
            # The pools it claims that its owner is in, now (a removal counts at once).
            pools = (
                granted(db.conn, node["owner"]) & frozenset(caps.pools)
                if caps.pools
                else frozenset()
            )
            for _attempt in range(LEASE_ATTEMPTS):
                found = self._best_task(node, caps, pools, request)
                backup: dict[str, Any] | None = None
                chosen: TaskRow
                if found is None:
                    candidate = self._backup_candidate(node_id, node["owner"], caps, pools)
                    if candidate is None:
                        return None
                    backup, spec = candidate
                    chosen = backup
                else:
                    chosen, spec = found
                lease_id = uuid.uuid4().hex
                expires = time.time() + self.core.config.lease_seconds
                with db.transaction() as conn:
                    if backup is not None:
                        if not backup_still_wanted(conn, backup):
                            continue  # another replica backed the tile up: search again
                        self.states.insert(conn, [backup_task(backup["tile"], backup["number"])])
                    leased = self.states.lease(
                        conn, chosen["id"], chosen["job_id"], node_id, lease_id, expires
                    )
                    if leased is None:
                        continue  # another replica leased it since the search: search again
                    task_row = leased
                break
            else:
                self.core.bus.work_changed()  # work is left: the node's long poll tries again
                return None
        self.core.bus.publish(
            "task",
            job_id=chosen["job_id"],
            task_id=chosen["id"],
            frame=chosen["frame"],
            status=TaskStatus.ACTIVE.value,
            node=caps.name,
        )
        return self._lease_model(task_row, spec, lease_id, expires)

    def _best_task(
        self,
        node: sqlite3.Row,
        caps: NodeCapabilities,
        pools: frozenset[str],
        request: LeaseRequest,
    ) -> tuple[sqlite3.Row, JobSpec] | None:
        """The jobs this node may work on, then each one's best task (samples first, then
        frame and tile order; never a sample of the node's own account's tile). One small
        query per job: sorting every queued task of the farm on every lease cost 12 ms
        with 1,000 queued tiles and 70 ms with 30,000 (the load test)."""
        db = self.core.db
        warm, cached = set(request.warm_bundles), set(request.cached_bundles)
        jobs = db.query(
            "SELECT j.id AS job_id, j.owner, j.priority, j.bundle, j.spec, j.created_at"
            " FROM jobs j WHERE j.status IN (?, ?) AND NOT EXISTS (SELECT 1 FROM blocklist"
            " b WHERE b.job_id = j.id AND b.node_id = ?)",
            (*RUNNABLE_JOBS, node["id"]),
        )
        # Tiles in flight per owner only break ties between owners: not read for one.
        busy = (
            {
                row[0]: row[1]
                for row in db.query(
                    "SELECT j.owner, COUNT(*) FROM tasks t JOIN jobs j ON j.id = t.job_id"
                    " WHERE t.status = ? GROUP BY j.owner",
                    (TaskStatus.ACTIVE.value,),
                )
            }
            if len({job["owner"] for job in jobs}) > 1
            else {}
        )
        best: tuple[Any, ...] | None = None
        # A task that just failed on this node goes to another first (see below).
        retry_cutoff = datetime.fromtimestamp(
            time.time() - self.core.config.same_node_retry_seconds, UTC
        ).isoformat()
        for job in jobs:
            spec = self.core.readable_spec(job["job_id"], job["spec"])
            if spec is None or not node_can_run(caps, spec, pools) or caps.price > spec.max_price:
                continue
            # A duplicate sample goes to another account, and so does a task whose
            # provider called it impossible (excluded_owners). A task whose last attempt
            # failed on this node is not leased to it again in a row while another node
            # might take it: only once `same_node_retry_seconds` passed unleased. (A
            # lease that merely expired is no failure of the task: the node may have it.)
            row = best_leasable(db, job["job_id"], node["owner"], node["id"], retry_cutoff)
            if row is None:
                continue
            locality = 2 if job["bundle"] in warm else 1 if job["bundle"] in cached else 0
            # Higher priority first; then a bundle the node already has; then the owner
            # with the fewest tiles in flight (fairness); then submission order.
            key = (
                -job["priority"],
                # Samples first: the tiles they check hold their frame and their pay.
                row["kind"] != TaskKind.VERIFY.value,
                -locality,
                busy.get(job["owner"], 0),
                job["created_at"],
                row["frame"],
                row["tile_index"],
            )
            if best is None or key < best[0]:
                best = (key, row, spec)
        return None if best is None else (best[1], best[2])

    def _backup_candidate(
        self, node_id: str, owner: str, caps: NodeCapabilities, pools: frozenset[str]
    ) -> tuple[dict[str, Any], JobSpec] | None:
        """A backup copy of a tile that holds up its frame on a slow node, for this idle node.

        Only the last unfinished tile of a frame qualifies (elsewhere there is other work),
        only after it has run `backup_after_seconds` and twice the job's median tile time
        (a fresh node would then likely finish first), and only once at a time.
        """
        wait = self.core.config.backup_after_seconds
        if wait <= 0:
            return None
        db = self.core.db
        rows = db.query(
            "SELECT t.*, j.spec, (SELECT COUNT(*) FROM tasks o WHERE o.job_id = t.job_id AND"
            " o.frame = t.frame AND o.kind = ? AND o.status != ?) AS unfinished FROM tasks t"
            " JOIN jobs j ON j.id = t.job_id WHERE t.kind = ? AND t.status = ? AND"
            " t.leased_at < ? AND t.node_id != ? AND j.status IN (?, ?) AND NOT EXISTS"
            " (SELECT 1 FROM tasks b WHERE b.backs_up = t.id AND b.status IN (?, ?, ?)) AND"
            " NOT EXISTS (SELECT 1 FROM blocklist k WHERE k.job_id = t.job_id AND"
            " k.node_id = ?) ORDER BY t.leased_at LIMIT 50",
            (
                TaskKind.RENDER.value,
                TaskStatus.COMPLETED.value,
                TaskKind.RENDER.value,
                TaskStatus.ACTIVE.value,
                time.time() - wait,
                node_id,
                *RUNNABLE_JOBS,
                *LEASABLE,
                TaskStatus.ACTIVE.value,
                node_id,
            ),
        )
        for row in rows:
            if row["unfinished"] != 1 or owner in row["excluded_owners"].split(","):
                continue  # (an account that called the tile impossible backs it up never)
            spec = self.core.readable_spec(row["job_id"], row["spec"])
            if spec is None or not node_can_run(caps, spec, pools) or caps.price > spec.max_price:
                continue
            times = [
                r[0]
                for r in db.query(
                    "SELECT render_seconds FROM tasks WHERE job_id = ? AND kind = ? AND"
                    " render_seconds IS NOT NULL ORDER BY render_seconds",
                    (row["job_id"], TaskKind.RENDER.value),
                )
            ]
            if not times or time.time() - row["leased_at"] < 2 * times[len(times) // 2]:
                continue
            count = db.fetch_one("SELECT COUNT(*) FROM tasks WHERE backs_up = ?", (row["id"],))[0]
            task = backup_task(row, count + 1)
            backup = {
                "id": task.id,
                "job_id": task.job_id,
                "frame": task.frame,
                "tile": row,
                "number": count + 1,
            }
            return backup, spec
        return None

    def _lease_model(
        self, task_row: sqlite3.Row, spec: JobSpec, lease_id: str, expires: float
    ) -> Lease:
        assignment = (
            RenderAssignment.model_validate_json(task_row["assignment"])
            if task_row["assignment"]
            else None
        )
        return Lease(
            lease_id=lease_id,
            task=task_model(task_row),
            job_name=spec.name,
            bundle=spec.bundle,
            bundle_size=self.core.store.size(spec.bundle),
            scene_path=spec.scene_path,
            assignment=assignment,
            denoise_input=task_row["denoise_input"],
            device=lease_device(spec),
            samples=spec.effective_samples,
            percentage=spec.effective_percentage,
            resolution_x=spec.scene.resolution_x,
            resolution_y=spec.scene.resolution_y,
            expires_at=datetime.fromtimestamp(expires, UTC),
            heartbeat_interval=self.heartbeat_interval(),
            blender_version=spec.blender_version,
        )

    def requeue_expired(self) -> int:
        """Put tasks whose lease ran out back in the queue (the node died or hung)."""
        sql = "SELECT * FROM tasks WHERE status = ? AND lease_expires < ?"
        params = (TaskStatus.ACTIVE.value, time.time())
        if not self.core.db.query(sql, params):
            return 0  # the common case, checked without taking the write lock
        changes = Changes()
        with self.core.db.transaction() as conn:
            expired = conn.execute(sql, params).fetchall()
            for row in expired:
                self.states.requeue(conn, row, changes, expired=True)
        self.states.announce(changes)
        return len(expired)

    def fail_unconfirmed(self) -> int:
        """Fail the tasks (and jobs) that a provider called impossible, or that failed
        every attempt on one account, once no other provider could take them for
        `verify_wait_seconds`: nothing else would ever confirm or contradict the claim."""
        cutoff = datetime.fromtimestamp(
            time.time() - self.core.config.verify_wait_seconds, UTC
        ).isoformat()
        sql = (
            "SELECT t.* FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE t.status = ? AND"
            " t.kind IN (?, ?, ?) AND t.excluded_owners != '' AND t.updated_at < ? AND"
            " j.status IN (?, ?)"
        )
        params = (
            TaskStatus.SOFT_FAILED.value,
            TaskKind.RENDER.value,
            TaskKind.DENOISE.value,
            TaskKind.FINISH.value,
            cutoff,
            *RUNNABLE_JOBS,
        )
        if not self.core.db.query(sql, params):
            return 0  # the common case, checked without taking the write lock
        changes = Changes()
        failed = 0
        with self.core.db.transaction() as conn:
            for row in conn.execute(sql, params).fetchall():
                failed += self.states.fail_unconfirmable(conn, row, changes)
        self.states.announce(changes)
        return failed

    #: A lease's task, with its node's owner and its job's status and preview trust.
    LEASE_ROW_SQL = (
        "SELECT t.*, n.owner AS node_owner, j.status AS job_status, j.previews_trusted AS"
        " previews_trusted FROM tasks t JOIN jobs j ON j.id = t.job_id LEFT JOIN nodes n"
        " ON n.id = t.node_id WHERE t.lease_id = ?"
    )

    def lease_row(self, who: Principal, lease_id: str) -> sqlite3.Row:
        row = self.core.db.query_one(self.LEASE_ROW_SQL, (lease_id,))
        if row is None:
            raise LeaseNotFoundError(
                "Unknown lease: it expired and the task was given to another node, "
                "or it never existed."
            )
        self.check_holder(who, row)
        return row

    @staticmethod
    def check_holder(who: Principal, row: sqlite3.Row) -> None:
        """Refuse a caller whose account does not hold the lease of `row` (a lease row)."""
        if row["node_owner"] != who.account and who.role is not Role.ADMIN:
            raise NotAllowedError("This lease is held by another provider's node.")

    def heartbeat(self, who: Principal, lease_id: str, beat: Heartbeat) -> HeartbeatReply:
        row = self.lease_row(who, lease_id)
        if row["status"] != TaskStatus.ACTIVE.value:
            if row["status"] != TaskStatus.CANCELED.value:
                raise LeaseOverError(f"The task is {row['status']}; this lease is over.")
            return HeartbeatReply(expires_at=datetime.now(UTC), cancel=True)
        # The lease is extended in the database only once less than half of it (and at
        # least two heartbeats) is left: at 1,000 nodes a commit on every beat was most of
        # what the coordinator's one writer did (see docs/load-test.md).
        config = self.core.config
        now = time.time()
        expires = row["lease_expires"] or 0.0
        if expires - now <= max(config.lease_seconds / 2, 2 * config.heartbeat_interval):
            expires = now + config.lease_seconds
            with self.core.db.transaction() as conn:
                self.states.extend_lease(conn, lease_id, expires)
        self._touch_node(row["node_id"])
        return HeartbeatReply(
            expires_at=datetime.fromtimestamp(expires, UTC),
            cancel=row["job_status"] == JobStatus.CANCELED.value,
        )

    def release(self, who: Principal, lease_id: str) -> None:
        row = self.lease_row(who, lease_id)
        if row["status"] != TaskStatus.ACTIVE.value:
            return
        changes = Changes()
        with self.core.db.transaction() as conn:
            self.states.requeue(conn, row, changes)
        self.states.announce(changes)

    def denoise_input(self, who: Principal, lease_id: str) -> Path:
        """The merged frame a denoise or finish lease works on."""
        row = self.lease_row(who, lease_id)
        if not row["denoise_input"]:
            raise NotFoundError("This lease is not a denoise or finish task.")
        return self.core.store.path(row["denoise_input"])


def backup_still_wanted(conn: sqlite3.Connection, backup: dict[str, Any]) -> bool:
    """Inside the granting transaction: is the backed-up tile still running with no copy
    on the way? (A plain task's grant checks itself: `TaskStates.lease`.)"""
    tile = backup["tile"]
    return (
        conn.execute(
            "SELECT 1 FROM tasks t WHERE t.id = ? AND t.status = ? AND NOT EXISTS (SELECT 1"
            " FROM tasks b WHERE b.backs_up = t.id AND b.status IN (?, ?, ?))",
            (tile["id"], TaskStatus.ACTIVE.value, *LEASABLE, TaskStatus.ACTIVE.value),
        ).fetchone()
        is not None
    )


def task_model(row: sqlite3.Row) -> Task:
    return Task(
        id=row["id"],
        job_id=row["job_id"],
        kind=TaskKind(row["kind"]),
        frame=row["frame"],
        tile_index=row["tile_index"],
        status=TaskStatus(row["status"]),
        attempts=row["attempts"],
        node=row["node_id"],
        message=row["message"],
        result_sha256=row["result_sha"],
        render_seconds=row["render_seconds"],
        updated_at=datetime.fromisoformat(row["updated_at"]),
    )

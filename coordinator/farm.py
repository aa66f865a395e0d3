"""The farm's rules: accounts, bundles, jobs and their tasks, leases, uploads, failures.

Every state change is one database transaction, so a coordinator killed at any moment
restarts into a consistent state: an accepted tile stays accepted, a lease that was
running either gets its upload (the lease survives the restart) or expires and its task
is queued again. Errors are `ApiError`s with the HTTP status and a message saying what
to fix. HTTP itself (routing, streaming) lives in `app.py`; merging frames in
`assembly.py`.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import sqlite3
import threading
import time
import uuid
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from common.errors import ApiError
from coordinator import ledger, sampling
from coordinator.config import CoordinatorConfig
from coordinator.db import Database
from coordinator.events import EventBus
from coordinator.store import ContentStore, HashMismatchError, TooLargeError
from coordinator.upload_checks import check_result
from coordinator.verification import (
    ProviderRecord,
    reputation,
    should_verify,
    suspension_reason,
)
from protocol.models import (
    FINISHED_JOB_STATES,
    AccountToken,
    Heartbeat,
    HeartbeatReply,
    Job,
    JobEstimate,
    JobProgress,
    JobSpec,
    JobStatus,
    Lease,
    LeaseRequest,
    LedgerCheck,
    LedgerEntry,
    NodeCapabilities,
    NodeInfo,
    NodeRegistration,
    Region,
    RenderAssignment,
    Role,
    Task,
    TaskFailure,
    TaskKind,
    TaskStatus,
    UploadReceipt,
    Wallet,
)
from renderers.regions import ADAPTIVE_SAMPLING_MARGIN, RegionPlan, plan_grid
from renderers.scene_info import BLEND_MAGICS

#: A task's database row, or a copy of one with changes (a backup's result moved in).
TaskRow = sqlite3.Row | dict[str, Any]
NODE_TOUCH_SECONDS = 5.0
#: Heartbeats a second a farm is asked for at most: a farm with more nodes than this
#: times `heartbeat_interval` is told to beat less often, down to a quarter of a lease.
#: At 1,000 nodes beating every 5 s heartbeats took 40% of the coordinator's CPU
#: (docs/load-test.md).
HEARTBEATS_PER_SECOND = 100.0
LEASABLE = (TaskStatus.QUEUED.value, TaskStatus.SOFT_FAILED.value)
RUNNABLE_JOBS = (JobStatus.QUEUED.value, JobStatus.ACTIVE.value)
#: Scene errors that no other node will fix: the task fails at once.
FATAL_FAILURE_KINDS = frozenset(
    {
        "no_camera",
        "corrupt_scene",
        "unsupported_engine",
        "NoCameraError",
        "CorruptSceneError",
        "UnsupportedEngineError",
    }
)


@dataclass(frozen=True, slots=True)
class Principal:
    account: str
    role: Role

    def can(self, *roles: Role) -> bool:
        return self.role is Role.ADMIN or self.role in roles


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def plan_for(spec: JobSpec) -> RegionPlan:
    """The region plan of every frame of a job (the same for all its frames)."""
    width, height = spec.effective_size()
    adaptive = spec.scene.adaptive_sampling
    margin = ADAPTIVE_SAMPLING_MARGIN if adaptive else 0
    return plan_grid(width, height, spec.tiles.columns, spec.tiles.rows, margin=margin)


class Farm:
    def __init__(
        self, config: CoordinatorConfig, db: Database, store: ContentStore, bus: EventBus
    ) -> None:
        self.config = config
        self.db = db
        self.store = store
        self.bus = bus
        #: Called with (job_id, frame) when every tile of a frame is accepted.
        self.on_frame_ready: list[Any] = []
        self._specs: dict[str, JobSpec] = {}
        self._touched: dict[str, float] = {}  # node -> last seen, not yet written
        self._touch_written = 0.0
        self._nodes_seen = 0  # nodes that polled or beat in the last NODE_TOUCH_SECONDS
        self._touch_lock = threading.Lock()
        #: node -> why it takes no work now (reported with its polls; memory only: a
        #: paused node reports again within seconds of a restart).
        self._paused: dict[str, str] = {}
        self._rng = random.Random()

    # --- accounts -----------------------------------------------------------------------

    def ensure_admin(self) -> str | None:
        """Create the admin account on first start; returns its new token (else None)."""
        if self.db.query_one("SELECT 1 FROM accounts WHERE role = ?", (Role.ADMIN.value,)):
            return None
        token = self.create_account("admin", Role.ADMIN).token
        path = self.config.admin_token_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(token + "\n")
        path.chmod(0o600)
        return token

    def create_account(self, name: str, role: Role) -> AccountToken:
        token = "tsr_" + secrets.token_urlsafe(32)
        try:
            with self.db.transaction() as conn:
                conn.execute(
                    "INSERT INTO accounts (name, role, token_hash, created_at) VALUES (?,?,?,?)",
                    (name, role.value, hash_token(token), now_iso()),
                )
        except sqlite3.IntegrityError:
            raise ApiError(
                f"An account named '{name}' already exists.",
                status=409,
                hint="Choose another name.",
            ) from None
        return AccountToken(account=name, role=role, token=token)

    def issue_token(self, name: str, role: Role) -> AccountToken:
        """A fresh token for `name` (created if new); the old token stops working."""
        token = "tsr_" + secrets.token_urlsafe(32)
        taken = self.db.query_one("SELECT role FROM accounts WHERE name = ?", (name,))
        if taken is not None and taken["role"] != role.value:
            raise ApiError(
                f"The account name '{name}' is taken by a {taken['role']}.",
                status=409,
                hint="Choose another node name.",
            )
        with self.db.transaction() as conn:
            updated = conn.execute(
                "UPDATE accounts SET token_hash = ? WHERE name = ? AND role = ?",
                (hash_token(token), name, role.value),
            ).rowcount
            if not updated:
                conn.execute(
                    "INSERT INTO accounts (name, role, token_hash, created_at) VALUES (?,?,?,?)",
                    (name, role.value, hash_token(token), now_iso()),
                )
        return AccountToken(account=name, role=role, token=token)

    def authenticate(self, token: str) -> Principal | None:
        row = self.db.query_one(
            "SELECT name, role FROM accounts WHERE token_hash = ?", (hash_token(token),)
        )
        if row is None:
            return None
        return Principal(account=row["name"], role=Role(row["role"]))

    # --- bundles --------------------------------------------------------------------------

    def put_bundle(self, sha256: str, chunks: Iterable[bytes]) -> int:
        if self.store.exists(sha256):
            return self.store.size(sha256)
        _, size = self._store_upload(
            chunks,
            sha256,
            self.config.max_bundle_bytes,
            "Split the scene or raise the coordinator's limit.",
        )
        return size

    def _store_upload(
        self, chunks: Iterable[bytes], sha256: str, limit: int, too_large_hint: str
    ) -> tuple[str, int]:
        """Store an upload under its hash; 400 if the hash is wrong, 413 past `limit`."""
        try:
            return self.store.put_stream(chunks, max_bytes=limit, expected_sha256=sha256)
        except HashMismatchError as exc:
            raise ApiError(exc.message, status=400, hint=exc.hint) from None
        except TooLargeError as exc:
            raise ApiError(exc.message, status=413, hint=too_large_hint) from None

    def _check_bundle(self, spec: JobSpec) -> None:
        if not self.store.exists(spec.bundle):
            raise ApiError(
                f"Bundle {spec.bundle[:12]}... has not been uploaded.",
                status=422,
                hint="Upload it first (PUT /api/v1/bundles/<sha256>).",
            )
        path = self.store.path(spec.bundle)
        try:
            with zipfile.ZipFile(path) as archive:
                try:
                    with archive.open(spec.scene_path) as scene:
                        head = scene.read(8)
                except KeyError:
                    raise ApiError(
                        f"The bundle has no file '{spec.scene_path}'.",
                        status=422,
                        hint="scene_path must name the .blend inside the bundle.",
                    ) from None
        except zipfile.BadZipFile:
            raise ApiError(
                "The bundle is not a zip archive.",
                status=422,
                hint="Pack the scene with `tessera submit`.",
            ) from None
        if not head.startswith(BLEND_MAGICS):
            raise ApiError(
                f"'{spec.scene_path}' in the bundle is not a .blend file.",
                status=422,
                hint="Point scene_path at a Blender file.",
            )

    # --- jobs -----------------------------------------------------------------------------

    def submit(self, who: Principal, spec: JobSpec) -> Job:
        self._require(who, Role.REQUESTER)
        self._check_bundle(spec)
        job_id = uuid.uuid4().hex[:12]
        stamp = now_iso()
        assignments = plan_assignments(spec)
        rows = [
            (
                f"{job_id}-f{a.frame}-t{index}",
                job_id,
                TaskKind.RENDER.value,
                a.frame,
                index,
                TaskStatus.QUEUED.value,
                a.model_dump_json(),
                stamp,
            )
            for index, a in assignments
        ]
        estimate = estimate_milli(spec, [a for _, a in assignments], self.config)
        too_dear = _over_max_credits(spec, estimate)
        if too_dear is not None:
            raise too_dear
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO jobs (id, owner, name, status, priority, spec, bundle, created_at,"
                " updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    job_id,
                    who.account,
                    spec.name,
                    JobStatus.QUEUED.value,
                    spec.priority,
                    spec.model_dump_json(),
                    spec.bundle,
                    stamp,
                    stamp,
                ),
            )
            conn.executemany(
                "INSERT INTO tasks (id, job_id, kind, frame, tile_index, status, assignment,"
                " updated_at) VALUES (?,?,?,?,?,?,?,?)",
                rows,
            )
            conn.executemany(
                "INSERT INTO frames (job_id, frame, status) VALUES (?,?,?)",
                [(job_id, frame, "pending") for frame in spec.frames.frames()],
            )
            ledger.escrow(conn, job_id, who.account, estimate)
        self.bus.publish("job", job_id=job_id, status=JobStatus.QUEUED.value)
        self.bus.work_changed()
        return self.job(who, job_id)

    def estimate(self, who: Principal, spec: JobSpec) -> JobEstimate:
        """What `submit(who, spec)` would escrow, and why it would refuse the job (a dry
        run: the bundle need not exist yet and nothing is held)."""
        self._require(who, Role.REQUESTER)
        assignments = [a for _, a in plan_assignments(spec)]
        estimate = estimate_milli(spec, assignments, self.config)
        have = ledger.balance(self.db, ledger.user(who.account))
        refusal = _over_max_credits(spec, estimate) or ledger.unaffordable(estimate, have)
        return JobEstimate(
            credits=ledger.credits(estimate),
            balance=ledger.credits(have),
            max_credits=spec.max_credits,
            refusal=refusal.message if refusal is not None else "",
            refusal_hint=refusal.hint if refusal is not None else "",
        )

    def jobs(self, who: Principal) -> list[Job]:
        if who.role is Role.ADMIN:
            rows = self.db.query("SELECT * FROM jobs ORDER BY created_at")
        else:
            rows = self.db.query(
                "SELECT * FROM jobs WHERE owner = ? ORDER BY created_at", (who.account,)
            )
        return [self._job_model(row) for row in rows]

    def job(self, who: Principal, job_id: str) -> Job:
        return self._job_model(self._job_row(who, job_id))

    def tasks(self, who: Principal, job_id: str) -> list[Task]:
        self._job_row(who, job_id)
        rows = self.db.query(
            "SELECT * FROM tasks WHERE job_id = ? ORDER BY frame, kind, tile_index", (job_id,)
        )
        return [_task_model(row) for row in rows]

    def set_priority(self, who: Principal, job_id: str, priority: int) -> Job:
        self._job_row(who, job_id)
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET priority = ?, updated_at = ? WHERE id = ?",
                (priority, now_iso(), job_id),
            )
        self.bus.work_changed()
        return self.job(who, job_id)

    def pause(self, who: Principal, job_id: str) -> Job:
        row = self._job_row(who, job_id)
        if row["status"] in RUNNABLE_JOBS:
            self._set_job_status(
                job_id, JobStatus.PAUSED, "Paused: running tiles finish, no new tiles start."
            )
        elif row["status"] != JobStatus.PAUSED.value:
            raise ApiError(
                f"Job {job_id} is {row['status']}; only a queued or active job can be paused.",
                status=409,
            )
        return self.job(who, job_id)

    def resume(self, who: Principal, job_id: str) -> Job:
        row = self._job_row(who, job_id)
        if row["status"] == JobStatus.PAUSED.value:
            self._set_job_status(job_id, JobStatus.QUEUED, "")
            self.bus.work_changed()
        elif row["status"] not in RUNNABLE_JOBS:
            raise ApiError(f"Job {job_id} is {row['status']} and cannot be resumed.", status=409)
        return self.job(who, job_id)

    def cancel(self, who: Principal, job_id: str) -> Job:
        row = self._job_row(who, job_id)
        if row["status"] in {s.value for s in FINISHED_JOB_STATES}:
            return self.job(who, job_id)
        with self.db.transaction() as conn:
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
            ledger.settle(conn, job_id)
        self.bus.publish("job", job_id=job_id, status=JobStatus.CANCELED.value)
        return self.job(who, job_id)

    # --- nodes ------------------------------------------------------------------------------

    def register_node(self, who: Principal, caps: NodeCapabilities) -> NodeRegistration:
        self._require(who, Role.PROVIDER)
        existing = self.db.query_one(
            "SELECT id FROM nodes WHERE owner = ? AND name = ?", (who.account, caps.name)
        )
        node_id = existing["id"] if existing else uuid.uuid4().hex[:12]
        with self.db.transaction() as conn:
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
        self.bus.publish("node", node=node_id, status="idle")
        return NodeRegistration(
            node_id=node_id,
            heartbeat_interval=self._heartbeat_interval(),
            poll_timeout=self.config.poll_timeout,
        )

    def nodes(self, who: Principal) -> list[NodeInfo]:
        rows = self.db.query(
            "SELECT n.*, p.verified, p.rejected, p.suspended FROM nodes n LEFT JOIN providers p"
            " ON p.account = n.owner ORDER BY n.name"
        )
        if who.role is not Role.ADMIN and who.role is not Role.REQUESTER:
            rows = [row for row in rows if row["owner"] == who.account]
        return [self._node_model(row) for row in rows]

    def _node_row(self, who: Principal, node_id: str) -> sqlite3.Row:
        self._require(who, Role.PROVIDER)
        row = self.db.query_one("SELECT * FROM nodes WHERE id = ?", (node_id,))
        if row is None:
            raise ApiError(
                f"Unknown node {node_id}.",
                status=404,
                hint="Register the node again (restart `tessera node`).",
            )
        if row["owner"] != who.account and who.role is not Role.ADMIN:
            raise ApiError(f"Node {node_id} belongs to another account.", status=403)
        return row

    # --- leasing ---------------------------------------------------------------------------

    def try_lease(self, who: Principal, node_id: str, request: LeaseRequest) -> Lease | None:
        """Lease the best matching task to the node, or None if nothing fits now.

        The search is read-only; only a grant writes. Both happen under the database
        lock, so no other request can take the chosen task in between. (Expired leases
        are re-queued by the sweeper thread, not here: hundreds of idle nodes poll.)
        """
        node = self._node_row(who, node_id)
        suspended = self.db.query_one(
            "SELECT suspended FROM providers WHERE account = ? AND suspended IS NOT NULL",
            (node["owner"],),
        )
        if suspended is not None:
            raise ApiError(
                f"The provider account '{node['owner']}' is suspended: {suspended[0]}.",
                status=403,
                hint="Check the node's renders; the farm's admin can lift the suspension"
                " (`tessera provider reinstate`).",
            )
        self._touch_node(node_id)
        with self._touch_lock:
            if request.paused is not None:
                self._paused[node_id] = request.paused
                return None
            self._paused.pop(node_id, None)
        caps = NodeCapabilities.model_validate_json(node["capabilities"])
        warm, cached = set(request.warm_bundles), set(request.cached_bundles)
        with self.db.lock:
            # The jobs this node may work on, then each one's best task (samples first, then
            # frame and tile order; never a sample of the node's own account's tile). One
            # small query per job: sorting every queued task of the farm on every lease
            # cost 12 ms with 1,000 queued tiles and 70 ms with 30,000 (the load test).
            jobs = self.db.query(
                "SELECT j.id AS job_id, j.owner, j.priority, j.bundle, j.spec, j.created_at"
                " FROM jobs j WHERE j.status IN (?, ?) AND NOT EXISTS (SELECT 1 FROM blocklist"
                " b WHERE b.job_id = j.id AND b.node_id = ?)",
                (*RUNNABLE_JOBS, node_id),
            )
            busy = {
                row[0]: row[1]
                for row in self.db.query(
                    "SELECT j.owner, COUNT(*) FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE"
                    " t.status = ? GROUP BY j.owner",
                    (TaskStatus.ACTIVE.value,),
                )
            }
            best: tuple[Any, ...] | None = None
            for job in jobs:
                spec = self._spec(job["job_id"], job["spec"])
                if not _node_can_run(caps, spec) or caps.price > spec.max_price:
                    continue
                row = self.db.query_one(
                    "SELECT id, job_id, kind, frame, tile_index FROM tasks WHERE job_id = ? AND"
                    " status IN (?, ?) AND instr(',' || excluded_owners || ',', ',' || ? || ',')"
                    " = 0 ORDER BY kind != ?, frame, tile_index LIMIT 1",
                    (job["job_id"], *LEASABLE, node["owner"], TaskKind.VERIFY.value),
                )  # a duplicate sample goes to another account (excluded_owners)
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
            backup: dict[str, Any] | None = None
            chosen: TaskRow
            if best is None:
                found = self._backup_candidate(node_id, caps)
                if found is None:
                    return None
                backup, spec = found
                chosen = backup
            else:
                _, chosen, spec = best
            lease_id = uuid.uuid4().hex
            expires = time.time() + self.config.lease_seconds
            with self.db.transaction() as conn:
                if backup is not None:
                    conn.execute(
                        "INSERT INTO tasks (id, job_id, kind, frame, tile_index, status,"
                        " assignment, backs_up, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                        (
                            backup["id"],
                            backup["job_id"],
                            TaskKind.BACKUP.value,
                            backup["frame"],
                            backup["tile_index"],
                            TaskStatus.QUEUED.value,
                            backup["assignment"],
                            backup["backs_up"],
                            now_iso(),
                        ),
                    )
                conn.execute(
                    "UPDATE tasks SET status = ?, lease_id = ?, node_id = ?, lease_expires = ?,"
                    " leased_at = ?, updated_at = ? WHERE id = ?",
                    (
                        TaskStatus.ACTIVE.value,
                        lease_id,
                        node_id,
                        expires,
                        time.time(),
                        now_iso(),
                        chosen["id"],
                    ),
                )
                conn.execute(
                    "UPDATE jobs SET status = ?, updated_at = ? WHERE id = ? AND status = ?",
                    (JobStatus.ACTIVE.value, now_iso(), chosen["job_id"], JobStatus.QUEUED.value),
                )
                conn.execute(
                    "UPDATE nodes SET current_task = ?, last_seen = ? WHERE id = ?",
                    (chosen["id"], time.time(), node_id),
                )
                task_row = conn.execute(
                    "SELECT * FROM tasks WHERE id = ?", (chosen["id"],)
                ).fetchone()
        self.bus.publish(
            "task",
            job_id=chosen["job_id"],
            task_id=chosen["id"],
            frame=chosen["frame"],
            status=TaskStatus.ACTIVE.value,
            node=caps.name,
        )
        return self._lease_model(task_row, spec, lease_id, expires)

    @staticmethod
    def _job_spec_json(conn: sqlite3.Connection, job_id: str) -> str:
        return str(conn.execute("SELECT spec FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])

    def _backup_candidate(
        self, node_id: str, caps: NodeCapabilities
    ) -> tuple[dict[str, Any], JobSpec] | None:
        """A backup copy of a tile that holds up its frame on a slow node, for this idle node.

        Only the last unfinished tile of a frame qualifies (elsewhere there is other work),
        only after it has run `backup_after_seconds` and twice the job's median tile time
        (a fresh node would then likely finish first), and only once at a time.
        """
        wait = self.config.backup_after_seconds
        if wait <= 0:
            return None
        rows = self.db.query(
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
            if row["unfinished"] != 1:
                continue
            spec = self._spec(row["job_id"], row["spec"])
            if not _node_can_run(caps, spec) or caps.price > spec.max_price:
                continue
            times = [
                r[0]
                for r in self.db.query(
                    "SELECT render_seconds FROM tasks WHERE job_id = ? AND kind = ? AND"
                    " render_seconds IS NOT NULL ORDER BY render_seconds",
                    (row["job_id"], TaskKind.RENDER.value),
                )
            ]
            if not times or time.time() - row["leased_at"] < 2 * times[len(times) // 2]:
                continue
            count = self.db.fetch_one(
                "SELECT COUNT(*) FROM tasks WHERE backs_up = ?", (row["id"],)
            )[0]
            backup = {
                "id": f"{row['id']}-b{count + 1}",
                "job_id": row["job_id"],
                "frame": row["frame"],
                "tile_index": row["tile_index"],
                "assignment": row["assignment"],
                "backs_up": row["id"],
            }
            return backup, spec
        return None

    def _spec(self, job_id: str, raw: str) -> JobSpec:
        """Parsed job specs, cached: a spec never changes after submission."""
        spec = self._specs.get(job_id)
        if spec is None:
            spec = self._specs[job_id] = JobSpec.model_validate_json(raw)
        return spec

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
        with self.db.transaction() as conn:
            conn.executemany(
                "UPDATE nodes SET last_seen = MAX(last_seen, ?) WHERE id = ?",
                [(seen, node) for node, seen in touched.items()],
            )

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
            task=_task_model(task_row),
            job_name=spec.name,
            bundle=spec.bundle,
            bundle_size=self.store.size(spec.bundle),
            scene_path=spec.scene_path,
            assignment=assignment,
            denoise_input=task_row["denoise_input"],
            device=_lease_device(spec),
            samples=spec.samples or spec.scene.samples,
            expires_at=datetime.fromtimestamp(expires, UTC),
            heartbeat_interval=self._heartbeat_interval(),
        )

    def _heartbeat_interval(self) -> float:
        """The configured interval, longer when more nodes were seen in the last few
        seconds than HEARTBEATS_PER_SECOND allows (never past a quarter of a lease)."""
        configured = self.config.heartbeat_interval
        wanted = self._nodes_seen / HEARTBEATS_PER_SECOND
        return max(configured, min(wanted, self.config.lease_seconds / 4))

    def requeue_expired(self) -> int:
        """Put tasks whose lease ran out back in the queue (the node died or hung)."""
        now = time.time()
        sql = "SELECT id, job_id, node_id, frame FROM tasks WHERE status = ? AND lease_expires < ?"
        params = (TaskStatus.ACTIVE.value, now)
        if not self.db.query(sql, params):
            return 0  # the common case, checked without taking the write lock
        with self.db.transaction() as conn:
            expired = conn.execute(sql, params).fetchall()
            for row in expired:
                self._record_failure(
                    conn,
                    row["id"],
                    row["job_id"],
                    row["node_id"],
                    "lease_expired",
                    "The node stopped sending heartbeats.",
                )
                conn.execute(
                    "UPDATE tasks SET status = ?, lease_id = NULL, node_id = NULL,"
                    " lease_expires = NULL, updated_at = ? WHERE id = ?",
                    (TaskStatus.QUEUED.value, now_iso(), row["id"]),
                )
                conn.execute(
                    "UPDATE nodes SET current_task = NULL WHERE id = ? AND current_task = ?",
                    (row["node_id"], row["id"]),
                )
        for row in expired:
            self.bus.publish(
                "task",
                job_id=row["job_id"],
                task_id=row["id"],
                frame=row["frame"],
                status=TaskStatus.QUEUED.value,
            )
        if expired:
            self.bus.work_changed()
        return len(expired)

    def _lease_row(self, who: Principal, lease_id: str) -> sqlite3.Row:
        row = self.db.query_one(
            "SELECT t.*, n.owner AS node_owner, j.status AS job_status FROM tasks t"
            " JOIN jobs j ON j.id = t.job_id LEFT JOIN nodes n ON n.id = t.node_id"
            " WHERE t.lease_id = ?",
            (lease_id,),
        )
        if row is None:
            raise ApiError(
                "Unknown lease: it expired and the task was given to another node, "
                "or it never existed.",
                status=404,
                hint="Drop this task and ask for a new lease.",
            )
        if row["node_owner"] != who.account and who.role is not Role.ADMIN:
            raise ApiError("This lease is held by another provider's node.", status=403)
        return row

    def heartbeat(self, who: Principal, lease_id: str, beat: Heartbeat) -> HeartbeatReply:
        row = self._lease_row(who, lease_id)
        if row["status"] != TaskStatus.ACTIVE.value:
            cancel = row["status"] == TaskStatus.CANCELED.value
            if not cancel:
                raise ApiError(f"The task is {row['status']}; this lease is over.", status=409)
            return HeartbeatReply(expires_at=datetime.now(UTC), cancel=True)
        # The lease is extended in the database only once less than half of it (and at
        # least two heartbeats) is left: at 1,000 nodes a commit on every beat was most of
        # what the coordinator's one writer did (see docs/load-test.md).
        now = time.time()
        expires = row["lease_expires"] or 0.0
        if expires - now <= max(self.config.lease_seconds / 2, 2 * self.config.heartbeat_interval):
            expires = now + self.config.lease_seconds
            with self.db.transaction() as conn:
                conn.execute(
                    "UPDATE tasks SET lease_expires = ? WHERE lease_id = ?", (expires, lease_id)
                )
        self._touch_node(row["node_id"])
        return HeartbeatReply(
            expires_at=datetime.fromtimestamp(expires, UTC),
            cancel=row["job_status"] == JobStatus.CANCELED.value,
        )

    def release(self, who: Principal, lease_id: str) -> None:
        row = self._lease_row(who, lease_id)
        if row["status"] != TaskStatus.ACTIVE.value:
            return
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE tasks SET status = ?, lease_id = NULL, node_id = NULL, lease_expires ="
                " NULL, updated_at = ? WHERE id = ?",
                (TaskStatus.QUEUED.value, now_iso(), row["id"]),
            )
            conn.execute("UPDATE nodes SET current_task = NULL WHERE id = ?", (row["node_id"],))
        self.bus.publish(
            "task",
            job_id=row["job_id"],
            task_id=row["id"],
            frame=row["frame"],
            status=TaskStatus.QUEUED.value,
        )
        self.bus.work_changed()

    def report_failure(self, who: Principal, lease_id: str, failure: TaskFailure) -> None:
        """Record a node's failed attempt; a repeat of a report already recorded (its
        reply was lost and the node sent it again) changes nothing."""
        done = self.db.query_one(
            "SELECT n.owner FROM failures f LEFT JOIN nodes n ON n.id = f.node_id"
            " WHERE f.lease_id = ? LIMIT 1",
            (lease_id,),
        )
        if done is not None and done["owner"] == who.account:
            return
        row = self._lease_row(who, lease_id)
        if row["status"] != TaskStatus.ACTIVE.value:
            raise ApiError(f"The task is {row['status']}; this lease is over.", status=409)
        self._fail_task(
            row,
            failure.kind,
            failure.message,
            retryable=failure.retryable and failure.kind not in FATAL_FAILURE_KINDS,
        )

    def _fail_task(
        self,
        row: sqlite3.Row,
        kind: str,
        message: str,
        *,
        retryable: bool,
        penalise: bool = False,
    ) -> None:
        """Record a failed attempt; fail the job once a task has no attempts left.

        `penalise`: the node's own result was wrong (not a crash), which counts against
        its provider's reputation. A duplicate sample that cannot be rendered never fails
        the job: its tile is accepted as if it had not been sampled.
        """
        job_id, node_id = row["job_id"], row["node_id"]
        attempts = row["attempts"] + 1
        final = not retryable or attempts >= self.config.max_attempts
        if row["kind"] == TaskKind.VERIFY.value and final:
            self._give_up_sample(row, kind, message, penalise=penalise)
            return
        status = TaskStatus.FAILED if final else TaskStatus.SOFT_FAILED
        with self.db.transaction() as conn:
            if penalise and row["node_owner"]:
                self._record_provider(conn, row["node_owner"], rejected=1)
            self._record_failure(conn, row["id"], job_id, node_id, kind, message, row["lease_id"])
            conn.execute(
                "UPDATE tasks SET status = ?, attempts = ?, lease_id = NULL, node_id = NULL,"
                " lease_expires = NULL, message = ?, updated_at = ? WHERE id = ?",
                (status.value, attempts, message[:2000], now_iso(), row["id"]),
            )
            conn.execute(
                "UPDATE nodes SET current_task = NULL, tasks_failed = tasks_failed + 1"
                " WHERE id = ?",
                (node_id,),
            )
            node_failures = conn.execute(
                "SELECT COUNT(*) FROM failures WHERE job_id = ? AND node_id = ?", (job_id, node_id)
            ).fetchone()[0]
            if node_failures >= self.config.blocklist_after:
                conn.execute(
                    "INSERT OR IGNORE INTO blocklist (job_id, node_id, reason) VALUES (?,?,?)",
                    (job_id, node_id, f"{node_failures} failed tasks on this job"),
                )
            if final:
                reasons = [
                    f"{r['kind']}: {r['message']}"
                    for r in conn.execute(
                        "SELECT kind, message FROM failures WHERE task_id = ? ORDER BY id",
                        (row["id"],),
                    )
                ]
                summary = f"Task {row['id']} failed: " + " | ".join(reasons[-3:])
                conn.execute(
                    "UPDATE jobs SET status = ?, message = ?, updated_at = ? WHERE id = ?",
                    (JobStatus.FAILED.value, summary[:4000], now_iso(), job_id),
                )
                # Running tasks are cancelled too (their nodes hear it at the next
                # heartbeat): the escrow is refunded now, so nothing after could be paid.
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
                ledger.settle(conn, job_id)
        self.bus.publish(
            "task", job_id=job_id, task_id=row["id"], frame=row["frame"], status=status.value
        )
        if final:
            self.bus.publish("job", job_id=job_id, status=JobStatus.FAILED.value)
        self.bus.work_changed()

    def _give_up_sample(self, row: sqlite3.Row, kind: str, message: str, *, penalise: bool) -> None:
        """A sample failed on every try: settle its tile without it."""
        changes: list[tuple[TaskRow, TaskStatus]] = []
        ready: list[tuple[str, int]] = []
        with self.db.transaction() as conn:
            if penalise and row["node_owner"]:
                self._record_provider(conn, row["node_owner"], rejected=1)
            self._record_failure(
                conn, row["id"], row["job_id"], row["node_id"], kind, message, row["lease_id"]
            )
            conn.execute(
                "UPDATE tasks SET status = ?, lease_id = NULL, lease_expires = NULL, message = ?,"
                " updated_at = ? WHERE id = ?",
                (TaskStatus.FAILED.value, message[:2000], now_iso(), row["id"]),
            )
            conn.execute("UPDATE nodes SET current_task = NULL WHERE id = ?", (row["node_id"],))
            # The tile, and a first sample waiting for this arbiter, get the benefit of
            # the doubt: nobody could show them wrong.
            for other in conn.execute(
                "SELECT * FROM tasks WHERE (id = ? OR verifies = ?) AND status = ?",
                (row["verifies"], row["verifies"], TaskStatus.CHECKING.value),
            ).fetchall():
                ready += self._complete(conn, other["id"])
                changes.append((other, TaskStatus.COMPLETED))
        changes.append((row, TaskStatus.FAILED))
        self._announce(changes, ready)

    @staticmethod
    def _record_failure(
        conn: sqlite3.Connection,
        task_id: str,
        job_id: str,
        node_id: str | None,
        kind: str,
        message: str,
        lease_id: str | None = None,
    ) -> None:
        conn.execute(
            "INSERT INTO failures (task_id, job_id, node_id, kind, message, at, lease_id) VALUES"
            " (?,?,?,?,?,?,?)",
            (task_id, job_id, node_id, kind, message[:2000], now_iso(), lease_id),
        )

    # --- results ----------------------------------------------------------------------------

    def accept_result(
        self, who: Principal, lease_id: str, claimed_sha256: str | None, chunks: Iterable[bytes]
    ) -> UploadReceipt:
        """Store, check and accept a task's EXR from the node that holds its lease."""
        if not claimed_sha256:
            raise ApiError(
                "The upload has no X-Content-SHA256 header.",
                status=400,
                hint="Send the SHA-256 of the EXR with the upload.",
            )
        receipt = self._receipt(who, lease_id, claimed_sha256)
        if receipt is not None:
            return receipt
        row = self._lease_row(who, lease_id)
        if row["status"] == TaskStatus.COMPLETED.value and row["result_sha"] == claimed_sha256:
            # A retried upload of a result accepted before receipts were kept.
            return UploadReceipt(task_id=row["id"], sha256=claimed_sha256, accepted=True)
        if row["status"] != TaskStatus.ACTIVE.value:
            raise ApiError(
                f"The task is {row['status']}; this lease no longer accepts results.",
                status=409,
                hint="Drop the result and ask for a new lease.",
            )
        sha256, _ = self._store_upload(
            chunks,
            claimed_sha256,
            self.config.max_result_bytes,
            "A tile this large means a wrong render region.",
        )
        problem = self._check_result(row, sha256)
        if problem:
            self._fail_task(row, "bad_result", problem, retryable=True, penalise=True)
            raise ApiError(
                f"The result was refused: {problem}",
                status=422,
                hint="The task goes back to the queue.",
            )
        if row["kind"] == TaskKind.VERIFY.value:
            return self._accept_sample(who, row, lease_id, sha256)
        changes: list[tuple[TaskRow, TaskStatus]] = []
        ready: list[tuple[str, int]] = []
        with self.db.transaction() as conn:
            repeat = self._receipt_in(conn, who, lease_id, sha256)
            if repeat is not None:
                return repeat  # the same upload, sent twice at once, was accepted meanwhile
            self._store_result(conn, row, lease_id, sha256)
            if row["kind"] == TaskKind.BACKUP.value:
                tile = self._take_backup(conn, row, sha256)
                if tile is None:
                    changes.append((row, TaskStatus.CANCELED))
                    accepted = False
                else:
                    changes.append((row, TaskStatus.CANCELED))
                    ready += self._settle_upload(conn, tile, changes)
                    accepted = True
            else:
                self._cancel_backups(conn, row["id"], "the original render finished first")
                ready += self._settle_upload(conn, row, changes)
                accepted = True
            self._write_receipt(conn, row, lease_id, sha256, accepted, bool(ready))
        self._announce(changes, ready)
        if not accepted:
            return UploadReceipt(task_id=row["id"], sha256=sha256, accepted=False)
        return UploadReceipt(
            task_id=row["id"], sha256=sha256, accepted=True, frame_completed=bool(ready)
        )

    def check_upload(self, who: Principal, lease_id: str) -> None:
        """Refuse (404/403) an upload to a lease that is not this provider's, before any
        of its body is stored. A lease whose result was accepted takes a repeat."""
        row = self.db.query_one(
            "SELECT n.owner FROM receipts r LEFT JOIN nodes n ON n.id = r.node_id"
            " WHERE r.lease_id = ?",
            (lease_id,),
        )
        if row is None:
            self._lease_row(who, lease_id)
        elif row["owner"] != who.account and who.role is not Role.ADMIN:
            raise ApiError("This lease is held by another provider's node.", status=403)

    def _receipt(self, who: Principal, lease_id: str, claimed_sha256: str) -> UploadReceipt | None:
        with self.db.lock:
            return self._receipt_in(self.db.conn, who, lease_id, claimed_sha256)

    @staticmethod
    def _receipt_in(
        conn: sqlite3.Connection, who: Principal, lease_id: str, claimed_sha256: str
    ) -> UploadReceipt | None:
        """The receipt given for this lease's accepted upload, if there is one: a node
        whose reply was lost sends the same result again and must get the same answer
        (not "lease is over", not a second payment). Another hash for a lease already
        delivered is a conflict."""
        row = conn.execute(
            "SELECT r.*, n.owner AS node_owner FROM receipts r LEFT JOIN nodes n"
            " ON n.id = r.node_id WHERE r.lease_id = ?",
            (lease_id,),
        ).fetchone()
        if row is None:
            return None
        if row["node_owner"] != who.account and who.role is not Role.ADMIN:
            raise ApiError("This lease is held by another provider's node.", status=403)
        if row["sha256"] != claimed_sha256:
            raise ApiError(
                "This lease's result was already delivered, with another SHA-256.",
                status=409,
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

    def _settle_upload(
        self,
        conn: sqlite3.Connection,
        row: TaskRow,
        changes: list[tuple[TaskRow, TaskStatus]],
    ) -> list[tuple[str, int]]:
        """A checked tile or denoised frame: hold it for a sample, or accept it now."""
        if row["kind"] == TaskKind.RENDER.value and self._start_sample(conn, row):
            conn.execute(
                "UPDATE tasks SET status = ? WHERE id = ?", (TaskStatus.CHECKING.value, row["id"])
            )
            changes.append((row, TaskStatus.CHECKING))
            return []
        changes.append((row, TaskStatus.COMPLETED))
        return self._complete(conn, row["id"])

    def _take_backup(
        self, conn: sqlite3.Connection, backup: sqlite3.Row, sha256: str
    ) -> dict[str, Any] | None:
        """A backup finished first: its result becomes the original tile's, whose slow
        lease ends (that node's next heartbeat or upload is refused). None if the
        original finished first."""
        original = conn.execute(
            "SELECT * FROM tasks WHERE id = ?", (backup["backs_up"],)
        ).fetchone()
        conn.execute(
            "UPDATE tasks SET status = ?, message = ?, updated_at = ? WHERE id = ?",
            (TaskStatus.CANCELED.value, "", now_iso(), backup["id"]),
        )
        # The slow node may have lost its lease meanwhile (re-queued): the result still
        # stands.
        if original is None or original["status"] not in (TaskStatus.ACTIVE.value, *LEASABLE):
            conn.execute(
                "UPDATE tasks SET message = ? WHERE id = ?",
                ("the original render finished first", backup["id"]),
            )
            return None
        conn.execute(
            "UPDATE tasks SET message = ? WHERE id = ?",
            (f"finished first: its result is task {original['id']}'s", backup["id"]),
        )
        conn.execute(
            "UPDATE nodes SET current_task = NULL WHERE id = ? AND current_task = ?",
            (original["node_id"], original["id"]),
        )
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

    def _cancel_backups(self, conn: sqlite3.Connection, task_id: str, why: str) -> None:
        for row in conn.execute(
            "SELECT id, node_id FROM tasks WHERE backs_up = ? AND status IN (?, ?, ?)",
            (task_id, *LEASABLE, TaskStatus.ACTIVE.value),
        ).fetchall():
            conn.execute(
                "UPDATE tasks SET status = ?, message = ?, updated_at = ? WHERE id = ?",
                (TaskStatus.CANCELED.value, why, now_iso(), row["id"]),
            )
            conn.execute(
                "UPDATE nodes SET current_task = NULL WHERE id = ? AND current_task = ?",
                (row["node_id"], row["id"]),
            )

    def _store_result(
        self, conn: sqlite3.Connection, row: sqlite3.Row, lease_id: str, sha256: str
    ) -> None:
        """Record an upload that passed its checks and end the lease (status unchanged)."""
        current = conn.execute(
            "SELECT status, lease_id FROM tasks WHERE id = ?", (row["id"],)
        ).fetchone()
        if current["status"] != TaskStatus.ACTIVE.value or current["lease_id"] != lease_id:
            raise ApiError("The lease ended while the result was uploading.", status=409)
        # Lease to accepted upload, measured here rather than claimed by the node.
        seconds = max(0.0, time.time() - (row["leased_at"] or time.time()))
        conn.execute(
            "UPDATE tasks SET result_sha = ?, lease_expires = NULL, render_seconds = ?,"
            " updated_at = ? WHERE id = ?",
            (sha256, seconds, now_iso(), row["id"]),
        )
        conn.execute(
            "UPDATE nodes SET current_task = NULL, render_seconds = render_seconds + ?"
            " WHERE id = ?",
            (seconds, row["node_id"]),
        )

    def _complete(self, conn: sqlite3.Connection, task_id: str) -> list[tuple[str, int]]:
        """Accept a stored result for good and pay for it; the frame, if now complete."""
        row = conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        conn.execute(
            "UPDATE tasks SET status = ?, updated_at = ? WHERE id = ?",
            (TaskStatus.COMPLETED.value, now_iso(), task_id),
        )
        conn.execute(
            "UPDATE nodes SET tasks_completed = tasks_completed + 1 WHERE id = ?",
            (row["node_id"],),
        )
        self._pay_task(conn, row)
        if row["kind"] == TaskKind.DENOISE.value:
            return [(row["job_id"], row["frame"])]
        if row["kind"] != TaskKind.RENDER.value:
            return []
        remaining = conn.execute(
            "SELECT COUNT(*) FROM tasks WHERE job_id = ? AND frame = ? AND kind = ? AND"
            " status != ?",
            (row["job_id"], row["frame"], TaskKind.RENDER.value, TaskStatus.COMPLETED.value),
        ).fetchone()[0]
        return [(row["job_id"], row["frame"])] if remaining == 0 else []

    def _announce(
        self, changes: list[tuple[TaskRow, TaskStatus]], ready: list[tuple[str, int]]
    ) -> None:
        for row, status in changes:
            self.bus.publish(
                "task",
                job_id=row["job_id"],
                task_id=row["id"],
                frame=row["frame"],
                status=status.value,
                url=f"/api/v1/tasks/{row['id']}/preview.png"
                if status is TaskStatus.COMPLETED and row["kind"] != TaskKind.VERIFY.value
                else None,
            )
        for job_id, frame in ready:
            for callback in self.on_frame_ready:
                callback(job_id, frame)
        if any(status is TaskStatus.QUEUED for _, status in changes):
            self.bus.work_changed()

    def _pay_task(self, conn: sqlite3.Connection, row: sqlite3.Row) -> None:
        """Pay the node's owner for an accepted task, inside the accepting transaction."""
        job = conn.execute("SELECT spec FROM jobs WHERE id = ?", (row["job_id"],)).fetchone()
        node = conn.execute(
            "SELECT owner, capabilities FROM nodes WHERE id = ?", (row["node_id"],)
        ).fetchone()
        if job is None or node is None:
            return
        spec = self._spec(row["job_id"], job["spec"])
        caps = NodeCapabilities.model_validate_json(node["capabilities"])
        price = min(caps.price, spec.max_price)
        if price <= 0:
            return
        if row["kind"] == TaskKind.DENOISE.value:
            units = denoise_units(spec)
        else:
            region = RenderAssignment.model_validate_json(row["assignment"]).render_region
            units = render_units(spec, region)
        amount = ledger.cost_milli(units, price)
        paid = ledger.pay(
            conn, row["id"], row["job_id"], node["owner"], amount, self.config.fee_rate
        )
        conn.execute(
            "UPDATE nodes SET earned_milli = earned_milli + ? WHERE id = ?", (paid, row["node_id"])
        )

    # --- duplicate sampling ----------------------------------------------------------------

    def _start_sample(self, conn: sqlite3.Connection, row: TaskRow) -> bool:
        """Maybe queue a duplicate sample of this freshly uploaded tile; True if queued."""
        policy = self.config.verification
        owner = row["node_owner"]
        if not policy.enabled or owner is None:
            return False
        assignment = RenderAssignment.model_validate_json(row["assignment"])
        if assignment.denoise_in_render:
            return False  # a denoised whole frame has no noisy pixels to compare windows of
        if not should_verify(self._provider_record(conn, owner), policy, self._rng):
            return False
        spec = self._spec(row["job_id"], self._job_spec_json(conn, row["job_id"]))
        if not self._verifier_online(conn, spec, row["job_id"], {owner}):
            return False  # nobody else could check it: accept it as it is
        window = sampling.window_assignment(assignment, spec, policy, self._rng)
        self._queue_sample(conn, row, window, {owner})
        return True

    def _queue_sample(
        self,
        conn: sqlite3.Connection,
        tile: TaskRow,
        window: RenderAssignment,
        excluded_owners: set[str],
    ) -> None:
        count = conn.execute(
            "SELECT COUNT(*) FROM tasks WHERE verifies = ?", (tile["id"],)
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO tasks (id, job_id, kind, frame, tile_index, status, assignment,"
            " verifies, excluded_owners, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                f"{tile['id']}-v{count + 1}",
                tile["job_id"],
                TaskKind.VERIFY.value,
                tile["frame"],
                tile["tile_index"],
                TaskStatus.QUEUED.value,
                window.model_dump_json(),
                tile["id"],
                ",".join(sorted(excluded_owners)),
                now_iso(),
            ),
        )
        self.bus.work_changed()

    def _verifier_online(
        self, conn: sqlite3.Connection, spec: JobSpec, job_id: str, excluded: set[str]
    ) -> bool:
        """Whether a connected node of another, unsuspended account could take a sample."""
        cutoff = time.time() - self.config.verifier_seen_seconds
        rows = conn.execute(
            "SELECT n.owner, n.capabilities FROM nodes n LEFT JOIN providers p ON"
            " p.account = n.owner WHERE n.last_seen >= ? AND p.suspended IS NULL AND NOT EXISTS"
            " (SELECT 1 FROM blocklist b WHERE b.job_id = ? AND b.node_id = n.id)",
            (cutoff, job_id),
        ).fetchall()
        for node in rows:
            if node["owner"] in excluded:
                continue
            caps = NodeCapabilities.model_validate_json(node["capabilities"])
            if _node_can_run(caps, spec) and caps.price <= spec.max_price:
                return True
        return False

    def _accept_sample(
        self, who: Principal, row: sqlite3.Row, lease_id: str, sha256: str
    ) -> UploadReceipt:
        """A verify task's window came back: judge it against the tile (and a first sample)."""
        tile = self.db.query_one(
            "SELECT t.*, n.owner AS node_owner, n.capabilities AS node_caps FROM tasks t"
            " LEFT JOIN nodes n ON n.id = t.node_id WHERE t.id = ?",
            (row["verifies"],),
        )
        pending = self.db.query(
            "SELECT t.*, n.owner AS node_owner, n.capabilities AS node_caps FROM tasks t"
            " LEFT JOIN nodes n ON n.id = t.node_id WHERE t.verifies = ? AND t.status = ?"
            " ORDER BY t.id",
            (row["verifies"], TaskStatus.CHECKING.value),
        )
        job = self.db.fetch_one("SELECT spec FROM jobs WHERE id = ?", (row["job_id"],))
        spec = self._spec(row["job_id"], job["spec"])
        node = self.db.query_one("SELECT capabilities FROM nodes WHERE id = ?", (row["node_id"],))
        verdict: sampling.Verdict | None = None
        if tile is not None and tile["status"] == TaskStatus.CHECKING.value:
            sample = dict(row) | {
                "result_sha": sha256,
                "node_caps": node["capabilities"] if node else None,
            }
            samples = [_result(dict(r)) for r in pending if r["id"] != row["id"]]
            samples.append(_result(sample))
            verdict = sampling.judge(_result(dict(tile)), samples, _lease_device(spec), self.store)
        changes: list[tuple[TaskRow, TaskStatus]] = []
        ready: list[tuple[str, int]] = []
        with self.db.transaction() as conn:
            repeat = self._receipt_in(conn, who, lease_id, sha256)
            if repeat is not None:
                return repeat
            self._store_result(conn, row, lease_id, sha256)
            current = conn.execute(
                "SELECT status FROM tasks WHERE id = ?", (row["verifies"],)
            ).fetchone()
            if verdict is None or current is None or current["status"] != "checking":
                # The tile was settled meanwhile: this sample was still honest work.
                ready += self._complete(conn, row["id"])
                changes.append((row, TaskStatus.COMPLETED))
            else:
                assert tile is not None
                ready += self._apply_verdict(conn, tile, row, verdict, changes)
            self._write_receipt(conn, row, lease_id, sha256, True, bool(ready))
        self._announce(changes, ready)
        return UploadReceipt(
            task_id=row["id"], sha256=sha256, accepted=True, frame_completed=bool(ready)
        )

    def _apply_verdict(
        self,
        conn: sqlite3.Connection,
        tile: sqlite3.Row,
        sample: sqlite3.Row,
        verdict: sampling.Verdict,
        changes: list[tuple[TaskRow, TaskStatus]],
    ) -> list[tuple[str, int]]:
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
        ready: list[tuple[str, int]] = []
        if verdict.arbitrate:
            conn.execute(
                "UPDATE tasks SET status = ?, message = ? WHERE id = ?",
                (TaskStatus.CHECKING.value, verdict.reason[:2000], sample["id"]),
            )
            excluded = {tile["node_owner"], sample["node_owner"]} - {None}
            window = RenderAssignment.model_validate_json(sample["assignment"])
            self._queue_sample(conn, tile, window, excluded)
            changes.append((sample, TaskStatus.CHECKING))
        for task_id in verdict.confirmed:
            ready += self._complete(conn, task_id)
            changes.append((rows[task_id], TaskStatus.COMPLETED))
        for task_id in verdict.rejected:
            conn.execute(
                "UPDATE tasks SET status = ?, message = ?, updated_at = ? WHERE id = ?",
                (TaskStatus.REJECTED.value, verdict.reason[:2000], now_iso(), task_id),
            )
            changes.append((rows[task_id], TaskStatus.REJECTED))
        if verdict.requeue_tile:
            self._requeue_rejected_tile(conn, tile, verdict)
            changes.append((tile, TaskStatus.QUEUED))
        for owner in verdict.verified:
            self._record_provider(conn, owner, verified=1)
        for owner in verdict.penalised:
            self._record_provider(conn, owner, rejected=1)
        return ready

    def _requeue_rejected_tile(
        self, conn: sqlite3.Connection, tile: sqlite3.Row, verdict: sampling.Verdict
    ) -> None:
        """The tile was wrong: forget its result, keep its node off this job, render again."""
        self._record_failure(
            conn, tile["id"], tile["job_id"], tile["node_id"], "verification", verdict.reason
        )
        if tile["node_owner"] in verdict.penalised:
            conn.execute(
                "INSERT OR IGNORE INTO blocklist (job_id, node_id, reason) VALUES (?,?,?)",
                (tile["job_id"], tile["node_id"], "a result failed duplicate sampling"),
            )
        conn.execute(
            "UPDATE tasks SET status = ?, result_sha = NULL, lease_id = NULL, node_id = NULL,"
            " render_seconds = NULL, message = ?, updated_at = ? WHERE id = ?",
            (TaskStatus.QUEUED.value, verdict.reason[:2000], now_iso(), tile["id"]),
        )
        conn.execute("DELETE FROM previews WHERE task_id = ?", (tile["id"],))

    def _provider_record(self, conn: sqlite3.Connection, account: str) -> ProviderRecord:
        row = conn.execute(
            "SELECT verified, rejected FROM providers WHERE account = ?", (account,)
        ).fetchone()
        return ProviderRecord() if row is None else ProviderRecord(row[0], row[1])

    def _record_provider(
        self, conn: sqlite3.Connection, account: str, *, verified: int = 0, rejected: int = 0
    ) -> None:
        """Count confirmed or rejected results; suspend a provider rejected too often."""
        conn.execute(
            "INSERT INTO providers (account, verified, rejected) VALUES (?,?,?) ON CONFLICT"
            " (account) DO UPDATE SET verified = verified + excluded.verified,"
            " rejected = rejected + excluded.rejected",
            (account, verified, rejected),
        )
        reason = suspension_reason(self._provider_record(conn, account), self.config.verification)
        if reason is not None:
            changed = conn.execute(
                "UPDATE providers SET suspended = ? WHERE account = ? AND suspended IS NULL",
                (reason, account),
            ).rowcount
            if changed:
                self.bus.publish("node", node=account, status="suspended")

    def resolve_stale_samples(self) -> int:
        """Accept tiles whose first sample no other provider could take in time.

        Only first samples: a disagreement waits for a third provider, since accepting
        either side without one could accept wrong pixels.
        """
        cutoff = datetime.fromtimestamp(time.time() - self.config.verify_wait_seconds, UTC)
        stale = [
            row
            for row in self.db.query(
                "SELECT v.*, j.spec FROM tasks v JOIN jobs j ON j.id = v.job_id WHERE"
                " v.kind = ? AND v.status IN (?, ?) AND NOT EXISTS (SELECT 1 FROM tasks o"
                " WHERE o.verifies = v.verifies AND o.status = ?)",
                (TaskKind.VERIFY.value, *LEASABLE, TaskStatus.CHECKING.value),
            )
            if datetime.fromisoformat(row["updated_at"]) < cutoff
        ]
        settled = 0
        for row in stale:
            spec = self._spec(row["job_id"], row["spec"])
            excluded = set(filter(None, row["excluded_owners"].split(",")))
            changes: list[tuple[TaskRow, TaskStatus]] = []
            ready: list[tuple[str, int]] = []
            with self.db.transaction() as conn:
                if self._verifier_online(conn, spec, row["job_id"], excluded):
                    continue
                if not self._drop_sample(conn, row, "no other provider could check it"):
                    continue
                tile = conn.execute(
                    "SELECT * FROM tasks WHERE id = ?", (row["verifies"],)
                ).fetchone()
                ready += self._complete(conn, tile["id"])
                changes.append((tile, TaskStatus.COMPLETED))
            settled += 1
            self._announce(changes, ready)
        return settled

    def _drop_sample(self, conn: sqlite3.Connection, sample: sqlite3.Row, why: str) -> bool:
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

    # --- credits ----------------------------------------------------------------------------

    def grant_credits(self, who: Principal, name: str, amount: float) -> Wallet:
        if who.role is not Role.ADMIN:
            raise ApiError("Only an admin can grant credits.", status=403)
        if self.db.query_one("SELECT 1 FROM accounts WHERE name = ?", (name,)) is None:
            raise ApiError(
                f"No account named '{name}'.", status=404, hint="Create the account first."
            )
        milli = ledger.to_milli(amount)
        if milli <= 0:
            raise ApiError("A grant must be at least 0.001 credits.", status=422)
        with self.db.transaction() as conn:
            ledger.grant(conn, name, milli, memo=f"granted by {who.account}")
        return self.wallet(Principal(account=name, role=who.role))

    def wallet(self, who: Principal) -> Wallet:
        account = ledger.user(who.account)
        return Wallet(
            account=who.account,
            balance=ledger.credits(ledger.balance(self.db, account)),
            escrow=ledger.credits(ledger.escrow_held(self.db, who.account)),
            history=[
                LedgerEntry(
                    txn=h.txn,
                    kind=h.kind,
                    amount=ledger.credits(h.amount),
                    job_id=h.job_id,
                    task_id=h.task_id,
                    memo=h.memo,
                    at=datetime.fromisoformat(h.at),
                )
                for h in ledger.history(self.db, account, 100)
            ],
        )

    def reinstate(self, who: Principal, account: str) -> None:
        """Lift a provider's suspension (admin); its next rejection suspends it again."""
        if who.role is not Role.ADMIN:
            raise ApiError("Only an admin can lift a suspension.", status=403)
        with self.db.transaction() as conn:
            changed = conn.execute(
                "UPDATE providers SET suspended = NULL WHERE account = ? AND suspended IS NOT NULL",
                (account,),
            ).rowcount
        if not changed:
            raise ApiError(
                f"The provider account '{account}' is not suspended.",
                status=404,
                hint="`tessera nodes` shows which providers are suspended.",
            )
        self.bus.publish("node", node=account, status="reinstated")

    def ledger_check(self, who: Principal) -> LedgerCheck:
        if who.role is not Role.ADMIN:
            raise ApiError("Only an admin can check the ledger.", status=403)
        problems = ledger.check(self.db)
        return LedgerCheck(ok=not problems, problems=problems)

    def _check_result(self, row: sqlite3.Row, sha256: str) -> str | None:
        """Structure and values of an uploaded EXR against its task; None when fine."""
        spec = self._spec(row["job_id"], self._job_spec_json_db(row["job_id"]))
        assignment = (
            RenderAssignment.model_validate_json(row["assignment"])
            if row["kind"] != TaskKind.DENOISE.value
            else None
        )
        return check_result(self.store.path(sha256), TaskKind(row["kind"]), assignment, spec)

    def _job_spec_json_db(self, job_id: str) -> str:
        return str(self.db.fetch_one("SELECT spec FROM jobs WHERE id = ?", (job_id,))["spec"])

    # --- models -----------------------------------------------------------------------------

    def _require(self, who: Principal, role: Role) -> None:
        if not who.can(role):
            raise ApiError(
                f"This needs a {role.value} token; yours is {who.role.value}.", status=403
            )

    def _job_row(self, who: Principal, job_id: str) -> sqlite3.Row:
        row = self.db.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None or (row["owner"] != who.account and who.role is not Role.ADMIN):
            raise ApiError(f"No job {job_id}.", status=404, hint="`tessera jobs` lists yours.")
        return row

    def _set_job_status(self, job_id: str, status: JobStatus, message: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET status = ?, message = ?, updated_at = ? WHERE id = ?",
                (status.value, message, now_iso(), job_id),
            )
        self.bus.publish("job", job_id=job_id, status=status.value)

    def _job_model(self, row: sqlite3.Row) -> Job:
        spec = JobSpec.model_validate_json(row["spec"])
        counts = self.db.fetch_one(
            "SELECT COUNT(*) AS total, SUM(status = ?) AS done FROM tasks WHERE job_id = ?"
            " AND kind = ?",
            (TaskStatus.COMPLETED.value, row["id"], TaskKind.RENDER.value),
        )
        frames = self.db.query(
            "SELECT frame FROM frames WHERE job_id = ? AND status = 'done' ORDER BY frame",
            (row["id"],),
        )
        message = row["message"]
        if row["status"] in RUNNABLE_JOBS and not message:
            message = self._no_node_message(spec)
        escrowed, paid = ledger.job_credits(self.db, row["id"])
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
            message=message,
            frames_done=[r["frame"] for r in frames],
            credits_escrowed=ledger.credits(escrowed),
            credits_spent=ledger.credits(paid),
        )

    def _no_node_message(self, spec: JobSpec) -> str:
        cutoff = time.time() - self.config.node_offline_after
        rows = self.db.query("SELECT capabilities FROM nodes WHERE last_seen >= ?", (cutoff,))
        if not rows:
            return "Waiting for a node: none is connected."
        caps = [NodeCapabilities.model_validate_json(r["capabilities"]) for r in rows]
        able = [c for c in caps if _node_can_run(c, spec)]
        if any(c.price <= spec.max_price for c in able):
            return ""
        if able:
            cheapest = min(c.price for c in able)
            return (
                f"Waiting for a node at {spec.max_price:g} credits per work unit or less: the"
                f" cheapest connected node that can run this job asks {cheapest:g}."
            )
        offered = sorted({d for c in caps for d in c.devices})
        return (
            f"No connected node can run this job: it needs {spec.device}"
            + (f" and Blender {spec.blender_version}" if spec.blender_version else "")
            + f"; nodes offer {', '.join(offered) or 'nothing'}."
        )

    def _node_model(self, row: sqlite3.Row) -> NodeInfo:
        record = ProviderRecord(row["verified"] or 0, row["rejected"] or 0)
        offline = time.time() - row["last_seen"] > self.config.node_offline_after
        with self._touch_lock:
            paused = None if offline or row["current_task"] else self._paused.get(row["id"])
        status: Literal["idle", "busy", "paused", "offline"] = (
            "offline"
            if offline
            else "busy"
            if row["current_task"]
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
        )


def plan_assignments(spec: JobSpec) -> list[tuple[int, RenderAssignment]]:
    """(tile index, assignment) of every render task of a job, frame by frame."""
    plan = plan_for(spec)
    return [
        (
            tile.index,
            RenderAssignment(
                frame=frame,
                width=plan.width,
                height=plan.height,
                render_region=Region(**_rect(tile.render)),
                core_region=Region(**_rect(tile.core)),
                whole_frame=plan.is_whole_frame,
                samples=spec.samples,
                percentage=spec.percentage,
                denoise_data=spec.wants_denoise and not plan.is_whole_frame,
                denoise_in_render=spec.wants_denoise and plan.is_whole_frame,
            ),
        )
        for frame in spec.frames.frames()
        for tile in plan.tiles
    ]


def _over_max_credits(spec: JobSpec, estimate: int) -> ApiError | None:
    """The 422 refusal of a job whose estimate exceeds its max_credits."""
    if spec.max_credits is None or estimate <= ledger.to_milli(spec.max_credits):
        return None
    return ApiError(
        f"This job may cost up to {ledger.credits(estimate):g} credits, more than its"
        f" max_credits of {spec.max_credits:g}.",
        status=422,
        hint="Raise --max-credits, lower --max-price, or render fewer samples/frames.",
    )


def estimate_milli(
    spec: JobSpec, assignments: list[RenderAssignment], config: CoordinatorConfig
) -> int:
    """The most a job can cost at its max price: every tile, one duplicate sample of each
    (new providers are sampled on every tile), and the denoise of each tiled frame."""
    estimate = 0
    for assignment in assignments:
        units = render_units(spec, assignment.render_region)
        if config.verification.enabled and not assignment.denoise_in_render:
            units += sample_units(spec, assignment, config)
        estimate += ledger.cost_milli(units, spec.max_price, round_up=True)
    if spec.wants_denoise and not plan_for(spec).is_whole_frame:
        per_frame = ledger.cost_milli(denoise_units(spec), spec.max_price, round_up=True)
        estimate += per_frame * len(spec.frames.frames())
    return estimate


def render_units(spec: JobSpec, region: Region) -> float:
    """Work units of a render task: region pixels x effective samples / 1e6, times the
    scene's cost relative to the benchmark scene. One unit is what a million
    pixel-samples of the benchmark scene cost, on any node: a slow node earns no more."""
    samples = spec.samples or spec.scene.samples
    return (region.x1 - region.x0) * (region.y1 - region.y0) * samples / 1e6 * spec.scene_cost


def sample_units(spec: JobSpec, tile: RenderAssignment, config: CoordinatorConfig) -> float:
    """Work units of one duplicate sample of `tile` (its size is fixed, its place random)."""
    window = sampling.window_assignment(tile, spec, config.verification, random.Random(0))
    return render_units(spec, window.render_region)


def _lease_device(spec: JobSpec) -> str:
    """The device a lease names: a job that takes any device renders on CPU, so that the
    tiles of one frame never mix device classes."""
    return "CPU" if spec.device == "ANY" else spec.device


def _result(row: dict[str, Any]) -> sampling.Result:
    caps = row.get("node_caps")
    return sampling.Result(
        task_id=row["id"],
        owner=row.get("node_owner") or "",
        capabilities=NodeCapabilities.model_validate_json(caps) if caps else None,
        sha256=row["result_sha"],
        assignment=RenderAssignment.model_validate_json(row["assignment"]),
    )


def denoise_units(spec: JobSpec) -> float:
    """Work units of a denoise task: frame pixels / 1e6."""
    width, height = spec.effective_size()
    return width * height / 1e6


def _rect(rect: Any) -> dict[str, int]:
    return {"x0": rect.x0, "y0": rect.y0, "x1": rect.x1, "y1": rect.y1}


def _node_can_run(caps: NodeCapabilities, spec: JobSpec) -> bool:
    if spec.blender_version and spec.blender_version not in caps.blender_versions:
        return False
    if "CYCLES" not in caps.engines:
        return False
    if spec.device in ("ANY", "CPU"):
        return "CPU" in caps.devices
    if spec.device == "GPU":
        return any(d != "CPU" for d in caps.devices)
    return spec.device in caps.devices


def _task_model(row: sqlite3.Row) -> Task:
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

"""The farm: one facade over the coordinator's rooms, for the HTTP layer and the tests.

`Farm` builds the rooms on one `Core` (configuration, database, store, event bus) and
forwards each public operation to the room that owns it; it holds no rule of its own:

- accounts (`accounts.py`), credits (`credits.py`), bundles (`bundles.py`),
- jobs (`jobs.py`), leases and nodes (`scheduler.py`), uploads and failures
  (`results.py`), duplicate samples and reputation (`verify/`),
- every status change (`task_states.py`), frame assembly (`assembly.py`).

`Farm.open` also owns the running parts: the frame assembler and the sweeper thread
that re-queues expired leases, settles samples nobody could take, fails the tasks a
provider called impossible that no other provider came to try, and keeps running jobs
within their budget (`steer_budgets`); on PostgreSQL, the relay that lets replicas of
one database hear each other (`coordinator.engines.notify`).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.accounts import Accounts, Principal
from coordinator.assembly import Assembler
from coordinator.bundles import Bundles
from coordinator.config import CoordinatorConfig
from coordinator.core import Core
from coordinator.credits import Credits
from coordinator.db import Database, open_database
from coordinator.events import EventBus
from coordinator.jobs import Jobs
from coordinator.pools import Pools
from coordinator.results import Results
from coordinator.scheduler import Scheduler
from coordinator.store import ContentStore, SpooledUpload, Store
from coordinator.task_states import FrameReady, TaskStates
from coordinator.verify.reputation import Reputation
from coordinator.verify.samples import Samples
from protocol.accounts import (
    AccountInfo,
    AccountToken,
    LedgerCheck,
    Wallet,
)
from protocol.models import (
    FrameState,
    Heartbeat,
    HeartbeatReply,
    Job,
    JobEstimate,
    JobSpec,
    JobStatus,
    Lease,
    LeaseRequest,
    NodeCapabilities,
    NodeInfo,
    NodeRegistration,
    Role,
    Task,
    TaskFailure,
    UploadReceipt,
)
from protocol.output import (
    Deliverables,
)
from protocol.requirements import PoolInfo

__all__ = ["SWEEP_SECONDS", "Farm", "Principal"]

if TYPE_CHECKING:
    from coordinator.engines.notify import PeerRelay

log = logging.getLogger(__name__)
SWEEP_SECONDS = 1.0
RECOVER_SWEEPS = 10
#: Sweeps between two budget checks of the running jobs.
BUDGET_EVERY = 3


class Farm:
    def __init__(
        self, config: CoordinatorConfig, db: Database, store: Store, bus: EventBus
    ) -> None:
        self.config, self.db, self.store, self.bus = config, db, store, bus
        self.core = core = Core(config, db, store, bus)
        self.accounts = Accounts(core)
        self.reputation = Reputation(core)
        self.credits = Credits(core, self.accounts)
        self.states = TaskStates(core, self.credits, self.reputation)
        self.bundles = Bundles(core)
        self.scheduler = Scheduler(core, self.states, self.reputation)
        self.samples = Samples(core, self.states, self.reputation)
        self.results = Results(core, self.states, self.scheduler, self.samples)
        self.pools = Pools(core)
        self.jobs_room = Jobs(
            core, self.states, self.bundles, self.scheduler, self.results, self.pools
        )
        self.assembler: Assembler | None = None
        self.relay: PeerRelay | None = None
        self.stopping = threading.Event()
        self._sweeper: threading.Thread | None = None

    @classmethod
    def open(cls, config: CoordinatorConfig) -> Farm:
        """The farm of a data folder, with its assembler (started by `start`)."""
        store = ContentStore(config.store_dir, config.spool_name)
        if cleared := store.clear_leftovers():
            log.info("removed %d partial files left by an earlier run", cleared)
        farm = cls(config, open_database(config.db_url, config.db_path), store, EventBus())
        if farm.db.engine == "postgresql":
            from coordinator.engines.notify import PeerRelay  # (psycopg only when used)

            farm.relay = PeerRelay(getattr(farm.db, "url"), farm.bus)  # noqa: B009
        farm.assembler = Assembler(farm.states)
        farm.on_frame_ready.append(farm.assembler.submit)
        return farm

    def start(self) -> None:
        if self.relay is not None:
            self.relay.start()
        if self.assembler is not None:
            self.assembler.start()
        self._sweeper = threading.Thread(target=self._sweep, name="lease-sweeper", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        self.stopping.set()
        self.bus.wake_pollers()  # open long polls answer at once
        if self._sweeper is not None:
            self._sweeper.join(timeout=10)
        if self.assembler is not None:
            self.assembler.stop()
        if self.relay is not None:
            self.relay.stop()
        self.db.close()

    def _sweep(self) -> None:
        """Every SWEEP_SECONDS, on one replica of the database at a time (the claim's
        holder; another takes over when it dies). The holder checks running jobs' budgets
        (every BUDGET_EVERY) and, with replicas, queues frames whose assembly a dead
        replica left undone (every RECOVER_SWEEPS)."""
        sweeps = 0
        replicated = self.db.engine != "sqlite"
        while not self.stopping.wait(SWEEP_SECONDS):
            try:
                if replicated:  # every replica, claim or not (SWEEP_SECONDS: about 1 s)
                    self.accounts.recheck()
                with self.db.claim("sweep") as mine:
                    if not mine:
                        continue
                    self.requeue_expired()
                    self.resolve_stale_samples()
                    self.fail_unconfirmed()
                    if sweeps % BUDGET_EVERY == 0:
                        self.steer_budgets()
                    sweeps += 1
                    recover = self.relay is not None and sweeps % RECOVER_SWEEPS == 0
                    if recover and self.assembler is not None:
                        self.assembler.recover()
            except Exception:
                log.exception("lease sweep failed")

    def steer_budgets(self) -> int:
        """Top up the escrow of running jobs whose measured work costs more than held, and
        pause those that would pass their cap or their owner's balance (with the reason);
        the number paused (`coordinator.billing`)."""
        pauses = self.credits.steer_budgets()
        for job_id, reason in pauses:
            self.states.set_job_status(job_id, JobStatus.PAUSED, reason)
        return len(pauses)

    @property
    def on_frame_ready(self) -> list[FrameReady]:
        """Called with (job_id, frame) when every tile of a frame is accepted."""
        return self.states.on_frame_ready

    # --- accounts and credits --------------------------------------------------------------

    def ensure_admin(self) -> str | None:
        return self.accounts.ensure_admin()

    def create_account(self, name: str, role: Role) -> AccountToken:
        return self.accounts.create(name, role)

    def issue_token(self, name: str, role: Role) -> AccountToken:
        return self.accounts.issue_token(name, role)

    def new_join_nonce(self, seconds: float) -> str:
        return self.accounts.new_join_nonce(seconds)

    def use_join_nonce(self, nonce: str) -> bool:
        return self.accounts.use_join_nonce(nonce)

    def authenticate(self, token: str) -> Principal | None:
        return self.accounts.authenticate(token)

    def list_accounts(self, who: Principal) -> list[AccountInfo]:
        return self.accounts.listing(who)

    def revoke_account(self, who: Principal, name: str) -> AccountInfo:
        return self.accounts.revoke(who, name)

    def grant_credits(self, who: Principal, name: str, amount: float) -> Wallet:
        return self.credits.grant(who, name, amount)

    def wallet(self, who: Principal) -> Wallet:
        return self.credits.wallet(who)

    def ledger_check(self, who: Principal) -> LedgerCheck:
        return self.credits.check(who)

    def reinstate(self, who: Principal, account: str) -> None:
        self.reputation.reinstate(who, account)

    # --- pools -----------------------------------------------------------------------------

    def create_pool(self, who: Principal, name: str) -> PoolInfo:
        return self.pools.create(who, name)

    def add_to_pool(self, who: Principal, name: str, account: str) -> PoolInfo:
        return self.pools.add(who, name, account)

    def remove_from_pool(self, who: Principal, name: str, account: str) -> PoolInfo:
        return self.pools.remove(who, name, account)

    def list_pools(self, who: Principal) -> list[PoolInfo]:
        return self.pools.listing(who)

    # --- bundles ---------------------------------------------------------------------------

    def put_bundle(self, sha256: str, upload: SpooledUpload | Iterable[bytes]) -> int:
        if not isinstance(upload, SpooledUpload):
            upload = self.bundles.spool(upload)
        return self.bundles.put(sha256, upload)

    # --- jobs ------------------------------------------------------------------------------

    def submit(self, who: Principal, spec: JobSpec) -> Job:
        return self.jobs_room.submit(who, spec)

    def estimate(self, who: Principal, spec: JobSpec) -> JobEstimate:
        return self.jobs_room.estimate(who, spec)

    def jobs(self, who: Principal) -> list[Job]:
        return self.jobs_room.jobs(who)

    def job(self, who: Principal, job_id: str) -> Job:
        return self.jobs_room.job(who, job_id)

    def owned_job_ids(self, who: Principal) -> set[str]:
        return self.jobs_room.owned_job_ids(who)

    def tasks(self, who: Principal, job_id: str) -> list[Task]:
        return self.jobs_room.tasks(who, job_id)

    def frames(self, who: Principal, job_id: str) -> list[FrameState]:
        return self.jobs_room.frames(who, job_id)

    def frame_file(self, who: Principal, job_id: str, frame: int, kind: str) -> Path:
        return self.jobs_room.frame_file(who, job_id, frame, kind)

    def deliverables(self, who: Principal, job_id: str) -> Deliverables:
        return self.jobs_room.deliverables(who, job_id)

    def deliverable_file(self, who: Principal, job_id: str, sha256: str) -> Path:
        return self.jobs_room.deliverable_file(who, job_id, sha256)

    def task_preview(self, who: Principal, task_id: str) -> Path:
        return self.jobs_room.task_preview(who, task_id)

    def set_priority(self, who: Principal, job_id: str, priority: int) -> Job:
        return self.jobs_room.set_priority(who, job_id, priority)

    def pause(self, who: Principal, job_id: str) -> Job:
        return self.jobs_room.pause(who, job_id)

    def resume(self, who: Principal, job_id: str) -> Job:
        return self.jobs_room.resume(who, job_id)

    def cancel(self, who: Principal, job_id: str) -> Job:
        return self.jobs_room.cancel(who, job_id)

    # --- nodes and leases ------------------------------------------------------------------

    def register_node(self, who: Principal, caps: NodeCapabilities) -> NodeRegistration:
        return self.scheduler.register_node(who, caps)

    def nodes(self, who: Principal) -> list[NodeInfo]:
        return self.scheduler.nodes(who)

    def try_lease(self, who: Principal, node_id: str, request: LeaseRequest) -> Lease | None:
        return self.scheduler.try_lease(who, node_id, request)

    def end_poll(self, who: Principal, node_id: str) -> None:
        self.scheduler.end_poll(who, node_id)

    def poll_ended(self, node_id: str) -> bool:
        return self.scheduler.poll_ended(node_id)

    def heartbeat(self, who: Principal, lease_id: str, beat: Heartbeat) -> HeartbeatReply:
        return self.scheduler.heartbeat(who, lease_id, beat)

    def release(self, who: Principal, lease_id: str) -> None:
        self.scheduler.release(who, lease_id)

    def denoise_input(self, who: Principal, lease_id: str) -> Path:
        return self.scheduler.denoise_input(who, lease_id)

    def requeue_expired(self) -> int:
        return self.scheduler.requeue_expired()

    def resolve_stale_samples(self) -> int:
        return self.samples.resolve_stale()

    def fail_unconfirmed(self) -> int:
        return self.scheduler.fail_unconfirmed()

    # --- results ---------------------------------------------------------------------------

    def check_upload(self, who: Principal, lease_id: str) -> sqlite3.Row | None:
        return self.results.check_upload(who, lease_id)

    def accept_result(
        self,
        who: Principal,
        lease_id: str,
        claimed_sha256: str | None,
        upload: SpooledUpload | Iterable[bytes],
        checked: sqlite3.Row | None = None,
    ) -> UploadReceipt:
        return self.results.accept(who, lease_id, claimed_sha256, upload, checked)

    def report_failure(self, who: Principal, lease_id: str, failure: TaskFailure) -> None:
        self.results.report_failure(who, lease_id, failure)

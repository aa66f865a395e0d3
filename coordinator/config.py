"""The coordinator's configuration: one frozen object built at start-up and passed in."""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.verify.policy import VerificationPolicy


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    data_dir: Path
    #: The database: None for `coordinator.sqlite` in `data_dir`, else a URL
    #: (`sqlite:///path`, or `postgresql://...` shared by several replicas).
    db_url: str | None = None
    #: The content store's folder: None for `store` in `data_dir`; replicas share one.
    shared_store: Path | None = None
    lease_seconds: float = 60.0
    heartbeat_interval: float = 5.0
    poll_timeout: float = 20.0
    max_attempts: int = 3
    blocklist_after: int = 3
    max_bundle_bytes: int = 10 * 2**30
    max_result_bytes: int = 2 * 2**30
    node_offline_after: float = 120.0
    farm_name: str | None = None
    lan_secret: str | None = None
    version: str = "0.1.0"
    #: The coordinator's share of every payment (goes to the ledger's `fee` account).
    fee_rate: float = 0.05
    #: Duplicate sampling: who is checked, how often, when a provider is suspended.
    verification: VerificationPolicy = field(default_factory=VerificationPolicy)
    #: A duplicate sample no other provider can take within this time is dropped and its
    #: tile accepted unchecked (a farm of one provider cannot cross-check itself).
    verify_wait_seconds: float = 30.0
    #: A node counts as able to take a sample if it was seen this recently (nodes poll or
    #: beat every few seconds; `node_offline_after` is kept long for display).
    verifier_seen_seconds: float = 30.0
    #: A task whose last attempt failed on a node is not leased to that node again for
    #: this long: another node gets the next try. Only when none takes it meanwhile does
    #: the same node (a farm of one node, say) try again.
    same_node_retry_seconds: float = 30.0
    #: An idle node gets a backup copy of the last unfinished tile of a frame once that
    #: tile has run this long and twice the job's median tile time; the first result
    #: wins. 0 turns backups off.
    backup_after_seconds: float = 30.0
    #: Request bodies other than uploads (bundles, results) larger than this get 413
    #: before they are parsed.
    max_json_bytes: int = 2**20
    #: Token bucket per token (per client address without one): requests a second, 0 = off.
    rate_limit: float = 50.0
    #: ...and how many may come at once before the rate applies.
    rate_burst: int = 200
    #: Requests being worked on at once; past it the coordinator answers 503 with
    #: Retry-After instead of queueing. Long polls and event streams, which mostly wait,
    #: count against `max_waiting` instead. 0 = no limit.
    max_concurrent: int = 256
    max_waiting: int = 4096
    #: Uploads (bundles, results) are refused with 507 Insufficient Storage while writing
    #: them would leave less than this many bytes free on the data folder's file system,
    #: so the database and the frames being merged always have room. 0 = no check.
    min_free_disk: int = 2**30
    #: Retry-After (seconds) of a 507: how long a sender waits before trying again.
    storage_retry_after: float = 10.0
    #: Seconds a client has to send a request body (408 and the connection closed past
    #: it), plus one second per `body_min_rate` bytes received: a slow but progressing
    #: upload of a big bundle keeps going, a sender trickling bytes does not hold a
    #: request slot. 0 = no limit.
    body_timeout: float = 15.0
    body_min_rate: int = 16 * 1024
    #: Requests without a valid token (no token, a wrong or revoked one) in progress at
    #: once from one client address; past it 429. They may also hold at most a quarter
    #: of `max_concurrent` together, so strangers never starve accounts and nodes.
    #: /health needs no slot. 0 = no limit.
    max_anonymous_per_ip: int = 8
    #: Node traffic (lease polls and everything done with a lease) has a bucket per
    #: account, on top of `rate_limit`/`rate_burst`: each node the account registered
    #: adds this many requests a second and this much burst.
    node_rate: float = 2.0
    node_burst: int = 10
    #: The most render tasks (frames x tiles) one job may have, whatever it pays: a
    #: bigger plan is refused from arithmetic before any task is built.
    max_tasks_per_job: int = 20_000
    #: Render tasks any requester may have queued or running at once, even with no
    #: credits (free jobs included)...
    free_queued_tasks: int = 2_000
    #: ...plus this many per credit of the requester's balance (up to max_tasks_per_job
    #: per job): a stranger with nothing to lose cannot fill the farm's queue.
    queued_tasks_per_credit: int = 1_000

    @property
    def db_path(self) -> Path:
        return self.data_dir / "coordinator.sqlite"

    @property
    def store_dir(self) -> Path:
        return self.shared_store if self.shared_store is not None else self.data_dir / "store"

    @property
    def spool_name(self) -> str | None:
        """This replica's spool folder in a shared store (None when the store is its own):
        stable across restarts, so a restarted replica clears its own leftovers only."""
        if self.shared_store is None:
            return None
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:10]
        return f"{socket.gethostname()}-{digest}"

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin.token"

"""The coordinator's SQLite database: schema migrations and the single connection.

SQLite allows one writer; rather than let request threads race for it, every access
goes through one connection guarded by one lock (`Database.lock`), and every multi-step
change runs inside `Database.transaction()`, which commits or rolls back as a whole.
WAL mode keeps readers cheap and makes a crash mid-write leave the last committed state.

This module knows tables, not jobs: the rules live in the rooms `coordinator.farm`
composes. It is plain `sqlite3`: the one writer and its lock are the point, and
sqlite-utils' helpers were never used.

Several coordinator replicas share a PostgreSQL database instead (`open_database` with a
`postgresql://` URL): `coordinator.engines.postgres.PostgresDatabase` answers the same
calls, runs the same migrations (rewritten by `coordinator.engines.dialect`), and
serialises write transactions across replicas. The rooms write SQLite's SQL for both;
a statement that must lock the rows it reads appends `db.row_lock`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.errors import TesseraError
from coordinator.errors import StorageFullError

#: sqlite3's primary result code for "database or disk is full".
SQLITE_FULL = 13

MIGRATIONS: tuple[str, ...] = (
    # 1: the farm's first schema
    """
    CREATE TABLE accounts (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        token_hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL
    );
    CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL REFERENCES accounts(name),
        name TEXT NOT NULL,
        capabilities TEXT NOT NULL,
        registered_at TEXT NOT NULL,
        last_seen REAL NOT NULL,
        current_task TEXT,
        tasks_completed INTEGER NOT NULL DEFAULT 0,
        tasks_failed INTEGER NOT NULL DEFAULT 0,
        render_seconds REAL NOT NULL DEFAULT 0
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL REFERENCES accounts(name),
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        priority INTEGER NOT NULL,
        spec TEXT NOT NULL,
        bundle TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id),
        kind TEXT NOT NULL,
        frame INTEGER NOT NULL,
        tile_index INTEGER NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        assignment TEXT,
        denoise_input TEXT,
        lease_id TEXT UNIQUE,
        node_id TEXT,
        lease_expires REAL,
        result_sha TEXT,
        render_seconds REAL,
        message TEXT NOT NULL DEFAULT '',
        updated_at TEXT NOT NULL
    );
    CREATE INDEX tasks_by_status ON tasks(status, job_id);
    CREATE INDEX tasks_by_frame ON tasks(job_id, frame);
    CREATE TABLE failures (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL,
        job_id TEXT NOT NULL,
        node_id TEXT,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE TABLE blocklist (
        job_id TEXT NOT NULL,
        node_id TEXT NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (job_id, node_id)
    );
    CREATE TABLE frames (
        job_id TEXT NOT NULL,
        frame INTEGER NOT NULL,
        status TEXT NOT NULL,
        merged_sha TEXT,
        exr_sha TEXT,
        png_sha TEXT,
        PRIMARY KEY (job_id, frame)
    );
    CREATE TABLE previews (
        task_id TEXT PRIMARY KEY,
        png_sha TEXT NOT NULL
    );
    """,
    # 2: when each lease began, so the coordinator itself measures task time
    """
    ALTER TABLE tasks ADD COLUMN leased_at REAL;
    """,
    # 3: credits, a double-entry ledger in milli-credits (see ledger.py)
    """
    CREATE TABLE ledger_txns (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        job_id TEXT,
        task_id TEXT,
        memo TEXT NOT NULL DEFAULT '',
        at TEXT NOT NULL
    );
    CREATE TABLE ledger_entries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        txn TEXT NOT NULL REFERENCES ledger_txns(id),
        account TEXT NOT NULL,
        amount INTEGER NOT NULL
    );
    CREATE INDEX ledger_entries_by_account ON ledger_entries(account);
    CREATE INDEX ledger_entries_by_txn ON ledger_entries(txn);
    """,
    # 4: duplicate sampling: verify tasks, provider standing, the comparisons made
    """
    ALTER TABLE tasks ADD COLUMN verifies TEXT;
    ALTER TABLE tasks ADD COLUMN excluded_owners TEXT NOT NULL DEFAULT '';
    ALTER TABLE nodes ADD COLUMN earned_milli INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX tasks_by_target ON tasks(verifies);
    CREATE TABLE providers (
        account TEXT PRIMARY KEY,
        verified INTEGER NOT NULL DEFAULT 0,
        rejected INTEGER NOT NULL DEFAULT 0,
        suspended TEXT
    );
    CREATE TABLE verifications (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL,
        sample_task_id TEXT NOT NULL,
        other_task_id TEXT NOT NULL,
        mode TEXT NOT NULL,
        agree INTEGER NOT NULL,
        statistic REAL NOT NULL,
        threshold REAL NOT NULL,
        detail TEXT NOT NULL,
        at TEXT NOT NULL
    );
    """,
    # 5: backup renders of tiles that a slow node holds up
    """
    ALTER TABLE tasks ADD COLUMN backs_up TEXT;
    CREATE INDEX tasks_by_original ON tasks(backs_up);
    """,
    # 6: idempotent delivery. The receipt of every accepted upload, written in the
    # accepting transaction, so that a node whose reply was lost and that sends the same
    # result again gets the same answer (never "lease is over", never a second payment);
    # and the lease of every recorded failure, so that a repeated report is a no-op.
    """
    CREATE TABLE receipts (
        lease_id TEXT PRIMARY KEY,
        task_id TEXT NOT NULL,
        node_id TEXT,
        sha256 TEXT NOT NULL,
        accepted INTEGER NOT NULL,
        frame_completed INTEGER NOT NULL,
        at TEXT NOT NULL
    );
    ALTER TABLE failures ADD COLUMN lease_id TEXT;
    CREATE INDEX failures_by_lease ON failures(lease_id);
    """,
    # 7: revocable tokens. A revoked account keeps its row (the ledger and its jobs name
    # it) but its token no longer authenticates, and it cannot be given a new one.
    """
    ALTER TABLE accounts ADD COLUMN revoked_at TEXT;
    """,
    # 8: no one party's word decides. A failure a node reports as final waits for another
    # provider to confirm it (`final`), and costs its provider reputation once another's
    # result is accepted (`contradicted`); a tile doubted against the requester's preview
    # keeps the doubt while another provider checks it (`doubt`), and a confirmed one marks
    # the job's previews untrustworthy (`previews_trusted`).
    """
    ALTER TABLE failures ADD COLUMN final INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE failures ADD COLUMN contradicted INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX failures_by_task ON failures(task_id, id);
    ALTER TABLE tasks ADD COLUMN doubt TEXT;
    ALTER TABLE jobs ADD COLUMN previews_trusted INTEGER NOT NULL DEFAULT 1;
    """,
    # 9: explicit render settings (issue 17). Every assignment names its samples and
    # percentage and the scene's declared resolution; older rows left samples and
    # percentage to the .blend (null). They get their job spec's effective values.
    """
    UPDATE tasks SET assignment = json_set(
        assignment,
        '$.samples', COALESCE(json_extract(assignment, '$.samples'), (SELECT
            COALESCE(json_extract(j.spec, '$.samples'), json_extract(j.spec, '$.scene.samples'))
            FROM jobs j WHERE j.id = tasks.job_id)),
        '$.percentage', COALESCE(json_extract(assignment, '$.percentage'), (SELECT
            COALESCE(json_extract(j.spec, '$.percentage'),
                json_extract(j.spec, '$.scene.resolution_percentage'))
            FROM jobs j WHERE j.id = tasks.job_id)),
        '$.resolution_x', COALESCE(json_extract(assignment, '$.resolution_x'), (SELECT
            json_extract(j.spec, '$.scene.resolution_x') FROM jobs j WHERE j.id = tasks.job_id)),
        '$.resolution_y', COALESCE(json_extract(assignment, '$.resolution_y'), (SELECT
            json_extract(j.spec, '$.scene.resolution_y') FROM jobs j WHERE j.id = tasks.job_id))
    ) WHERE assignment IS NOT NULL AND json_valid(assignment)
    """,
    # 10: the artist's deliverable (issue 12). Every file a finish task made (the scene's
    # own frame, File Output nodes' files), the raw EXR of every pass, and the job's
    # movie and preview video, stored content-addressed and named as Blender names them.
    """
    CREATE TABLE deliverables (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        path TEXT NOT NULL,
        frame INTEGER,
        kind TEXT NOT NULL,
        sha TEXT NOT NULL,
        size INTEGER NOT NULL,
        PRIMARY KEY (job_id, path)
    );
    """,
    # 11: pools (issue 14). A pool is owned by the account that created it; its owner
    # adds the accounts whose nodes may serve it and who may submit to it.
    """
    CREATE TABLE pools (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL REFERENCES accounts(name),
        created_at TEXT NOT NULL
    );
    CREATE TABLE pool_members (
        pool TEXT NOT NULL REFERENCES pools(name),
        account TEXT NOT NULL REFERENCES accounts(name),
        added_at TEXT NOT NULL,
        PRIMARY KEY (pool, account)
    );
    CREATE INDEX pool_members_by_account ON pool_members(account);
    """,
    # 12: what a job really costs (issue 16): the render time each failed, expired or
    # rejected attempt took, counted as wasted work in the job's cost figures.
    # The figures are read per job, so failures and ledger transactions get a job index.
    """
    ALTER TABLE failures ADD COLUMN seconds REAL;
    CREATE INDEX failures_by_job ON failures(job_id);
    CREATE INDEX ledger_txns_by_job ON ledger_txns(job_id, kind);
    """,
    # 13: leasing seeks a job's best task per status and kind in frame and tile order
    # (coordinator.lease_query) instead of sorting the job's whole queue on every lease.
    """
    CREATE INDEX tasks_to_lease ON tasks(job_id, status, kind, frame, tile_index);
    """,
    # 14: LAN join challenges live in the database: a node behind a load balancer may ask
    # one replica for a challenge and answer another, and each challenge works once on
    # all of them (a replayed join would hand out the joiner's account).
    """
    CREATE TABLE join_nonces (nonce TEXT PRIMARY KEY, expires REAL NOT NULL);
    """,
)


def now_iso() -> str:
    """The timestamp every row's `*_at` column holds."""
    return datetime.now(UTC).isoformat()


class Database:
    """One SQLite connection for the whole coordinator, serialised by `lock`."""

    #: Which engine this is ("sqlite" or "postgresql").
    engine = "sqlite"
    #: Appended to a SELECT whose rows the transaction will change: nothing on SQLite,
    #: whose one writer already excludes every other (" FOR UPDATE" on PostgreSQL).
    row_lock = ""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.RLock()
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    def schema_version(self) -> int:
        with self.lock:
            return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self.lock:
            version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                with self.transaction():
                    for statement in script.split(";"):
                        if statement.strip():
                            self.conn.execute(statement)
                    self.conn.execute(f"PRAGMA user_version={number}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and one IMMEDIATE transaction; commit on success, else roll back.

        The COMMIT is inside the guarded block: a commit that fails (disk full) must roll
        back too, or the connection would stay inside a transaction that every later
        BEGIN refuses. A full disk is reported as `StorageFullError`.
        """
        with self.lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self.conn
                    self.conn.execute("COMMIT")
                except BaseException:
                    # SQLite may have rolled back already (after some I/O errors).
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                if _is_full(exc):
                    raise StorageFullError(
                        "The coordinator's disk is full: its database cannot grow."
                    ) from exc
                raise

    @contextmanager
    def claim(self, name: str) -> Iterator[bool]:
        """Work only one coordinator may do at a time (a sweep, a frame's assembly):
        yields whether this one has it. On SQLite the one process always has it."""
        yield True

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        with self.lock:
            return list(self.conn.execute(sql, params))

    def query_one(
        self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()
    ) -> sqlite3.Row | None:
        with self.lock:
            row: sqlite3.Row | None = self.conn.execute(sql, params).fetchone()
            return row

    def fetch_one(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Row:
        """Like query_one, for queries that always return a row (aggregates, known keys)."""
        row = self.query_one(sql, params)
        if row is None:
            raise LookupError(f"no row for {sql!r} {params!r}")
        return row


class DatabaseURLError(TesseraError):
    """A --db URL that names no engine the coordinator runs on."""


def open_database(url: str | None, default_path: Path) -> Database:
    """The database a `--db` URL names: `sqlite:///path` (None: `default_path`) or
    `postgresql://user@host/name` (libpq's URL, `?host=/socket/dir` included)."""
    if url is None:
        return Database(default_path)
    if url.startswith("sqlite:///"):
        return Database(Path(url.removeprefix("sqlite://")))
    if url.startswith(("postgresql://", "postgres://")):
        from coordinator.engines.postgres import PostgresDatabase

        return PostgresDatabase(url, MIGRATIONS)
    raise DatabaseURLError(
        f"The database URL {url!r} names no engine the coordinator runs on.",
        hint="Use sqlite:///absolute/path.sqlite or postgresql://user@host/dbname.",
    )


def _is_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return int(code) & 0xFF == SQLITE_FULL
    return "database or disk is full" in str(exc)

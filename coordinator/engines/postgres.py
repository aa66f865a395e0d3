"""The coordinator's database on PostgreSQL, shared by several coordinator replicas.

`PostgresDatabase` offers what `coordinator.db.Database` offers (query, query_one,
fetch_one, transaction, conn, lock), so the rooms run unchanged:

- each thread has its own connection (autocommit outside `transaction()`);
- statements are rewritten from SQLite's dialect once (`dialect.to_postgres`);
- rows are read by name or position like `sqlite3.Row`; sums come back as int;
- every `transaction()` first takes one transaction-scoped advisory lock, the farm's
  writer lock: write transactions of all replicas run one at a time, as SQLite's do in
  one process, so a rule that reads then writes inside a transaction (a lease, a
  payment, a receipt) holds across replicas. Reads need no lock;
- `claim(name)` is an advisory lock only one replica holds: background work (sweeps,
  frame assembly) runs on one replica at a time, and moves on when it dies;
- a unique violation is raised as `sqlite3.IntegrityError` and a full disk as
  `StorageFullError`, the errors the rooms already handle.

It must not hold rules of the farm, nor SQL of the rooms.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import psycopg
from psycopg import errors as pg_errors
from psycopg.adapt import Dumper, Loader
from psycopg.pq import TransactionStatus

from common.errors import TesseraError
from coordinator.db import Database
from coordinator.engines.dialect import schema_to_postgres, to_postgres
from coordinator.errors import StorageFullError

#: Advisory lock keys (any 64-bit numbers no other program on the database uses).
WRITER_LOCK = 0x7E55E4A0001
MIGRATION_LOCK = 0x7E55E4A0002
BEGIN_LOCKED = f"BEGIN; SELECT pg_advisory_xact_lock({WRITER_LOCK})".encode()
#: Migrations that only fix rows written before PostgreSQL was supported (SQLite only):
#: a PostgreSQL database starts at the newest schema, and `coordinator migrate` copies
#: rows from an SQLite database that has run them.
SQLITE_ONLY_MIGRATIONS = frozenset({9})
#: SQLite functions the rooms use that PostgreSQL lacks, defined in the database itself
#: (SQLite's comparisons are integers, so the rooms count with SUM(a = b)).
COMPAT_FUNCTIONS = (
    """CREATE OR REPLACE FUNCTION tessera_sum_bool(state BIGINT, value BOOLEAN)
    RETURNS BIGINT LANGUAGE sql IMMUTABLE AS
    'SELECT CASE WHEN value IS NULL THEN state ELSE COALESCE(state, 0) + value::int END'""",
    "CREATE OR REPLACE AGGREGATE sum(BOOLEAN) (SFUNC = tessera_sum_bool, STYPE = BIGINT)",
)


class DatabaseConnectError(TesseraError):
    """The --db URL names a PostgreSQL database this process cannot connect to."""


def _without_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


class Row:
    """A result row read by column name (case-insensitive) or position, like sqlite3.Row."""

    __slots__ = ("_index", "_names", "_values")

    def __init__(self, names: list[str], index: dict[str, int], values: Sequence[Any]) -> None:
        self._names, self._index, self._values = names, index, values

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            try:
                return self._values[self._index[key.lower()]]
            except KeyError:
                raise IndexError(f"No item with that key: {key!r}") from None
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._names)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._names, self._values, strict=True))!r})"


#: Column names -> (names, index by lower-cased name): one per distinct result shape.
_SHAPES: dict[tuple[bytes, ...], tuple[list[str], dict[str, int]]] = {}


def _row_factory(cursor: psycopg.Cursor[Any]) -> Any:
    # From the raw result, not `cursor.description`, which builds a Column per field on
    # every statement (0.75 ms of CPU per task in the load test).
    result = cursor.pgresult
    count = result.nfields if result is not None else 0
    key = tuple(result.fname(i) or b"" for i in range(count)) if result is not None else ()
    shape = _SHAPES.get(key)
    if shape is None:
        names = [name.decode() for name in key]
        shape = _SHAPES.setdefault(key, (names, {n.lower(): i for i, n in enumerate(names)}))
    names, index = shape

    def make(values: Sequence[Any]) -> Row:
        return Row(names, index, values)

    return make


class _BoolAsInt(Dumper):
    """SQLite has no booleans: the rooms store flags as 0/1 integers."""

    oid = psycopg.adapters.types["int8"].oid

    def dump(self, obj: Any) -> bytes:
        return b"1" if obj else b"0"


class _NumericAsNumber(Loader):
    """SUM() of integers is `numeric` on PostgreSQL; the rooms expect int (or float)."""

    def load(self, data: Any) -> int | float:
        text = bytes(data).decode()
        return int(text) if "." not in text else float(text)


class PgConnection:
    """The part of `sqlite3.Connection` the rooms use, over one psycopg connection."""

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> psycopg.Cursor[Any]:
        return self.raw.execute(to_postgres(sql), params or None)

    def executemany(self, sql: str, rows: Any) -> psycopg.Cursor[Any]:
        cursor = self.raw.cursor()
        cursor.executemany(to_postgres(sql), list(rows))
        return cursor

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != TransactionStatus.IDLE


def connect(url: str) -> psycopg.Connection[Any]:
    """A connection in autocommit mode with the rooms' row and value conventions."""
    raw: psycopg.Connection[Any] = psycopg.connect(url, autocommit=True, row_factory=_row_factory)
    raw.adapters.register_dumper(bool, _BoolAsInt)
    raw.adapters.register_loader("numeric", _NumericAsNumber)
    return raw


class PostgresDatabase(Database):
    """One farm's PostgreSQL database, as seen by one coordinator process (a `Database`
    in every call the rooms make; none of SQLite's state is set up)."""

    engine = "postgresql"
    #: Appended to a SELECT whose rows a transaction is about to change.
    row_lock = " FOR UPDATE"

    def __init__(self, url: str, migrations: Sequence[str]) -> None:
        self.url = url
        self.path = None  # type: ignore[assignment]
        self.lock = threading.RLock()  # a process lock, for the few callers that use one
        self._local = threading.local()
        self._all: list[psycopg.Connection[Any]] = []
        self._all_lock = threading.Lock()
        try:
            self._connection()
        except psycopg.OperationalError as exc:
            raise DatabaseConnectError(
                f"Cannot connect to the PostgreSQL database {_without_password(url)}: "
                f"{str(exc).strip().splitlines()[0]}",
                hint="Check the --db URL (user, host, database name, password in ~/.pgpass)"
                " and that the server accepts this machine (pg_hba.conf).",
            ) from None
        self._migrate_to(migrations)

    # --- connections -----------------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection (typed as the rooms expect: it answers the same calls)."""
        return cast(sqlite3.Connection, self._connection())

    @conn.setter
    def conn(self, value: sqlite3.Connection) -> None:
        raise AttributeError("a PostgreSQL database has one connection per thread")

    def _connection(self) -> PgConnection:
        current: PgConnection | None = getattr(self._local, "conn", None)
        if current is None or current.raw.closed or current.raw.broken:
            raw = connect(self.url)
            with self._all_lock:
                self._all.append(raw)
            current = self._local.conn = PgConnection(raw)
        return current

    def close(self) -> None:
        with self._all_lock:
            connections, self._all = self._all, []
        for raw in connections:
            raw.close()

    # --- schema ----------------------------------------------------------------------------

    def _migrate_to(self, migrations: Sequence[str]) -> None:
        """Bring the schema to the newest migration; replicas starting together wait for
        the first (one advisory lock), and the others find nothing left to do."""
        raw = self._connection().raw
        with raw.transaction():
            raw.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            raw.execute("CREATE TABLE IF NOT EXISTS tessera_schema (version INTEGER NOT NULL)")
            row = raw.execute("SELECT version FROM tessera_schema").fetchone()
            if row is None:
                raw.execute("INSERT INTO tessera_schema (version) VALUES (0)")
            version = 0 if row is None else int(row[0])
            for statement in COMPAT_FUNCTIONS:
                raw.execute(statement.encode())
            for number, script in enumerate(migrations[version:], start=version + 1):
                if number in SQLITE_ONLY_MIGRATIONS:
                    continue
                for statement in script.split(";"):
                    if statement.strip():
                        raw.execute(schema_to_postgres(statement).encode())
            raw.execute("UPDATE tessera_schema SET version = %s", (len(migrations),))

    def schema_version(self) -> int:
        return int(self.fetch_one("SELECT version FROM tessera_schema")[0])

    # --- statements ------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction holding the farm's writer lock; commit on success, else roll
        back. Errors are the ones SQLite's transaction raises (see the module docstring)."""
        conn = self._connection()
        if conn.in_transaction:
            raise RuntimeError("transaction() inside a transaction: nest the work instead")
        raw = conn.raw
        try:
            # One round trip: every one inside the lock also waits for the GIL.
            raw.execute(BEGIN_LOCKED)
            try:
                yield cast(sqlite3.Connection, conn)
                raw.execute("COMMIT")
            except BaseException:
                if not raw.closed and conn.in_transaction:
                    raw.execute("ROLLBACK")
                raise
        except pg_errors.IntegrityError as exc:
            raise sqlite3.IntegrityError(str(exc)) from exc
        except pg_errors.DiskFull as exc:
            raise StorageFullError(
                "The farm's database server is out of disk: its database cannot grow."
            ) from exc

    @contextmanager
    def claim(self, name: str) -> Iterator[bool]:
        """A session advisory lock named `name`, tried without waiting: True while this
        replica holds it, False when another does. A replica that dies loses its
        session, and with it the claim: another takes the work over."""
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        raw = self._connection().raw
        mine = bool(self.fetch_one("SELECT pg_try_advisory_lock(?)", (key,))[0])
        try:
            yield mine
        finally:
            if mine and not raw.closed:
                raw.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        return self._connection().execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        return self._connection().execute(sql, params).fetchone()

    def fetch_one(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        row = self.query_one(sql, params)
        if row is None:
            raise LookupError(f"no row for {sql!r} {params!r}")
        return row

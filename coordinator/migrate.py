"""Move a farm's data from one database to another (`tessera coordinator migrate`), e.g.
from the embedded SQLite file to the PostgreSQL that several replicas will share.

Both databases are brought to the newest schema first; the destination must hold no farm
yet (no account). Every table is copied in one transaction, parents before children,
identity counters are moved past the copied ids, and every table's row count is compared
afterwards. It must not change the source, and it must not run while a coordinator
serves the source (stop it first: rows written meanwhile would be left behind).
"""

from __future__ import annotations

from pathlib import Path

from common.errors import TesseraError
from coordinator.db import Database, open_database

#: Tables in an order that copies each row after the rows it refers to.
ORDER = (
    "accounts",
    "nodes",
    "jobs",
    "tasks",
    "failures",
    "blocklist",
    "frames",
    "previews",
    "ledger_txns",
    "ledger_entries",
    "providers",
    "verifications",
    "receipts",
)
#: Tables with an autoincrement `id`, whose counter must move past the copied rows.
COUNTED = ("failures", "ledger_entries", "verifications")
BATCH = 2000


class MigrationError(TesseraError):
    """The copy cannot start or did not copy everything."""


def _tables(db: Database) -> list[str]:
    if db.engine == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    else:
        sql = (
            "SELECT table_name FROM information_schema.tables WHERE table_schema ="
            " current_schema() AND table_name != 'tessera_schema'"
        )
    names = {str(row[0]) for row in db.query(sql)}
    return [t for t in ORDER if t in names] + sorted(names - set(ORDER))


def migrate(source_url: str, destination_url: str) -> dict[str, int]:
    """Copy every row; returns the rows copied per table."""
    if source_url == destination_url:
        raise MigrationError("--from and --to name the same database.")
    source = open_database(source_url, Path("coordinator.sqlite"))
    try:
        destination = open_database(destination_url, Path("coordinator.sqlite"))
        try:
            return _copy(source, destination)
        finally:
            destination.close()
    finally:
        source.close()


def _copy(source: Database, destination: Database) -> dict[str, int]:
    if destination.query_one("SELECT 1 FROM accounts LIMIT 1") is not None:
        raise MigrationError(
            "The destination database already holds a farm (it has accounts).",
            hint="Migrate into a new, empty database (createdb tessera_new).",
        )
    tables = _tables(source)
    missing = set(tables) - set(_tables(destination))
    if missing:
        raise MigrationError(f"The destination has no table {sorted(missing)}.")
    copied: dict[str, int] = {}
    with destination.transaction() as conn:
        for table in tables:
            rows = source.query(f"SELECT * FROM {table}")
            copied[table] = len(rows)
            if not rows:
                continue
            columns = list(rows[0].keys())
            sql = (
                f"INSERT INTO {table} ({', '.join(columns)})"
                f" VALUES ({', '.join('?' for _ in columns)})"
            )
            for start in range(0, len(rows), BATCH):
                conn.executemany(sql, [tuple(row) for row in rows[start : start + BATCH]])
        if destination.engine == "postgresql":
            for table in COUNTED:
                conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                    f" COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
                )
    for table, count in copied.items():
        found = int(destination.fetch_one(f"SELECT COUNT(*) FROM {table}")[0])
        if found != count:
            raise MigrationError(f"{table}: {count} rows in the source, {found} copied.")
    return copied

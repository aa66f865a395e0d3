"""`tessera coordinator`'s database and store options (`--db`, `--store`) and its
`migrate` action (`tessera coordinator migrate --from URL --to URL`).

Only argument parsing and printing live here; the copy is `coordinator.migrate`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UsageError


def add_database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        nargs="?",
        choices=["serve", "migrate"],
        default="serve",
        help="serve (default), or migrate a farm's data from one database to another",
    )
    parser.add_argument(
        "--db",
        default=None,
        metavar="URL",
        help="the farm's database: sqlite:///path (default: coordinator.sqlite in --data) or "
        "postgresql://user@host/dbname, which several coordinator replicas may share",
    )
    parser.add_argument(
        "--store",
        type=Path,
        default=None,
        metavar="DIR",
        help="the content store (bundles, tiles, frames; default: store in --data); "
        "replicas sharing a database share this folder (a shared mount)",
    )
    parser.add_argument(
        "--from",
        dest="migrate_from",
        default=None,
        metavar="URL",
        help="migrate: the database to copy from (sqlite:///path)",
    )
    parser.add_argument(
        "--to",
        dest="migrate_to",
        default=None,
        metavar="URL",
        help="migrate: the database to copy into (postgresql://...; must hold no farm yet)",
    )


def cmd_migrate(args: argparse.Namespace) -> int:
    """Copy every row of one farm database into another, then compare the counts."""
    from coordinator.migrate import migrate

    if not args.migrate_from or not args.migrate_to:
        raise UsageError(
            "tessera coordinator migrate needs --from URL and --to URL.",
            hint="e.g. --from sqlite:///srv/tessera/coordinator.sqlite"
            " --to postgresql://tessera@dbhost/tessera",
        )
    copied = migrate(args.migrate_from, args.migrate_to)
    for table, rows in copied.items():
        print(f"  {table}: {rows} rows")
    print(f"Copied {sum(copied.values())} rows into {args.migrate_to}; every count matches.")
    return 0

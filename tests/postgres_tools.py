"""A real PostgreSQL 15 server for the tests, and the engine switch of the farm fixtures.

`postgres` (session) runs `initdb` + `pg_ctl` from Debian's packages in a temporary
folder, as the `postgres` user when the tests run as root, listening on a unix socket
only, and stops it at the end; `postgres.new_database()` gives each farm a database of
its own. Without the binaries the tests that need it fail under CI (CI=true) and skip
elsewhere, saying what to install.

`db_engine` is the engine a farm fixture builds on: `TESSERA_TEST_DB` (sqlite by
default; postgresql runs every farm test on PostgreSQL), and both for the modules in
`BOTH_ENGINES`, which are parametrised over the two.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

#: Modules whose farm tests run on both engines whatever TESSERA_TEST_DB says.
BOTH_ENGINES = {
    "tests.test_coordinator",
    "tests.test_ledger",
    "tests.test_hot_paths",
    "tests.test_lan_join_replicas",
}
DEFAULT_ENGINE = os.environ.get("TESSERA_TEST_DB", "sqlite")
PG_BIN_DIRS = (Path("/usr/lib/postgresql/15/bin"), Path("/usr/local/bin"))


def pg_binary(name: str) -> Path | None:
    for folder in PG_BIN_DIRS:
        if (folder / name).is_file():
            return folder / name
    found = shutil.which(name)
    return Path(found) if found else None


@dataclass
class PostgresServer:
    folder: Path
    _numbers: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def socket_dir(self) -> Path:
        return self.folder

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def new_database(self) -> str:
        name = f"farm_{os.getpid()}_{next(self._numbers)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


class MissingPostgresError(Exception):
    """PostgreSQL's server programs are not installed."""


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _missing(what: str) -> None:
    message = (
        f"PostgreSQL 15 is needed for this test and {what}: install Debian's postgresql "
        "package (apt-get install postgresql), which provides initdb and pg_ctl."
    )
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def start_postgres() -> PostgresServer:
    """A new PostgreSQL server in a temporary folder (`stop_postgres` ends it);
    `MissingPostgresError` without the binaries. Also used by `benchmarks.bench_load`."""
    initdb, pg_ctl = pg_binary("initdb"), pg_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise MissingPostgresError("initdb/pg_ctl were not found")
    folder = Path(tempfile.mkdtemp(prefix="tessera-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data = folder / "data"
    subprocess.run(
        _as_postgres([str(initdb), "-D", str(data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-sync"]),
        check=True, capture_output=True,
    )  # fmt: skip
    options = f"-c listen_addresses='' -k {folder} -c fsync=off -c max_connections=400"
    subprocess.run(
        _as_postgres([str(pg_ctl), "-D", str(data), "-l", str(folder / "log"), "-o", options,
                      "-w", "start"]),
        check=True, capture_output=True,
    )  # fmt: skip
    return PostgresServer(folder)


def stop_postgres(server: PostgresServer) -> None:
    pg_ctl = pg_binary("pg_ctl")
    subprocess.run(
        _as_postgres([str(pg_ctl), "-D", str(server.folder / "data"), "-m", "immediate", "-w",
                      "stop"]),
        check=False, capture_output=True,
    )  # fmt: skip
    shutil.rmtree(server.folder, ignore_errors=True)


_shared: list[PostgresServer] = []


def shared_postgres() -> PostgresServer:
    """The test session's one server, started on first use and stopped at exit."""
    if not _shared:
        _shared.append(start_postgres())
        atexit.register(stop_postgres, _shared[0])
    return _shared[0]


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    try:
        return shared_postgres()
    except MissingPostgresError as exc:
        _missing(str(exc))
        raise


_databases: dict[Path, str] = {}


def coordinator_db_options(data_dir: Path) -> list[str]:
    """`--db URL` for a `tessera coordinator` a test starts on `data_dir`: its own
    PostgreSQL database (the same one when restarted on that folder) when
    TESSERA_TEST_DB=postgresql, else nothing (its SQLite file in the folder)."""
    if DEFAULT_ENGINE != "postgresql":
        return []
    key = data_dir.resolve()
    if key not in _databases:
        _databases[key] = shared_postgres().new_database()
    return ["--db", _databases[key]]


@pytest.fixture()
def db_engine(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", DEFAULT_ENGINE))


@pytest.fixture()
def db_url(db_engine: str, request: pytest.FixtureRequest) -> str | None:
    """A new database for one farm: None (the farm's own SQLite file) or a PostgreSQL URL."""
    if db_engine == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_engine" in metafunc.fixturenames and metafunc.module.__name__ in BOTH_ENGINES:
        metafunc.parametrize("db_engine", ["sqlite", "postgresql"], indirect=True)

"""Several coordinator replicas on one real PostgreSQL 15 database (see
`tests.postgres_tools`): leases never go to two nodes, one task is paid once however
many uploads race, the admin is created once per database, a SQLite farm moves to
PostgreSQL with nothing lost, and the SQL rewrite between the dialects.

The replicas are `Farm`s in this process, each with its own connections and locks: the
database is all they share, as separate processes would.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from coordinator import ledger
from coordinator.db import DatabaseURLError, open_database
from coordinator.engines.dialect import DialectError, to_postgres
from coordinator.engines.notify import PeerRelay
from coordinator.farm import Farm, Principal
from coordinator.migrate import MigrationError, migrate
from coordinator.verify.policy import VerificationPolicy
from protocol.client import sha256_file
from protocol.models import FrameRange, Lease, LeaseRequest, Role, TileGrid
from tests.coordinator_tools import open_farm
from tests.farm_tools import REPO, make_bundle
from tests.inprocess_farm import CAPS, TRUTH, small_spec, write_tile_exr
from tests.postgres_tools import PostgresServer

ADMIN = Principal("admin", Role.ADMIN)
ARTIST = Principal("artist", Role.REQUESTER)
NODES = 200


@pytest.fixture()
def replicas(postgres: PostgresServer, tmp_path: Path) -> Iterator[Callable[[int], list[Farm]]]:
    """`make(n)`: n replicas sharing one new database and one store folder."""
    farms: list[Farm] = []

    def make(count: int) -> list[Farm]:
        url = postgres.new_database()
        for i in range(count):
            farms.append(
                open_farm(
                    tmp_path / f"replica-{i}",
                    db_url=url,
                    shared_store=tmp_path / "store",
                    verification=VerificationPolicy(enabled=False),
                    lease_seconds=600,
                )
            )
        return farms[-count:]

    yield make
    for farm in farms:
        farm.db.close()


def _job(farm: Farm, demo_scene: Path, folder: Path, frames: int, tiles: TileGrid) -> str:
    farm.create_account("artist", Role.REQUESTER)
    farm.grant_credits(ADMIN, "artist", 100_000)
    path, sha = make_bundle(demo_scene, folder)
    farm.put_bundle(sha, iter([path.read_bytes()]))
    spec = small_spec().model_copy(
        update={"bundle": sha, "frames": FrameRange(start=1, end=frames), "tiles": tiles}
    )
    return farm.submit(ARTIST, spec).id


def _nodes(farm: Farm, count: int, accounts: int) -> list[tuple[Principal, str]]:
    nodes = []
    for a in range(accounts):
        farm.create_account(f"p{a}", Role.PROVIDER)
    for n in range(count):
        who = Principal(f"p{n % accounts}", Role.PROVIDER)
        caps = CAPS.model_copy(update={"name": f"n{n}", "price": 1.0})
        nodes.append((who, farm.register_node(who, caps).node_id))
    return nodes


def test_200_nodes_leasing_through_two_replicas_never_get_one_task_twice(
    replicas: Callable[[int], list[Farm]], demo_scene: Path, tmp_path: Path
) -> None:
    a, b = replicas(2)
    job_id = _job(a, demo_scene, tmp_path / "bundle", 10, TileGrid(columns=5, rows=4))
    nodes = _nodes(a, NODES, 20)
    start = threading.Barrier(NODES)

    def lease(index: int) -> Lease | None:
        who, node_id = nodes[index]
        replica = (a, b)[index % 2]
        start.wait()
        while True:  # a node that lost every race for a task polls again, as it would
            granted = replica.try_lease(who, node_id, LeaseRequest(wait=0))
            if granted is not None or not replica.db.query(
                "SELECT 1 FROM tasks WHERE status = 'queued'"
            ):
                return granted

    with ThreadPoolExecutor(NODES) as pool:
        granted = [g for g in pool.map(lease, range(NODES)) if g is not None]

    assert len(granted) == NODES  # 200 tasks, 200 nodes: each gets one
    assert len({g.task.id for g in granted}) == len(granted), "a task went to two nodes"
    rows = a.db.query(
        "SELECT id, lease_id, node_id FROM tasks WHERE job_id = ? AND status = 'active'",
        (job_id,),
    )
    in_db = {row["id"]: (row["lease_id"], row["node_id"]) for row in rows}
    assert len(in_db) == len(granted)
    for g in granted:
        assert in_db[g.task.id][0] == g.lease_id
    assert len({node for _, node in in_db.values()}) == len(granted)
    a.db.close()  # (the 200 threads' connections)
    b.db.close()


def _tile(lease: Lease, folder: Path) -> Path:
    assert lease.assignment is not None
    r = lease.assignment.render_region
    return write_tile_exr(folder / f"{lease.lease_id}.exr", TRUTH[r.y0 : r.y1, r.x0 : r.x1])


def test_concurrent_uploads_of_one_task_through_two_replicas_pay_once(
    replicas: Callable[[int], list[Farm]], demo_scene: Path, tmp_path: Path
) -> None:
    a, b = replicas(2)
    job_id = _job(a, demo_scene, tmp_path / "bundle", 1, TileGrid(columns=2, rows=1))
    (who, node_id), _ = _nodes(a, 2, 2)
    lease = a.try_lease(who, node_id, LeaseRequest(wait=0))
    assert lease is not None
    path = _tile(lease, tmp_path)
    sha, data = sha256_file(path), path.read_bytes()
    start = threading.Barrier(8)

    def upload(index: int) -> Any:
        start.wait()
        return (a, b)[index % 2].accept_result(who, lease.lease_id, sha, iter([data]))

    with ThreadPoolExecutor(8) as pool:
        receipts = list(pool.map(upload, range(8)))

    assert all(r.accepted for r in receipts)
    paid = a.db.fetch_one(
        "SELECT COUNT(*) FROM ledger_txns WHERE kind = 'pay' AND task_id = ?", (lease.task.id,)
    )[0]
    assert paid == 1
    assert ledger.check(a.db) == []
    assert a.db.fetch_one("SELECT status FROM tasks WHERE id = ?", (lease.task.id,))[0] == (
        "completed"
    )
    assert job_id


def test_the_admin_is_created_once_per_database(replicas: Callable[[int], list[Farm]]) -> None:
    farms = replicas(4)
    start = threading.Barrier(len(farms))

    def ensure(farm: Farm) -> str | None:
        start.wait()
        return farm.ensure_admin()

    with ThreadPoolExecutor(len(farms)) as pool:
        tokens = list(pool.map(ensure, farms))
    assert len([t for t in tokens if t is not None]) == 1
    assert farms[0].db.fetch_one("SELECT COUNT(*) FROM accounts WHERE role = 'admin'")[0] == 1
    token = next(t for t in tokens if t is not None)
    assert all(farm.authenticate(token) == ADMIN for farm in farms)


def _table_rows(url: str | None, path: Path, table: str) -> list[tuple[Any, ...]]:
    db = open_database(url, path)
    try:
        return sorted((tuple(row) for row in db.query(f"SELECT * FROM {table}")), key=repr)
    finally:
        db.close()


def test_a_sqlite_farm_moves_to_postgresql_with_nothing_lost(
    postgres: PostgresServer, demo_scene: Path, tmp_path: Path
) -> None:
    farm = open_farm(tmp_path / "sqlite-farm", verification=VerificationPolicy(enabled=False))
    assert farm.db.engine == "sqlite"
    farm.ensure_admin()
    _job(farm, demo_scene, tmp_path / "bundle", 2, TileGrid(columns=2, rows=1))
    (who, node_id), _ = _nodes(farm, 2, 2)
    for _ in range(2):
        lease = farm.try_lease(who, node_id, LeaseRequest(wait=0))
        assert lease is not None
        path = _tile(lease, tmp_path)
        farm.accept_result(who, lease.lease_id, sha256_file(path), iter([path.read_bytes()]))
    sqlite_path = farm.config.db_path
    farm.db.close()
    target = postgres.new_database()

    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "coordinator", "migrate",
         "--from", f"sqlite://{sqlite_path}", "--to", target],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "every count matches" in done.stdout

    tables = ["accounts", "nodes", "jobs", "tasks", "frames", "ledger_txns", "ledger_entries",
              "receipts", "failures", "providers"]  # fmt: skip
    for table in tables:
        before = _table_rows(None, sqlite_path, table)
        after = _table_rows(target, sqlite_path, table)
        assert after == before, table
    assert len(_table_rows(target, sqlite_path, "ledger_txns")) > 2
    moved = open_database(target, sqlite_path)
    try:
        assert ledger.check(moved) == []
        with moved.transaction() as conn:  # the identity counters moved past the copies
            ledger.grant(conn, "artist", 5)
    finally:
        moved.close()

    with pytest.raises(MigrationError, match="already holds a farm"):
        migrate(f"sqlite://{sqlite_path}", target)
    with pytest.raises(MigrationError, match="same database"):
        migrate(target, target)
    usage = subprocess.run(
        [sys.executable, "-m", "app.cli", "coordinator", "migrate", "--to", target],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert usage.returncode != 0
    assert "needs --from URL and --to URL" in usage.stderr + usage.stdout


def test_a_database_url_of_no_known_engine_is_refused_with_the_forms_that_work(
    tmp_path: Path,
) -> None:
    with pytest.raises(DatabaseURLError, match="postgresql://user@host/dbname"):
        open_database("mysql://farm", tmp_path / "x.sqlite")


def test_a_coordinator_given_an_unreachable_database_says_so_without_the_password(
    tmp_path: Path,
) -> None:
    url = f"postgresql://farm:hunter2@/farm?host={tmp_path}"  # no server listens there
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "coordinator", "--port", "0",
         "--data", str(tmp_path / "data"), "--db", url],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "Cannot connect to the PostgreSQL database postgresql://farm:***@" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_sqlite_statements_are_rewritten_for_postgresql() -> None:
    assert to_postgres("UPDATE nodes SET last_seen = MAX(last_seen, ?) WHERE id = ?") == (
        "UPDATE nodes SET last_seen = GREATEST(last_seen, %s) WHERE id = %s"
    )
    assert to_postgres("SELECT MAX(id) FROM t WHERE a = ?") == "SELECT MAX(id) FROM t WHERE a = %s"
    assert to_postgres("INSERT OR IGNORE INTO blocklist (a) VALUES (?)") == (
        "INSERT INTO blocklist (a) VALUES (%s) ON CONFLICT DO NOTHING"
    )
    assert to_postgres("INSERT OR REPLACE INTO previews (task_id, png_sha) VALUES (?, ?)") == (
        "INSERT INTO previews (task_id, png_sha) VALUES (%s, %s) ON CONFLICT (task_id)"
        " DO UPDATE SET png_sha = EXCLUDED.png_sha"
    )
    # quoted text is left alone (but % is doubled for the driver), instr becomes strpos
    assert to_postgres("SELECT instr(a, ?) FROM t WHERE b = 'x?, MAX(1, 2) 5%'") == (
        "SELECT strpos(a, %s) FROM t WHERE b = 'x?, MAX(1, 2) 5%%'"
    )
    with pytest.raises(DialectError, match="PRIMARY_KEYS"):
        to_postgres("INSERT OR REPLACE INTO mystery (a) VALUES (?)")


def _eventually(check: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def test_replicas_hear_each_others_events_work_and_revocations(
    replicas: Callable[[int], list[Farm]], demo_scene: Path, tmp_path: Path
) -> None:
    a, b = replicas(2)
    relays = [PeerRelay(str(getattr(f.db, "url")), f.bus) for f in (a, b)]  # noqa: B009
    for relay in relays:
        relay.start()
    try:
        a.ensure_admin()
        provider = a.create_account("prov", Role.PROVIDER)
        assert b.authenticate(provider.token) is not None  # now known to b's memory
        work_before = b.bus.work_version
        job_id = _job(a, demo_scene, tmp_path / "bundle", 1, TileGrid(columns=2, rows=1))
        _eventually(
            lambda: any(e.job_id == job_id for e in b.bus.since(0)), "b streams a's job event"
        )
        _eventually(lambda: b.bus.work_version > work_before, "a's new work wakes b's polls")
        a.revoke_account(ADMIN, "prov")
        _eventually(lambda: b.accounts.is_revoked("prov"), "b hears of the revocation")
        assert b.authenticate(provider.token) is None
    finally:
        for relay in relays:
            relay.stop()


def test_background_work_is_claimed_by_one_replica_and_taken_over_when_it_dies(
    replicas: Callable[[int], list[Farm]],
) -> None:
    a, b = replicas(2)
    with a.db.claim("sweep") as mine:
        assert mine
        with b.db.claim("sweep") as theirs:
            assert not theirs
        with b.db.claim("frame:j:1") as other:
            assert other  # another name is another claim
    with b.db.claim("sweep") as theirs:
        assert theirs  # released
    hold = a.db.claim("sweep")
    assert hold.__enter__()
    a.db.close()  # the replica dies: its session, and its claim, end
    _eventually(lambda: _claims(b, "sweep"), "b takes the claim over")


def _claims(farm: Farm, name: str) -> bool:
    with farm.db.claim(name) as mine:
        return mine


def test_missing_postgresql_fails_under_ci_and_skips_elsewhere_naming_the_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests import postgres_tools

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install postgresql"):
        postgres_tools._missing("initdb/pg_ctl were not found")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="initdb and pg_ctl"):
        postgres_tools._missing("initdb/pg_ctl were not found")
    monkeypatch.setattr(postgres_tools, "PG_BIN_DIRS", ())
    monkeypatch.setenv("PATH", "")
    with pytest.raises(postgres_tools.MissingPostgresError, match="not found"):
        postgres_tools.start_postgres()

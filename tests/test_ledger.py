"""Credits: the double-entry ledger on a real database, a property test over random
sequences of grants, escrows, payments, rejections, cancellations, crashes and restarts,
and a real coordinator where a priced node is paid and the requester refunded."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import ApiError
from coordinator import ledger
from coordinator.config import CoordinatorConfig
from coordinator.db import Database, open_database
from coordinator.errors import DomainError
from coordinator.http.errors import status_of
from coordinator.planning import frame_assignments, plan_assignments
from coordinator.pricing import denoise_units, estimate_milli, render_units, sample_units
from protocol.models import Role
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.worker import RenderWorker
from tests.farm_tools import (
    RunningCoordinator,
    job_spec,
    make_bundle,
    serve_leases,
    start_coordinator,
    wait_for_job,
)

STAMP = "2026-01-01T00:00:00+00:00"


def _account(db: Database, name: str, role: str = "requester") -> None:
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO accounts (name, role, token_hash, created_at) VALUES (?,?,?,?)",
            (name, role, uuid.uuid4().hex, STAMP),
        )


def _job(db: Database, owner: str, tasks: int, cost: int) -> tuple[str, list[str]]:
    """A job row with `tasks` queued tasks, escrowing `cost` in the same transaction."""
    job_id = uuid.uuid4().hex[:12]
    task_ids = [f"{job_id}-t{i}" for i in range(tasks)]
    with db.transaction() as conn:
        _insert_job(conn, job_id, owner, task_ids)
        ledger.escrow(conn, job_id, owner, cost)
    return job_id, task_ids


def _insert_job(conn: sqlite3.Connection, job_id: str, owner: str, task_ids: list[str]) -> None:
    conn.execute(
        "INSERT INTO jobs (id, owner, name, status, priority, spec, bundle, created_at,"
        " updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
        (job_id, owner, "job", "queued", 50, "{}", "x", STAMP, STAMP),
    )
    conn.executemany(
        "INSERT INTO tasks (id, job_id, kind, frame, tile_index, status, updated_at)"
        " VALUES (?,?,?,?,?,?,?)",
        [(task_id, job_id, "render", 1, i, "queued", STAMP) for i, task_id in enumerate(task_ids)],
    )


def _accept(db: Database, job_id: str, task_id: str, provider: str, amount: int) -> None:
    with db.transaction() as conn:
        conn.execute("UPDATE tasks SET status = 'completed' WHERE id = ?", (task_id,))
        ledger.pay(conn, task_id, job_id, provider, amount, 0.05)


@pytest.fixture()
def db(tmp_path: Path, db_url: str | None) -> Iterator[Database]:
    database = open_database(db_url, tmp_path / "ledger.sqlite")
    _account(database, "alice")
    _account(database, "bob", "provider")
    yield database
    database.close()


def test_grant_escrow_pay_refund(db: Database) -> None:
    with db.transaction() as conn:
        ledger.grant(conn, "alice", 100_000)
    assert ledger.balance(db, "user:alice") == 100_000
    assert ledger.balance(db, "issuance") == -100_000
    job_id, tasks = _job(db, "alice", 2, 30_000)
    assert ledger.balance(db, "user:alice") == 70_000
    assert ledger.escrow_held(db, "alice") == 30_000
    _accept(db, job_id, tasks[0], "bob", 10_000)
    _accept(db, job_id, tasks[0], "bob", 10_000)  # paying the same task twice is a no-op
    assert ledger.balance(db, "user:bob") == 9_500
    assert ledger.balance(db, "fee") == 500
    assert ledger.balance(db, ledger.escrow_account(job_id)) == 20_000
    with db.transaction() as conn:
        conn.execute("UPDATE jobs SET status = 'completed' WHERE id = ?", (job_id,))
        assert ledger.refund(conn, job_id, "alice") == 20_000
        assert ledger.refund(conn, job_id, "alice") == 0
    assert ledger.balance(db, "user:alice") == 90_000
    assert ledger.escrow_held(db, "alice") == 0
    assert ledger.check(db) == []
    kinds = [entry.kind for entry in ledger.history(db, "user:alice")]
    assert kinds == ["refund", "escrow", "grant"]


def test_escrow_is_refused_with_the_numbers_and_nothing_is_written(db: Database) -> None:
    with db.transaction() as conn:
        ledger.grant(conn, "alice", 5_000)
    with pytest.raises(DomainError) as refused:
        _job(db, "alice", 1, 12_500)
    assert status_of(refused.value) == 402
    assert "12.5 credits" in refused.value.message and "is 5." in refused.value.message
    assert db.fetch_one("SELECT COUNT(*) AS n FROM jobs")["n"] == 0
    assert ledger.balance(db, "user:alice") == 5_000
    assert ledger.check(db) == []


def test_check_finds_broken_entries(db: Database) -> None:
    with db.transaction() as conn:
        ledger.grant(conn, "alice", 10_000)
    job_id, tasks = _job(db, "alice", 1, 4_000)
    with db.transaction() as conn:
        ledger.pay(conn, tasks[0], job_id, "bob", 1_000, 0.05)  # task not completed
        conn.execute(
            "INSERT INTO ledger_entries (txn, account, amount) VALUES (?,?,?)",
            (f"escrow:{job_id}", "user:alice", -20_000),
        )
        conn.execute("UPDATE jobs SET status = 'canceled' WHERE id = ?", (job_id,))
    problems = ledger.check(db)
    text = "\n".join(problems)
    assert f"transaction escrow:{job_id} is unbalanced" in text
    assert "account user:alice is negative" in text
    assert f"task {tasks[0]} was paid but is queued" in text
    assert f"job {job_id} is canceled but" in text
    assert "issuance is" in text


def test_a_true_up_is_paid_once_from_escrow_and_a_top_up_is_held_once(db: Database) -> None:
    with db.transaction() as conn:
        ledger.grant(conn, "alice", 10_000)
    job_id, tasks = _job(db, "alice", 2, 2_000)
    _accept(db, job_id, tasks[0], "bob", 1_000)
    with db.transaction() as conn:
        assert ledger.topup(conn, job_id, "alice", 3_000, 1)
        assert not ledger.topup(conn, job_id, "alice", 3_000, 1)  # the same step: a no-op
        assert not ledger.topup(conn, job_id, "alice", 1_000_000, 2)  # unaffordable
        assert ledger.escrowed_in(conn, job_id) == 5_000
        assert ledger.adjust(conn, tasks[0], job_id, "bob", 2_000, 0.05) == 1_900
        assert ledger.adjust(conn, tasks[0], job_id, "bob", 2_000, 0.05) == 0  # once
        assert ledger.paid_for_task(conn, tasks[0]) == 3_000
    assert ledger.job_credits(db, job_id) == (5_000, 3_000)
    assert ledger.check(db) == []
    with db.transaction() as conn:  # a true-up of a task never paid, nor completed
        ledger.adjust(conn, tasks[1], job_id, "bob", 500, 0.05)
    text = "\n".join(ledger.check(db))
    assert f"task {tasks[1]} was trued up but never paid" in text
    assert f"task {tasks[1]} was paid but is queued" in text


# --- property: random operation sequences keep every invariant ---------------------------------

USERS = ("alice", "bob", "carol")
operation = st.one_of(
    st.tuples(st.just("grant"), st.sampled_from(USERS), st.integers(1, 50_000)),
    st.tuples(st.just("submit"), st.sampled_from(USERS), st.integers(1, 4), st.integers(0, 30_000)),
    st.tuples(
        st.just("accept"), st.integers(0, 20), st.sampled_from(USERS), st.integers(0, 15_000)
    ),
    st.tuples(st.just("reject"), st.integers(0, 20)),
    st.tuples(st.just("cancel"), st.integers(0, 20)),
    st.tuples(st.just("crash"), st.integers(0, 20), st.sampled_from(USERS)),
    st.tuples(st.just("restart")),
)


def _pick(db: Database, index: int) -> tuple[str, str] | None:
    """The index-th open task of a running job, as (job_id, task_id)."""
    rows = db.query(
        "SELECT t.job_id, t.id FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE"
        " t.status IN ('queued', 'soft_failed') AND j.status IN ('queued', 'active')"
        " ORDER BY t.id"
    )
    if not rows:
        return None
    row = rows[index % len(rows)]
    return row[0], row[1]


def _finish_if_done(conn: sqlite3.Connection, job_id: str) -> None:
    left = conn.execute(
        "SELECT COUNT(*) FROM tasks WHERE job_id = ? AND status != 'completed'", (job_id,)
    ).fetchone()[0]
    if left == 0:
        conn.execute("UPDATE jobs SET status = 'completed' WHERE id = ?", (job_id,))
        ledger.settle(conn, job_id)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(operation, max_size=40))
def test_random_operations_keep_the_ledger_sound(
    tmp_path: Path, db_engine: str, request: pytest.FixtureRequest, ops: list[tuple[Any, ...]]
) -> None:
    path = tmp_path / f"{uuid.uuid4().hex}.sqlite"
    url = None if db_engine == "sqlite" else request.getfixturevalue("postgres").new_database()
    db = open_database(url, path)
    for name in USERS:
        _account(db, name)
    paid: set[str] = set()
    try:
        for op in ops:
            kind = op[0]
            if kind == "grant":
                with db.transaction() as conn:
                    ledger.grant(conn, op[1], op[2])
            elif kind == "submit":
                try:
                    _job(db, op[1], op[2], op[3])
                except DomainError as exc:
                    assert status_of(exc) == 402
            elif kind == "accept":
                picked = _pick(db, op[1])
                if picked is not None:
                    job_id, task_id = picked
                    with db.transaction() as conn:
                        conn.execute(
                            "UPDATE tasks SET status = 'completed' WHERE id = ?", (task_id,)
                        )
                        ledger.pay(conn, task_id, job_id, op[2], op[3], 0.05)
                        ledger.pay(conn, task_id, job_id, op[2], op[3], 0.05)  # a retry
                        _finish_if_done(conn, job_id)
                    paid.add(task_id)
            elif kind == "reject":
                picked = _pick(db, op[1])
                if picked is not None:
                    with db.transaction() as conn:
                        conn.execute(
                            "UPDATE tasks SET status = 'soft_failed' WHERE id = ?", (picked[1],)
                        )
            elif kind == "cancel":
                picked = _pick(db, op[1])
                if picked is not None:
                    with db.transaction() as conn:
                        conn.execute(
                            "UPDATE tasks SET status = 'canceled' WHERE job_id = ? AND"
                            " status != 'completed'",
                            (picked[0],),
                        )
                        conn.execute(
                            "UPDATE jobs SET status = 'canceled' WHERE id = ?", (picked[0],)
                        )
                        ledger.settle(conn, picked[0])
            elif kind == "crash":
                # A crash after the payment, before the commit: nothing of it may remain.
                picked = _pick(db, op[1])
                if picked is not None:
                    with pytest.raises(RuntimeError), db.transaction() as conn:
                        conn.execute(
                            "UPDATE tasks SET status = 'completed' WHERE id = ?", (picked[1],)
                        )
                        ledger.pay(conn, picked[1], picked[0], op[2], 1_000, 0.05)
                        raise RuntimeError("crash")
            else:
                db.close()
                db = open_database(url, path)
            assert ledger.check(db) == []
        balances = db.query("SELECT account, SUM(amount) FROM ledger_entries GROUP BY account")
        assert sum(row[1] for row in balances) == 0
        assert all(row[1] >= 0 for row in balances if row[0] != "issuance")
        payments = db.query("SELECT task_id FROM ledger_txns WHERE kind = 'pay'")
        assert {row[0] for row in payments} <= paid
        assert len(payments) == len({row[0] for row in payments})
    finally:
        db.close()


# --- a real coordinator: a priced node is paid, the requester refunded -----------------------


@pytest.fixture()
def coordinator(tmp_path: Path, db_url: str | None) -> Iterator[RunningCoordinator]:
    running = start_coordinator(
        tmp_path / "coordinator", "--lease-seconds", "4", "--heartbeat-interval", "1",
        *(["--db", db_url] if db_url else []),
    )  # fmt: skip
    yield running
    running.stop()


@pytest.fixture(scope="module")
def demo_info(worker: RenderWorker, demo_scene: Path) -> SceneInfo:
    return inspect_scene(worker, demo_scene)


def test_a_priced_job_pays_its_provider_and_refunds_the_rest(
    coordinator: RunningCoordinator,
    demo_info: SceneInfo,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
) -> None:
    with coordinator.client(coordinator.admin_token) as admin:
        alice = admin.create_account("alice", Role.REQUESTER).token
        bob = admin.create_account("bob", Role.PROVIDER).token
        assert admin.grant("alice", 100).balance == 100
    path, sha = make_bundle(demo_scene, tmp_path / "bundle")
    spec = job_spec(demo_info, sha, frames="1", tiles=(2, 1), max_price=1, max_credits=100)
    with coordinator.client(alice) as client:
        client.upload_bundle(path)
        job = client.submit_job(spec)
        tasks = client.tasks(job.id)
        wallet = client.wallet()
        assert wallet.escrow > 0 and wallet.balance == pytest.approx(100 - wallet.escrow)
        escrowed = wallet.escrow
        with coordinator.client(bob) as provider:
            pricey = serve_leases(
                provider, worker, demo_scene, tmp_path, until_idle=1, name="pricey", price=2
            )
            assert pricey == 0, "a node dearer than the job's max_price gets no task"
            assert "the cheapest connected node" in client.job(job.id).message
            cheap = serve_leases(provider, worker, demo_scene, tmp_path, until_idle=2, price=1)
            assert cheap == len(tasks) + 1  # and the denoise task of the tiled frame
            assert wait_for_job(client, job.id) == "completed"
            earned = provider.wallet().balance
        after = client.wallet()
        bill = client.job(job.id)
    assert spec.wants_denoise
    # The bill follows the measured scene cost, not the declared one (docs/billing.md).
    measured = bill.measured_scene_cost
    assert measured is not None
    plan_units = [
        render_units(spec, a, measured) for _, a in frame_assignments(spec, spec.frames.start)
    ]
    plan_units.append(denoise_units(spec))
    expected_milli = sum(ledger.cost_milli(units, 1) for units in plan_units)
    fee_milli = sum(int(ledger.cost_milli(units, 1) * 0.05) for units in plan_units)
    config = CoordinatorConfig(data_dir=tmp_path)
    assignments = [a for _, a in plan_assignments(spec)]
    assert escrowed == pytest.approx(estimate_milli(spec, config) / 1000)
    assert bill.cost.estimate == pytest.approx(escrowed)
    # The estimate covers each tile and one duplicate sample of it at the max price.
    declared = [render_units(spec, a) for _, a in frame_assignments(spec, spec.frames.start)]
    declared.append(denoise_units(spec))
    allowance = sum(sample_units(spec, a, config) for a in assignments)
    assert escrowed == pytest.approx(
        (sum(ledger.cost_milli(u, 1, round_up=True) for u in declared) + 1000 * allowance) / 1000,
        abs=0.003,
    )
    # Paid at least the measured price; a provisional payment above it is kept (a floor).
    assert (expected_milli - fee_milli) / 1000 - 0.003 <= earned <= 1.25 * expected_milli / 1000
    assert bill.cost.final == pytest.approx(bill.credits_spent)
    assert earned == pytest.approx(bill.credits_spent * 0.95, abs=0.003)
    assert after.escrow == 0
    assert after.balance == pytest.approx(100 - bill.credits_spent)
    with coordinator.client(coordinator.admin_token) as admin:
        check = admin.ledger_check()
        assert check.ok, check.problems


def test_an_unaffordable_job_gets_402_with_the_numbers_and_nothing_is_created(
    coordinator: RunningCoordinator, demo_info: SceneInfo, demo_scene: Path, tmp_path: Path
) -> None:
    with coordinator.client(coordinator.admin_token) as admin:
        alice = admin.create_account("alice", Role.REQUESTER).token
        admin.grant("alice", 0.01)
        carol = admin.create_account("carol", Role.PROVIDER).token
    path, sha = make_bundle(demo_scene, tmp_path / "bundle")
    spec = job_spec(demo_info, sha, frames="1", tiles=(1, 1), max_price=1000)
    headers = {"Authorization": f"Bearer {alice}", "Content-Type": "application/json"}
    with coordinator.client(alice) as client:
        client.upload_bundle(path)
        refused = requests.post(
            f"{coordinator.url}/api/v1/jobs",
            data=spec.model_dump_json(),
            headers=headers,
            timeout=30,
        )
        assert refused.status_code == 402, refused.text
        detail = refused.json()["detail"]
        assert "may cost up to" in detail and "your balance is 0.01" in detail
        assert client.jobs() == []
        assert client.wallet().balance == pytest.approx(0.01)
        capped = requests.post(
            f"{coordinator.url}/api/v1/jobs",
            data=spec.model_copy(update={"max_price": 1, "max_credits": 0.001}).model_dump_json(),
            headers=headers,
            timeout=30,
        )
        assert capped.status_code == 422 and "max_credits of 0.001" in capped.json()["detail"]
    with coordinator.client(carol) as provider:
        assert provider.wallet().balance == 0
        forbidden = requests.post(
            f"{coordinator.url}/api/v1/accounts/carol/grant",
            json={"amount": 5},
            headers={"Authorization": f"Bearer {carol}"},
            timeout=30,
        )
        assert forbidden.status_code == 403
    with coordinator.client(coordinator.admin_token) as admin:
        with pytest.raises(ApiError) as unknown:
            admin.grant("nobody", 5)
        assert unknown.value.status == 404


def test_ledger_check_cli_exits_1_on_a_broken_ledger(
    coordinator: RunningCoordinator, db_url: str | None
) -> None:
    from tests.test_farm_cli import tessera

    url, admin = coordinator.url, coordinator.admin_token
    assert tessera("ledger", "check", url=url, token=admin).returncode == 0
    database = open_database(db_url, coordinator.data_dir / "coordinator.sqlite")
    with closing(database), database.transaction() as conn:
        conn.execute(
            "INSERT INTO ledger_txns (id, kind, memo, at) VALUES ('bad', 'grant', '', ?)",
            (STAMP,),
        )
        conn.execute("INSERT INTO ledger_entries (txn, account, amount) VALUES ('bad', 'x', 7)")
    broken = tessera("ledger", "check", url=url, token=admin)
    assert broken.returncode == 1
    assert "transaction bad is unbalanced by 7 milli" in broken.stdout

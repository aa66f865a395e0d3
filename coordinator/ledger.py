"""Credits: a double-entry ledger in the coordinator's SQLite database.

Amounts are integers in milli-credits (1 credit = 1000), so sums never drift. Accounts
are strings: `user:<name>`, `escrow:<job_id>`, `fee` (the coordinator's cut) and
`issuance`, the only account that may go negative: admin grants come from it, so the
total of all balances is always zero. Every transaction's entries sum to zero.

The moving functions (`grant`, `escrow`, `pay`, `refund`) take an open connection inside
the caller's transaction, so a ledger move commits together with the state change it pays
for. `pay`, `adjust` and `refund` use deterministic transaction ids (`pay:<task_id>`,
`adjust:<task_id>`, `refund:<job_id>`), so a task is paid at most once, trued up to the
measured bill at most once (docs/billing.md), and a job refunded at most once. `topup`
adds to a job's escrow when the measured bill is higher than the estimate.
`check` proves the invariants.
"""

from __future__ import annotations

import math
import sqlite3
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from coordinator.db import Database
from coordinator.errors import InsufficientCreditsError, InvalidRequestError

MILLI = 1000
ISSUANCE = "issuance"
FEE = "fee"
FINISHED_JOB_STATUSES = ("completed", "failed", "canceled")


def user(name: str) -> str:
    return f"user:{name}"


def escrow_account(job_id: str) -> str:
    return f"escrow:{job_id}"


def to_milli(credits: float) -> int:
    """Credits to milli-credits, rounded to the nearest milli-credit."""
    return round(credits * MILLI)


def credits(milli: int) -> float:
    return milli / MILLI


def cost_milli(units: float, price: float, *, round_up: bool = False) -> int:
    """What `units` work units cost at `price` credits each, in milli-credits.

    Estimates round up and payments round down, so the payments of a job never exceed
    its escrow.
    """
    exact = units * price * MILLI
    return math.ceil(exact - 1e-9) if round_up else math.floor(exact + 1e-9)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    txn: str
    kind: str
    amount: int
    job_id: str | None
    task_id: str | None
    memo: str
    at: str


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _post(
    conn: sqlite3.Connection,
    txn_id: str,
    kind: str,
    entries: list[tuple[str, int]],
    *,
    job_id: str | None = None,
    task_id: str | None = None,
    memo: str = "",
) -> bool:
    """Record one balanced transaction; False (and nothing written) if the id exists."""
    if sum(amount for _, amount in entries) != 0:
        raise ValueError(f"unbalanced transaction {txn_id}: {entries}")
    inserted = conn.execute(
        "INSERT OR IGNORE INTO ledger_txns (id, kind, job_id, task_id, memo, at)"
        " VALUES (?,?,?,?,?,?)",
        (txn_id, kind, job_id, task_id, memo, _now()),
    ).rowcount
    if not inserted:
        return False
    conn.executemany(
        "INSERT INTO ledger_entries (txn, account, amount) VALUES (?,?,?)",
        [(txn_id, account, amount) for account, amount in entries if amount != 0],
    )
    return True


def _balance(conn: sqlite3.Connection, account: str) -> int:
    row = conn.execute(
        "SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE account = ?", (account,)
    ).fetchone()
    return int(row[0])


def grant(conn: sqlite3.Connection, account_name: str, amount: int, memo: str = "") -> str:
    """Issue `amount` milli-credits to the user `account_name`; returns the txn id."""
    if amount <= 0:
        raise InvalidRequestError("A grant must be a positive amount.")
    txn_id = f"grant:{uuid.uuid4().hex[:16]}"
    _post(
        conn,
        txn_id,
        "grant",
        [(ISSUANCE, -amount), (user(account_name), amount)],
        memo=memo or f"grant to {account_name}",
    )
    return txn_id


def escrow(conn: sqlite3.Connection, job_id: str, owner: str, amount: int) -> None:
    """Hold `amount` from the owner for the job; 402 if the owner cannot afford it."""
    if amount <= 0:
        return
    refusal = unaffordable(amount, _balance(conn, user(owner)))
    if refusal is not None:
        raise refusal
    _post(
        conn,
        f"escrow:{job_id}",
        "escrow",
        [(user(owner), -amount), (escrow_account(job_id), amount)],
        job_id=job_id,
        memo=f"escrow for job {job_id}",
    )


def unaffordable(amount: int, have: int) -> InsufficientCreditsError | None:
    """The refusal of a job whose escrow of `amount` exceeds the balance `have`."""
    if amount <= 0 or have >= amount:
        return None
    return InsufficientCreditsError(
        f"This job may cost up to {credits(amount):g} credits; your balance is {credits(have):g}.",
        hint="Ask an admin for credits (`tessera grant`), lower --max-price, or render less.",
    )


def job_credits(db: Database, job_id: str) -> tuple[int, int]:
    """(escrowed, paid out) milli-credits of a job: what its escrow received (top-ups
    included) and what left it as payments for tasks and their true-ups (refunds are
    neither)."""
    row = db.fetch_one(
        "SELECT COALESCE(SUM(CASE WHEN t.kind = 'escrow' AND e.amount > 0 THEN e.amount END), 0)"
        " AS escrowed, COALESCE(SUM(CASE WHEN t.kind IN ('pay', 'adjust') THEN -e.amount END),"
        " 0) AS paid"
        " FROM ledger_entries e JOIN ledger_txns t ON t.id = e.txn WHERE e.account = ?",
        (escrow_account(job_id),),
    )
    return int(row["escrowed"]), int(row["paid"])


def pay(
    conn: sqlite3.Connection,
    task_id: str,
    job_id: str,
    provider_owner: str,
    amount: int,
    fee_rate: float,
) -> int:
    """Pay a task's provider from the job's escrow, less the fee; at most once per task.

    The payment is capped at what is left in escrow. Returns what the provider received
    (milli-credits), 0 when nothing was written (already paid, or nothing to pay).
    """
    memo = f"task {task_id}"
    return _from_escrow(conn, "pay", task_id, job_id, provider_owner, amount, fee_rate, memo)


def adjust(
    conn: sqlite3.Connection,
    task_id: str,
    job_id: str,
    provider_owner: str,
    amount: int,
    fee_rate: float,
) -> int:
    """True a paid task up to its measured price: pay `amount` more from the job's escrow
    (capped at what it holds), less the fee, at most once per task. Returns what the
    provider received, 0 when nothing was written."""
    memo = f"task {task_id}: measured price"
    return _from_escrow(conn, "adjust", task_id, job_id, provider_owner, amount, fee_rate, memo)


def _from_escrow(
    conn: sqlite3.Connection,
    kind: str,
    task_id: str,
    job_id: str,
    provider_owner: str,
    amount: int,
    fee_rate: float,
    memo: str,
) -> int:
    """Move `amount` (capped at what the job's escrow holds) to the provider, less the
    fee, as the one `kind:task_id` transaction; what the provider received (0: nothing
    written, already posted or nothing to move)."""
    held = _balance(conn, escrow_account(job_id))
    amount = min(amount, held)
    if amount <= 0:
        return 0
    fee = math.floor(amount * fee_rate + 1e-9)
    posted = _post(
        conn,
        f"{kind}:{task_id}",
        kind,
        [(escrow_account(job_id), -amount), (user(provider_owner), amount - fee), (FEE, fee)],
        job_id=job_id,
        task_id=task_id,
        memo=memo,
    )
    return amount - fee if posted else 0


def topup(conn: sqlite3.Connection, job_id: str, owner: str, amount: int, step: int) -> bool:
    """Add `amount` from the owner to the job's escrow (the `step`th top-up, so each is
    written once); False if it was written before, or the owner cannot afford it."""
    if amount <= 0 or _balance(conn, user(owner)) < amount:
        return False
    return _post(
        conn,
        f"escrow:{job_id}:topup{step}",
        "escrow",
        [(user(owner), -amount), (escrow_account(job_id), amount)],
        job_id=job_id,
        memo=f"escrow top-up for job {job_id}: measured work costs more than estimated",
    )


def paid_for_task(conn: sqlite3.Connection, task_id: str) -> int:
    """Milli-credits that left escrow for the task (its payment and true-up)."""
    row = conn.execute(
        "SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE txn IN (?, ?) AND amount < 0",
        (f"pay:{task_id}", f"adjust:{task_id}"),
    ).fetchone()
    return -int(row[0])


def refund(conn: sqlite3.Connection, job_id: str, owner: str) -> int:
    """Return what is left in the job's escrow to its owner, once; the amount refunded."""
    held = _balance(conn, escrow_account(job_id))
    if held <= 0:
        return 0
    done = _post(
        conn,
        f"refund:{job_id}",
        "refund",
        [(escrow_account(job_id), -held), (user(owner), held)],
        job_id=job_id,
        memo=f"leftover of job {job_id}",
    )
    return held if done else 0


def balance_in(conn: sqlite3.Connection, account: str) -> int:
    """An account's balance, read inside the caller's transaction."""
    return _balance(conn, account)


def escrowed_in(conn: sqlite3.Connection, job_id: str) -> int:
    """What the job's escrow received: its estimate and every top-up."""
    row = conn.execute(
        "SELECT COALESCE(SUM(e.amount), 0) FROM ledger_entries e JOIN ledger_txns t ON"
        " t.id = e.txn WHERE e.account = ? AND t.kind = 'escrow' AND e.amount > 0",
        (escrow_account(job_id),),
    ).fetchone()
    return int(row[0])


def topups_in(conn: sqlite3.Connection, job_id: str) -> int:
    """How many top-ups the job's escrow received."""
    row = conn.execute(
        "SELECT COUNT(*) FROM ledger_txns WHERE kind = 'escrow' AND job_id = ? AND id != ?",
        (job_id, f"escrow:{job_id}"),
    ).fetchone()
    return int(row[0])


def balance(db: Database, account: str) -> int:
    with db.lock:
        return _balance(db.conn, account)


def escrow_held(db: Database, owner: str) -> int:
    """Escrow still held for the owner's unfinished jobs, in milli-credits."""
    row = db.fetch_one(
        "SELECT COALESCE(SUM(e.amount), 0) AS held FROM ledger_entries e JOIN jobs j ON"
        " e.account = 'escrow:' || j.id WHERE j.owner = ?",
        (owner,),
    )
    return int(row["held"])


def history(db: Database, account: str, limit: int = 100) -> list[HistoryEntry]:
    """The account's latest entries, newest first."""
    rows = db.query(
        "SELECT t.id, t.kind, e.amount, t.job_id, t.task_id, t.memo, t.at FROM ledger_entries e"
        " JOIN ledger_txns t ON t.id = e.txn WHERE e.account = ? ORDER BY e.id DESC LIMIT ?",
        (account, limit),
    )
    return [
        HistoryEntry(
            txn=r["id"],
            kind=r["kind"],
            amount=int(r["amount"]),
            job_id=r["job_id"],
            task_id=r["task_id"],
            memo=r["memo"],
            at=r["at"],
        )
        for r in rows
    ]


def check(db: Database) -> list[str]:
    """Every broken invariant of the ledger, as sentences; empty when all hold."""
    problems: list[str] = []
    with db.lock:
        for row in db.query(
            "SELECT t.id, COALESCE(SUM(e.amount), 0) AS total FROM ledger_txns t"
            " LEFT JOIN ledger_entries e ON e.txn = t.id GROUP BY t.id"
            " HAVING COALESCE(SUM(e.amount), 0) != 0"
        ):
            problems.append(f"transaction {row['id']} is unbalanced by {row['total']} milli")
        for row in db.query(
            "SELECT e.txn FROM ledger_entries e LEFT JOIN ledger_txns t ON t.id = e.txn"
            " WHERE t.id IS NULL GROUP BY e.txn"
        ):
            problems.append(f"entries refer to a missing transaction {row['txn']}")
        balances = {
            r["account"]: int(r["total"])
            for r in db.query(
                "SELECT account, SUM(amount) AS total FROM ledger_entries GROUP BY account"
            )
        }
        for account, amount in sorted(balances.items()):
            if account != ISSUANCE and amount < 0:
                problems.append(f"account {account} is negative: {amount} milli")
        others = sum(amount for account, amount in balances.items() if account != ISSUANCE)
        if balances.get(ISSUANCE, 0) != -others:
            problems.append(
                f"issuance is {balances.get(ISSUANCE, 0)} milli but the other accounts hold"
                f" {others} milli"
            )
        for row in db.query(
            "SELECT t.task_id, k.status FROM ledger_txns t LEFT JOIN tasks k ON k.id = t.task_id"
            " WHERE t.kind IN ('pay', 'adjust') AND (k.status IS NULL OR k.status != 'completed')"
        ):
            problems.append(f"task {row['task_id']} was paid but is {row['status'] or 'missing'}")
        for row in db.query(
            "SELECT task_id, COUNT(*) AS n FROM ledger_txns WHERE kind = 'pay'"
            " GROUP BY task_id HAVING COUNT(*) > 1"
        ):
            problems.append(f"task {row['task_id']} was paid {row['n']} times")
        for row in db.query(
            "SELECT a.task_id FROM ledger_txns a LEFT JOIN ledger_txns p ON p.kind = 'pay'"
            " AND p.task_id = a.task_id WHERE a.kind = 'adjust' AND p.id IS NULL"
        ):
            problems.append(f"task {row['task_id']} was trued up but never paid")
        for row in db.query(
            "SELECT task_id, COUNT(*) AS n FROM ledger_txns WHERE kind = 'adjust'"
            " GROUP BY task_id HAVING COUNT(*) > 1"
        ):
            problems.append(f"task {row['task_id']} was trued up {row['n']} times")
        for row in db.query(
            "SELECT j.id, j.status, SUM(e.amount) AS held FROM jobs j JOIN ledger_entries e"
            " ON e.account = 'escrow:' || j.id WHERE j.status IN (?, ?, ?) GROUP BY j.id"
            " HAVING SUM(e.amount) != 0",
            FINISHED_JOB_STATUSES,
        ):
            problems.append(
                f"job {row['id']} is {row['status']} but {row['held']} milli are still in escrow"
            )
    return problems


def settle(conn: sqlite3.Connection, job_id: str) -> int:
    """Refund a finished job's leftover escrow to its owner (looked up); the amount."""
    row = conn.execute("SELECT owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        return 0
    return refund(conn, job_id, row["owner"])

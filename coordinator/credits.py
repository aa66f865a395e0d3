"""Credits as the farm uses them: admin grants, wallets, the ledger check, paying a
node's owner for an accepted task, and settling a finished job's bill. The bookkeeping
itself is `coordinator.ledger`; what a task is worth is `coordinator.billing`."""

from __future__ import annotations

import math
import sqlite3
from datetime import datetime

from coordinator import billing, ledger
from coordinator.accounts import Accounts, Principal
from coordinator.core import Core, node_caps
from coordinator.errors import InvalidRequestError, NotAllowedError, NotFoundError
from protocol.accounts import (
    LedgerCheck,
    LedgerEntry,
    Wallet,
)
from protocol.models import (
    Role,
)

__all__ = ["MAX_GRANT_CREDITS", "Credits"]

#: The ledger counts integer milli-credits in SQLite (64-bit): keep grants far below that.
MAX_GRANT_CREDITS = 1e12


class Credits:
    def __init__(self, core: Core, accounts: Accounts) -> None:
        self.core = core
        self.accounts = accounts

    def grant(self, who: Principal, name: str, amount: float) -> Wallet:
        if who.role is not Role.ADMIN:
            raise NotAllowedError("Only an admin can grant credits.")
        if not math.isfinite(amount) or amount > MAX_GRANT_CREDITS:
            # found by the fuzzer: 1e300 or Infinity overflowed the ledger's integers (500)
            raise InvalidRequestError(f"A grant is at most {MAX_GRANT_CREDITS:g} credits.")
        if not self.accounts.exists(name):
            raise NotFoundError(f"No account named '{name}'.", hint="Create the account first.")
        milli = ledger.to_milli(amount)
        if milli <= 0:
            raise InvalidRequestError("A grant must be at least 0.001 credits.")
        with self.core.db.transaction() as conn:
            ledger.grant(conn, name, milli, memo=f"granted by {who.account}")
        return self.wallet(Principal(account=name, role=who.role))

    def wallet(self, who: Principal) -> Wallet:
        db = self.core.db
        account = ledger.user(who.account)
        return Wallet(
            account=who.account,
            balance=ledger.credits(ledger.balance(db, account)),
            escrow=ledger.credits(ledger.escrow_held(db, who.account)),
            history=[
                LedgerEntry(
                    txn=h.txn,
                    kind=h.kind,
                    amount=ledger.credits(h.amount),
                    job_id=h.job_id,
                    task_id=h.task_id,
                    memo=h.memo,
                    at=datetime.fromisoformat(h.at),
                )
                for h in ledger.history(db, account, 100)
            ],
        )

    def check(self, who: Principal) -> LedgerCheck:
        if who.role is not Role.ADMIN:
            raise NotAllowedError("Only an admin can check the ledger.")
        problems = ledger.check(self.core.db)
        return LedgerCheck(ok=not problems, problems=problems)

    def pay_task(self, conn: sqlite3.Connection, row: sqlite3.Row) -> None:
        """Pay the node's owner for an accepted task, inside the accepting transaction, at
        the job's provisional scene cost (`coordinator.billing`)."""
        node = conn.execute(
            "SELECT owner, capabilities FROM nodes WHERE id = ?", (row["node_id"],)
        ).fetchone()
        if node is None:
            return
        spec = self.core.spec_in(conn, row["job_id"])
        caps = node_caps(node["capabilities"])
        if min(caps.price, spec.max_price) <= 0:
            return
        owner = conn.execute("SELECT owner FROM jobs WHERE id = ?", (row["job_id"],)).fetchone()
        scene_cost = billing.provisional_scene_cost(conn, spec, row["job_id"], owner["owner"])
        amount = billing.task_amount(spec, row, caps, scene_cost)
        paid = ledger.pay(
            conn, row["id"], row["job_id"], node["owner"], amount, self.core.config.fee_rate
        )
        conn.execute(
            "UPDATE nodes SET earned_milli = earned_milli + ? WHERE id = ?", (paid, row["node_id"])
        )

    def settle(self, conn: sqlite3.Connection, job_id: str) -> int:
        """A finished job's bill: true every accepted task up to the measured scene cost,
        then refund what is left in escrow to the owner; the amount refunded."""
        row = conn.execute("SELECT owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return 0
        spec = self.core.spec_in(conn, job_id)
        billing.true_up(conn, self.core.config, spec, job_id, row["owner"])
        return ledger.settle(conn, job_id)

    def steer_budgets(self) -> list[tuple[str, str]]:
        """Top up the escrow of running priced jobs whose measured work costs more than
        held; the (job, reason) of those that must pause instead (the sweeper pauses them)."""
        pauses: list[tuple[str, str]] = []
        jobs = self.core.db.query(
            "SELECT id, owner, spec FROM jobs WHERE status IN ('queued', 'active')"
        )
        for job in jobs:
            spec = self.core.readable_spec(job["id"], job["spec"])
            if spec is None or spec.max_price <= 0:
                continue
            with self.core.db.transaction() as conn:
                verdict = billing.budget(conn, self.core.config, spec, job["id"], job["owner"])
            if verdict.pause:
                pauses.append((job["id"], verdict.pause))
        return pauses

"""Provider standing in the database: confirmed and rejected results per account, and
suspension (set when rejections pile up, lifted by an admin). What the numbers mean is
`coordinator.verify.policy`."""

from __future__ import annotations

import sqlite3

from coordinator.accounts import Principal
from coordinator.core import Core
from coordinator.errors import NotAllowedError, NotFoundError
from coordinator.verify.policy import ProviderRecord, suspension_reason
from protocol.models import Role

__all__ = ["Reputation"]


class Reputation:
    def __init__(self, core: Core) -> None:
        self.core = core

    @staticmethod
    def record(conn: sqlite3.Connection, account: str) -> ProviderRecord:
        row = conn.execute(
            "SELECT verified, rejected FROM providers WHERE account = ?", (account,)
        ).fetchone()
        return ProviderRecord() if row is None else ProviderRecord(row[0], row[1])

    def count(
        self, conn: sqlite3.Connection, account: str, *, verified: int = 0, rejected: int = 0
    ) -> None:
        """Count confirmed or rejected results; suspend a provider rejected too often."""
        conn.execute(
            "INSERT INTO providers (account, verified, rejected) VALUES (?,?,?) ON CONFLICT"
            " (account) DO UPDATE SET verified = providers.verified + excluded.verified,"
            " rejected = providers.rejected + excluded.rejected",
            (account, verified, rejected),
        )
        policy = self.core.config.verification
        reason = suspension_reason(self.record(conn, account), policy)
        if reason is not None:
            changed = conn.execute(
                "UPDATE providers SET suspended = ? WHERE account = ? AND suspended IS NULL",
                (reason, account),
            ).rowcount
            if changed:
                self.core.bus.publish("node", node=account, status="suspended")

    def suspended(self, account: str) -> str | None:
        """Why the provider may not lease work, or None."""
        row = self.core.db.query_one(
            "SELECT suspended FROM providers WHERE account = ? AND suspended IS NOT NULL",
            (account,),
        )
        return None if row is None else str(row[0])

    def reinstate(self, who: Principal, account: str) -> None:
        """Lift a provider's suspension (admin); its next rejection suspends it again."""
        if who.role is not Role.ADMIN:
            raise NotAllowedError("Only an admin can lift a suspension.")
        with self.core.db.transaction() as conn:
            changed = conn.execute(
                "UPDATE providers SET suspended = NULL WHERE account = ? AND suspended IS NOT NULL",
                (account,),
            ).rowcount
        if not changed:
            raise NotFoundError(
                f"The provider account '{account}' is not suspended.",
                hint="`tessera nodes` shows which providers are suspended.",
            )
        self.core.bus.publish("node", node=account, status="reinstated")

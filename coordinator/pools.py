"""Pools: a studio's own machines for its confidential shots.

A pool is a name owned by the account that created it. Its owner (or an admin) adds
accounts to it: a provider account added to a pool may have its nodes serve the pool
(`tessera node --pool NAME`), a requester account added to it may submit jobs to it
(`--pool NAME`); the owner may do both. A job in a pool is leased only to nodes of the
pool's accounts that claim the pool; a job without a pool runs on any node.

A node's claim is checked against membership on every lease (`granted`), so removing
an account from a pool takes effect on its next request. This room owns the `pools`
and `pool_members` tables and nothing else.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime

from coordinator.accounts import Principal
from coordinator.core import Core
from coordinator.db import now_iso
from coordinator.errors import ConflictError, NotAllowedError, NotFoundError
from protocol.models import Role
from protocol.requirements import PoolInfo

__all__ = ["Pools", "granted"]


def granted(conn: sqlite3.Connection, account: str) -> frozenset[str]:
    """The pools `account` owns or was added to."""
    rows = conn.execute(
        "SELECT name FROM pools WHERE owner = ? UNION SELECT pool FROM pool_members"
        " WHERE account = ?",
        (account, account),
    ).fetchall()
    return frozenset(row[0] for row in rows)


class Pools:
    def __init__(self, core: Core) -> None:
        self.core = core

    def create(self, who: Principal, name: str) -> PoolInfo:
        with self.core.db.transaction() as conn:
            if conn.execute("SELECT 1 FROM pools WHERE name = ?", (name,)).fetchone():
                raise ConflictError(
                    f"A pool named '{name}' exists already.", hint="Choose another name."
                )
            conn.execute(
                "INSERT INTO pools (name, owner, created_at) VALUES (?, ?, ?)",
                (name, who.account, now_iso()),
            )
        return self.pool(who, name)

    def add(self, who: Principal, name: str, account: str) -> PoolInfo:
        """Add `account` to the pool (its owner or an admin only); adding twice is fine."""
        self._owned(who, name)
        with self.core.db.transaction() as conn:
            if not conn.execute("SELECT 1 FROM accounts WHERE name = ?", (account,)).fetchone():
                raise NotFoundError(
                    f"No account '{account}' on this farm.",
                    hint="Ask the farm's admin for the provider's account name.",
                )
            conn.execute(
                "INSERT OR IGNORE INTO pool_members (pool, account, added_at) VALUES (?, ?, ?)",
                (name, account, now_iso()),
            )
        self.core.bus.work_changed()
        return self.pool(who, name)

    def remove(self, who: Principal, name: str, account: str) -> PoolInfo:
        self._owned(who, name)
        with self.core.db.transaction() as conn:
            gone = conn.execute(
                "DELETE FROM pool_members WHERE pool = ? AND account = ?", (name, account)
            ).rowcount
        if not gone:
            raise NotFoundError(f"Account '{account}' is not in pool '{name}'.")
        return self.pool(who, name)

    def listing(self, who: Principal) -> list[PoolInfo]:
        """The pools the caller owns or was added to (every pool for an admin)."""
        if who.role is Role.ADMIN:
            rows = self.core.db.query("SELECT name FROM pools ORDER BY name")
            names = [row["name"] for row in rows]
        else:
            with self.core.db.lock:
                names = sorted(granted(self.core.db.conn, who.account))
        return [self.pool(who, name) for name in names]

    def pool(self, who: Principal, name: str) -> PoolInfo:
        """One pool; its members are shown to its owner and admins only."""
        row = self._row(who, name)
        members = [
            r["account"]
            for r in self.core.db.query(
                "SELECT account FROM pool_members WHERE pool = ? ORDER BY account", (name,)
            )
        ]
        if row["owner"] != who.account and who.role is not Role.ADMIN:
            members = []
        return PoolInfo(
            name=row["name"],
            owner=row["owner"],
            members=members,
            created_at=datetime.fromisoformat(row["created_at"]),
        )

    def check_submit(self, who: Principal, name: str) -> None:
        """Refuse a job in pool `name` unless the caller owns it, was added to it, or is
        an admin."""
        self._row(who, name)

    def _row(self, who: Principal, name: str) -> sqlite3.Row:
        """The pool, if the caller may see it (owner, member, admin); else not found:
        a pool's existence is not told to strangers."""
        row = self.core.db.query_one("SELECT * FROM pools WHERE name = ?", (name,))
        if row is not None and who.role is not Role.ADMIN and row["owner"] != who.account:
            with self.core.db.lock:
                if name not in granted(self.core.db.conn, who.account):
                    row = None
        if row is None:
            raise NotFoundError(
                f"No pool '{name}' that your account '{who.account}' belongs to.",
                hint="Check the name (`tessera pool list`), or ask the pool's owner to add"
                " you (`tessera pool add POOL ACCOUNT`).",
            )
        return row

    def _owned(self, who: Principal, name: str) -> sqlite3.Row:
        row = self._row(who, name)
        if row["owner"] != who.account and who.role is not Role.ADMIN:
            raise NotAllowedError(
                f"Pool '{name}' belongs to '{row['owner']}': only its owner or an admin"
                " adds or removes its accounts."
            )
        return row

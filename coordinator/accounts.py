"""Accounts and tokens: who is calling (`Principal`) and what role it holds.

Tokens are stored as SHA-256 digests and found by the digest of the token sent, so no
raw token is ever compared or stored.

An admin can revoke an account: its row stays (the ledger and its jobs name it), its
token stops authenticating at once, and it can never be given a new one (a LAN re-join
under its name is refused). The admin account itself cannot be revoked.

Valid tokens are remembered in memory (digest -> `Principal`), so that authenticating
a known token - which the HTTP layer does on every request, before its rate and load
limits - costs no database access. Every change to the accounts table goes through this
class, which forgets the digests it changes (a revoked or replaced token), so the memory
is never staler than the database. Replicas of one PostgreSQL database tell each other
about revoked and replaced tokens (`engines.notify`); as such a note can be lost (a
listener reconnecting), each replica also reads the accounts table again every
`TOKEN_RECHECK_SECONDS` (`recheck`: one query for all tokens, on the sweeper thread), so
no replica honours a revoked token for much longer than that.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from coordinator import ledger
from coordinator.core import Core
from coordinator.db import now_iso
from coordinator.errors import ConflictError, NotAllowedError, NotFoundError
from protocol.accounts import (
    AccountInfo,
    AccountToken,
)
from protocol.models import (
    Role,
)

__all__ = ["TOKEN_RECHECK_SECONDS", "Accounts", "Principal", "hash_token", "require"]

#: With replicas, how often each one re-reads which remembered tokens are still valid.
TOKEN_RECHECK_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Principal:
    account: str
    role: Role

    def can(self, *roles: Role) -> bool:
        return self.role is Role.ADMIN or self.role in roles


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def require(who: Principal, role: Role) -> None:
    """Refuse a caller whose role is not `role` (admins may do anything)."""
    if not who.can(role):
        raise NotAllowedError(f"This needs a {role.value} token; yours is {who.role.value}.")


class Accounts:
    def __init__(self, core: Core) -> None:
        self.core = core
        #: digest of a valid token -> its account (see the module docstring)
        self._known: dict[str, Principal] = {}
        #: bumped by every forgetting, so that a lookup racing a revocation is not kept
        self._generation = 0
        #: accounts revoked since start (earlier ones never authenticated in this run)
        self._revoked: set[str] = set()
        self._lock = threading.Lock()
        core.bus.handlers["account"] = self._on_peer

    def ensure_admin(self) -> str | None:
        """Create the admin account on first start of the farm's database; returns its new
        token (else None: it exists, perhaps made by another replica of this database)."""
        db = self.core.db
        if db.query_one("SELECT 1 FROM accounts WHERE role = ?", (Role.ADMIN.value,)):
            return None
        try:
            token = self.create("admin", Role.ADMIN).token
        except ConflictError:
            return None  # another replica on the same database created it just now
        path = self.core.config.admin_token_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(token + "\n")
        path.chmod(0o600)
        return token

    def create(self, name: str, role: Role) -> AccountToken:
        token = "tsr_" + secrets.token_urlsafe(32)
        try:
            with self.core.db.transaction() as conn:
                conn.execute(
                    "INSERT INTO accounts (name, role, token_hash, created_at) VALUES (?,?,?,?)",
                    (name, role.value, hash_token(token), now_iso()),
                )
        except sqlite3.IntegrityError:
            raise ConflictError(
                f"An account named '{name}' already exists.", hint="Choose another name."
            ) from None
        return AccountToken(account=name, role=role, token=token)

    def new_join_nonce(self, seconds: float) -> str:
        """A LAN join challenge that works once, within `seconds`, on any replica of this
        database (expired ones are dropped on the way)."""
        nonce = secrets.token_hex(16)
        now = time.time()
        with self.core.db.transaction() as conn:
            conn.execute("DELETE FROM join_nonces WHERE expires < ?", (now,))
            conn.execute(
                "INSERT INTO join_nonces (nonce, expires) VALUES (?, ?)", (nonce, now + seconds)
            )
        return nonce

    def use_join_nonce(self, nonce: str) -> bool:
        """Spend a join challenge: True once for a live one, False ever after."""
        with self.core.db.transaction() as conn:
            spent = conn.execute(
                "DELETE FROM join_nonces WHERE nonce = ? AND expires >= ?", (nonce, time.time())
            ).rowcount
        return spent == 1

    def issue_token(self, name: str, role: Role) -> AccountToken:
        """A fresh token for `name` (created if new); the old token stops working."""
        token = "tsr_" + secrets.token_urlsafe(32)
        taken = self.core.db.query_one(
            "SELECT role, revoked_at FROM accounts WHERE name = ?", (name,)
        )
        if taken is not None and taken["role"] != role.value:
            raise ConflictError(
                f"The account name '{name}' is taken by a {taken['role']}.",
                hint="Choose another node name.",
            )
        if taken is not None and taken["revoked_at"] is not None:
            raise NotAllowedError(
                f"The account '{name}' was revoked by the farm's admin.",
                hint="Ask the farm's admin for an account.",
            )
        with self.core.db.transaction() as conn:
            updated = conn.execute(
                "UPDATE accounts SET token_hash = ? WHERE name = ? AND role = ?",
                (hash_token(token), name, role.value),
            ).rowcount
            if not updated:
                conn.execute(
                    "INSERT INTO accounts (name, role, token_hash, created_at) VALUES (?,?,?,?)",
                    (name, role.value, hash_token(token), now_iso()),
                )
        self._forget(name)  # the token it replaced
        self.core.bus.tell_peers("account", name=name, revoked=False)
        return AccountToken(account=name, role=role, token=token)

    def authenticate(self, token: str) -> Principal | None:
        """The account of a valid token; None for an unknown or revoked one."""
        digest = hash_token(token)
        with self._lock:
            known = self._known.get(digest)
        if known is not None:
            return known
        generation = self._generation
        row = self.core.db.query_one(
            "SELECT name, role FROM accounts WHERE token_hash = ? AND revoked_at IS NULL",
            (digest,),
        )
        if row is None:
            return None
        who = Principal(account=row["name"], role=Role(row["role"]))
        with self._lock:
            if generation == self._generation:
                self._known[digest] = who
        return who

    def known(self, token: str) -> Principal | None:
        """`authenticate` from memory only (never the database): None when not known."""
        with self._lock:
            return self._known.get(hash_token(token))

    def is_revoked(self, name: str) -> bool:
        """Whether an account that authenticated earlier was revoked since (open long
        polls and event streams ask; no database access)."""
        with self._lock:
            return name in self._revoked

    def revoke(self, who: Principal, name: str) -> AccountInfo:
        """Revoke `name`'s token for good (admin only); revoking twice changes nothing."""
        require(who, Role.ADMIN)
        row = self.core.db.query_one("SELECT role FROM accounts WHERE name = ?", (name,))
        if row is None:
            raise NotFoundError(f"No account named '{name}'.", hint="`tessera account list`.")
        if row["role"] == Role.ADMIN.value:
            raise ConflictError(
                "The admin account cannot be revoked: the farm would have no admin.",
                hint="Revoke requester and provider accounts only.",
            )
        with self.core.db.transaction() as conn:
            conn.execute(
                "UPDATE accounts SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (now_iso(), name),
            )
        self._on_peer({"name": name, "revoked": True})
        self.core.bus.tell_peers("account", name=name, revoked=True)
        return self._info(name)

    def listing(self, who: Principal) -> list[AccountInfo]:
        """Every account, oldest first, with its balance (admin only)."""
        require(who, Role.ADMIN)
        rows = self.core.db.query("SELECT name FROM accounts ORDER BY created_at, name")
        return [self._info(row["name"]) for row in rows]

    def _info(self, name: str) -> AccountInfo:
        db = self.core.db
        row = db.fetch_one(
            "SELECT name, role, created_at, revoked_at FROM accounts WHERE name = ?", (name,)
        )
        revoked = row["revoked_at"]
        return AccountInfo(
            name=row["name"],
            role=Role(row["role"]),
            created_at=datetime.fromisoformat(row["created_at"]),
            revoked_at=datetime.fromisoformat(revoked) if revoked else None,
            balance=ledger.credits(ledger.balance(db, ledger.user(name))),
        )

    def _on_peer(self, note: dict[str, Any]) -> None:
        """An account changed (here or on another replica of the database): forget its
        tokens, and remember a revocation for the open long polls and streams."""
        name = str(note["name"])
        if note.get("revoked"):
            with self._lock:
                self._revoked.add(name)
            self.core.bus.wake_pollers()  # its open long polls end at once
        self._forget(name)

    def recheck(self) -> int:
        """Forget remembered tokens the database no longer holds as valid, and note
        revoked accounts (ending their long polls): what a lost note from another
        replica would have said. One query for every account; returns the tokens
        forgotten. The sweeper calls it with replicas only (see the module docstring)."""
        with self._lock:
            if not self._known:
                return 0
        rows = self.core.db.query("SELECT name, token_hash, revoked_at FROM accounts")
        valid = {(row["token_hash"], row["name"]) for row in rows if row["revoked_at"] is None}
        revoked = {row["name"] for row in rows if row["revoked_at"] is not None}
        with self._lock:
            stale = [d for d, who in self._known.items() if (d, who.account) not in valid]
            for digest in stale:
                del self._known[digest]
            if stale:
                self._generation += 1
            newly = revoked - self._revoked
            self._revoked |= revoked
        if newly:
            self.core.bus.wake_pollers()
        return len(stale)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._generation += 1
            for digest in [d for d, who in self._known.items() if who.account == name]:
                del self._known[digest]

    def exists(self, name: str) -> bool:
        return self.core.db.query_one("SELECT 1 FROM accounts WHERE name = ?", (name,)) is not None

"""Accounts and tokens: who is calling (`Principal`) and what role it holds.

Tokens are stored as SHA-256 digests and found by the digest of the token sent, so no
raw token is ever compared or stored.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from dataclasses import dataclass

from coordinator.core import Core
from coordinator.db import now_iso
from coordinator.errors import ConflictError, NotAllowedError
from protocol.models import AccountToken, Role

__all__ = ["Accounts", "Principal", "hash_token", "require"]


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

    def ensure_admin(self) -> str | None:
        """Create the admin account on first start; returns its new token (else None)."""
        db = self.core.db
        if db.query_one("SELECT 1 FROM accounts WHERE role = ?", (Role.ADMIN.value,)):
            return None
        token = self.create("admin", Role.ADMIN).token
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

    def issue_token(self, name: str, role: Role) -> AccountToken:
        """A fresh token for `name` (created if new); the old token stops working."""
        token = "tsr_" + secrets.token_urlsafe(32)
        taken = self.core.db.query_one("SELECT role FROM accounts WHERE name = ?", (name,))
        if taken is not None and taken["role"] != role.value:
            raise ConflictError(
                f"The account name '{name}' is taken by a {taken['role']}.",
                hint="Choose another node name.",
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
        return AccountToken(account=name, role=role, token=token)

    def authenticate(self, token: str) -> Principal | None:
        row = self.core.db.query_one(
            "SELECT name, role FROM accounts WHERE token_hash = ?", (hash_token(token),)
        )
        if row is None:
            return None
        return Principal(account=row["name"], role=Role(row["role"]))

    def exists(self, name: str) -> bool:
        return self.core.db.query_one("SELECT 1 FROM accounts WHERE name = ?", (name,)) is not None

"""Wire models of accounts, LAN joining and credits: who is who, and what they hold.

Split from `protocol.models` (whose `Role` and bounds they use). Data shapes and their
validation only: no I/O.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from protocol.base import Strict
from protocol.models import MAX_CREDITS, Role

__all__ = [
    "AccountCreate",
    "AccountInfo",
    "AccountToken",
    "Grant",
    "JoinChallenge",
    "JoinRequest",
    "LedgerCheck",
    "LedgerEntry",
    "Me",
    "Wallet",
]


# --- accounts ------------------------------------------------------------


class AccountCreate(Strict):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.@-]+$")
    role: Role


class AccountToken(Strict):
    account: str
    role: Role
    token: str


class JoinChallenge(Strict):
    nonce: str


class JoinRequest(Strict):
    """A LAN machine proving it knows the farm's secret (HMAC of the nonce, not the
    secret). `role`: a node joins as a provider (account ``lan-NAME``), an artist's app or
    CLI as a requester (account ``lan-user-NAME``); never as an admin."""

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    nonce: str = Field(min_length=16, max_length=100)
    proof: str = Field(pattern=r"^[0-9a-f]{64}$")
    role: Literal["provider", "requester"] = "provider"


class Grant(Strict):
    amount: float = Field(gt=0, le=MAX_CREDITS, description="credits")


class LedgerEntry(Strict):
    txn: str
    kind: str
    amount: float = Field(description="credits; negative when they left the account")
    job_id: str | None = None
    task_id: str | None = None
    memo: str = ""
    at: datetime


class Wallet(Strict):
    account: str
    balance: float
    escrow: float = Field(description="credits held for the account's unfinished jobs")
    history: list[LedgerEntry] = Field(default_factory=list)


class LedgerCheck(Strict):
    ok: bool
    problems: list[str] = Field(default_factory=list)


class Me(Strict):
    account: str
    role: Role


# --- accounts (admin) ---------------------------------------------------------------------


class AccountInfo(Strict):
    """An account as the admin's `GET /api/v1/accounts` lists it (never its token)."""

    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None = Field(
        default=None, description="when its token was revoked; None while it works"
    )
    balance: float = Field(default=0.0, description="the account's credits")

"""Who is calling: the bearer token's account, the role each route needs (checked
before an upload is spooled), and the LAN join handshake that trades the farm's secret for
a token."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from coordinator.errors import NotAllowedError, NotAuthenticatedError, NotFoundError
from coordinator.farm import Farm, Principal
from coordinator.http.limits import PRINCIPAL_KEY
from protocol.accounts import (
    AccountToken,
    JoinRequest,
)
from protocol.discovery import join_proof
from protocol.models import (
    Role,
)

__all__ = ["Admin", "LanJoin", "Provider", "Requester", "Who", "principal"]

JOIN_NONCE_SECONDS = 60.0
bearer = HTTPBearer(auto_error=False)


async def principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The account behind the request's bearer token (401 if none or unknown).

    Async on purpose: a sync dependency costs a thread-pool round trip per request (and
    the role check below another), which was a large share of a heartbeat's CPU (see
    docs/load-test.md). The limits middleware already looked the token up for its rate
    limits, from the accounts' memory of valid tokens (or the database, off the event
    loop); its answer is reused. Revocation is honoured as before: `Accounts` forgets a
    revoked token at once (and every replica's memory within `TOKEN_RECHECK_SECONDS`).
    """
    if credentials is None:
        raise NotAuthenticatedError(
            "This endpoint needs a token.", hint="Send 'Authorization: Bearer <token>'."
        )
    who: Principal | None = request.scope.get(PRINCIPAL_KEY)
    if who is None:
        farm: Farm = request.app.state.services.farm
        # Tokens are stored as SHA-256 digests and found by the digest of the token sent,
        # so the comparison's timing depends only on a hash of the caller's guess: it
        # tells an attacker nothing about any stored token. No raw token is ever compared
        # or stored. A token not in memory is looked up off the event loop.
        who = farm.accounts.known(credentials.credentials)
        if who is None:
            who = await run_in_threadpool(farm.authenticate, credentials.credentials)
    if who is None:
        raise NotAuthenticatedError(
            "The token is not valid (unknown, replaced or revoked).",
            hint="Check the token, or ask the farm's admin for a new one.",
        )
    return who


Who = Annotated[Principal, Depends(principal)]


def _role(role: Role, refusal: str) -> Any:
    async def check(who: Who) -> Principal:
        if not who.can(role):
            raise NotAllowedError(f"{refusal} Your token is a {who.role.value} token.")
        return who

    return Depends(check)


# Role checks are dependencies so that they run before an upload is spooled or a body
# validated (FastAPI reads a JSON body first: `limits` bounds its size and time).
Admin = Annotated[Principal, _role(Role.ADMIN, "Only an admin may do this.")]
Requester = Annotated[Principal, _role(Role.REQUESTER, "This needs a requester token.")]
Provider = Annotated[Principal, _role(Role.PROVIDER, "This needs a provider token.")]


class LanJoin:
    """One-use challenges for nodes that prove they know the farm's secret (kept in the
    database: a challenge asked of one replica may be answered to another)."""

    def __init__(self, farm: Farm, secret: str | None) -> None:
        self.farm = farm
        self.secret = secret

    def _require_lan(self) -> str:
        if not self.secret:
            raise NotFoundError(
                "This coordinator does not accept LAN joins.",
                hint="Start it with --lan --farm NAME --secret S, or use a token.",
            )
        return self.secret

    def challenge(self) -> str:
        self._require_lan()
        return self.farm.new_join_nonce(JOIN_NONCE_SECONDS)

    def join(self, body: JoinRequest) -> AccountToken:
        secret = self._require_lan()
        if not self.farm.use_join_nonce(body.nonce):  # each nonce works once
            raise NotAuthenticatedError(
                "The join challenge expired or was already used.",
                hint="Ask for a new challenge (GET /api/v1/join/challenge).",
            )
        expected = join_proof(secret, body.nonce, body.name)
        if not hmac.compare_digest(expected, body.proof):
            raise NotAuthenticatedError(
                "Wrong farm secret.", hint="Use the --secret the coordinator was started with."
            )
        if body.role == Role.REQUESTER.value:
            return self.farm.issue_token(f"lan-user-{body.name}", Role.REQUESTER)
        return self.farm.issue_token(f"lan-{body.name}", Role.PROVIDER)

"""LAN join challenges across replicas of one database (both engines): a challenge asked
of one replica is answered to another, and works once on all of them; a replayed join,
which would hand out the joiner's account, is refused everywhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.errors import NotAuthenticatedError
from coordinator.farm import Farm
from coordinator.http.auth import LanJoin
from protocol.accounts import JoinRequest
from protocol.discovery import join_proof
from tests.coordinator_tools import open_farm

SECRET = "a farm secret"


@pytest.fixture()
def replicas(tmp_path: Path, db_url: str | None) -> Iterator[tuple[Farm, Farm]]:
    options = {"db_url": db_url} if db_url else {}
    # Two farms on one database: one SQLite file, or one PostgreSQL database.
    first = open_farm(tmp_path / "coordinator", **options)
    second = open_farm(tmp_path / "coordinator", **options)
    yield first, second
    first.db.close()
    second.db.close()


def _join(lan: LanJoin, nonce: str, name: str = "render-01") -> str:
    body = JoinRequest(name=name, nonce=nonce, proof=join_proof(SECRET, nonce, name))
    return lan.join(body).token


def test_a_challenge_from_one_replica_is_answered_to_another_once(
    replicas: tuple[Farm, Farm],
) -> None:
    a, b = (LanJoin(farm, SECRET) for farm in replicas)
    nonce = a.challenge()
    assert _join(b, nonce).startswith("tsr_")
    for replica in (a, b):  # a replay, to either replica
        with pytest.raises(NotAuthenticatedError, match="expired or was already used"):
            _join(replica, nonce)


def test_an_unknown_or_expired_challenge_is_refused(replicas: tuple[Farm, Farm]) -> None:
    first, _ = replicas
    lan = LanJoin(first, SECRET)
    with pytest.raises(NotAuthenticatedError):
        _join(lan, "f" * 32)
    expired = first.new_join_nonce(-1.0)
    with pytest.raises(NotAuthenticatedError):
        _join(lan, expired)
    # A wrong secret spends the challenge too: it cannot be tried again.
    nonce = lan.challenge()
    wrong = JoinRequest(name="x", nonce=nonce, proof=join_proof("guess", nonce, "x"))
    with pytest.raises(NotAuthenticatedError, match="Wrong farm secret"):
        lan.join(wrong)
    with pytest.raises(NotAuthenticatedError, match="already used"):
        _join(lan, nonce, "x")

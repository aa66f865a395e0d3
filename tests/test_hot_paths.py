"""The per-task paths made cheaper for the load test (docs/load-test.md) keep their rules:
a small result read into memory and a streamed one are both checked and accepted once,
a non-holder's upload is refused with nothing spooled, a lease is never granted twice,
and a replica forgets a token revoked behind its back within a sweep."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from coordinator.farm import Farm
from protocol.models import Lease, NodeCapabilities, Role
from tests.coordinator_tools import FreshFarm
from tests.test_security import call, caps, fake_bundle, free_spec, honest_result, start_configured


def _chunks(data: bytes) -> Iterator[bytes]:
    """A body sent chunked (no Content-Length): the streamed upload path."""
    for start in range(0, len(data), 1000):
        yield data[start : start + 1000]


def test_small_and_streamed_results_are_accepted_once_and_others_refused(tmp_path: Path) -> None:
    coordinator = start_configured(tmp_path / "coordinator", verification=False)
    try:
        url, admin = coordinator.url, coordinator.admin_token
        tokens = {}
        for name, role in [("alice", "requester"), ("bob", "provider"), ("carol", "provider")]:
            reply = call(url, "POST", "/accounts", admin, json_body={"name": name, "role": role})
            tokens[name] = reply.json()["token"]
        bundle = fake_bundle()
        sha = hashlib.sha256(bundle).hexdigest()
        assert call(url, "PUT", f"/bundles/{sha}", tokens["alice"], data=bundle).ok
        reply = call(url, "POST", "/jobs", tokens["alice"], json_body=free_spec(sha))
        assert reply.status_code == 201, reply.text
        node = call(url, "POST", "/nodes", tokens["bob"], json_body=caps("nb")).json()["node_id"]
        spool = tmp_path / "coordinator" / "store" / "tmp"
        receipts = []
        for send in (lambda data: data, _chunks):  # small (in memory), then streamed
            reply = call(url, "POST", f"/nodes/{node}/lease", tokens["bob"], json_body={})
            assert reply.status_code == 200, reply.text
            lease = Lease.model_validate(reply.json())
            data, digest = honest_result(tmp_path, lease)
            path = f"/leases/{lease.lease_id}/result"
            sha_header = {"X-Content-SHA256": digest}
            # another provider is refused before anything is spooled, on either path
            refused = call(url, "PUT", path, tokens["carol"], data=send(data), headers=sha_header)
            assert refused.status_code == 403, refused.text
            assert not list(spool.iterdir()) if spool.exists() else True
            accepted = call(url, "PUT", path, tokens["bob"], data=send(data), headers=sha_header)
            assert accepted.status_code == 200, accepted.text
            assert accepted.json()["accepted"] is True
            # a repeat (the reply was lost) gets the same receipt, never a second payment
            again = call(url, "PUT", path, tokens["bob"], data=send(data), headers=sha_header)
            assert again.status_code == 200 and again.json() == accepted.json()
            # another result for the delivered lease is a conflict
            junk = b"x" * 100
            junk_sha = {"X-Content-SHA256": hashlib.sha256(junk).hexdigest()}
            other = call(url, "PUT", path, tokens["bob"], data=send(junk), headers=junk_sha)
            assert other.status_code in (400, 409), other.text
            receipts.append(accepted.json()["task_id"])
        assert len(set(receipts)) == 2  # two tiles, each leased once
        check = call(url, "GET", "/ledger/check", admin).json()
        assert check["ok"], check
    finally:
        coordinator.stop()


def test_a_lease_is_granted_once_when_the_task_was_taken_meanwhile(fresh_farm: FreshFarm) -> None:
    """The grant is one conditional UPDATE: a task another replica leased between the
    search and the grant is not granted again (the search moves on)."""
    farm: Farm = fresh_farm()
    states = farm.states
    provider = farm.accounts.create("bob", Role.PROVIDER)
    who = farm.authenticate(provider.token)
    assert who is not None
    node = farm.register_node(who, NodeCapabilities(name="n1", blender_versions=["5.0.1"]))
    with farm.db.transaction() as conn:
        conn.execute(
            "INSERT INTO jobs (id, owner, name, status, priority, spec, bundle, created_at,"
            " updated_at) VALUES ('j', 'bob', 'j', 'queued', 0, '{}', 'b', 'x', 'x')"
        )
        conn.execute(
            "INSERT INTO tasks (id, job_id, kind, frame, tile_index, status, updated_at)"
            " VALUES ('t', 'j', 'render', 1, 0, 'queued', 'x')"
        )
        first = states.lease(conn, "t", "j", node.node_id, "lease-1", 1e12)
        second = states.lease(conn, "t", "j", node.node_id, "lease-2", 1e12)
    assert first is not None and first["lease_id"] == "lease-1"
    assert second is None
    row = farm.db.fetch_one("SELECT lease_id, status FROM tasks WHERE id = 't'")
    assert (row["lease_id"], row["status"]) == ("lease-1", "active")


def test_a_token_revoked_behind_a_replicas_back_stops_at_the_next_recheck(
    fresh_farm: FreshFarm,
) -> None:
    """Another replica revoked (or replaced) the token and its note was lost: this replica
    still remembers the token until `recheck` (every sweep with replicas), then not."""
    farm: Farm = fresh_farm()
    bob = farm.accounts.create("bob", Role.PROVIDER)
    carol = farm.accounts.create("carol", Role.PROVIDER)
    assert farm.authenticate(bob.token) is not None
    assert farm.authenticate(carol.token) is not None
    with farm.db.transaction() as conn:  # what another replica wrote
        conn.execute("UPDATE accounts SET revoked_at = 'now' WHERE name = 'bob'")
        conn.execute("UPDATE accounts SET token_hash = 'replaced' WHERE name = 'carol'")
    assert farm.accounts.known(bob.token) is not None  # remembered: no note came
    assert farm.accounts.recheck() == 2
    assert farm.accounts.known(bob.token) is None
    assert farm.authenticate(bob.token) is None
    assert farm.authenticate(carol.token) is None
    assert farm.accounts.is_revoked("bob")
    assert not farm.accounts.is_revoked("carol")
    assert farm.accounts.recheck() == 0

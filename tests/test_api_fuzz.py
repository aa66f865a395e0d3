"""Fuzz the coordinator's API from its own OpenAPI document (schemathesis): every
operation gets generated path parameters, queries and bodies, sent with an admin's, a
requester's and a provider's token, to a real coordinator on 127.0.0.1. No answer may be
a 5xx, the server must log no traceback, and `tessera ledger check` (GET /ledger/check)
must still pass afterwards: no request, however odd, corrupts the farm's state.

Each case is sent twice per token: with its generated path parameters (almost always
ids that do not exist) and with the ids of real objects (a job, a node, its lease, a
bundle, accounts), so that odd bodies and queries meet real state too.

Bounded: `EXAMPLES` cases per operation, derandomized (the same cases every run).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings

from tests.test_security import call, caps, fake_bundle, free_spec, start_configured

schemathesis = pytest.importorskip("schemathesis")

#: Cases per operation, each sent with 3 tokens, and again with real ids in its path.
EXAMPLES = 25
#: Streams that never end on their own; their access rules are tested in test_security.
SKIPPED = {"/api/v1/events"}


def test_fuzzing_the_openapi_document_finds_no_5xx_and_the_ledger_holds(tmp_path: Path) -> None:
    # The rate limit is off so that every generated case reaches the handlers.
    coordinator = start_configured(tmp_path / "coordinator", rate_limit=0, verification=False)
    try:
        url, admin = coordinator.url, coordinator.admin_token
        tokens = {"admin": admin}
        for name, role in [("alice", "requester"), ("bob", "provider")]:
            reply = call(url, "POST", "/accounts", admin, json_body={"name": name, "role": role})
            tokens[name] = reply.json()["token"]
        # some state for the fuzzer to bump into: a bundle, a job, a node holding a lease
        bundle = fake_bundle()
        sha = hashlib.sha256(bundle).hexdigest()
        call(url, "PUT", f"/bundles/{sha}", tokens["alice"], data=bundle)
        job = call(url, "POST", "/jobs", tokens["alice"], json_body=free_spec(sha)).json()["id"]
        node = call(url, "POST", "/nodes", tokens["bob"], json_body=caps("n")).json()["node_id"]
        lease = call(url, "POST", f"/nodes/{node}/lease", tokens["bob"], json_body={}).json()
        real = {
            "job_id": job,
            "task_id": lease["task"]["id"],
            "node_id": node,
            "lease_id": lease["lease_id"],
            "sha256": sha,
            "name": "alice",
            "account": "bob",
        }

        schema = schemathesis.openapi.from_url(f"{url}/api/v1/openapi.json")
        session = requests.Session()
        server_errors: list[str] = []
        operations = 0
        started = time.monotonic()
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.path in SKIPPED:
                continue
            operations += 1

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate],
            )
            @given(case=operation.as_strategy())
            def fuzz(case: schemathesis.Case) -> None:
                for variant in ("generated", "real"):
                    if variant == "real":
                        params = case.path_parameters or {}
                        known = {k: real[k] for k in params if k in real}
                        if not known:
                            return
                        case.path_parameters = {**params, **known}
                        if isinstance(case.body, dict) and case.path.endswith("/lease"):
                            case.body["wait"] = 0  # a real node's poll waits for work (20 s)
                    for who, token in tokens.items():
                        response = case.call(
                            base_url=url,
                            session=session,
                            headers={"Authorization": f"Bearer {token}"},
                            timeout=70,  # a lease long poll waits up to 60 s
                        )
                        if response.status_code >= 500:
                            server_errors.append(
                                f"{case.method} {case.formatted_path} as {who}:"
                                f" {response.status_code} {response.text[:300]}"
                            )

            fuzz()
        session.close()
        print(f"fuzzed {operations} operations in {time.monotonic() - started:.1f} s")
        assert operations >= 25
        assert not server_errors, "\n".join(server_errors)
        check = call(url, "GET", "/ledger/check", admin).json()
        assert check == {"ok": True, "problems": []}
        assert call(url, "GET", "/health").status_code == 200
        assert coordinator.process.poll() is None
    finally:
        coordinator.stop()
    log = coordinator.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]

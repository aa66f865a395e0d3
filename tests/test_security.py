"""Attacks on the coordinator's API, each with its expected refusal: every route called
with no token, a bad token and every role's token (a table over the OpenAPI document);
tokens never stored raw; bodies past the size limits; rate limits per token; overload
answered with 503 and Retry-After; HTTPS with a certificate made here.

The coordinator is a real server process on 127.0.0.1 (port 0), started with the
configuration each test needs (`start_configured`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from protocol.models import Lease, NodeCapabilities
from tests.farm_tools import RunningCoordinator, launch_coordinator, start_coordinator
from tests.inprocess_farm import TRUTH, small_spec, write_tile_exr

API = "/api/v1"

_RUNNER = """
import json, sys
from pathlib import Path
from coordinator.config import CoordinatorConfig
from coordinator.server import serve
from coordinator.verify.policy import VerificationPolicy

options = json.loads(sys.argv[1])
options["data_dir"] = Path(options["data_dir"])
options["verification"] = VerificationPolicy(enabled=options.pop("verification", True))
try:
    serve(
        CoordinatorConfig(**options),
        "127.0.0.1",
        0,
        on_ready=lambda url, _: print("Tessera coordinator listening on", url, flush=True),
    )
except KeyboardInterrupt:  # how RunningCoordinator.stop() ends it
    pass
"""


def start_configured(data_dir: Path, **options: Any) -> RunningCoordinator:
    """A real coordinator process with any `CoordinatorConfig` fields (the CLI has only
    some of them as options); `verification=False` turns duplicate sampling off."""
    argv = ["-c", _RUNNER, json.dumps({"data_dir": str(data_dir), **options})]
    return launch_coordinator(argv, data_dir)


def call(
    url: str,
    method: str,
    path: str,
    token: str | None = None,
    *,
    json_body: Any = None,
    data: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> requests.Response:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    return requests.request(
        method,
        f"{url}{API}{path}",
        json=json_body,
        data=data,
        headers=sent,
        timeout=timeout,
        stream=path.startswith("/events"),  # an event stream never ends: read the status only
    )


def fake_bundle() -> bytes:
    """A bundle the coordinator accepts: a zip holding a file that starts like a .blend."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("scene.blend", b"BLENDER-v500" + bytes(64))
    return buffer.getvalue()


def free_spec(bundle_sha: str, name: str = "job") -> dict[str, Any]:
    """A 2-tile 64x48 one-frame job that costs nothing (no credits needed)."""
    spec = small_spec().model_copy(update={"bundle": bundle_sha, "name": name, "max_price": 0})
    return spec.model_dump(mode="json")


def caps(name: str) -> dict[str, Any]:
    return NodeCapabilities(name=name, blender_versions=["5.0.1"]).model_dump(mode="json")


def honest_result(folder: Path, lease: Lease) -> tuple[bytes, str]:
    assert lease.assignment is not None
    r = lease.assignment.render_region
    path = write_tile_exr(folder / f"{lease.lease_id}.exr", TRUTH[r.y0 : r.y1, r.x0 : r.x1])
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


# --- a farm with a bit of everything ---------------------------------------------------------


@dataclass
class Farm:
    coordinator: RunningCoordinator
    tokens: dict[str, str | None]
    ids: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.coordinator.url


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    """alice's job A (finished, rendered by bob's node), job B (both tiles leased by
    bob's nodes) and job C (queued); dave is another requester, carol another provider."""
    folder = tmp_path_factory.mktemp("security")
    coordinator = start_configured(folder / "coordinator", verification=False)
    try:
        url, admin = coordinator.url, coordinator.admin_token
        tokens: dict[str, str | None] = {"anon": None, "bad": "not-a-token-" + "x" * 30}
        for name, role in [
            ("alice", "requester"),
            ("dave", "requester"),
            ("bob", "provider"),
            ("carol", "provider"),
            ("eve", "requester"),  # revoked by the admin in the route table
        ]:
            reply = call(url, "POST", "/accounts", admin, json_body={"name": name, "role": role})
            tokens[name] = reply.json()["token"]
        tokens["admin"] = admin
        state = Farm(coordinator, tokens)
        bundle = fake_bundle()
        sha = hashlib.sha256(bundle).hexdigest()
        assert call(url, "PUT", f"/bundles/{sha}", tokens["alice"], data=bundle).ok
        nodes = {}
        for name, owner in [("nb1", "bob"), ("nb2", "bob"), ("nb3", "bob"), ("nc", "carol")]:
            reply = call(url, "POST", "/nodes", tokens[owner], json_body=caps(name))
            nodes[name] = reply.json()["node_id"]

        def submit(name: str) -> str:
            reply = call(url, "POST", "/jobs", tokens["alice"], json_body=free_spec(sha, name))
            assert reply.status_code == 201, reply.text
            return str(reply.json()["id"])

        def lease(node: str) -> Lease:
            reply = call(url, "POST", f"/nodes/{nodes[node]}/lease", tokens["bob"], json_body={})
            assert reply.status_code == 200, reply.text
            return Lease.model_validate(reply.json())

        job_a = submit("A")
        for _ in range(2):
            granted = lease("nb1")
            data, digest = honest_result(folder, granted)
            reply = call(
                url,
                "PUT",
                f"/leases/{granted.lease_id}/result",
                tokens["bob"],
                data=data,
                headers={"X-Content-SHA256": digest},
            )
            assert reply.status_code == 200, reply.text
        deadline = time.monotonic() + 60
        while call(url, "GET", f"/jobs/{job_a}", tokens["alice"]).json()["status"] != "completed":
            assert time.monotonic() < deadline, "job A did not complete"
            time.sleep(0.1)
        task_a = call(url, "GET", f"/jobs/{job_a}/tasks", tokens["alice"]).json()[0]["id"]
        job_b = submit("B")
        lease_1, lease_2 = lease("nb1"), lease("nb2")
        assert lease_1.task.job_id == lease_2.task.job_id == job_b
        job_c = submit("C")
        frames_a = call(url, "GET", f"/jobs/{job_a}/frames", tokens["alice"]).json()
        # alice's pool, bob in it (carol is added and removed in the route table)
        assert call(url, "POST", "/pools", tokens["alice"], json_body={"name": "studio"}).ok
        member = {"account": "bob"}
        assert call(url, "POST", "/pools/studio/members", tokens["alice"], json_body=member).ok
        state.ids = {
            "exr_a": frames_a[0]["files"]["exr"],
            "sha": sha,
            "A": job_a,
            "B": job_b,
            "C": job_c,
            "task_a": task_a,
            "lease_1": lease_1.lease_id,
            "lease_2": lease_2.lease_id,
            **nodes,
        }
        yield state
    finally:
        coordinator.stop()


# --- every route, every caller -------------------------------------------------------------

#: Callers in the order they are tried: refusals first, then the callers allowed (so that a
#: route that changes state does so last).
CALLERS = ("anon", "bad", "dave", "carol", "alice", "bob", "admin")
#: Callers who must never see anything of alice's jobs (bob renders job B, so sees its ids).
STRANGERS = ("dave", "carol")


@dataclass(frozen=True)
class Case:
    method: str
    path: str  # the OpenAPI path, with {placeholders}
    expect: dict[str, int]  # caller -> status; callers not named: `others`
    others: int
    concrete: str = ""  # the path to call, when it differs ({job_id} -> {A} etc.)
    body: Callable[[Farm, str], dict[str, Any]] | None = None
    data: Callable[[Farm], bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    public: bool = False  # no token needed: anon and bad get `others` too

    def status_for(self, caller: str) -> int:
        if caller in ("anon", "bad") and not self.public:
            return 401
        return self.expect.get(caller, self.others)


ADMIN_ONLY = {"admin": 200}
OWNER = {"alice": 200, "admin": 200}  # everyone else: 404, as if the job did not exist
_count = iter(range(10**6))


def _new_account(_: Farm, caller: str) -> dict[str, Any]:
    return {"name": f"made-by-{caller}-{next(_count)}", "role": "requester"}


def _new_job(farm: Farm, caller: str) -> dict[str, Any]:
    return free_spec(farm.ids["sha"], f"by {caller}")


def _new_node(_: Farm, caller: str) -> dict[str, Any]:
    return caps(f"node-of-{caller}-{next(_count)}")


TABLE: list[Case] = [
    Case("GET", "/health", {}, 200, public=True),
    Case("GET", "/me", {}, 200),
    Case("GET", "/wallet", {}, 200),
    Case("POST", "/accounts", {"admin": 201}, 403, body=_new_account),
    Case("GET", "/accounts", ADMIN_ONLY, 403),
    Case("POST", "/accounts/{name}/revoke", ADMIN_ONLY, 403, "/accounts/eve/revoke"),
    Case(
        "POST",
        "/accounts/{name}/grant",
        ADMIN_ONLY,
        403,
        "/accounts/alice/grant",
        body=lambda *_: {"amount": 1.5},
    ),
    # bob is not suspended: the admin's call is allowed and finds nothing to lift
    Case("POST", "/providers/{account}/reinstate", {"admin": 404}, 403, "/providers/bob/reinstate"),
    Case("GET", "/ledger/check", ADMIN_ONLY, 403),
    # LAN joins are off on this coordinator: 404 for everyone, token or not
    Case("GET", "/join/challenge", {}, 404, public=True),
    Case(
        "POST",
        "/join",
        {},
        404,
        body=lambda *_: {"name": "n", "nonce": "0" * 32, "proof": "0" * 64},
        public=True,
    ),
    # content-addressed: a requester that has the bundle may skip its upload
    Case("HEAD", "/bundles/{sha256}", {"bob": 403, "carol": 403}, 200, "/bundles/{sha}"),
    Case(
        "PUT",
        "/bundles/{sha256}",
        {"bob": 403, "carol": 403},
        200,
        "/bundles/{sha}",
        data=lambda _: fake_bundle(),
    ),
    # alice's jobs use it; bob's node holds a lease of job B
    Case("GET", "/bundles/{sha256}", {**OWNER, "bob": 200}, 404, "/bundles/{sha}"),
    Case("POST", "/jobs", {"bob": 403, "carol": 403}, 201, body=_new_job),
    Case("POST", "/jobs/estimate", {"bob": 403, "carol": 403}, 200, body=_new_job),
    Case("GET", "/jobs", {}, 200),
    Case("GET", "/jobs/{job_id}", OWNER, 404, "/jobs/{A}"),
    Case("PATCH", "/jobs/{job_id}", OWNER, 404, "/jobs/{A}", body=lambda *_: {"priority": 60}),
    Case("GET", "/jobs/{job_id}/tasks", OWNER, 404, "/jobs/{A}/tasks"),
    Case("GET", "/jobs/{job_id}/frames", OWNER, 404, "/jobs/{A}/frames"),
    Case("GET", "/jobs/{job_id}/frames/{frame}.{kind}", OWNER, 404, "/jobs/{A}/frames/1.exr"),
    Case("GET", "/jobs/{job_id}/deliverables", OWNER, 404, "/jobs/{A}/deliverables"),
    # job A's raw EXR is one of its deliverables; a hash is no key to another's file
    Case(
        "GET",
        "/jobs/{job_id}/deliverables/{sha256}",
        OWNER,
        404,
        "/jobs/{A}/deliverables/{exr_a}",
    ),
    Case("GET", "/tasks/{task_id}/preview.png", OWNER, 404, "/tasks/{task_a}/preview.png"),
    Case("POST", "/pools", {}, 201, body=lambda _, caller: {"name": f"pool-{caller}"}),
    Case("GET", "/pools", {}, 200),
    # strangers are not told the pool exists; bob is in it but does not own it
    Case(
        "POST",
        "/pools/{name}/members",
        {"alice": 200, "admin": 200, "bob": 403},
        404,
        "/pools/studio/members",
        body=lambda *_: {"account": "carol"},
    ),
    # carol, added above, may see the pool but not change it; the admin comes last and
    # finds her gone
    Case(
        "DELETE",
        "/pools/{name}/members/{account}",
        {"alice": 200, "bob": 403, "carol": 403, "admin": 404},
        404,
        "/pools/studio/members/carol",
    ),
    Case("POST", "/jobs/{job_id}/pause", OWNER, 404, "/jobs/{C}/pause"),
    Case("POST", "/jobs/{job_id}/resume", OWNER, 404, "/jobs/{C}/resume"),
    Case("POST", "/jobs/{job_id}/cancel", OWNER, 404, "/jobs/{C}/cancel"),
    Case("GET", "/events", {}, 200),  # filtered to the caller's jobs
    Case("POST", "/nodes", {"alice": 403, "dave": 403}, 200, body=_new_node),
    Case("GET", "/nodes", {}, 200),  # a provider sees its own nodes only (checked below)
    # nb3 is bob's idle node; POST /jobs above left work to lease
    Case(
        "POST",
        "/nodes/{node_id}/lease",
        {"bob": 200, "admin": 200},
        403,
        "/nodes/{nb3}/lease",
        body=lambda *_: {"wait": 0},
    ),
    Case(
        "POST",
        "/leases/{lease_id}/heartbeat",
        {"bob": 200, "admin": 200},
        403,
        "/leases/{lease_1}/heartbeat",
        body=lambda *_: {"progress": 0.5},
    ),
    # the holder is let in, and told this is no denoise lease
    Case(
        "GET",
        "/leases/{lease_id}/denoise-input",
        {"bob": 404, "admin": 404},
        403,
        "/leases/{lease_1}/denoise-input",
    ),
    # the holder is let in, and told the hash header is missing; others are refused
    # before the body is spooled
    Case(
        "PUT",
        "/leases/{lease_id}/result",
        {"bob": 400, "admin": 400},
        403,
        "/leases/{lease_1}/result",
        data=lambda _: b"junk",
    ),
    # the holder ends the lease; the admin then finds no such lease
    Case(
        "POST",
        "/leases/{lease_id}/failure",
        {"bob": 204, "admin": 404},
        403,
        "/leases/{lease_1}/failure",
        body=lambda *_: {"kind": "worker_crashed", "message": "test", "retryable": True},
    ),
    Case(
        "POST",
        "/leases/{lease_id}/release",
        {"bob": 204, "admin": 404},
        403,
        "/leases/{lease_2}/release",
    ),
    # after nb3's lease row: it ends the node's next poll (none is made after this)
    Case(
        "POST",
        "/nodes/{node_id}/stop-polling",
        {"bob": 204, "admin": 204},
        403,
        "/nodes/{nb3}/stop-polling",
    ),
]

#: Calls beyond one per route: other objects, query parameters.
EXTRA: list[Case] = [
    Case("GET", "/jobs/{job_id}", OWNER, 404, "/jobs/{B}"),
    Case("GET", "/jobs/{job_id}", {}, 404, "/jobs/no-such-job"),
    # the admin account cannot be revoked; an unknown one is not found
    Case("POST", "/accounts/{name}/revoke", {"admin": 409}, 403, "/accounts/admin/revoke"),
    Case("POST", "/accounts/{name}/revoke", {"admin": 404}, 403, "/accounts/nobody/revoke"),
    Case("GET", "/jobs/{job_id}/frames/{frame}.{kind}", OWNER, 404, "/jobs/{A}/frames/1.png"),
    Case("GET", "/events", OWNER, 404, "/events?job={A}"),
    Case("PATCH", "/jobs/{job_id}", OWNER, 404, "/jobs/{B}", body=lambda *_: {"priority": 0}),
    Case(
        "POST",
        "/nodes/{node_id}/lease",
        {"carol": 200, "admin": 200},
        403,
        "/nodes/{nc}/lease",
        body=lambda *_: {"wait": 0},
    ),
]


def _operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "patch", "delete", "head", "options"}
    return {
        (method.upper(), path.removeprefix(API))
        for path, item in spec["paths"].items()
        for method in item
        if method in methods
    }


def test_every_route_checks_the_token_and_the_role(farm: Farm) -> None:
    spec = call(farm.url, "GET", "/openapi.json").json()
    assert _operations(spec) == {(c.method, c.path) for c in TABLE}, (
        "a route was added or removed: give it a row in TABLE"
    )
    failures = []
    for case in TABLE + EXTRA:
        path = (case.concrete or case.path).format(**farm.ids)
        for caller in CALLERS:
            body = case.body(farm, caller) if case.body else None
            data = case.data(farm) if case.data else None
            reply = call(
                farm.url,
                case.method,
                path,
                farm.tokens[caller],
                json_body=body,
                data=data,
                headers=case.headers,
            )
            streaming = path.startswith("/events") and reply.status_code == 200
            text = "" if streaming else reply.text
            reply.close()
            if reply.status_code != case.status_for(caller):
                failures.append(
                    f"{case.method} {path} as {caller}: {reply.status_code}, expected"
                    f" {case.status_for(caller)} ({text[:200]})"
                )
            if reply.status_code >= 400 and case.method != "HEAD":
                assert set(json.loads(text)) == {"error", "detail", "hint"}, text
            if caller in STRANGERS:
                for key in ("A", "B", "C", "task_a", "lease_1", "lease_2"):
                    assert farm.ids[key] not in text or farm.ids[key] in path, (
                        f"{case.method} {path} showed {caller} alice's {key}: {text[:300]}"
                    )
    assert not failures, "\n".join(failures)


def test_callers_see_only_their_own(farm: Farm) -> None:
    url, tokens, ids = farm.url, farm.tokens, farm.ids
    mine = {job["id"] for job in call(url, "GET", "/jobs", tokens["alice"]).json()}
    assert {ids["A"], ids["B"], ids["C"]} <= mine
    assert not {ids["A"], ids["B"], ids["C"]} & {
        job["id"] for job in call(url, "GET", "/jobs", tokens["dave"]).json()
    }
    assert call(url, "GET", "/jobs", tokens["carol"]).json() == []
    assert {n["owner"] for n in call(url, "GET", "/nodes", tokens["carol"]).json()} == {"carol"}
    assert {n["owner"] for n in call(url, "GET", "/nodes", tokens["bob"]).json()} == {"bob"}
    # a requester sees the farm's nodes, not which of another's tasks they run
    seen = {n["id"]: n for n in call(url, "GET", "/nodes", tokens["dave"]).json()}
    assert {ids["nb1"], ids["nc"]} <= set(seen)
    dave_jobs = {job["id"] for job in call(url, "GET", "/jobs", tokens["dave"]).json()}
    assert seen[ids["nb1"]]["current_task"] is None  # it renders alice's job B
    for node in seen.values():
        task = node["current_task"]
        assert task is None or task.split("-")[0] in dave_jobs, node
    # the wallet is the caller's own
    assert call(url, "GET", "/wallet", tokens["dave"]).json()["account"] == "dave"
    # the frame file itself: the owner gets an EXR, a stranger only a 404
    frame = call(url, "GET", f"/jobs/{ids['A']}/frames/1.exr", tokens["alice"])
    assert frame.status_code == 200
    assert frame.content[:4] == b"\x76\x2f\x31\x01"  # OpenEXR magic
    assert call(url, "GET", "/ledger/check", tokens["admin"]).json()["ok"] is True


def test_the_database_never_holds_a_raw_token(farm: Farm) -> None:
    data_dir = farm.coordinator.data_dir
    stored = b"".join(
        path.read_bytes()
        for path in data_dir.glob("coordinator.sqlite*")  # the database, its WAL and SHM
    )
    assert stored
    for name, token in farm.tokens.items():
        if token is None or name == "bad":
            continue
        assert token.encode() not in stored, f"{name}'s token is stored raw"
        assert hashlib.sha256(token.encode()).hexdigest().encode() in stored


# --- sizes ----------------------------------------------------------------------------------


def test_oversized_bodies_get_413_before_they_are_parsed(tmp_path: Path) -> None:
    coordinator = start_configured(
        tmp_path / "c", max_json_bytes=4096, max_bundle_bytes=50_000, max_result_bytes=20_000
    )
    try:
        url, admin = coordinator.url, coordinator.admin_token
        alice = call(
            url, "POST", "/accounts", admin, json_body={"name": "alice", "role": "requester"}
        ).json()["token"]
        bob = call(
            url, "POST", "/accounts", admin, json_body={"name": "bob", "role": "provider"}
        ).json()["token"]
        # by Content-Length: refused before a byte of the body is read
        big = {"name": "x" * 10_000, "role": "requester"}
        reply = call(url, "POST", "/accounts", admin, json_body=big)
        assert reply.status_code == 413
        assert reply.json()["error"] == "too large"
        assert "4096 bytes" in reply.json()["detail"]
        # chunked, without a Content-Length: refused once the bytes read pass the limit
        chunks = iter([b'{"name": "', b"y" * 3000, b"y" * 3000, b'", "role": "requester"}'])
        reply = call(url, "POST", "/accounts", admin, data=chunks)
        assert reply.status_code == 413, reply.text
        assert "4096 bytes" in reply.json()["detail"]
        # not-JSON garbage past the limit is refused the same way, not parsed
        reply = call(url, "POST", "/jobs", alice, data=b"\xff" * 100_000)
        assert reply.status_code == 413
        # uploads have their own limits
        blob = b"z" * 60_000
        sha = hashlib.sha256(blob).hexdigest()
        reply = call(url, "PUT", f"/bundles/{sha}", alice, data=blob)
        assert reply.status_code == 413
        assert "50000 bytes" in reply.json()["detail"]
        small = fake_bundle()
        small_sha = hashlib.sha256(small).hexdigest()
        assert call(url, "PUT", f"/bundles/{small_sha}", alice, data=small).status_code == 200
        node = call(url, "POST", "/nodes", bob, json_body=caps("n")).json()["node_id"]
        call(url, "POST", "/jobs", alice, json_body=free_spec(small_sha))
        lease = call(url, "POST", f"/nodes/{node}/lease", bob, json_body={}).json()
        result = b"r" * 30_000
        reply = call(
            url,
            "PUT",
            f"/leases/{lease['lease_id']}/result",
            bob,
            data=result,
            headers={"X-Content-SHA256": hashlib.sha256(result).hexdigest()},
        )
        assert reply.status_code == 413
        assert "20000 bytes" in reply.json()["detail"]
        # nothing of the refused uploads is left behind
        assert not list((coordinator.data_dir / "store" / "tmp").iterdir())
        assert call(url, "GET", "/health").status_code == 200
    finally:
        coordinator.stop()


# --- rates ----------------------------------------------------------------------------------


def test_rate_limits_per_token_answer_429_with_retry_after(tmp_path: Path) -> None:
    coordinator = start_configured(tmp_path / "c", rate_limit=1.0, rate_burst=4)
    try:
        url, admin = coordinator.url, coordinator.admin_token
        bob = call(
            url, "POST", "/accounts", admin, json_body={"name": "bob", "role": "provider"}
        ).json()["token"]
        nodes = [
            call(url, "POST", "/nodes", bob, json_body=caps(f"n{i}")).json()["node_id"]
            for i in range(2)
        ]
        # the burst is used up (2 calls above), then the token is refused
        statuses = [call(url, "GET", "/me", bob).status_code for _ in range(4)]
        assert statuses[:2] == [200, 200]
        assert 429 in statuses
        reply = call(url, "GET", "/me", bob)
        assert reply.status_code == 429
        assert int(reply.headers["Retry-After"]) >= 1
        assert set(reply.json()) == {"error", "detail", "hint"}
        assert reply.json()["error"] == "too many requests"
        # another token is not affected
        assert call(url, "GET", "/me", admin).status_code == 200
        # node traffic has the account's node bucket, as large as its two nodes need:
        # bob's throttled token still polls (rate 1 + 2 x 2 a second, burst 4 + 2 x 10)
        for node in nodes:
            for _ in range(3):
                reply = call(url, "POST", f"/nodes/{node}/lease", bob, json_body={"wait": 0})
                assert reply.status_code == 204, reply.text
        # ... but past what two nodes need it is throttled too, whichever node or lease
        # the path names (the bucket is the account's, not the path's)
        paths = [f"/nodes/{nodes[i % 2]}/lease" for i in range(10)]
        paths += [f"/leases/made-up-{i}/heartbeat" for i in range(20)]
        codes = [call(url, "POST", path, bob, json_body={"wait": 0}).status_code for path in paths]
        assert 429 in codes, codes
        # the bucket refills at the configured rate
        time.sleep(float(call(url, "GET", "/me", bob).headers.get("Retry-After", "1")) + 0.1)
        assert call(url, "GET", "/me", bob).status_code == 200
        # made-up tokens share the client address's bucket: guessing does not escape it
        guesses = [call(url, "GET", "/me", f"guess-{i}").status_code for i in range(8)]
        assert guesses[0] == 401
        assert 429 in guesses
        # so do requests without a token
        assert 429 in [call(url, "GET", "/health").status_code for _ in range(8)]
    finally:
        coordinator.stop()


def test_default_limits_never_throttle_a_node(tmp_path: Path) -> None:
    """A provider's many nodes share one token: with the default limits, 100 nodes polling
    and beating at once from one address are never throttled."""
    coordinator = start_configured(tmp_path / "c")
    try:
        url, admin = coordinator.url, coordinator.admin_token
        bob = call(
            url, "POST", "/accounts", admin, json_body={"name": "bob", "role": "provider"}
        ).json()["token"]
        with ThreadPoolExecutor(16) as pool:
            nodes = list(
                pool.map(
                    lambda i: call(url, "POST", "/nodes", bob, json_body=caps(f"n{i}")).json()[
                        "node_id"
                    ],
                    range(100),
                )
            )
            polls = list(
                pool.map(
                    lambda node: (
                        call(
                            url, "POST", f"/nodes/{node}/lease", bob, json_body={"wait": 0}
                        ).status_code
                    ),
                    nodes * 3,
                )
            )
        assert set(polls) == {204}
    finally:
        coordinator.stop()


# --- overload -------------------------------------------------------------------------------


def _slow_upload(url: str, token: str, release: threading.Event) -> int:
    def body() -> Iterator[bytes]:
        yield b"PK"
        release.wait(60)
        yield b"rest"

    sha = "a" * 64
    return call(url, "PUT", f"/bundles/{sha}", token, data=body()).status_code


def test_overload_answers_503_with_retry_after(tmp_path: Path) -> None:
    coordinator = start_configured(tmp_path / "c", max_concurrent=2, max_waiting=2)
    try:
        url, admin = coordinator.url, coordinator.admin_token
        alice = call(
            url, "POST", "/accounts", admin, json_body={"name": "alice", "role": "requester"}
        ).json()["token"]
        release = threading.Event()
        with ThreadPoolExecutor(3) as pool:
            # three slow uploads for two places: two are worked on, one is refused at once
            # (its client only reads the 503 once it has sent its body)
            uploads = [pool.submit(_slow_upload, url, alice, release) for _ in range(3)]
            try:
                time.sleep(1.0)  # no other request meanwhile: it could take a place
                deadline = time.monotonic() + 30
                while (reply := call(url, "GET", "/me", admin)).status_code != 503:
                    assert time.monotonic() < deadline, "never overloaded"
                    time.sleep(0.2)
                assert reply.headers["Retry-After"] == "1"
                assert reply.json()["error"] == "unavailable"
                assert "overloaded" in reply.json()["detail"]
                # /health needs no slot: it answers even now
                assert call(url, "GET", "/health").status_code == 200
            finally:
                release.set()
            # the two slow uploads end (a wrong hash: 400), the third was refused
            assert sorted(u.result() for u in uploads) == [400, 400, 503]
        assert call(url, "GET", "/health").status_code == 200
        # long polls have their own budget: two waiting polls, the third is refused
        bob = call(
            url, "POST", "/accounts", admin, json_body={"name": "bob", "role": "provider"}
        ).json()["token"]
        node = call(url, "POST", "/nodes", bob, json_body=caps("n")).json()["node_id"]
        with ThreadPoolExecutor(2) as pool:
            polls = [
                pool.submit(
                    lambda: (
                        call(
                            url, "POST", f"/nodes/{node}/lease", bob, json_body={"wait": 3}
                        ).status_code
                    )
                )
                for _ in range(2)
            ]
            time.sleep(1)
            third = call(url, "POST", f"/nodes/{node}/lease", bob, json_body={"wait": 0})
            assert third.status_code == 503
            assert call(url, "GET", "/me", bob).status_code == 200  # others still served
            assert [p.result() for p in polls] == [204, 204]
        # a stampede: every request is answered, 200 or 503, and the server lives on
        with ThreadPoolExecutor(32) as pool:
            codes = list(pool.map(lambda _: call(url, "GET", "/me", admin).status_code, range(200)))
        assert set(codes) <= {200, 503}
        assert 200 in codes
        assert call(url, "GET", "/health").status_code == 200
        assert coordinator.process.poll() is None
    finally:
        coordinator.stop()


# --- TLS ------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_with_a_self_signed_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    coordinator = start_coordinator(tmp_path / "c", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        assert coordinator.url.startswith("https://127.0.0.1:")
        reply = requests.get(
            f"{coordinator.url}{API}/me",
            headers={"Authorization": f"Bearer {coordinator.admin_token}"},
            verify=str(cert),
            timeout=30,
        )
        assert reply.json()["role"] == "admin"
        # a client that does not trust the certificate refuses to talk
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{coordinator.url}{API}/health", timeout=30)
        # plain HTTP is not served on the TLS port
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(coordinator.url.replace("https", "http") + f"{API}/health", timeout=30)
    finally:
        coordinator.stop()


# --- accounts: create, list and revoke from the CLI -----------------------------------------

_CLI = "from app.cli import main; raise SystemExit(main())"


def tessera(url: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`tessera ARGS` in a fresh Python, as a user would run it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TESSERA_COORDINATOR=url, TESSERA_TOKEN=token)
    return subprocess.run(
        [sys.executable, "-c", _CLI, *args],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_accounts_are_created_listed_and_revoked_by_the_admin(tmp_path: Path) -> None:
    coordinator = start_configured(tmp_path / "c", verification=False)
    try:
        url, admin = coordinator.url, coordinator.admin_token
        made = tessera(url, admin, "account", "create", "mallory", "--role", "provider", "--json")
        assert made.returncode == 0, made.stderr
        mallory = json.loads(made.stdout)["token"]
        made = tessera(url, admin, "account", "create", "rita", "--role", "requester")
        assert made.returncode == 0, made.stderr
        assert "Created requester account 'rita'" in made.stdout
        rita = made.stdout.strip().splitlines()[-1]
        assert call(url, "GET", "/me", rita).json()["account"] == "rita"
        # only an admin creates accounts (or lists or revokes them)
        for token in (rita, mallory):
            refused = tessera(url, token, "account", "create", "sneaky", "--role", "requester")
            assert refused.returncode == 2
            assert "admin" in refused.stderr and "Traceback" not in refused.stderr
            assert tessera(url, token, "account", "list").returncode == 2
            assert tessera(url, token, "account", "revoke", "rita").returncode == 2
        assert call(url, "GET", "/me", rita).status_code == 200
        assert call(url, "POST", "/accounts/rita/grant", admin, json_body={"amount": 7}).ok
        node = call(url, "POST", "/nodes", mallory, json_body=caps("m1")).json()["node_id"]

        # a long poll and an event stream open before the revocation
        with ThreadPoolExecutor(2) as pool:
            poll = pool.submit(
                lambda: (
                    call(
                        url, "POST", f"/nodes/{node}/lease", mallory, json_body={"wait": 20}
                    ).status_code
                )
            )

            def stream() -> float:
                with call(url, "GET", "/events", rita) as reply:
                    assert reply.status_code == 200
                    for _ in reply.iter_lines():
                        pass
                return time.monotonic()

            ended = pool.submit(stream)
            time.sleep(1.0)
            for name in ("mallory", "rita"):
                revoked = tessera(url, admin, "account", "revoke", name)
                assert revoked.returncode == 0, revoked.stderr
                assert f"Account '{name}' is revoked" in revoked.stdout
            at = time.monotonic()
            # every new request is refused at once, on every route
            for token, path in [(rita, "/me"), (rita, "/jobs"), (mallory, "/nodes")]:
                reply = call(url, "GET", path, token)
                assert reply.status_code == 401, reply.text
                assert "revoked" in reply.json()["detail"]
            reply = call(url, "POST", "/leases/x/heartbeat", mallory, json_body={})
            assert reply.status_code == 401
            # ... and what was open ends within a second or so
            assert poll.result(timeout=10) == 401
            assert ended.result(timeout=10) - at < 5
        # revoking twice changes nothing; the admin cannot be revoked
        assert tessera(url, admin, "account", "revoke", "rita").returncode == 0
        refused = tessera(url, admin, "account", "revoke", "admin")
        assert refused.returncode == 2 and "cannot be revoked" in refused.stderr
        # the listing: every account, its role, when made and revoked, its balance
        listed = tessera(url, admin, "account", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        accounts = {a["name"]: a for a in json.loads(listed.stdout)}
        assert set(accounts) == {"admin", "mallory", "rita"}
        assert accounts["rita"]["role"] == "requester"
        assert accounts["rita"]["balance"] == 7
        assert accounts["rita"]["revoked_at"] and accounts["mallory"]["revoked_at"]
        assert accounts["admin"]["revoked_at"] is None
        text = tessera(url, admin, "account", "list").stdout
        assert text.splitlines()[0].split() == ["NAME", "ROLE", "CREATED", "REVOKED", "BALANCE"]
        assert any(line.split()[0] == "admin" and " - " in line for line in text.splitlines())
        # the list never shows a token
        assert rita not in listed.stdout and mallory not in listed.stdout
    finally:
        coordinator.stop()
    # a restart keeps the revocation (it is in the database, not only in memory)
    coordinator = start_configured(tmp_path / "c", verification=False)
    try:
        assert call(coordinator.url, "GET", "/me", rita).status_code == 401
        assert call(coordinator.url, "GET", "/me", coordinator.admin_token).status_code == 200
    finally:
        coordinator.stop()

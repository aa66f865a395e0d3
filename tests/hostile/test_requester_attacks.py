"""Attacks by a requester (issue 17): malformed numbers, fake previews, underpaid samples,
huge plans. Each test replays an attack and asserts what a safe farm does."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.hostile.attack_tools import (
    bright_previews,
    call,
    hostile_farm,
    raw_json,
    rss_peak_kb,
    spec,
    write_tile_exr,
)

JSON = {"Content-Type": "application/json"}


def test_sanity_a_requester_submits_and_a_provider_renders(tmp_path: Path) -> None:
    with hostile_farm(tmp_path / "c", "--no-verification") as farm:
        alice, bob = farm.account("alice", "requester"), farm.account("bob", "provider")
        sha = farm.upload_bundle(alice)
        job = farm.submit(alice, spec(sha))
        node = farm.node(bob, "n1")
        for _ in range(2):
            lease = farm.lease(bob, node)
            assert lease is not None and lease.assignment is not None
            r = lease.assignment.render_region
            tile = np.full((r.y1 - r.y0, r.x1 - r.x0, 4), 0.5, np.float32)
            data = write_tile_exr(tmp_path / f"{lease.lease_id}.exr", tile)
            reply = farm.upload(bob, lease.lease_id, data)
            assert reply.status_code == 200, reply.text
        deadline = time.monotonic() + 30
        while call(farm.url, "GET", f"/jobs/{job}", alice).json()["status"] != "completed":
            assert time.monotonic() < deadline, "the job did not complete"
            time.sleep(0.1)


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_preview_luminance_is_refused_up_front(tmp_path: Path, raw: str) -> None:
    with hostile_farm(tmp_path / "c") as farm:
        alice, bob = farm.account("alice", "requester"), farm.account("bob", "provider")
        call(farm.url, "POST", "/accounts/alice/grant", farm.admin, json_body={"amount": 10})
        sha = farm.upload_bundle(alice)
        node = farm.node(bob, "n1")
        balance = call(farm.url, "GET", "/wallet", alice).json()["balance"]
        body = spec(sha, max_price=1.0, previews=bright_previews(range(1, 2), size=2))
        body["previews"][0]["luminance"][0] = "@@RAW@@"
        data = raw_json(body, **{"@@RAW@@": raw})
        problems = []
        for path in ("/jobs", "/jobs/estimate"):
            reply = call(farm.url, "POST", path, alice, data=data, headers=JSON)
            if reply.status_code != 422 or "luminance" not in reply.text:
                problems.append(
                    f"POST {path}: {reply.status_code} {reply.text[:200]}"
                    " (want 422 naming luminance)"
                )
        jobs = call(farm.url, "GET", "/jobs", alice)
        if jobs.status_code != 200:
            problems.append(f"GET /jobs broke afterwards: {jobs.status_code} {jobs.text[:200]}")
        elif jobs.json() != []:
            problems.append("a job was created from a refused spec")
        after = call(farm.url, "GET", "/wallet", alice).json()["balance"]
        if after != balance:
            problems.append(f"credits were escrowed for a refused spec: {balance} -> {after}")
        reply = call(farm.url, "POST", f"/nodes/{node}/lease", bob, json_body={"wait": 0})
        if reply.status_code not in (200, 204):
            problems.append(f"lease poll broke afterwards: {reply.status_code} {reply.text[:200]}")
        assert not problems, "\n".join(problems)


def test_fake_previews_never_get_an_honest_provider_penalised(tmp_path: Path) -> None:
    with hostile_farm(tmp_path / "c", "--no-verification", "--suspend-after", "3") as farm:
        alice, bob = farm.account("alice", "requester"), farm.account("bob", "provider")
        sha = farm.upload_bundle(alice)
        node = farm.node(bob, "honest")
        for n in range(4):
            farm.submit(
                alice, spec(sha, f"liar-{n}", previews=bright_previews(range(1, 2), size=16))
            )
        refused = []
        for _ in range(8):  # bounded: 4 jobs x 2 tiles
            lease = farm.lease(bob, node)
            if lease is None:
                break
            assert lease.assignment is not None
            r = lease.assignment.render_region
            black = np.zeros((r.y1 - r.y0, r.x1 - r.x0, 4), np.float32)
            reply = farm.upload(bob, lease.lease_id, write_tile_exr(tmp_path / "t.exr", black))
            if reply.status_code != 200:
                refused.append(f"{reply.status_code} {reply.text[:150]}")
        info = farm.node_info(bob, node)
        assert info["suspended"] is None, f"the honest provider was suspended: {info['suspended']}"
        assert info["rejected"] == 0, f"honest black tiles counted as rejected: {refused}"
        farm.submit(alice, spec(sha, "after"))
        assert farm.lease(bob, node) is not None, "the honest node gets no more leases"


def test_the_lease_states_the_samples_that_were_paid_for(tmp_path: Path) -> None:
    with hostile_farm(tmp_path / "c", "--no-verification") as farm:
        alice, bob = farm.account("alice", "requester"), farm.account("bob", "provider")
        sha = farm.upload_bundle(alice)
        body = spec(sha, scene={"samples": 1}, samples=None)
        estimate = call(farm.url, "POST", "/jobs/estimate", alice, json_body=body)
        assert estimate.status_code == 200, estimate.text
        farm.submit(alice, body)
        lease = farm.lease(bob, farm.node(bob, "n1"))
        assert lease is not None and lease.assignment is not None
        a = lease.assignment
        assert a.samples is not None, "assignment.samples is None: the node renders the .blend's"
        assert a.samples == 1 == lease.samples, f"rendered {a.samples}, paid for 1"
        assert a.percentage is not None, "assignment.percentage is None"
        assert a.percentage == 10


def test_a_huge_plan_is_refused_quickly_and_cheaply(tmp_path: Path) -> None:
    with hostile_farm(tmp_path / "c") as farm:
        alice = farm.account("alice", "requester")
        sha = farm.upload_bundle(alice)
        body = spec(
            sha,
            scene={"resolution_x": 4096, "resolution_y": 4096, "frame_end": 25},
            percentage=100,
            frames={"start": 1, "end": 25},
            tiles={"columns": 64, "rows": 64},
        )
        pid = farm.coordinator.process.pid
        before = rss_peak_kb(pid)
        started = time.monotonic()
        reply = call(farm.url, "POST", "/jobs/estimate", alice, json_body=body, timeout=60)
        took = time.monotonic() - started
        grown = (rss_peak_kb(pid) - before) / 1024
        problems = []
        if reply.status_code not in (413, 422) or "task" not in reply.text.lower():
            problems.append(
                f"want 413/422 naming the task limit, got {reply.status_code}: {reply.text[:300]}"
            )
        if took >= 5:
            problems.append(f"took {took:.1f}s")
        if grown >= 100:
            problems.append(f"peak memory grew {grown:.0f} MB")
        assert not problems, "\n".join(problems)


def test_absurd_prices_are_422(tmp_path: Path) -> None:
    with hostile_farm(tmp_path / "c") as farm:
        alice = farm.account("alice", "requester")
        sha = farm.upload_bundle(alice)
        problems = []
        for path in ("/jobs", "/jobs/estimate"):
            for field in ("max_price", "max_credits"):
                for raw in ("Infinity", "1e308"):
                    body = spec(sha)
                    body[field] = "@@RAW@@"
                    data = raw_json(body, **{"@@RAW@@": raw})
                    reply = call(farm.url, "POST", path, alice, data=data, headers=JSON)
                    if reply.status_code != 422:
                        problems.append(
                            f"{field}={raw} on {path}: {reply.status_code} {reply.text[:150]}"
                        )
        jobs = call(farm.url, "GET", "/jobs", alice)
        if jobs.status_code != 200:
            problems.append(f"GET /jobs afterwards: {jobs.status_code}")
        assert not problems, "want 422 for each:\n" + "\n".join(problems)

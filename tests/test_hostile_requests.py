"""Issue 17: a hostile requester (and provider) against a real coordinator on 127.0.0.1.

Each test is one finding of the probe: a number that is not finite or far too large
(refused at the wire model, never a 500, never half-committed), a spec that claims less
work than the node would render (every assignment names its samples, percentage and
resolution), plans too large for the request or the requester's credits (refused from
arithmetic before anything is built), a bundle whose scene cannot be read (a 4xx), and
an EXR decompression bomb (refused from its header, before a pixel is decoded).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from coordinator.farm import Principal
from coordinator.planning import plan_assignments
from coordinator.pricing import render_units
from protocol.models import (
    FailureKind,
    JobSpec,
    LeaseRequest,
    NodeCapabilities,
    RenderAssignment,
    Role,
    TaskFailure,
)
from protocol.requirements import printable
from renderers.exr import ExrImage, ExrPart, write_exr
from tests.coordinator_tools import FreshFarm
from tests.farm_tools import RunningCoordinator
from tests.inprocess_farm import small_spec
from tests.test_security import call, caps, fake_bundle, start_configured

API = "/api/v1"


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    coordinator = start_configured(tmp_path_factory.mktemp("hostile"), verification=False)
    try:
        yield coordinator
    finally:
        coordinator.stop()


def requester(farm: RunningCoordinator, name: str, credits: float = 0) -> str:
    admin = farm.admin_token
    reply = call(
        farm.url, "POST", "/accounts", admin, json_body={"name": name, "role": "requester"}
    )
    assert reply.status_code == 201, reply.text
    if credits:
        granted = call(
            farm.url, "POST", f"/accounts/{name}/grant", admin, json_body={"amount": credits}
        )
        assert granted.status_code == 200, granted.text
    return str(reply.json()["token"])


def upload_bundle(farm: RunningCoordinator, token: str, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    reply = call(farm.url, "PUT", f"/bundles/{sha}", token, data=data)
    assert reply.status_code in (200, 201, 204), reply.text
    return sha


def spec_json(bundle: str, **update: Any) -> dict[str, Any]:
    fields = {**small_spec().model_dump(), "bundle": bundle, **update}
    return JobSpec.model_validate(fields).model_dump(mode="json")


def post_raw(farm: RunningCoordinator, path: str, token: str, text: str) -> requests.Response:
    return call(
        farm.url, "POST", path, token, data=text, headers={"Content-Type": "application/json"}
    )


# --- 1. a non-finite number in a spec ------------------------------------------------------


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_preview_is_refused_and_nothing_is_committed(
    farm: RunningCoordinator, bad: str
) -> None:
    token = requester(farm, f"nan-{bad.strip('-').lower()}-{len(bad)}", credits=10)
    bundle = upload_bundle(farm, token, fake_bundle())
    spec = spec_json(bundle, previews=[])
    spec["previews"] = [{"frame": 1, "width": 2, "height": 1, "luminance": ["__BAD__", 0.5]}]
    text = json.dumps(spec).replace('"__BAD__"', bad)
    for path in ("/jobs", "/jobs/estimate"):
        reply = post_raw(farm, path, token, text)
        assert reply.status_code == 422, reply.text
        assert "finite" in reply.json()["detail"]
    listed = call(farm.url, "GET", "/jobs", token)
    assert listed.status_code == 200 and listed.json() == []
    assert call(farm.url, "GET", "/wallet", token).json()["escrow"] == 0
    assert call(farm.url, "GET", "/jobs", farm.admin_token).status_code == 200


def test_a_bad_stored_spec_does_not_break_listings_or_leases(fresh_farm: FreshFarm) -> None:
    farm = fresh_farm()
    farm.create_account("artist", Role.REQUESTER)
    who = Principal("artist", Role.REQUESTER)
    data = fake_bundle()
    sha = hashlib.sha256(data).hexdigest()
    farm.put_bundle(sha, iter([data]))
    good = farm.submit(who, small_spec().model_copy(update={"bundle": sha, "max_price": 0}))
    bad = farm.submit(who, small_spec().model_copy(update={"bundle": sha, "max_price": 0}))
    with farm.db.transaction() as conn:  # what a coordinator before the fix could store
        conn.execute("UPDATE jobs SET spec = ? WHERE id = ?", ('{"previews": [null]}', bad.id))
    farm.core._specs.clear()
    listed = farm.jobs(who)
    assert good.id in [job.id for job in listed]
    assert farm.jobs(Principal("admin", Role.ADMIN))
    farm.create_account("p", Role.PROVIDER)
    provider = Principal("p", Role.PROVIDER)
    node = farm.register_node(provider, NodeCapabilities(name="n", blender_versions=["5.0.1"]))
    lease = farm.try_lease(provider, node.node_id, LeaseRequest(wait=0))
    assert lease is not None and lease.task.job_id == good.id


# --- 5. every assignment says what it pays for ----------------------------------------------


def test_assignments_name_samples_percentage_and_resolution() -> None:
    scene = small_spec().scene.model_copy(update={"samples": 1})
    spec = small_spec().model_copy(update={"scene": scene, "samples": None, "scene_cost": 0.01})
    for _, assignment in plan_assignments(spec):
        assert assignment.samples == 1
        assert assignment.percentage == 10
        assert (assignment.resolution_x, assignment.resolution_y) == (640, 480)
        region = assignment.render_region
        pixels = (region.x1 - region.x0) * (region.y1 - region.y0)
        assert render_units(spec, assignment) == pytest.approx(pixels * 1 / 1e6 * 0.01)


def test_the_lease_carries_the_paid_for_render_settings(farm: RunningCoordinator) -> None:
    token = requester(farm, "underpay")
    bundle = upload_bundle(farm, token, fake_bundle())
    scene = small_spec().scene.model_copy(update={"samples": 1, "resolution_percentage": 10})
    spec = spec_json(bundle, scene=scene, samples=None, percentage=None, max_price=0, name="u")
    assert call(farm.url, "POST", "/jobs", token, json_body=spec).status_code == 201
    admin = farm.admin_token
    call(farm.url, "POST", "/accounts", admin, json_body={"name": "up", "role": "provider"})
    provider = call(
        farm.url, "POST", "/accounts", admin, json_body={"name": "up2", "role": "provider"}
    )
    ptoken = provider.json()["token"]
    node = call(farm.url, "POST", "/nodes", ptoken, json_body=caps("up2")).json()["node_id"]
    reply = call(farm.url, "POST", f"/nodes/{node}/lease", ptoken, json_body={"wait": 5})
    assert reply.status_code == 200, reply.text
    assignment = reply.json()["assignment"]
    assert assignment["samples"] == 1
    assert assignment["percentage"] == 10
    assert (assignment["resolution_x"], assignment["resolution_y"]) == (640, 480)
    call(farm.url, "POST", f"/leases/{reply.json()['lease_id']}/release", ptoken)


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("name", "render\x1b[2J\x1b[Hpwned"),
        ("cpu", "EPYC\x1b]0;title\x07"),
        ("hostname", "host\x9b31m"),
        ("cpu_kernel", "AVX2\r\nforged line"),
    ],
)
def test_a_node_cannot_smuggle_terminal_escapes_into_what_others_see(
    farm: RunningCoordinator, field: str, text: str
) -> None:
    """Node names, CPU models and pause reasons reach requesters' and admins' terminals
    (`tessera nodes`): control characters are refused at the door, with the field named."""
    admin = farm.admin_token
    reply = call(
        farm.url, "POST", "/accounts", admin, json_body={"name": f"esc-{field}", "role": "provider"}
    )
    ptoken = reply.json()["token"]
    body = {**caps(f"esc-{field}"), field: text}
    refused = call(farm.url, "POST", "/nodes", ptoken, json_body=body)
    assert refused.status_code == 422, refused.text
    assert field in refused.text
    node = call(farm.url, "POST", "/nodes", ptoken, json_body=caps(f"esc-{field}"))
    assert node.status_code == 200, node.text
    paused = {"wait": 0, "paused": "on battery\x1b[31m, back soon"}
    lease = call(
        farm.url, "POST", f"/nodes/{node.json()['node_id']}/lease", ptoken, json_body=paused
    )
    assert lease.status_code == 422 and "paused" in lease.text


# --- 9. plans too large for the request or the requester --------------------------------------


def test_a_huge_plan_is_refused_from_arithmetic(farm: RunningCoordinator) -> None:
    token = requester(farm, "huge")
    bundle = upload_bundle(farm, token, fake_bundle())
    scene = small_spec().scene.model_copy(update={"frame_end": 25})
    spec = spec_json(
        bundle,
        scene=scene,
        frames={"start": 1, "end": 25, "step": 1},
        tiles={"columns": 64, "rows": 64},
        percentage=100,
        max_price=0,
    )
    for path in ("/jobs/estimate", "/jobs"):
        started = time.monotonic()
        reply = call(farm.url, "POST", path, token, json_body=spec)
        assert time.monotonic() - started < 2.0
        assert reply.status_code in (413, 422), reply.text
        assert "102400 tasks" in reply.json()["detail"]
        assert "20000" in reply.json()["detail"]


def test_a_requester_without_credits_queues_few_tasks(farm: RunningCoordinator) -> None:
    token = requester(farm, "broke")
    bundle = upload_bundle(farm, token, fake_bundle())
    scene = small_spec().scene.model_copy(update={"frame_end": 10})
    spec = spec_json(
        bundle,
        scene=scene,
        frames={"start": 1, "end": 10, "step": 1},
        tiles={"columns": 16, "rows": 16},
        percentage=100,
        max_price=0,
    )
    reply = call(farm.url, "POST", "/jobs", token, json_body=spec)
    assert reply.status_code == 422, reply.text
    assert "2560 tasks" in reply.json()["detail"]
    estimate = call(farm.url, "POST", "/jobs/estimate", token, json_body=spec)
    assert estimate.status_code == 200 and "2560 tasks" in estimate.json()["refusal"]
    rich = requester(farm, "rich", credits=5)
    bundle = upload_bundle(farm, rich, fake_bundle())
    assert call(farm.url, "POST", "/jobs", rich, json_body=spec).status_code == 201


# --- 10. 500s that are 4xx -------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_price", "max_credits"])
@pytest.mark.parametrize("value", ["Infinity", "1e308", "1e30"])
def test_huge_prices_are_invalid(farm: RunningCoordinator, field: str, value: str) -> None:
    token = requester(farm, f"price-{field}-{value}".replace("+", ""), credits=1)
    bundle = upload_bundle(farm, token, fake_bundle())
    spec = spec_json(bundle)
    spec[field] = "__BIG__"
    text = json.dumps(spec).replace('"__BIG__"', value)
    for path in ("/jobs/estimate", "/jobs"):
        assert post_raw(farm, path, token, text).status_code == 422


def test_a_huge_frame_number_is_not_found(farm: RunningCoordinator) -> None:
    token = requester(farm, "frames")
    bundle = upload_bundle(farm, token, fake_bundle())
    job = call(farm.url, "POST", "/jobs", token, json_body=spec_json(bundle, max_price=0)).json()
    for frame in ("99999999999999999999", "-99999999999999999999", "9223372036854775808"):
        reply = call(farm.url, "GET", f"/jobs/{job['id']}/frames/{frame}.exr", token)
        assert reply.status_code in (404, 422), reply.text


def _zip_with(method: int, data: bytes, *, flags: int = 0, corrupt: bool = False) -> bytes:
    """A zip whose scene.blend is stored with `method` (its bytes patched in afterwards)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("scene.blend", data)
    raw = bytearray(buffer.getvalue())
    if corrupt:
        start = 30 + len("scene.blend")
        raw[start : start + 8] = b"\xff" * 8
    if method != zipfile.ZIP_DEFLATED or flags:
        for signature, method_at, flags_at in ((b"PK\x03\x04", 8, 6), (b"PK\x01\x02", 10, 8)):
            at = raw.find(signature)
            raw[at + method_at : at + method_at + 2] = method.to_bytes(2, "little")
            old = int.from_bytes(raw[at + flags_at : at + flags_at + 2], "little")
            raw[at + flags_at : at + flags_at + 2] = (old | flags).to_bytes(2, "little")
    return bytes(raw)


@pytest.mark.parametrize(
    "bundle",
    [
        _zip_with(zipfile.ZIP_DEFLATED, b"BLENDER-v500" + bytes(4096), corrupt=True),
        _zip_with(zipfile.ZIP_DEFLATED, b"BLENDER-v500" + bytes(4096), flags=0x1),
        _zip_with(9, b"BLENDER-v500" + bytes(4096)),
        _zip_with(99, b"BLENDER-v500" + bytes(4096)),
        _zip_with(zipfile.ZIP_LZMA, b"BLENDER-v500" + bytes(4096)),
        _zip_with(zipfile.ZIP_BZIP2, b"BLENDER-v500" + bytes(4096)),
    ],
    ids=["corrupt-deflate", "encrypted", "deflate64", "aes", "bad-lzma", "bad-bzip2"],
)
def test_an_unreadable_scene_entry_is_a_clear_4xx(farm: RunningCoordinator, bundle: bytes) -> None:
    token = requester(farm, f"zip-{hashlib.sha256(bundle).hexdigest()[:8]}")
    sha = upload_bundle(farm, token, bundle)
    reply = call(farm.url, "POST", "/jobs", token, json_body=spec_json(sha, max_price=0))
    assert 400 <= reply.status_code < 500, reply.text
    assert "scene.blend" in reply.json()["detail"]


# --- 7. an EXR decompression bomb ------------------------------------------------------------


def _high_water_mark(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_an_exr_bomb_is_refused_from_its_header(farm: RunningCoordinator, tmp_path: Path) -> None:
    token = requester(farm, "bomber")
    bundle = upload_bundle(farm, token, fake_bundle())
    spec = spec_json(bundle, max_price=0, priority=100, name="bombed")
    assert call(farm.url, "POST", "/jobs", token, json_body=spec).status_code == 201
    admin = farm.admin_token
    ptoken = call(
        farm.url, "POST", "/accounts", admin, json_body={"name": "bomb", "role": "provider"}
    )
    ptoken = ptoken.json()["token"]
    node = call(farm.url, "POST", "/nodes", ptoken, json_body=caps("bomb")).json()["node_id"]
    reply = call(farm.url, "POST", f"/nodes/{node}/lease", ptoken, json_body={"wait": 5})
    assert reply.status_code == 200, reply.text
    lease = reply.json()
    side = 8000
    zeros = np.zeros((side, side), dtype=np.float32)  # untouched pages: costs the test nothing
    channels = {f"ViewLayer.Combined.{c}": zeros for c in "RG"}
    path = tmp_path / "bomb.exr"
    write_exr(path, ExrImage(side, side, [ExrPart("ViewLayer.Combined", channels)]))
    data = path.read_bytes()
    assert len(data) < 4 << 20
    pid = farm.process.pid
    before = _high_water_mark(pid)
    reply = call(
        farm.url,
        "PUT",
        f"/leases/{lease['lease_id']}/result",
        ptoken,
        data=data,
        headers={"X-Content-SHA256": hashlib.sha256(data).hexdigest()},
        timeout=120,
    )
    grown = _high_water_mark(pid) - before
    assert reply.status_code in (400, 409, 413, 422), reply.text
    assert grown < 200 << 20, f"the coordinator grew by {grown >> 20} MiB"


# --- minor: messages -------------------------------------------------------------------------


def test_job_messages_hide_provider_paths(fresh_farm: FreshFarm) -> None:
    farm = fresh_farm()
    farm.create_account("artist", Role.REQUESTER)
    who = Principal("artist", Role.REQUESTER)
    data = fake_bundle()
    sha = hashlib.sha256(data).hexdigest()
    farm.put_bundle(sha, iter([data]))
    job = farm.submit(who, small_spec().model_copy(update={"bundle": sha, "max_price": 0}))
    farm.create_account("p", Role.PROVIDER)
    provider = Principal("p", Role.PROVIDER)
    node = farm.register_node(provider, NodeCapabilities(name="n", blender_versions=["5.0.1"]))
    lease = farm.try_lease(provider, node.node_id, LeaseRequest(wait=0))
    assert lease is not None
    secret = "/home/alice/.cache/tessera/bundles/0123/scene.blend"
    failure = TaskFailure(
        kind=FailureKind.NO_CAMERA,
        message=f"{secret}: no camera\n" + "x" * 3000,
        retryable=False,
    )
    farm.report_failure(provider, lease.lease_id, failure)
    # One provider's word fails no job: a second account confirms the scene fault.
    farm.create_account("q", Role.PROVIDER)
    other = Principal("q", Role.PROVIDER)
    second = farm.register_node(other, NodeCapabilities(name="m", blender_versions=["5.0.1"]))
    confirming = farm.try_lease(other, second.node_id, LeaseRequest(wait=0))
    assert confirming is not None
    farm.report_failure(other, confirming.lease_id, failure)
    shown = farm.job(who, job.id)
    assert shown.status == "failed"
    assert "/home/alice" not in shown.message and len(shown.message) <= 300
    assert "\n" not in shown.message
    assert "scene.blend" in shown.message
    for task in farm.tasks(who, job.id):
        assert "/home/alice" not in task.message and len(task.message) <= 300


def test_the_disk_full_message_hides_the_free_bytes(tmp_path: Path) -> None:
    from coordinator.errors import StorageFullError
    from coordinator.store import ContentStore

    store = ContentStore(tmp_path / "store")
    with pytest.raises(StorageFullError) as raised:
        store.check_room(10, 1 << 60)
    assert "less than the minimum free space" in raised.value.message
    assert str(store.free_bytes()) not in raised.value.message


def test_old_assignments_get_explicit_settings_on_upgrade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coordinator import db as db_module
    from coordinator.db import MIGRATIONS, Database

    # A database from before the migration that made the settings explicit (and every
    # later one): created with only the migrations before it, then upgraded.
    explicit = next(i for i, script in enumerate(MIGRATIONS) if "'$.resolution_x'" in script)
    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS[:explicit])

    scene = small_spec().scene.model_copy(update={"samples": 64})
    spec = small_spec().model_copy(update={"scene": scene, "samples": None})
    old = plan_assignments(spec)[0][1].model_dump(mode="json")
    for key in ("resolution_x", "resolution_y"):
        del old[key]
    old.update(samples=None, percentage=None)
    db = Database(tmp_path / "old.sqlite")
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO accounts (name, role, token_hash, created_at)"
            " VALUES ('a', 'requester', 'h', 'x')"
        )
        conn.execute(
            "INSERT INTO jobs (id, owner, name, status, priority, spec, bundle, created_at,"
            " updated_at) VALUES ('j', 'a', 'n', 'queued', 50, ?, ?, 'x', 'x')",
            (spec.model_dump_json(), spec.bundle),
        )
        conn.execute(
            "INSERT INTO tasks (id, job_id, kind, frame, tile_index, status, attempts,"
            " assignment, updated_at) VALUES ('t', 'j', 'render', 1, 0, 'queued', 0, ?, 'x')",
            (json.dumps(old),),
        )
    db.close()
    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS)
    db = Database(tmp_path / "old.sqlite")
    raw = db.fetch_one("SELECT assignment FROM tasks WHERE id = 't'")[0]
    db.close()
    assignment = RenderAssignment.model_validate_json(raw)
    assert (assignment.samples, assignment.percentage) == (64, 10)
    assert (assignment.resolution_x, assignment.resolution_y) == (640, 480)


def test_a_nodes_own_messages_are_made_printable_before_they_are_sent() -> None:
    # A warm-up error's first line may hold a tab or a colour code: the node sends it
    # cleaned (farm_node.warmup, farm_node.gate), so an honest node is never refused.
    reason = printable("warm-up failed:\tCUDA error \x1b[31mout of memory\x1b[0m" + "x" * 400)
    assert "\t" not in reason and "\x1b" not in reason and len(reason) == 300
    assert LeaseRequest(wait=0, paused=reason).paused == reason

"""Nothing the requester declares judges a provider (issue 17, finding 4): a tile that is
flat where the requester's preview is lit is never refused or penalised on the preview's
word; another provider's render decides, and a confirmed tile marks the previews
untrustworthy. In process, with synthetic EXRs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from coordinator.farm import Farm, Principal
from protocol.client import sha256_file
from protocol.models import (
    FramePreview,
    Lease,
    LeaseRequest,
    Role,
    TaskKind,
    TaskStatus,
)
from tests.coordinator_tools import FreshFarm
from tests.inprocess_farm import CAPS, TRUTH, setup_farm, small_spec, task_status, write_tile_exr

A, B, C = (Principal(name, Role.PROVIDER) for name in "abc")
ARTIST = Principal("artist", Role.REQUESTER)
#: The frame of a black scene, as every honest node renders it.
BLACK = np.zeros_like(TRUTH)
BLACK[..., 3] = 1.0


def _lease(farm: Farm, who: Principal, node: str) -> Lease:
    lease = farm.try_lease(who, node, LeaseRequest(wait=0))
    assert lease is not None and lease.assignment is not None
    return lease


def _upload(farm: Farm, who: Principal, lease: Lease, folder: Path, frame: Any = TRUTH) -> Any:
    assert lease.assignment is not None
    r = lease.assignment.render_region
    path = write_tile_exr(folder / f"{lease.lease_id}.exr", frame[r.y0 : r.y1, r.x0 : r.x1])
    return farm.accept_result(who, lease.lease_id, sha256_file(path), iter([path.read_bytes()]))


def _add_provider(farm: Farm, who: Principal) -> str:
    farm.create_account(who.account, Role.PROVIDER)
    caps = CAPS.model_copy(update={"name": who.account, "price": 1.0})
    return farm.register_node(who, caps).node_id


def _record(farm: Farm, account: str) -> tuple[int, int, str | None]:
    row = farm.db.query_one(
        "SELECT verified, rejected, suspended FROM providers WHERE account = ?", (account,)
    )
    return (0, 0, None) if row is None else (row[0], row[1], row[2])


def _earned(farm: Farm, node_id: str) -> int:
    return int(farm.db.fetch_one("SELECT earned_milli FROM nodes WHERE id = ?", (node_id,))[0])


# --- finding 4: the requester's previews judge nobody -------------------------------------


def _lit_preview_spec() -> Any:
    """The small job with a fake preview: every pixel of frame 1 at luminance 1.0."""
    preview = FramePreview(frame=1, width=32, height=24, luminance=[1.0] * (32 * 24))
    return small_spec().model_copy(update={"previews": [preview]})


def test_fake_previews_never_refuse_or_penalise_an_honest_black_tile(
    fresh_farm: FreshFarm, demo_scene: Path, tmp_path: Path
) -> None:
    farm = fresh_farm()
    job_id, (node_a, node_b) = setup_farm(farm, _lit_preview_spec(), demo_scene, tmp_path / "b")
    first = _lease(farm, A, node_a)
    receipt = _upload(farm, A, first, tmp_path, BLACK)  # refused before the fix
    assert receipt.accepted
    assert _record(farm, "a") == (0, 0, None)
    # The doubt asks another provider to render a window where the preview is lit.
    assert task_status(farm, first.task.id) == TaskStatus.CHECKING
    sample = _lease(farm, B, node_b)
    assert sample.task.kind is TaskKind.VERIFY and sample.task.id == f"{first.task.id}-v1"
    _upload(farm, B, sample, tmp_path, BLACK)
    # The confirming render agrees: the first provider is accepted and paid, and the
    # job's previews are no longer believed.
    assert task_status(farm, first.task.id) == TaskStatus.COMPLETED
    assert _earned(farm, node_a) > 0
    assert _record(farm, "a")[1:] == (0, None)
    trusted = farm.db.fetch_one("SELECT previews_trusted FROM jobs WHERE id = ?", (job_id,))
    assert trusted[0] == 0
    # The next black tile is not doubted against them any more.
    second = _lease(farm, B, node_b)
    assert second.task.kind is TaskKind.RENDER
    assert _upload(farm, B, second, tmp_path, BLACK).accepted
    doubt = farm.db.fetch_one("SELECT doubt FROM tasks WHERE id = ?", (second.task.id,))
    assert doubt[0] is None
    for account in ("a", "b"):
        assert _record(farm, account)[1:] == (0, None), account


def test_a_black_tile_over_a_lit_scene_is_still_caught_by_other_providers(
    fresh_farm: FreshFarm, demo_scene: Path, tmp_path: Path
) -> None:
    farm = fresh_farm()
    lit = FramePreview(frame=1, width=32, height=24, luminance=[0.5] * (32 * 24))
    spec = small_spec().model_copy(update={"previews": [lit]})
    job_id, (node_a, node_b) = setup_farm(farm, spec, demo_scene, tmp_path / "b")
    node_c = _add_provider(farm, C)
    cheat = _lease(farm, A, node_a)
    _upload(farm, A, cheat, tmp_path, BLACK)
    message = farm.db.fetch_one("SELECT message FROM tasks WHERE id = ?", (cheat.task.id,))[0]
    assert "entirely black" in message
    first = _lease(farm, B, node_b)
    assert first.task.kind is TaskKind.VERIFY
    _upload(farm, B, first, tmp_path)  # disagrees: a third provider decides
    arbiter = _lease(farm, C, node_c)
    assert arbiter.task.kind is TaskKind.VERIFY and arbiter.task.id.endswith("-v2")
    _upload(farm, C, arbiter, tmp_path)
    assert task_status(farm, cheat.task.id) == TaskStatus.QUEUED
    assert _record(farm, "a")[1] == 1 and _earned(farm, node_a) == 0
    trusted = farm.db.fetch_one("SELECT previews_trusted FROM jobs WHERE id = ?", (job_id,))
    assert trusted[0] == 1

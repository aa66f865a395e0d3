"""A node whose result completes a frame takes that frame's next step (its finish) before
the next frame's render, instead of every frame's files arriving one render late.

Real SQLite and files, the coordinator's own `Farm` with its assembler driven by hand
(so the moment between the upload and the merge is held still), synthetic EXRs.
"""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from coordinator.assembly import Assembler
from coordinator.farm import Farm, Principal
from coordinator.followups import FrameFollowUps, expects_follow_up
from coordinator.verify.policy import VerificationPolicy
from protocol.client import sha256_file
from protocol.models import (
    FrameRange,
    FrameStatus,
    JobSpec,
    Lease,
    LeaseRequest,
    Role,
    TaskKind,
    TileGrid,
)
from protocol.output import FINISH_MANIFEST, FinishedEntry, FinishManifest
from tests.coordinator_tools import FreshFarm
from tests.inprocess_farm import TRUTH, setup_farm, small_spec, write_tile_exr

A = Principal("a", Role.PROVIDER)
POLL = LeaseRequest(wait=5)  # what a node asks: a long poll
NOW = LeaseRequest(wait=0)


@pytest.fixture()
def farm(fresh_farm: FreshFarm) -> Farm:
    return fresh_farm(verification=VerificationPolicy(enabled=False))


def _whole_frames(frames: int) -> JobSpec:
    return small_spec().model_copy(
        update={
            "tiles": TileGrid(columns=1, rows=1),
            "frames": FrameRange(start=1, end=frames),
            "finish": True,
        }
    )


def _render(farm: Farm, lease: Lease, folder: Path) -> None:
    path = write_tile_exr(folder / f"{lease.lease_id}.exr", TRUTH)
    receipt = farm.accept_result(A, lease.lease_id, sha256_file(path), iter([path.read_bytes()]))
    assert receipt.accepted and receipt.frame_completed


def _frame_status(farm: Farm, job_id: str, frame: int) -> str:
    return str(
        farm.db.fetch_one(
            "SELECT status FROM frames WHERE job_id = ? AND frame = ?", (job_id, frame)
        )[0]
    )


def test_the_node_that_completed_a_frame_takes_its_finish_before_the_next_render(
    farm: Farm, demo_scene: Path, tmp_path: Path
) -> None:
    job_id, (node_a, _) = setup_farm(farm, _whole_frames(2), demo_scene, tmp_path / "bundle")
    first = farm.try_lease(A, node_a, POLL)
    assert first is not None and first.task.frame == 1 and first.task.kind is TaskKind.RENDER
    _render(farm, first, tmp_path)
    # Frame 1 waits for its merge: the node's long poll is held, not given frame 2.
    assert _frame_status(farm, job_id, 1) == FrameStatus.PENDING.value
    assert farm.try_lease(A, node_a, POLL) is None
    Assembler(farm.states).assemble(job_id, 1)  # what the assembler thread does meanwhile
    assert _frame_status(farm, job_id, 1) == FrameStatus.FINISHING.value
    following = farm.try_lease(A, node_a, POLL)
    assert following is not None
    assert (following.task.kind, following.task.frame) == (TaskKind.FINISH, 1)


def test_an_immediate_lease_is_not_held_and_a_hold_ends_by_itself(
    farm: Farm, demo_scene: Path, tmp_path: Path
) -> None:
    job_id, (node_a, _) = setup_farm(farm, _whole_frames(3), demo_scene, tmp_path / "bundle")
    first = farm.try_lease(A, node_a, POLL)
    assert first is not None
    _render(farm, first, tmp_path)
    # A node that asks for an answer now gets one: the next frame.
    now = farm.try_lease(A, node_a, NOW)
    assert now is not None and (now.task.kind, now.task.frame) == (TaskKind.RENDER, 2)
    # A merge that never comes (a stuck or dead assembler) holds a node only so long.
    _render(farm, now, tmp_path)
    farm.scheduler.followups.hold_seconds = 0.2
    farm.scheduler.followups.completed(node_a, job_id, 2)
    assert farm.try_lease(A, node_a, POLL) is None
    time.sleep(0.3)
    later = farm.try_lease(A, node_a, POLL)
    assert later is not None and later.task.frame == 3


def test_only_frames_with_a_step_to_follow_hold_their_node() -> None:
    spec = _whole_frames(1)
    raw = spec.model_copy(update={"finish": False})
    denoised = raw.model_copy(update={"scene": raw.scene.model_copy(update={"denoising": True})})
    assert expects_follow_up(TaskKind.RENDER, spec, whole_frame=True)  # its finish
    assert expects_follow_up(TaskKind.DENOISE, spec, whole_frame=False)
    assert not expects_follow_up(TaskKind.FINISH, spec, whole_frame=True)
    assert not expects_follow_up(TaskKind.RENDER, raw, whole_frame=True)  # done at merge
    # A tiled, denoised frame is denoised once merged; a whole one in its render.
    assert denoised.wants_denoise
    assert expects_follow_up(TaskKind.RENDER, denoised, whole_frame=False)
    assert not expects_follow_up(TaskKind.RENDER, denoised, whole_frame=True)


def test_a_hold_reads_the_frame_from_the_database(farm: Farm) -> None:
    followups = FrameFollowUps(farm.db)
    followups.completed("node", "no-such-job", 1)
    assert not followups.holds("node"), "a frame that is not pending holds nothing"
    assert not followups.holds("another-node")


def _png_sha(farm: Farm, job_id: str, frame: int) -> str | None:
    row = farm.db.fetch_one(
        "SELECT png_sha FROM frames WHERE job_id = ? AND frame = ?", (job_id, frame)
    )
    return None if row[0] is None else str(row[0])


def test_a_frame_goes_to_its_finish_before_any_preview_and_falls_back_to_its_raw_one(
    farm: Farm, demo_scene: Path, tmp_path: Path
) -> None:
    job_id, (node_a, _) = setup_farm(farm, _whole_frames(1), demo_scene, tmp_path / "bundle")
    first = farm.try_lease(A, node_a, POLL)
    assert first is not None
    _render(farm, first, tmp_path)
    assembler = Assembler(farm.states)
    assembler.assemble(job_id, 1)
    # Queued at once: the held node gets its finish without waiting for a preview.
    assert _frame_status(farm, job_id, 1) == FrameStatus.FINISHING.value
    assert not _png_sha(farm, job_id, 1)
    finish = farm.try_lease(A, node_a, POLL)
    assert finish is not None and finish.task.kind is TaskKind.FINISH
    # The scene's file is one no thumbnail is made of (Radiance HDR): the frame's
    # preview is then its raw passes', made only now.
    upload = tmp_path / "finish.zip"
    manifest = FinishManifest(files=[FinishedEntry(path="frame_0001.hdr", kind="frame")])
    with zipfile.ZipFile(upload, "w") as archive:
        archive.writestr(FINISH_MANIFEST, manifest.model_dump_json())
        archive.writestr("frame_0001.hdr", b"#?RADIANCE\nnot really\n")
    receipt = farm.accept_result(
        A, finish.lease_id, sha256_file(upload), iter([upload.read_bytes()])
    )
    assert receipt.accepted
    assembler.assemble(job_id, 1)
    assert _frame_status(farm, job_id, 1) == FrameStatus.DONE.value
    png = _png_sha(farm, job_id, 1)
    assert png
    with Image.open(farm.store.path(png)) as preview:
        assert preview.format == "PNG" and preview.size[0] > 0

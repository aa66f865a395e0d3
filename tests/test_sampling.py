"""The duplicate-sampling policy and its verdicts, and the coordinator's handling of
samples that cannot happen (nobody else online, a sample failing on every try).

Real SQLite, real files in a real content store, synthetic EXRs: the end-to-end flow
with real renders is in test_verification.py.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.farm import Farm, Principal
from coordinator.planning import margin_for
from coordinator.store import ContentStore
from coordinator.verify.judge import Result, judge, render_class, window_assignment
from coordinator.verify.policy import (
    ProviderRecord,
    VerificationPolicy,
    choose_window,
    reputation,
    sampling_rate,
    suspension_reason,
)
from protocol.client import sha256_file
from protocol.models import (
    JobSpec,
    LeaseRequest,
    NodeCapabilities,
    Region,
    RenderAssignment,
    Role,
    TaskFailure,
    TaskKind,
    TaskStatus,
)
from renderers.regions import PixelRect
from tests.coordinator_tools import FreshFarm
from tests.inprocess_farm import (
    CAPS,
    TRUTH,
    setup_farm,
    small_spec,
    task_status,
    write_tile_exr,
)

POLICY = VerificationPolicy()


# --- policy ------------------------------------------------------------------------------


def test_new_and_doubted_providers_are_sampled_on_every_tile() -> None:
    assert sampling_rate(ProviderRecord(), POLICY) == 1.0
    assert sampling_rate(ProviderRecord(verified=49), POLICY) == 1.0
    assert sampling_rate(ProviderRecord(verified=500, rejected=10), POLICY) == 1.0
    assert sampling_rate(ProviderRecord(verified=100), POLICY) == pytest.approx(0.5)
    assert sampling_rate(ProviderRecord(verified=10_000), POLICY) == POLICY.min_rate
    assert sampling_rate(ProviderRecord(), VerificationPolicy(enabled=False)) == 0.0


def test_reputation_and_suspension() -> None:
    assert reputation(ProviderRecord()) == 1.0
    assert reputation(ProviderRecord(verified=9, rejected=1)) == pytest.approx(0.5)
    assert suspension_reason(ProviderRecord(rejected=2), POLICY) is None
    reason = suspension_reason(ProviderRecord(rejected=3), POLICY)
    assert reason is not None and "3 results" in reason


@given(
    x0=st.integers(0, 200),
    y0=st.integers(0, 200),
    w=st.integers(1, 300),
    h=st.integers(1, 300),
    seed=st.integers(0, 2**32),
)
def test_windows_lie_inside_the_core(x0: int, y0: int, w: int, h: int, seed: int) -> None:
    core = PixelRect(x0, y0, x0 + w, y0 + h)
    window = choose_window(core, POLICY, random.Random(seed))
    assert core.contains(window)
    assert min(w, POLICY.min_window) <= window.width <= max(POLICY.max_window, POLICY.min_window)
    assert min(h, POLICY.min_window) <= window.height <= max(POLICY.max_window, POLICY.min_window)


def _assignment(render: Region, core: Region, size: tuple[int, int] = (64, 48)) -> RenderAssignment:
    return RenderAssignment(
        frame=1,
        width=size[0],
        height=size[1],
        render_region=render,
        core_region=core,
        whole_frame=False,
        samples=8,
        percentage=100,
        resolution_x=size[0],
        resolution_y=size[1],
        denoise_data=True,
    )


def test_a_window_keeps_the_tile_settings_and_adds_the_margin(spec: JobSpec) -> None:
    tile = _assignment(Region(x0=28, y0=0, x1=64, y1=28), Region(x0=32, y0=0, x1=64, y1=24))
    adaptive = spec.model_copy(
        update={
            "samples": 64,
            "scene": spec.scene.model_copy(update={"adaptive_sampling": True}),
        }
    )
    margin = margin_for(adaptive)  # the job's plan's: one pixel per adaptive filter pass
    assert margin > 0
    for seed in range(50):
        window = window_assignment(tile, adaptive, POLICY, random.Random(seed))
        core, render = window.core_region, window.render_region
        assert 32 <= core.x0 < core.x1 <= 64 and 0 <= core.y0 < core.y1 <= 24
        assert render.x0 == max(0, core.x0 - margin) and render.x1 == min(64, core.x1 + margin)
        assert render.y0 == max(0, core.y0 - margin) and render.y1 == min(48, core.y1 + margin)
        assert window.samples == tile.samples and window.denoise_data
        assert not window.whole_frame


def test_exact_comparison_needs_the_same_machine_class() -> None:
    base = NodeCapabilities(name="a", blender_versions=["5.0.1"], cpu="EPYC", cpu_kernel="AVX2")
    same = base.model_copy(update={"name": "b"})
    assert render_class(base, "CPU") == render_class(same, "CPU")
    for change in ({"cpu_kernel": "SSE4.2"}, {"cpu": "Xeon"}, {"blender_versions": ["4.5"]}):
        assert render_class(base, "CPU") != render_class(base.model_copy(update=change), "CPU")
    assert render_class(None, "CPU") is None


# --- verdicts ----------------------------------------------------------------------------


TILE = _assignment(Region(x0=0, y0=0, x1=32, y1=24), Region(x0=0, y0=0, x1=32, y1=24))
WINDOW = _assignment(Region(x0=4, y0=4, x1=20, y1=20), Region(x0=8, y0=8, x1=16, y1=16))


@pytest.fixture()
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "store")


def _stored(
    store: ContentStore, folder: Path, rgba: npt.NDArray[np.floating[Any]], name: str
) -> str:
    path = write_tile_exr(folder / f"{name}.exr", rgba)
    sha, _ = store.put_stream(iter([path.read_bytes()]), max_bytes=1 << 30)
    return sha


def _result(
    store: ContentStore, folder: Path, name: str, assignment: RenderAssignment, honest: bool
) -> Result:
    r = assignment.render_region
    pixels = TRUTH[r.y0 : r.y1, r.x0 : r.x1]
    if not honest:
        pixels = pixels * 0.5
    return Result(name, name, CAPS, _stored(store, folder, pixels, name), assignment)


@pytest.mark.parametrize(
    ("tile_ok", "first_ok", "arbiter_ok", "expected"),
    [
        (True, True, None, "confirmed"),
        (False, True, None, "arbitrate"),
        (True, False, None, "arbitrate"),
        (True, False, True, "first loses"),
        (False, True, True, "tile loses"),
        (False, False, True, "all differ"),
    ],
)
def test_verdicts(
    store: ContentStore,
    tmp_path: Path,
    tile_ok: bool,
    first_ok: bool,
    arbiter_ok: bool | None,
    expected: str,
) -> None:
    tile = _result(store, tmp_path, "tile", TILE, tile_ok)
    samples = [_result(store, tmp_path, "first", WINDOW, first_ok)]
    if arbiter_ok is not None:
        if not tile_ok and not first_ok:
            # Two wrong answers that also differ from each other.
            wrong = TRUTH[4:20, 4:20] * 0.25
            samples[0] = Result(
                "first", "first", CAPS, _stored(store, tmp_path, wrong, "w"), WINDOW
            )
        samples.append(_result(store, tmp_path, "arbiter", WINDOW, arbiter_ok))
    verdict = judge(tile, samples, "CPU", store)
    if expected == "confirmed":
        assert set(verdict.confirmed) == {"tile", "first"} and not verdict.penalised
        assert set(verdict.verified) == {"tile", "first"}
    elif expected == "arbitrate":
        assert verdict.arbitrate and not verdict.confirmed and not verdict.penalised
    elif expected == "first loses":
        assert set(verdict.confirmed) == {"tile", "arbiter"}
        assert verdict.rejected == ("first",) and verdict.penalised == ("first",)
        assert not verdict.requeue_tile
    elif expected == "tile loses":
        assert set(verdict.confirmed) == {"first", "arbiter"}
        assert verdict.requeue_tile and verdict.penalised == ("tile",)
    else:
        assert verdict.requeue_tile and verdict.confirmed == ("arbiter",)
        assert not verdict.penalised
    assert all(c.outcome.mode == "exact" for c in verdict.comparisons)


# --- the coordinator when a sample cannot happen -----------------------------------------


@pytest.fixture()
def spec() -> JobSpec:
    return small_spec()


@pytest.fixture()
def farm(fresh_farm: FreshFarm) -> Farm:
    return fresh_farm(verify_wait_seconds=0.0)


def _upload(farm: Farm, who: Principal, node_id: str, folder: Path) -> str:
    lease = farm.try_lease(who, node_id, LeaseRequest(wait=0))
    assert lease is not None and lease.assignment is not None
    r = lease.assignment.render_region
    pixels = TRUTH[r.y0 : r.y1, r.x0 : r.x1]
    path = write_tile_exr(folder / f"{lease.lease_id}.exr", pixels)
    farm.accept_result(who, lease.lease_id, sha256_file(path), iter([path.read_bytes()]))
    return lease.task.id


def test_a_sample_nobody_can_take_is_dropped_and_its_tile_accepted(
    farm: Farm, spec: JobSpec, demo_scene: Path, tmp_path: Path
) -> None:
    _, (node_a, node_b) = setup_farm(farm, spec, demo_scene, tmp_path / "bundle")
    tile = _upload(farm, Principal("a", Role.PROVIDER), node_a, tmp_path)
    assert task_status(farm, tile) == TaskStatus.CHECKING
    assert task_status(farm, f"{tile}-v1") == TaskStatus.QUEUED
    assert farm.resolve_stale_samples() == 0, "b is online: the sample waits for it"
    with farm.db.transaction() as conn:
        conn.execute("UPDATE nodes SET last_seen = 0 WHERE id = ?", (node_b,))
    assert farm.resolve_stale_samples() == 1
    assert task_status(farm, tile) == TaskStatus.COMPLETED
    assert task_status(farm, f"{tile}-v1") == TaskStatus.CANCELED


def test_a_sample_failing_on_every_try_does_not_fail_the_job(
    farm: Farm, spec: JobSpec, demo_scene: Path, tmp_path: Path
) -> None:
    job_id, (node_a, node_b) = setup_farm(farm, spec, demo_scene, tmp_path / "bundle")
    tile = _upload(farm, Principal("a", Role.PROVIDER), node_a, tmp_path)
    b = Principal("b", Role.PROVIDER)
    for _ in range(farm.config.max_attempts):
        lease = farm.try_lease(b, node_b, LeaseRequest(wait=0))
        assert lease is not None and lease.task.kind is TaskKind.VERIFY
        farm.report_failure(b, lease.lease_id, TaskFailure(kind="render_failed", message="x"))
        with farm.db.transaction() as conn:  # the blocklist would keep b away from now on
            conn.execute("DELETE FROM blocklist")
            # ...and b gets the sample again only after nobody else took it for a while.
            conn.execute("UPDATE failures SET at = '2000-01-01T00:00:00+00:00'")
    # Every try failed on one account: b is kept off the sample, which waits for another
    # provider; with none, it is dropped after a while and its tile accepted.
    assert task_status(farm, f"{tile}-v1") == TaskStatus.SOFT_FAILED
    assert farm.resolve_stale_samples() == 1
    assert task_status(farm, tile) == TaskStatus.COMPLETED
    assert task_status(farm, f"{tile}-v1") == TaskStatus.CANCELED
    assert farm.job(Principal("artist", Role.REQUESTER), job_id).status.value != "failed"

"""Billing by measurement, end to end: a real coordinator, real renders, providers of
separate accounts served in turn (tests/verify_tools.py).

- A requester that declares a light scene through the API is billed by the measurement:
  its providers are paid within 30% of what an honest job of the same scene pays.
- A provider that stalls before uploading earns no more per unit than an honest one.
- A job whose measured work would pass its max_credits pauses with the reason, and the
  cap is never exceeded; one that would pass its owner's balance pauses, and resumes
  once credits are granted, keeping the tiles already accepted.
- A cheating provider's wasted work shows in the job's cost figures (served here, and in
  `tessera render --cheaters 1 --json`); the ledger checks.
- Two scenes of different weight cost in proportion to their render times.
And the pure parts: the robust aggregate, and the reference shared with farm_node.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator import metering
from farm_node import benchmark
from protocol.client import TesseraClient
from protocol.models import Job, JobStatus, Role
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.worker import RenderRequest, RenderWorker
from tests.farm_tools import REPO, RunningCoordinator, job_spec, make_bundle, start_coordinator
from tests.scene_tools import prepare_scene
from tests.verify_tools import VirtualNode, make_node, serve

#: Two frames of four tiles the size of the benchmark frame (160x90), 16 samples.
EIGHT: dict[str, object] = {"frames": "1-2", "tiles": (2, 2), "percentage": 50}
#: The weight test's jobs: three whole frames at 50%, 16 samples (the first task of a node
#: is not measured, so frames 2 and 3 are: the frames it times).
WHOLE: dict[str, object] = {"frames": "1-3", "tiles": (1, 1), "samples": 16, "percentage": 50}
COST_KEYS = {"credits_per_frame", "success_rate", "wasted_seconds", "estimate", "final"}


@pytest.fixture()
def coordinator(tmp_path: Path) -> Iterator[RunningCoordinator]:
    running = start_coordinator(tmp_path / "coordinator")
    yield running
    running.stop()


@pytest.fixture()
def admin(coordinator: RunningCoordinator) -> Iterator[TesseraClient]:
    with coordinator.client(coordinator.admin_token) as client:
        yield client


@pytest.fixture()
def requester(coordinator: RunningCoordinator, admin: TesseraClient) -> Iterator[TesseraClient]:
    token = admin.create_account("artist", Role.REQUESTER).token
    admin.grant("artist", 5000)
    with coordinator.client(token) as client:
        yield client


@pytest.fixture(scope="module")
def demo_info(worker: RenderWorker, demo_scene: Path) -> SceneInfo:
    return inspect_scene(worker, demo_scene)


def _submit(
    requester: TesseraClient, info: SceneInfo, scene: Path, folder: Path, **options: object
) -> str:
    path, sha = make_bundle(scene, folder)
    requester.upload_bundle(path)
    fields: dict[str, object] = {
        "frames": "1-2",
        "tiles": (2, 1),
        "percentage": 25,
        "samples": 16,
        "denoise": False,
        "max_price": 1.0,
    }
    fields.update(options)
    frames, tiles = str(fields.pop("frames")), fields.pop("tiles")
    assert isinstance(tiles, tuple)
    return requester.submit_job(job_spec(info, sha, frames, tiles, **fields)).id


def _finished(client: TesseraClient, *job_ids: str) -> bool:
    finished = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED)
    return all(client.job(job_id).status in finished for job_id in job_ids)


def _ledger_ok(admin: TesseraClient) -> None:
    check = admin.ledger_check()
    assert check.ok, check.problems


def _db(coordinator: RunningCoordinator) -> sqlite3.Connection:
    path = coordinator.data_dir / "coordinator.sqlite"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    return conn


def _paid_per_unit(coordinator: RunningCoordinator, job_id: str, provider: str) -> float:
    """Credits the provider received (fee included) per pixel-sample it rendered."""
    conn = _db(coordinator)
    try:
        rows = conn.execute(
            "SELECT t.task_id, SUM(CASE WHEN e.account = 'escrow:' || t.job_id THEN -e.amount"
            " END) AS paid FROM ledger_txns t JOIN ledger_entries e ON e.txn = t.id WHERE"
            " t.job_id = ? AND t.kind IN ('pay', 'adjust') AND t.task_id IN (SELECT k.id FROM"
            " tasks k JOIN nodes n ON n.id = k.node_id WHERE n.owner = ?) GROUP BY t.task_id",
            (job_id, provider),
        ).fetchall()
        paid = sum(r["paid"] for r in rows)
        samples = 0.0
        for r in rows:
            a = conn.execute(
                "SELECT (json_extract(assignment, '$.render_region.x1') -"
                " json_extract(assignment, '$.render_region.x0')) * (json_extract(assignment,"
                " '$.render_region.y1') - json_extract(assignment, '$.render_region.y0')) *"
                " json_extract(assignment, '$.samples') FROM tasks WHERE id = ?",
                (r["task_id"],),
            ).fetchone()[0]
            samples += a
    finally:
        conn.close()
    assert samples > 0, f"{provider} was paid for nothing in job {job_id}"
    return float(paid) / samples


def _tiles_of(coordinator: RunningCoordinator, job_id: str, provider: str) -> int:
    """Render tiles of the job the provider's nodes rendered (accepted)."""
    conn = _db(coordinator)
    try:
        return int(
            conn.execute(
                "SELECT COUNT(*) FROM tasks t JOIN nodes n ON n.id = t.node_id WHERE"
                " t.job_id = ? AND t.kind = 'render' AND t.status = 'completed' AND n.owner = ?",
                (job_id, provider),
            ).fetchone()[0]
        )
    finally:
        conn.close()


def _own_cost(coordinator: RunningCoordinator, job_id: str, provider: str) -> float:
    """The scene cost the provider's own tiles of the job show (its first one left out)."""
    conn = _db(coordinator)
    try:
        rows = conn.execute(
            "SELECT t.render_seconds, t.assignment FROM tasks t JOIN nodes n ON n.id ="
            " t.node_id WHERE t.job_id = ? AND t.kind = 'render' AND t.status = 'completed'"
            " AND n.owner = ? ORDER BY t.leased_at",
            (job_id, provider),
        ).fetchall()
    finally:
        conn.close()
    tiles = []
    for seconds, raw in rows[1:]:
        a = json.loads(raw)
        region = a["render_region"]
        pixels = (region["x1"] - region["x0"]) * (region["y1"] - region["y0"])
        tiles.append(metering.tile(seconds, None, pixels * a["samples"]))
    return metering.provider_cost(tiles)


# --- pure parts --------------------------------------------------------------------------


def test_the_reference_is_the_benchmarks() -> None:
    frame = 640 * 360 * (benchmark.BENCHMARK_PERCENTAGE / 100) ** 2
    units = frame * benchmark.BENCHMARK_SAMPLES / 1e6
    assert pytest.approx(benchmark.REFERENCE_SECONDS / units) == metering.REFERENCE_SECONDS_PER_UNIT


def test_a_slow_provider_cannot_raise_the_cost_and_tiles_weigh_by_their_work() -> None:
    def tiles(*costs: float, units: float = 1.0) -> list[metering.Tile]:
        ref = metering.REFERENCE_SECONDS_PER_UNIT
        return [metering.Tile(cost * units * ref, units) for cost in costs]

    honest = tiles(1.0, 1.2, 0.8)
    assert metering.robust_cost({"a": honest, "b": tiles(5.0, 6.0, 7.0)}) == pytest.approx(1.0)
    assert metering.robust_cost(
        {"a": tiles(2.0), "b": tiles(1.0), "c": tiles(100.0)}
    ) == pytest.approx(2.0)
    # A heavy small tile and a light large one: weighed by their work, as billed.
    mixed = [*tiles(3.0, units=1.0), *tiles(1.0, units=3.0)]
    assert metering.provider_cost(mixed) == pytest.approx((3.0 * 1 + 1.0 * 3) / 4)
    assert metering.robust_cost({}) is None
    assert metering.robust_cost({"a": tiles(1e-9)}) == metering.MIN_SCENE_COST
    # A node twice as fast as the reference took half the seconds for the same work.
    assert metering.tile(1.0, 2.0, 1e6) == metering.tile(2.0, 1.0, 1e6)
    assert metering.tile(2.0, None, 1e6) == metering.tile(2.0, 1.0, 1e6)
    assert metering.tile(2.0, 1.0, 1e6).cost == pytest.approx(
        2.0 / metering.REFERENCE_SECONDS_PER_UNIT
    )


# --- end to end ----------------------------------------------------------------------------


def test_a_false_scene_cost_is_billed_by_the_measurement_and_stalling_earns_nothing(
    coordinator: RunningCoordinator,
    admin: TesseraClient,
    requester: TesseraClient,
    demo_info: SceneInfo,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
) -> None:
    url = coordinator.url
    nodes = [make_node(admin, url, "bob", worker), make_node(admin, url, "carol", worker)]
    # Eight tiles each, so that a busy moment on this machine does not decide a bill.
    honest = _submit(requester, demo_info, demo_scene, tmp_path / "a", scene_cost=1.0, **EIGHT)
    light = _submit(requester, demo_info, demo_scene, tmp_path / "b", scene_cost=0.01, **EIGHT)
    serve(nodes, demo_scene, tmp_path, lambda: _finished(requester, honest, light))
    a, b = requester.job(honest), requester.job(light)
    assert a.status is JobStatus.COMPLETED and b.status is JobStatus.COMPLETED
    assert a.measured_scene_cost is not None and b.measured_scene_cost is not None
    # The light declaration sized only the escrow: the bill followed the measurement.
    assert b.cost.final > 20 * b.cost.estimate, b.cost
    assert b.cost.final == pytest.approx(a.cost.final, rel=0.3), (a.cost, b.cost)
    for provider in ("bob", "carol"):
        assert _paid_per_unit(coordinator, light, provider) == pytest.approx(
            _paid_per_unit(coordinator, honest, provider), rel=0.3
        )
    _ledger_ok(admin)

    # Dave stalls a second before every upload: his measured times are much longer. He
    # renders tiles beside two honest providers (and samples of theirs).
    dave = make_node(admin, url, "dave", worker, delay=1.0)
    twelve = {**EIGHT, "frames": "1-3"}
    stalled = _submit(requester, demo_info, demo_scene, tmp_path / "c", scene_cost=1.0, **twelve)
    serve([dave, *nodes], demo_scene, tmp_path, lambda: _finished(requester, stalled))
    c = requester.job(stalled)
    assert c.status is JobStatus.COMPLETED
    assert c.measured_scene_cost is not None
    assert _tiles_of(coordinator, stalled, "dave") >= 2, "dave rendered no tile: nothing shown"
    # Priced by his own times the job would cost far more (a 1 s stall on tiles of well
    # under a second): his stall did not set the price, the honest providers' times did.
    assert c.measured_scene_cost < 0.7 * _own_cost(coordinator, stalled, "dave")
    # In the same job, stalling earns no more per unit than rendering honestly (an honest
    # provider may earn a little more: an early tile keeps its provisional payment).
    for provider in ("bob", "carol"):
        if _tiles_of(coordinator, stalled, provider):
            assert _paid_per_unit(coordinator, stalled, "dave") <= 1.02 * _paid_per_unit(
                coordinator, stalled, provider
            )
    _ledger_ok(admin)


#: The pause tests' job: 3 frames of 2x2 tiles whose requester declares a scene 100x
#: lighter than the demo scene (the minimum cost), so the measurement bills far more.
LIGHT_CLAIM: dict[str, object] = {"frames": "1-3", "tiles": (2, 2), "scene_cost": 0.01}


def _slow_pair(admin: TesseraClient, url: str, worker: RenderWorker) -> list[VirtualNode]:
    return [
        make_node(admin, url, "bob", worker, delay=0.3),
        make_node(admin, url, "carol", worker, delay=0.3),
    ]


def _light_estimate(client: TesseraClient, info: SceneInfo) -> float:
    """What the farm holds in escrow for the LIGHT_CLAIM job of `_submit`'s defaults."""
    fields = {"percentage": 25, "samples": 16, "denoise": False, "max_price": 1.0}
    return client.estimate_job(
        job_spec(info, "0" * 64, "1-3", (2, 2), scene_cost=0.01, **fields)
    ).credits


def _serve_until_paused(
    nodes: list[VirtualNode], client: TesseraClient, job_id: str, scene: Path, scratch: Path
) -> Job:
    def paused_or_done() -> bool:
        return client.job(job_id).status in (JobStatus.PAUSED, JobStatus.COMPLETED)

    serve(nodes, scene, scratch, paused_or_done)
    job = client.job(job_id)
    assert job.status is JobStatus.PAUSED, job
    return job


def test_a_job_whose_measured_work_passes_its_cap_pauses_and_never_exceeds_it(
    coordinator: RunningCoordinator,
    admin: TesseraClient,
    requester: TesseraClient,
    demo_info: SceneInfo,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
) -> None:
    nodes = _slow_pair(admin, coordinator.url, worker)
    cap = round(_light_estimate(requester, demo_info) * 1.5, 3)
    job_id = _submit(
        requester, demo_info, demo_scene, tmp_path / "a", **LIGHT_CLAIM, max_credits=cap
    )
    job = _serve_until_paused(nodes, requester, job_id, demo_scene, tmp_path)
    assert "max_credits" in job.message and "--max-credits" in job.message
    assert job.credits_escrowed <= cap
    requester.cancel(job_id)
    time.sleep(0.2)
    job = requester.job(job_id)
    assert job.credits_spent <= cap and job.cost.final <= cap
    assert requester.wallet().escrow == 0
    _ledger_ok(admin)


def test_a_job_whose_measured_work_passes_the_balance_pauses_then_resumes_when_granted(
    coordinator: RunningCoordinator,
    admin: TesseraClient,
    demo_info: SceneInfo,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
) -> None:
    nodes = _slow_pair(admin, coordinator.url, worker)
    token = admin.create_account("thrifty", Role.REQUESTER).token
    # Enough for the declared (false, light) scene, far from what its renders measure.
    admin.grant("thrifty", round(_light_estimate(admin, demo_info) * 1.5, 3))
    with coordinator.client(token) as thrifty:
        job_id = _submit(thrifty, demo_info, demo_scene, tmp_path / "a", **LIGHT_CLAIM)
        job = _serve_until_paused(nodes, thrifty, job_id, demo_scene, tmp_path)
        assert "balance" in job.message and "Ask an admin for credits" in job.message
        accepted = {t.id for t in thrifty.tasks(job_id) if t.status == "completed"}
        assert accepted, "work was accepted before the pause"
        assert thrifty.wallet().balance >= 0
        _ledger_ok(admin)
        # Credits granted and the job resumed: it completes, keeping what was accepted.
        admin.grant("thrifty", 5000)
        thrifty.resume(job_id)
        serve(nodes, demo_scene, tmp_path, lambda: _finished(thrifty, job_id))
        job = thrifty.job(job_id)
        assert job.status is JobStatus.COMPLETED, job
        assert accepted <= {t.id for t in thrifty.tasks(job_id) if t.status == "completed"}
        assert job.cost.final > job.cost.estimate
    _ledger_ok(admin)


def test_a_cheaters_wasted_work_shows_in_the_cost_and_the_ledger_checks_out(
    coordinator: RunningCoordinator,
    admin: TesseraClient,
    requester: TesseraClient,
    demo_info: SceneInfo,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
) -> None:
    url = coordinator.url
    nodes: list[VirtualNode] = [
        make_node(admin, url, "cheater", worker, cheat="noise"),
        make_node(admin, url, "honest-a", worker),
        make_node(admin, url, "honest-b", worker),
    ]
    job_id = _submit(requester, demo_info, demo_scene, tmp_path / "a", percentage=10, samples=4)
    serve(nodes, demo_scene, tmp_path, lambda: _finished(requester, job_id))
    job = requester.job(job_id)
    assert job.status is JobStatus.COMPLETED
    cost = job.cost
    assert set(cost.model_dump()) == COST_KEYS
    assert cost.wasted_seconds > 0, cost
    assert cost.success_rate is not None and cost.success_rate < 1.0, cost
    assert cost.estimate > 0 and cost.final > 0
    assert cost.credits_per_frame == pytest.approx(cost.final / 2)
    assert job.verification_credits > 0
    by_name = {n.capabilities.name: n for n in admin.nodes()}
    cheater = by_name["cheater"]
    assert cheater.success_rate is not None and cheater.success_rate < 0.5
    assert by_name["honest-a"].success_rate == 1.0 and by_name["honest-a"].accepted_seconds > 0
    _ledger_ok(admin)


def test_two_scenes_of_different_weight_cost_in_proportion_to_their_render_times(
    coordinator: RunningCoordinator,
    admin: TesseraClient,
    requester: TesseraClient,
    demo_info: SceneInfo,
    demo_scene: Path,
    worker: RenderWorker,
    tmp_path: Path,
) -> None:
    # The demo scene, and a lighter one: every surface clear glass (fewer bounces).
    light = prepare_scene(demo_scene, tmp_path / "light.blend", glass=True)
    heavy = demo_scene

    # Plain renders of frames 2 and 3, the two scenes in turn (the best of three each: a
    # busy machine only ever makes a render slower).
    best: dict[tuple[Path, int], float] = {}
    for _ in range(3):
        for frame in (2, 3):
            for scene in (heavy, light):
                start = time.perf_counter()
                worker.render(
                    RenderRequest(
                        scene=scene, frame=frame, output=tmp_path / "t.exr", samples=16,
                        percentage=50,
                    )
                )  # fmt: skip
                took = time.perf_counter() - start
                best[scene, frame] = min(best.get((scene, frame), took), took)
    ratio_time = (best[heavy, 2] + best[heavy, 3]) / (best[light, 2] + best[light, 3])
    assert ratio_time > 1.3, "the scenes weigh the same: the test proves nothing"
    url = coordinator.url
    nodes = [make_node(admin, url, "bob", worker), make_node(admin, url, "carol", worker)]
    # One job after the other: a node renders the scene of the job being served.
    # Whole frames, as timed above: the farm's per-task overhead is a small share.
    light_id = _submit(requester, demo_info, light, tmp_path / "l", **WHOLE)
    serve(nodes, light, tmp_path, lambda: _finished(requester, light_id), timeout=120)
    heavy_id = _submit(requester, demo_info, heavy, tmp_path / "h", **WHOLE)
    serve(nodes, heavy, tmp_path, lambda: _finished(requester, heavy_id), timeout=120)
    light_job, heavy_job = requester.job(light_id), requester.job(heavy_id)
    assert light_job.status is JobStatus.COMPLETED and heavy_job.status is JobStatus.COMPLETED
    ratio_cost = heavy_job.cost.final / light_job.cost.final
    assert 0.6 <= ratio_cost / ratio_time <= 1.6, (ratio_cost, ratio_time)
    _ledger_ok(admin)


def test_tessera_render_with_a_cheater_reports_the_cost_and_the_wasted_work(
    demo_scene: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [
            sys.executable, "-m", "app.cli", "render", str(demo_scene), "--nodes", "2",
            "--cheaters", "1", "--frames", "1-2", "--tiles", "2x2", "--percentage", "10",
            "--samples", "4", "--no-denoise", "--out", str(tmp_path), "--json",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["probed"] is True  # a farm with a cheater needs the previews
    cost = summary["cost"]
    assert set(cost) == COST_KEYS
    assert summary["status"] == "completed" and summary["ledger_ok"] is True
    cheater = next(p for p in summary["providers"] if p["cheat"])
    assert cheater["rejected"] >= 1 and cheater["success_rate"] < 1.0
    # The cheater's refused results were delivered and wasted: both show in the cost.
    assert cost["success_rate"] < 1.0 and cost["wasted_seconds"] > 0, cost
    assert cost["estimate"] > 0 and cost["final"] > 0
    assert cost["credits_per_frame"] == pytest.approx(cost["final"] / 2)

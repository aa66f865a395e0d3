"""`--tiles auto` and a grid's cost on a real inspected scene (app.job_spec.tile_choice),
and the margin the coordinator plans from what the submitter reports."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from app.job_spec import job_options, job_spec_for, tile_choice
from coordinator.planning import frame_assignments, margin_for, plan_for, plan_of_tasks
from protocol.models import Region
from renderers.auto_tiles import efficient_tile_pixels
from renderers.regions import plan_grid
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.scene_probe import probe_scene
from renderers.worker import RenderWorker


@pytest.fixture(scope="module")
def demo_info(worker: RenderWorker, demo_scene: Path) -> SceneInfo:
    return inspect_scene(worker, demo_scene)


def test_the_scene_reports_what_the_margin_needs(demo_info: SceneInfo) -> None:
    assert demo_info.adaptive_sampling and demo_info.adaptive_min_samples == 0
    spec = job_spec_for(demo_info, job_options(tiles={"columns": 4, "rows": 4}))
    assert spec.scene.adaptive_threshold == pytest.approx(0.02)
    assert spec.scene.adaptive_min_samples == 0
    # 64 samples, threshold 0.02: Cycles' one filter pass follows the last sample.
    assert margin_for(spec) == 0 and plan_for(spec).margin == 0
    # At 100 samples the passes after samples 64, 80 and 96 change what is sampled.
    more = job_spec_for(demo_info, job_options(tiles={"columns": 4, "rows": 4}, samples=100))
    assert plan_for(more).margin == 3


def test_an_older_client_gets_the_conservative_margin(demo_info: SceneInfo) -> None:
    spec = job_spec_for(demo_info, job_options(tiles={"columns": 4, "rows": 4}))
    unknown = spec.model_copy(
        update={
            "scene": spec.scene.model_copy(
                update={"adaptive_threshold": None, "adaptive_min_samples": None}
            )
        }
    )
    assert margin_for(unknown) == 3  # passes after samples 16, 32 and 48 are possible


def test_auto_chooses_for_the_nodes_and_the_frames(demo_info: SceneInfo) -> None:
    one_frame = job_options(frames="7", percentage=150)  # 960x540
    options, choice = tile_choice(demo_info, one_frame, auto_nodes=64)
    assert (options.tiles.columns, options.tiles.rows) == (8, 8) == (choice.columns, choice.rows)
    assert choice.overhead == 0.0
    options, choice = tile_choice(demo_info, job_options(), auto_nodes=8)  # 24 frames
    assert (options.tiles.columns, options.tiles.rows) == (1, 1)
    assert "busy" in choice.reason


def test_a_chosen_grid_is_kept_and_costed(demo_info: SceneInfo) -> None:
    asked = job_options(tiles={"columns": 4, "rows": 4}, samples=512)
    options, choice = tile_choice(demo_info, asked)
    assert options == asked
    assert choice.overhead > 0.0 and "estimated overhead" in choice.describe()


def test_auto_uses_the_probed_fixed_cost_per_render(
    worker: RenderWorker, demo_scene: Path, demo_info: SceneInfo
) -> None:
    one_frame = job_options(frames="7", percentage=150)
    probe = probe_scene(worker, demo_scene, [7], samples=None, info=demo_info)
    assert 0.0 < probe.fixed_seconds < 5.0  # scene sync and the file write, per render
    smallest = efficient_tile_pixels(probe.fixed_seconds, probe.scene_seconds, 64)
    _, choice = tile_choice(demo_info, one_frame, auto_nodes=64, measured=probe)
    assert (960 // choice.columns) * (540 // choice.rows) >= smallest or choice.tiles == 1
    # A scene ten thousand times as slow to sync gets whole frames.
    slow = replace(probe, fixed_seconds=probe.fixed_seconds * 10_000)
    _, whole = tile_choice(demo_info, one_frame, auto_nodes=64, measured=slow)
    assert whole.tiles == 1 and "cost more than they save" in whole.reason


def test_merge_keeps_the_margins_a_job_was_rendered_with(demo_info: SceneInfo) -> None:
    """A job planned before the margin was derived (4 px then, 0 now) still merges: the
    coordinator takes the regions from its tasks' assignments."""
    spec = job_spec_for(demo_info, job_options(tiles={"columns": 4, "rows": 4}))
    old = plan_grid(640, 360, 4, 4, margin=4)
    assignments = {
        index: assignment.model_copy(
            update={
                "render_region": Region(
                    x0=tile.render.x0, y0=tile.render.y0, x1=tile.render.x1, y1=tile.render.y1
                )
            }
        )
        for (index, assignment), tile in zip(frame_assignments(spec, 1), old.tiles, strict=True)
    }
    plan = plan_of_tasks(spec, assignments)
    assert plan.margin == 4 and [t.render for t in plan.tiles] == [t.render for t in old.tiles]
    assert [t.core for t in plan.tiles] == [t.core for t in old.tiles]
    del assignments[5]
    assert plan_of_tasks(spec, assignments) == plan_for(spec)
    assert plan_for(spec).margin == 0

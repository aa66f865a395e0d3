"""Tests of the submit-time scene probe (renderers/scene_probe.py) and of
`prepare_submission` putting its results into the job spec, with real Blender renders.

The cost assertions compare render times, so their bands are wide: the demo scene IS the
benchmark scene (its cost is 1 up to timing noise), and the heavier scene is made about
twenty times as expensive per sample and only asked to cost four times as much.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from app.probe_memo import MEMO_FILE, BenchmarkMemo
from app.submit import prepare_submission
from common.errors import NoCameraError, UsageError
from protocol.models import JobOptions, JobSpec
from renderers.exr import read_exr
from renderers.scene_info import inspect_scene
from renderers.scene_probe import (
    MAX_COST,
    MIN_COST,
    PREVIEW_MAX_SIDE,
    SceneProbe,
    preview_frames,
    preview_percentage,
    probe_scene,
)
from renderers.worker import RenderRequest, RenderWorker
from tests.scene_tools import prepare_scene

#: 24 fully transparent veils in front of the camera: every camera, shadow and bounce ray
#: that crosses them is shaded 24 more times (measured: about 20x the demo's cost per
#: sample, loads as fast as the demo).
HEAVY_SCRIPT = """
import sys, bpy
from mathutils import Vector
bpy.ops.wm.open_mainfile(filepath=sys.argv[-2], load_ui=False, use_scripts=False)
scene = bpy.context.scene
camera = scene.camera.matrix_world
forward = camera.to_quaternion() @ Vector((0, 0, -1))
material = bpy.data.materials.new("Veil")
material.use_nodes = True
nodes = material.node_tree.nodes
for node in list(nodes):
    if node.type != "OUTPUT_MATERIAL":
        nodes.remove(node)
veil = nodes.new("ShaderNodeBsdfTransparent")
material.node_tree.links.new(veil.outputs[0], nodes["Material Output"].inputs["Surface"])
mesh = bpy.data.meshes.new("Veil")
mesh.from_pydata([(-5, -5, 0), (5, -5, 0), (5, 5, 0), (-5, 5, 0)], [], [(0, 1, 2, 3)])
mesh.materials.append(material)
for index in range(24):
    veil_object = bpy.data.objects.new(f"Veil{index}", mesh)
    veil_object.location = camera.translation + forward * (0.2 + 0.01 * index)
    veil_object.rotation_euler = camera.to_euler()
    scene.collection.objects.link(veil_object)
scene.cycles.transparent_max_bounces = 1024
bpy.ops.wm.save_as_mainfile(filepath=sys.argv[-1])
"""


@pytest.fixture(scope="module")
def demo_probe(worker: RenderWorker, demo_scene: Path) -> SceneProbe:
    return probe_scene(worker, demo_scene, range(1, 25), samples=None)


@pytest.fixture(scope="module")
def heavy_scene(demo_scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("heavy")
    script, target = folder / "make_heavy.py", folder / "heavy.blend"
    script.write_text(HEAVY_SCRIPT)
    subprocess.run(
        [sys.executable, "-I", str(script), str(demo_scene), str(target)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return target


def test_preview_frames_are_first_middle_and_last() -> None:
    assert preview_frames(range(1, 25)) == [1, 13, 24]
    assert preview_frames(range(1, 25, 5)) == [1, 11, 21]
    assert preview_frames([7]) == [7]
    assert preview_frames([3, 4]) == [3, 4]
    with pytest.raises(UsageError):
        preview_frames([])


@pytest.mark.parametrize(
    ("size", "percentage"),
    [((640, 360), 10), ((1920, 1080), 3), ((1080, 1920), 3), ((64, 64), 100), ((32, 20), 100)],
)
def test_preview_percentage_fits_the_preview(size: tuple[int, int], percentage: int) -> None:
    assert preview_percentage(*size) == percentage
    assert size[0] * percentage // 100 <= PREVIEW_MAX_SIDE
    assert size[1] * percentage // 100 <= PREVIEW_MAX_SIDE


def test_demo_previews(demo_probe: SceneProbe) -> None:
    assert [p.frame for p in demo_probe.previews] == [1, 13, 24]
    for preview in demo_probe.previews:
        assert (preview.width, preview.height) == (64, 36)  # 10 % of 640x360
        assert len(preview.luminance) == 64 * 36
        luminance = np.array(preview.luminance)
        assert np.isfinite(luminance).all()
        assert (luminance > 0).mean() > 0.9  # a lit studio: hardly a black pixel


def test_a_preview_is_the_luminance_of_the_same_render(
    worker: RenderWorker, demo_scene: Path, demo_probe: SceneProbe, tmp_path: Path
) -> None:
    """Orientation (row 0 at the top) and Rec.709 weights: the preview of frame 1 is the
    render with the preview's settings, seen through those weights."""
    output = tmp_path / "frame1.exr"
    preview = demo_probe.previews[0]
    assert preview.samples <= 16  # min(the demo's 64, PREVIEW_MAX_SAMPLES) or fewer
    worker.render(
        RenderRequest(
            scene=demo_scene,
            frame=1,
            output=output,
            samples=preview.samples,
            percentage=10,
            seed=0,
            adaptive_sampling=False,
        )
    )
    rgb = read_exr(output).combined_rgba()[..., :3].astype(np.float64)
    expected = rgb @ np.array([0.2126, 0.7152, 0.0722])
    luminance = np.array(preview.luminance).reshape(36, 64)
    np.testing.assert_allclose(luminance, expected, rtol=1e-5, atol=1e-9)
    assert not np.allclose(luminance, expected[::-1], rtol=0.05)  # the top is not the bottom


def test_the_demo_scene_costs_about_one(demo_probe: SceneProbe) -> None:
    # The demo scene is the benchmark scene: only timing noise separates the two.
    assert 0.3 < demo_probe.cost < 3.0
    assert demo_probe.scene_seconds > 0 and demo_probe.benchmark_seconds > 0


def test_a_heavier_scene_costs_more(
    worker: RenderWorker, demo_scene: Path, heavy_scene: Path
) -> None:
    light = probe_scene(worker, demo_scene, [1], samples=4)
    heavy = probe_scene(worker, heavy_scene, [1], samples=4)
    assert heavy.cost > 4 * light.cost, (heavy.cost, light.cost)
    assert MIN_COST <= heavy.cost <= MAX_COST
    # The job's samples cap the preview's; the previews still have the frame's aspect.
    assert [(p.frame, p.width, p.height) for p in heavy.previews] == [(1, 64, 36)]


def test_a_huge_frame_is_scaled_down_to_fit(
    worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    # 1 % of 8000x4000 is 80x40: rendered, then box-averaged to 64x32.
    huge = prepare_scene(demo_scene, tmp_path / "huge.blend", resolution_x=8000, resolution_y=4000)
    probe = probe_scene(worker, huge, [1], samples=2, benchmark_scene=demo_scene)
    (preview,) = probe.previews
    assert (preview.width, preview.height) == (64, 32)
    # The same render at full preview resolution, for comparison.
    output = tmp_path / "full.exr"
    worker.render(
        RenderRequest(
            scene=huge,
            frame=1,
            output=output,
            samples=preview.samples,
            percentage=1,
            seed=0,
            adaptive_sampling=False,
        )
    )
    rgb = read_exr(output).combined_rgba()[..., :3].astype(np.float64)
    full = rgb @ np.array([0.2126, 0.7152, 0.0722])
    assert full.shape == (40, 80)
    scaled = np.array(preview.luminance).reshape(32, 64)
    assert scaled.mean() == pytest.approx(full.mean(), rel=0.05)
    # Each quarter of the frame stays where it was (rows top-down, columns left-right).
    for rows, columns in ((slice(0, 16), slice(0, 32)), (slice(16, 32), slice(32, 64))):
        full_rows = slice(rows.start * 40 // 32, rows.stop * 40 // 32)
        full_columns = slice(columns.start * 80 // 64, columns.stop * 80 // 64)
        assert scaled[rows, columns].mean() == pytest.approx(
            full[full_rows, full_columns].mean(), rel=0.05
        )


def test_prepare_submission_fills_scene_cost_and_previews(
    worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    prepared = prepare_submission(
        worker, demo_scene, JobOptions(frames="2-6", samples=4), bundle_dir=tmp_path / "bundle"
    )
    spec = prepared.spec
    assert prepared.probe is not None
    assert spec.scene_cost == pytest.approx(prepared.probe.cost, abs=1e-4)
    assert 0.3 < spec.scene_cost < 3.0
    assert [(p.frame, p.width, p.height) for p in spec.previews] == [
        (2, 64, 36),
        (4, 64, 36),
        (6, 64, 36),
    ]
    # What the coordinator receives reads back the same.
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec
    skipped = prepare_submission(
        worker, demo_scene, JobOptions(frames="2"), bundle_dir=tmp_path / "bundle2", probe=False
    )
    assert skipped.probe is None
    assert (skipped.spec.scene_cost, skipped.spec.previews) == (1.0, [])


def test_a_scene_error_comes_before_the_probe(
    worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    no_camera = prepare_scene(demo_scene, tmp_path / "no-camera.blend", remove_camera=True)
    with pytest.raises(NoCameraError):
        prepare_submission(worker, no_camera, bundle_dir=tmp_path / "bundle")
    with pytest.raises(UsageError, match="frames 30-40"):
        prepare_submission(
            worker, demo_scene, JobOptions(frames="30-40"), bundle_dir=tmp_path / "bundle"
        )
    assert not (tmp_path / "bundle").exists() or not any((tmp_path / "bundle").iterdir())


def test_probe_of_an_inspected_scene_reuses_the_inspection(
    worker: RenderWorker, demo_scene: Path
) -> None:
    info = inspect_scene(worker, demo_scene)
    probe = probe_scene(worker, demo_scene, [5], samples=2, info=info, benchmark_scene=demo_scene)
    assert [p.frame for p in probe.previews] == [5]
    with pytest.raises(UsageError):
        probe_scene(worker, demo_scene, [1], samples=0, info=info)


def test_the_probe_memory_estimate_is_within_2x_of_blenders_reported_peak(
    worker: RenderWorker, demo_scene: Path, demo_probe: SceneProbe, tmp_path: Path
) -> None:
    """The probe renders small; its estimate for the whole frame is compared with the
    peak Cycles reports while rendering the whole demo frame as a job would (its own
    samples, its denoising)."""
    info = inspect_scene(worker, demo_scene)
    whole = worker.render(
        RenderRequest(
            scene=demo_scene,
            frame=1,
            output=tmp_path / "whole.exr",
            samples=4,
            denoise_data=info.denoising,
            denoise=info.denoising,
        )
    )
    reported = whole.peak_memory
    assert reported > 1 << 20, f"Blender reported no render memory ({reported} bytes)"
    assert demo_probe.memory.measured
    estimate = demo_probe.memory.peak(whole.frame_width * whole.frame_height)
    assert reported / 2 <= estimate <= reported * 2, (
        f"estimate {estimate / 2**20:.1f} MiB vs Blender's peak {reported / 2**20:.1f} MiB"
    )
    # The estimate grows with the frame: a 4x larger frame needs more.
    assert demo_probe.memory.peak(4 * whole.frame_width * whole.frame_height) > estimate


def test_the_benchmark_side_is_remembered_per_machine_and_only_the_scene_renders_again(
    worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    memo = BenchmarkMemo(tmp_path, worker.build)
    first = probe_scene(worker, demo_scene, [1], samples=4, benchmark_memo=memo)
    assert not first.benchmark_remembered
    assert list(memo.values()) == [first.benchmark_seconds]
    # A later probe on this machine (a new memo reads the file) renders only the scene.
    # (The figure is kept by the pixel count the cost renders use, which a scene much
    # heavier than this one lowers: such a scene measures the benchmark at its own.)
    again = BenchmarkMemo(tmp_path, worker.build)
    later = probe_scene(worker, demo_scene, [3, 5], samples=4, benchmark_memo=again)
    assert later.benchmark_remembered
    assert later.benchmark_seconds == first.benchmark_seconds
    assert later.cost == pytest.approx(later.scene_seconds / first.benchmark_seconds, rel=1e-6)
    assert [p.frame for p in later.previews] == [3, 5]
    # Another Blender build (or device) is another machine: nothing is remembered for it.
    other = BenchmarkMemo(tmp_path, replace(worker.build, build_hash="0123456789ab"))
    assert dict(other) == {}
    assert dict(BenchmarkMemo(tmp_path, worker.build, device="CUDA")) == {}


def test_an_unreadable_probe_memo_is_measured_again_and_rewritten(
    worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    (tmp_path / MEMO_FILE).write_text("{not json")
    memo = BenchmarkMemo(tmp_path, worker.build)
    assert dict(memo) == {}
    probe = probe_scene(worker, demo_scene, [1], samples=2, benchmark_memo=memo)
    assert not probe.benchmark_remembered
    assert dict(BenchmarkMemo(tmp_path, worker.build)) == dict(memo) != {}

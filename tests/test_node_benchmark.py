"""The node benchmark: measured once on the demo scene, cached per build/device/CPU, and
its warm worker handed on to the first task."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from farm_node.benchmark import (
    REFERENCE_SECONDS,
    benchmark_key,
    benchmark_score,
    cached_score,
)
from farm_node.runner import TaskRunner
from protocol.models import Lease, Region, RenderAssignment, Task, TaskKind, TaskStatus
from renderers.builds import BlenderBuild
from renderers.limits import RenderLimits


def _never_called() -> Path:
    raise AssertionError("the benchmark ran again instead of using its cache")


def test_the_score_is_measured_once_and_cached(
    bpy_build: BlenderBuild, demo_scene: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "benchmark.json"
    score = benchmark_score(bpy_build, demo_scene, cache, cpu_model="Test CPU")
    entries = json.loads(cache.read_text())
    (key,) = entries
    assert key.startswith("5.0.1 | CPU | Test CPU")
    seconds = entries[key]["seconds"]
    assert score == pytest.approx(REFERENCE_SECONDS / seconds, rel=1e-3)
    # A generous band: the reference machine scores about 1 when it is not busy.
    assert 0.01 < score < 100
    assert benchmark_score(bpy_build, _never_called, cache, cpu_model="Test CPU") == score


@pytest.mark.parametrize("sandbox", ["off", "bwrap"])
def test_the_runner_keeps_the_benchmark_worker_warm_for_the_first_task(
    bpy_build: BlenderBuild, demo_scene: Path, tmp_path: Path, sandbox: str
) -> None:
    """The benchmark's Blender takes the first bundle. In the sandbox it must restart
    once, since a sandbox shows Blender its one bundle only and its mounts are fixed."""
    limits = RenderLimits(sandbox=sandbox)
    with TaskRunner(bpy_build, tmp_path / "scratch", limits=limits) as runner:
        benchmark_score(runner, lambda: demo_scene, tmp_path / "b.json")
        assert runner.worker_starts == 1
        region = Region(x0=0, y0=0, x1=32, y1=18)
        lease = Lease(
            lease_id="l1",
            task=Task(
                id="t1",
                job_id="j",
                kind=TaskKind.RENDER,
                frame=1,
                tile_index=0,
                status=TaskStatus.ACTIVE,
                attempts=0,
            ),
            job_name="j",
            bundle="c" * 64,
            bundle_size=0,
            scene_path="demo.blend",
            assignment=RenderAssignment(
                frame=1,
                width=32,
                height=18,
                render_region=region,
                core_region=region,
                whole_frame=True,
                samples=1,
                percentage=5,
                resolution_x=640,
                resolution_y=360,
                denoise_data=False,
            ),
            device="CPU",
            samples=1,
            expires_at=datetime.now(UTC) + timedelta(minutes=1),
            heartbeat_interval=1.0,
        )
        runner.render(lease, demo_scene, tmp_path / "tile.exr")
        expected = 1 if sandbox == "off" else 2
        assert runner.worker_starts == expected, (
            "the first bundle took over the benchmark's Blender"
        )
        assert runner.warm_bundles() == ["c" * 64]


def test_keys_separate_builds_devices_cpus_and_kernels() -> None:
    keys = {
        benchmark_key("5.0.1", "CPU", "AMD EPYC", "AVX2"),
        benchmark_key("5.0.1", "CPU", "AMD EPYC", "SSE4.2"),
        benchmark_key("4.2.3", "CPU", "AMD EPYC", "AVX2"),
        benchmark_key("5.0.1", "optix", "AMD EPYC", ""),
        benchmark_key("5.0.1", "CPU", "Intel Xeon", "AVX2"),
    }
    assert len(keys) == 5
    assert benchmark_key("5.0.1", "optix", "X") == benchmark_key("5.0.1", "OPTIX", "X")


def test_an_unreadable_cache_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "benchmark.json"
    cache.write_text("{broken")
    with caplog.at_level(logging.WARNING):
        assert cached_score(cache, "anything") is None
    assert "unreadable benchmark cache" in caplog.text
    assert cached_score(tmp_path / "missing.json", "anything") is None

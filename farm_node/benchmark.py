"""The node's benchmark score: how fast it renders a fixed frame, relative to a reference.

Work is priced in benchmark-normalised units (a slow node earns the same for the same
pixels), so every node renders the same small frame of the demo scene once: 160x90
pixels (25 % of 640x360), 16 samples, frame 1, seed 0, CPU unless told otherwise.
``score = REFERENCE_SECONDS / measured``, where REFERENCE_SECONDS is this project's
reference machine (2 vCPUs of an AMD EPYC, bpy 5.0.1), so that machine scores about 1.0
and a node twice as fast scores 2.0. The score is cached in a JSON file keyed by
Blender version, device and CPU model (and kernel), so it is measured once per setup.

This module must not touch the network or decide what a node earns; it only measures.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common.json_files import read_json_object, write_json_atomically
from farm_node.hardware import CPUINFO, cpu_kernel, parse_cpuinfo, read_proc_file
from farm_node.runner import TaskRunner
from renderers.builds import BlenderBuild
from renderers.worker import RenderRequest, RenderWorker

__all__ = [
    "BENCHMARK_FRAME",
    "BENCHMARK_PERCENTAGE",
    "BENCHMARK_SAMPLES",
    "REFERENCE_SECONDS",
    "benchmark_key",
    "benchmark_score",
    "cached_score",
]

log = logging.getLogger(__name__)

#: Seconds the reference machine takes for the benchmark frame (best of the timed
#: renders): measured with bpy 5.0.1 on the dev machine (2 vCPUs of an AMD EPYC, AVX2).
REFERENCE_SECONDS = 0.40
BENCHMARK_FRAME = 1
BENCHMARK_PERCENTAGE = 25  # of the demo scene's 640x360: 160x90
BENCHMARK_SAMPLES = 16
#: The first render of a scene also loads it and builds its BVH: it is not timed.
TIMED_RENDERS = 3
_BENCHMARK_TIMEOUT = 600.0


def benchmark_key(blender_version: str, device: str, cpu_model: str, kernel: str = "") -> str:
    """The cache key of a score: the same build, device and CPU score the same."""
    return " | ".join((blender_version, device.upper(), cpu_model, kernel))


def cached_score(cache_file: Path, key: str) -> float | None:
    """The score stored under `key`, or None (an unreadable cache is ignored with a warning)."""
    entry = read_json_object(cache_file, "benchmark cache").get(key)
    if isinstance(entry, dict) and isinstance(entry.get("score"), int | float):
        return float(entry["score"])
    return None


def benchmark_score(
    runner_or_build: TaskRunner | BlenderBuild,
    scene: Path | Callable[[], Path],
    cache_file: Path,
    *,
    device: str = "CPU",
    cpu_model: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> float:
    """This node's score, from `cache_file` when known, else rendered and stored there.

    `scene` is the demo scene, or a function that makes it (called only when the
    benchmark has to run). With a `TaskRunner` its warm worker is used (and stays warm for
    the first task); with a `BlenderBuild` a worker is started and closed here.
    Raises the worker's errors when the render fails.
    """
    build = runner_or_build.build if isinstance(runner_or_build, TaskRunner) else runner_or_build
    env = runner_or_build.extra_env if isinstance(runner_or_build, TaskRunner) else extra_env
    cpu_text = read_proc_file(CPUINFO)
    model = cpu_model if cpu_model is not None else parse_cpuinfo(cpu_text)[0]
    kernel = cpu_kernel(cpu_text, env or {}) if device.upper() == "CPU" else ""
    key = benchmark_key(build.version, device, model, kernel)
    known = cached_score(cache_file, key)
    if known is not None:
        return known
    scene_path = scene() if callable(scene) else scene
    seconds = _measure(runner_or_build, scene_path, device, env or {})
    score = round(REFERENCE_SECONDS / max(seconds, 1e-6), 4)
    log.info("Benchmark: %.3f s for the reference frame, score %.3f (%s)", seconds, score, key)
    data = read_json_object(cache_file, "benchmark cache")
    data[key] = {"score": score, "seconds": round(seconds, 4), "measured_at": time.time()}
    write_json_atomically(cache_file, data)
    return score


def _measure(
    runner_or_build: TaskRunner | BlenderBuild, scene: Path, device: str, env: dict[str, str]
) -> float:
    with tempfile.TemporaryDirectory(prefix="tessera-benchmark-") as scratch:
        output = Path(scratch) / "benchmark.exr"

        def request(index: int) -> RenderRequest:
            return RenderRequest(
                scene=scene,
                frame=BENCHMARK_FRAME,
                output=output.with_name(f"benchmark-{index}.exr"),
                samples=BENCHMARK_SAMPLES,
                percentage=BENCHMARK_PERCENTAGE,
                seed=0,
                device=device.upper(),
            )

        timings: list[float] = []
        if isinstance(runner_or_build, TaskRunner):
            for index in range(TIMED_RENDERS + 1):
                result = runner_or_build.render_request(request(index), timeout=_BENCHMARK_TIMEOUT)
                timings.append(result.seconds)
        else:
            with RenderWorker(runner_or_build, extra_env=env) as worker:
                for index in range(TIMED_RENDERS + 1):
                    result = worker.render(request(index), timeout=_BENCHMARK_TIMEOUT)
                    timings.append(result.seconds)
    # The best of the timed renders: other load on the machine only ever slows a render.
    return min(timings[1:])

"""Farm overhead and scaling, each a ratio measured in the same run.

Overhead: 8 frames of the demo scene at 320x180 rendered by plain Blender in one process
(its start included) vs the same frames through a local farm with one node and the same
thread count (submit, pack, upload, lease, render, upload, merge, denoise task, download;
the farm itself is already running, as it would be). Goal <= 1.05x.
Scaling: the same job on 2 nodes with 1 thread each vs 1 node with 1 thread. Goal >=
1.9x on a 2-core machine.
Run: `python -m benchmarks.bench_farm [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.follow import follow_job
from app.local_farm import LocalFarm
from app.submit import prepare_submission, submit
from benchmarks.common import report
from protocol.client import TesseraClient
from protocol.models import JobOptions, TileGrid
from renderers.builds import default_build
from renderers.demo_scene import ensure_demo_scene
from renderers.worker import RenderWorker

PLAIN_BLENDER = r"""
import json, sys, time
import bpy
scene_path, out_dir, opts = sys.argv[-3], sys.argv[-2], json.loads(sys.argv[-1])
bpy.ops.wm.open_mainfile(filepath=scene_path, load_ui=False, use_scripts=False)
scene = bpy.context.scene
scene.render.resolution_percentage = opts["percentage"]
scene.cycles.samples = opts["samples"]
scene.render.threads_mode = "FIXED"
scene.render.threads = opts["threads"]
scene.render.use_persistent_data = True
settings = scene.render.image_settings
settings.media_type = "MULTI_LAYER_IMAGE"
settings.file_format = "OPEN_EXR_MULTILAYER"
settings.color_depth = "32"
for frame in range(opts["first"], opts["last"] + 1):
    scene.frame_set(frame)
    scene.render.filepath = f"{out_dir}/frame_{frame:04d}.exr"
    bpy.ops.render.render(write_still=True)
"""


def plain_blender(
    scene: Path, out: Path, frames: tuple[int, int], percentage: int, samples: int, threads: int
) -> float:
    script = out / "plain.py"
    out.mkdir(parents=True, exist_ok=True)
    script.write_text(PLAIN_BLENDER)
    options = {
        "first": frames[0],
        "last": frames[1],
        "percentage": percentage,
        "samples": samples,
        "threads": threads,
    }
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-I", str(script), str(scene), str(out), json.dumps(options)],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def farm_job(
    farm: LocalFarm,
    scene: Path,
    out: Path,
    frames: str,
    percentage: int,
    samples: int,
    tiles: tuple[int, int] = (1, 1),
) -> tuple[float, float]:
    """(preparation, job) seconds on an already running farm: preparation is the client's
    inspection and packing; the job runs from submit to the last frame downloaded."""
    started = time.perf_counter()
    with RenderWorker(default_build()) as worker:
        prepared = prepare_submission(
            worker,
            scene,
            JobOptions(
                frames=frames,
                tiles=TileGrid(columns=tiles[0], rows=tiles[1]),
                samples=samples,
                percentage=percentage,
            ),
            bundle_dir=out / "bundle",
        )
    submitted = time.perf_counter()
    with TesseraClient(farm.url, farm.requester_token) as client:
        job = submit(client, prepared)
        result = follow_job(client, job.id, out / "frames")
    if result.job.status.value != "completed":
        raise RuntimeError(f"benchmark job ended {result.job.status}: {result.job.message}")
    return submitted - started, time.perf_counter() - submitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 frames, few samples")
    args = parser.parse_args()
    frames, samples, percentage = ((1, 2), 4, 25) if args.quick else ((1, 8), 16, 50)
    frame_text = f"{frames[0]}-{frames[1]}"
    scene = ensure_demo_scene(default_build())
    threads = 2
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        # Best of two on both sides: a single run on a shared VM varies by +-10%.
        t_plain = min(
            plain_blender(scene, root / f"plain{i}", frames, percentage, samples, threads)
            for i in range(2)
        )
        with LocalFarm(
            root / "farm1", nodes=1, threads_per_node=threads, node_args=["--no-benchmark"]
        ) as farm:
            farm_job(farm, scene, root / "warm", "1", percentage, samples)  # warm the node
            runs = [
                farm_job(farm, scene, root / f"job{i}", frame_text, percentage, samples)
                for i in range(2)
            ]
            t_prep, t_job = min(runs, key=lambda run: run[1])
        scaling: dict[int, float] = {}
        for nodes in (1, 2):
            with LocalFarm(
                root / f"scale{nodes}",
                nodes=nodes,
                threads_per_node=1,
                node_args=["--no-benchmark"],
                # Scaling of rendering alone: with two provider accounts the 2-node farm
                # would also sample every tile (probation), which the 1-node farm cannot;
                # bench_verify measures that cost on its own.
                coordinator_args=["--no-verification"],
            ) as farm:
                farm_job(farm, scene, root / f"warm{nodes}", f"1-{nodes}", percentage, samples)
                scaling[nodes] = farm_job(
                    farm, scene, root / f"scale-job{nodes}", frame_text, percentage, samples
                )[1]
    rows: list[dict[str, object]] = [
        {
            "measure": "overhead",
            "setup": f"plain Blender, {threads} threads",
            "seconds": t_plain,
            "ratio": 1.0,
            "goal": "",
        },
        {
            "measure": "overhead",
            "setup": f"tessera job, 1 node x {threads} threads",
            "seconds": t_job,
            "ratio": t_job / t_plain,
            "goal": "<= 1.05",
        },
        {
            "measure": "overhead",
            "setup": "  + client inspection and packing",
            "seconds": t_prep + t_job,
            "ratio": (t_prep + t_job) / t_plain,
            "goal": "",
        },
        {
            "measure": "scaling",
            "setup": "1 node x 1 thread",
            "seconds": scaling[1],
            "ratio": 1.0,
            "goal": "",
        },
        {
            "measure": "scaling",
            "setup": "2 nodes x 1 thread",
            "seconds": scaling[2],
            "ratio": scaling[1] / scaling[2],
            "goal": ">= 1.9 (speed-up)",
        },
    ]
    report("farm", rows, ["measure", "setup", "seconds", "ratio", "goal"])
    print(
        f"{frames[1] - frames[0] + 1} frames of the demo scene at {percentage}% "
        f"({640 * percentage // 100}x{360 * percentage // 100}), {samples} samples, "
        "denoised as the scene asks. Overhead ratio: farm time / plain Blender time; "
        "scaling ratio: 1-node time / 2-node time. The farm is already running."
    )


if __name__ == "__main__":
    main()

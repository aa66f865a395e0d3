"""The whole `tessera render --nodes 1` command vs plain Blender, fixed parts shown apart.

8 frames of the demo scene at 60 % (384x216), 16 samples, denoised as the scene asks:
plain Blender renders them in one process (its start included), and `tessera render
--nodes 1` renders them on a farm it starts and stops itself, timed from launching the
command to its exit (start, inspection, probe, packing, upload, rendering, downloads,
the ledger check and the stop all included). Both use every CPU of this machine (the one
node gets them all). Goal: <= 1.05x.

The command's `--json` summary says when each step ended (`timings`, seconds since it
started); the table shows the fixed parts from it: the coordinator listening, the node
registered, the scene inspected and packed (beside the farm's start), the job
submitted, the first frame downloaded (vs plain Blender's first frame), the stop. The
first run on a fresh `TESSERA_HOME` also measures the node's benchmark score (kept for
later runs) and is shown apart; the ratio is the best of two later runs against the best
of two plain runs, alternated. Run: `python -m benchmarks.bench_render_overhead [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import report
from renderers.builds import default_build
from renderers.demo_scene import ensure_demo_scene

REPO = Path(__file__).resolve().parent.parent

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
    print("FRAME", frame, time.time(), flush=True)
"""


@dataclass(frozen=True)
class Job:
    frames: tuple[int, int]
    percentage: int
    samples: int
    threads: int


@dataclass(frozen=True)
class PlainRun:
    total: float
    first_frame: float


@dataclass(frozen=True)
class FarmRun:
    total: float
    #: The command's own `timings` (seconds since it started).
    steps: dict[str, float]
    #: Seconds outside the command's own clock: Python starting, imports, exiting.
    outside: float


def plain_blender(scene: Path, out: Path, job: Job) -> PlainRun:
    out.mkdir(parents=True, exist_ok=True)
    script = out / "plain.py"
    script.write_text(PLAIN_BLENDER)
    options = {
        "first": job.frames[0],
        "last": job.frames[1],
        "percentage": job.percentage,
        "samples": job.samples,
        "threads": job.threads,
    }
    wall_start, started = time.time(), time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-I", str(script), str(scene), str(out), json.dumps(options)],
        check=True,
        capture_output=True,
        text=True,
    )
    total = time.perf_counter() - started
    stamps = [
        float(line.split()[2]) for line in done.stdout.splitlines() if line.startswith("FRAME")
    ]
    return PlainRun(total, stamps[0] - wall_start)


def tessera_render(scene: Path, out: Path, home: Path, job: Job) -> FarmRun:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TESSERA_HOME"] = str(home)
    argv = [sys.executable, "-m", "app.cli", "render", str(scene), "--nodes", "1"]
    argv += ["--frames", f"{job.frames[0]}-{job.frames[1]}", "--percentage", str(job.percentage)]
    argv += ["--samples", str(job.samples), "--out", str(out), "--json"]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    total = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"tessera render failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    if summary["status"] != "completed":
        raise RuntimeError(f"the job ended {summary['status']}")
    steps = {name: float(value) for name, value in summary["timings"].items()}
    # What the command's own clock cannot see: starting Python and importing the CLI
    # before it, and exiting after it.
    outside = max(0.0, total - float(summary["wall_seconds"]))
    return FarmRun(total, steps, outside)


def _rows(plain: PlainRun, cold: FarmRun, warm: FarmRun, frames: int) -> list[dict[str, object]]:
    s = warm.steps
    rows: list[dict[str, object]] = [
        _row("whole", "plain Blender, one process", plain.total, 1.0),
        _row(
            "whole",
            "tessera render --nodes 1, first run (node benchmark measured)",
            cold.total,
            cold.total / plain.total,
        ),
        _row("whole", "tessera render --nodes 1", warm.total, warm.total / plain.total, "<= 1.05"),
        _row(
            "part", "  Python start, imports and exit (outside the command's clock)", warm.outside
        ),
        _row(
            "part",
            "  coordinator listening (since the command started)",
            s["coordinator_listening"],
        ),
        _row(
            "part",
            "  node registered (coordinator + node, in parallel with the scene)",
            s["nodes_registered"],
        ),
        _row(
            "part",
            "  scene inspected and packed (probed only with --cheaters or --tiles auto)",
            s["prepared"],
        ),
        _row("part", "  waiting for the farm after preparing", s["farm_started"] - s["prepared"]),
        _row("part", "  upload and submit", s["submitted"] - s["farm_started"]),
        _row(
            "part", "  first frame downloaded, after submitting", s["first_frame"] - s["submitted"]
        ),
        _row("part", "  plain Blender's first frame, after launching it", plain.first_frame),
        _row("part", "  the other frames", s["job_done"] - s["first_frame"]),
        _row("part", "  report and ledger check", s["stopping"] - s["job_done"]),
        _row("part", "  stop the farm", s["stopped"] - s["stopping"]),
        _row(
            "part", "  fixed overhead in all (farm total - plain total)", warm.total - plain.total
        ),
        _row(
            "part",
            "  farm: everything but the job (total - submit to last frame)",
            warm.total - (s["job_done"] - s["submitted"]),
        ),
        _row(
            "frame",
            "  plain Blender, seconds per frame after the first",
            (plain.total - plain.first_frame) / max(1, frames - 1),
        ),
        _row(
            "frame",
            "  tessera render, seconds per frame after the first",
            (s["job_done"] - s["first_frame"]) / max(1, frames - 1),
        ),
    ]
    return rows


def _row(
    measure: str, setup: str, seconds: float, ratio: float | None = None, goal: str = ""
) -> dict[str, object]:
    return {
        "measure": measure,
        "setup": setup,
        "seconds": round(seconds, 3),
        "ratio": "" if ratio is None else round(ratio, 3),
        "goal": goal,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 frames at 25 %%, 4 samples")
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    job = Job((1, 2), 25, 4, threads) if args.quick else Job((1, 8), 60, 16, threads)
    scene = ensure_demo_scene(default_build())
    with tempfile.TemporaryDirectory(prefix="bench-render-") as scratch:
        root = Path(scratch)
        home = root / "home"
        cold = tessera_render(scene, root / "cold", home, job)
        plains: list[PlainRun] = []
        warms: list[FarmRun] = []
        for index in range(2):  # alternated: a shared machine's load drifts
            plains.append(plain_blender(scene, root / f"plain{index}", job))
            warms.append(tessera_render(scene, root / f"farm{index}", home, job))
    plain = min(plains, key=lambda run: run.total)
    warm = min(warms, key=lambda run: run.total)
    report(
        "render_overhead",
        _rows(plain, cold, warm, job.frames[1] - job.frames[0] + 1),
        ["measure", "setup", "seconds", "ratio", "goal"],
    )
    width, height = 640 * job.percentage // 100, 360 * job.percentage // 100
    print(
        f"{job.frames[1] - job.frames[0] + 1} frames of the demo scene at {width}x{height}, "
        f"{job.samples} samples, {threads} threads on both sides; best of 2 each, "
        f"alternated. Plain runs: {[round(r.total, 2) for r in plains]} s; farm runs: "
        f"{[round(r.total, 2) for r in warms]} s."
    )


if __name__ == "__main__":
    main()

"""Coordinator capacity: many simulated nodes (no Blender) leasing and completing tasks.

Starts a real coordinator process on 127.0.0.1, submits one job of many tiny tiles, and
lets N node threads (default 500) register, long-poll for leases and upload a valid
pre-rendered EXR of each tile's size, as fast as the coordinator lets them. Reports
tasks per second and lease latency percentiles; the baseline row is the same work done
by a single node, so the ratio shows how throughput holds up under concurrency.
Run: `python -m benchmarks.bench_coordinator [--nodes 500] [--quick]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

from benchmarks.common import report
from protocol.client import TesseraClient, sha256_file
from protocol.models import (
    FrameRange,
    JobSpec,
    LeaseRequest,
    NodeCapabilities,
    Role,
    SceneSummary,
    TileGrid,
)
from renderers.exr import ExrImage, ExrPart, write_exr

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.farm_tools import start_coordinator  # noqa: E402

WIDTH, HEIGHT = 64, 48
GRID = (8, 6)  # 48 tasks per frame, 8x8-pixel tiles


def _tile_exr(folder: Path, width: int, height: int) -> tuple[Path, str]:
    path = folder / f"tile_{width}x{height}.exr"
    if not path.exists():
        rng = np.random.default_rng(width * 1000 + height)
        channels = {
            f"ViewLayer.Combined.{c}": rng.random((height, width), dtype=np.float32) for c in "RGBA"
        }
        write_exr(path, ExrImage(width, height, [ExrPart("ViewLayer.Combined", channels, {})]))
    return path, sha256_file(path)


def _bundle(folder: Path) -> Path:
    path = folder / "bundle.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("scene.blend", b"BLENDER-v500" + b"\0" * 64)  # magic is all it checks
    return path


def _spec(bundle_sha: str, frames: int) -> JobSpec:
    scene = SceneSummary(
        name="bench",
        frame_start=1,
        frame_end=frames,
        resolution_x=WIDTH,
        resolution_y=HEIGHT,
        resolution_percentage=100,
        samples=1,
        adaptive_sampling=False,
        denoising=False,
        camera="Camera",
    )
    return JobSpec(
        name="capacity",
        bundle=bundle_sha,
        scene_path="scene.blend",
        scene=scene,
        frames=FrameRange(start=1, end=frames),
        tiles=TileGrid(columns=GRID[0], rows=GRID[1]),
    )


def run(nodes: int, frames: int, scratch: Path) -> dict[str, object]:
    # Capacity, not limits: the simulated nodes poll as fast as the coordinator answers,
    # far past the per-account rate a real farm's nodes need (tests/test_security.py).
    coordinator = start_coordinator(
        scratch / f"coordinator-{nodes}", "--lease-seconds", "120", "--rate-limit", "0"
    )
    latencies: list[float] = []
    lock = threading.Lock()
    try:
        with coordinator.client(coordinator.admin_token) as admin:
            requester = admin.create_account("req", Role.REQUESTER).token
            provider = admin.create_account("prov", Role.PROVIDER).token
        bundle = _bundle(scratch)
        with TesseraClient(coordinator.url, requester) as client:
            sha = client.upload_bundle(bundle)
            job = client.submit_job(_spec(sha, frames))
        total = job.progress.tasks_total
        done = threading.Event()
        exrs: dict[tuple[int, int], tuple[Path, str]] = {}

        def node_loop(index: int) -> None:
            with TesseraClient(coordinator.url, provider, timeout=120) as client:
                node = client.register_node(NodeCapabilities(name=f"sim-{index}"))
                while not done.is_set():
                    started = time.perf_counter()
                    lease = client.lease(node.node_id, LeaseRequest(wait=2))
                    if lease is None:
                        continue
                    with lock:
                        latencies.append(time.perf_counter() - started)
                    region = lease.assignment.render_region  # type: ignore[union-attr]
                    size = (region.x1 - region.x0, region.y1 - region.y0)
                    with lock:
                        if size not in exrs:
                            exrs[size] = _tile_exr(scratch, *size)
                        path, digest = exrs[size]
                    client.upload_result(lease.lease_id, path, digest)

        threads = [threading.Thread(target=node_loop, args=(i,), daemon=True) for i in range(nodes)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        with TesseraClient(coordinator.url, requester) as client:
            while client.job(job.id).progress.tasks_done < total:
                time.sleep(0.2)
        elapsed = time.perf_counter() - started
        done.set()
        for thread in threads:
            thread.join(timeout=30)
        ordered = sorted(latencies)
        return {
            "nodes": nodes,
            "tasks": total,
            "seconds": elapsed,
            "tasks_per_s": total / elapsed,
            "lease_p50_ms": 1000 * statistics.median(ordered),
            "lease_p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
        }
    finally:
        coordinator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="50 nodes, fewer tasks")
    args = parser.parse_args()
    nodes, frames = (50, 4) if args.quick else (args.nodes, 40)
    with tempfile.TemporaryDirectory() as scratch:
        baseline = run(1, max(1, frames // 8), Path(scratch))
        loaded = run(nodes, frames, Path(scratch))
    baseline["ratio"] = 1.0
    loaded["ratio"] = float(loaded["tasks_per_s"]) / float(baseline["tasks_per_s"])  # type: ignore[arg-type]
    report(
        "coordinator",
        [baseline, loaded],
        ["nodes", "tasks", "seconds", "tasks_per_s", "lease_p50_ms", "lease_p99_ms", "ratio"],
    )
    print("ratio: tasks per second with N simulated nodes vs one node, same coordinator.")


if __name__ == "__main__":
    main()

"""Soak: a farm that keeps losing nodes still finishes every job and loses no tile.

A local farm (coordinator + 3 node processes, each its own provider account, so
duplicate sampling runs too) renders 50 small jobs of the demo scene (1 frame, 2x2
tiles, 64x36 px, 4 samples) while a node is killed with SIGKILL every few seconds and
started again a moment later. Reported: jobs completed, tasks retried (failures the
coordinator recorded: expired leases of killed nodes, mostly), tiles lost (render
tasks of completed jobs without an accepted result: must be 0), backups, samples, and
whether the ledger check passed. Bounded: it gives up after `--minutes` (default 5).

Run: `make soak` or `python -m benchmarks.soak [--jobs N] [--minutes M]`.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
import time
from pathlib import Path

from app.local_farm import LocalFarm
from app.submit import prepare_submission
from benchmarks.common import report
from protocol.client import TesseraClient
from protocol.models import FINISHED_JOB_STATES, JobOptions, JobStatus, TileGrid
from renderers.builds import default_build
from renderers.demo_scene import ensure_demo_scene
from renderers.worker import RenderWorker

NODES = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--kill-every", type=float, default=8.0, help="seconds between kills")
    parser.add_argument("--quick", action="store_true", help="10 jobs, 2 minutes")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.minutes = 10, 2.0
    build = default_build()
    scene = ensure_demo_scene(build)
    rng = random.Random(5)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tessera-soak-") as tmp:
        folder = Path(tmp)
        with RenderWorker(build) as worker:
            prepared = prepare_submission(
                worker,
                scene,
                JobOptions(
                    frames="1",
                    tiles=TileGrid(columns=2, rows=2),
                    samples=4,
                    percentage=10,
                    denoise=False,
                    max_price=1.0,
                ),
                bundle_dir=folder / "bundle",
            )
        with LocalFarm(
            folder / "farm",
            nodes=NODES,
            threads_per_node=1,
            node_args=["--no-benchmark"],
            price=1.0,
            credits=1_000_000,
        ) as farm:
            with TesseraClient(farm.url, farm.requester_token) as client:
                client.upload_bundle(prepared.bundle.zip_path, prepared.bundle.sha256)
                job_ids = [
                    client.submit_job(prepared.spec.model_copy(update={"name": f"soak {i}"})).id
                    for i in range(args.jobs)
                ]
                kills, deadline = 0, started + args.minutes * 60
                next_kill = time.monotonic() + args.kill_every
                while time.monotonic() < deadline:
                    jobs = [client.job(j) for j in job_ids]
                    if all(job.status in FINISHED_JOB_STATES for job in jobs):
                        break
                    if time.monotonic() >= next_kill:
                        victim = rng.randrange(NODES)
                        farm.kill_node(victim)
                        time.sleep(1.0)
                        farm.restart_node(victim)
                        kills += 1
                        next_kill = time.monotonic() + args.kill_every
                    time.sleep(0.5)
                jobs = [client.job(j) for j in job_ids]
            with TesseraClient(farm.url, farm.admin_token) as admin:
                ledger = admin.ledger_check()
            counts = _counts(folder / "farm" / "coordinator" / "coordinator.sqlite")
    completed = sum(job.status is JobStatus.COMPLETED for job in jobs)
    row = {
        "jobs": args.jobs,
        "completed": completed,
        "node_kills": kills,
        "tasks_retried": counts["retried"],
        "tiles_lost": counts["lost"],
        "backups": counts["backups"],
        "samples": counts["samples"],
        "ledger_ok": ledger.ok,
        "minutes": round((time.monotonic() - started) / 60, 2),
    }
    report("soak", [row], list(row))
    ok = completed == args.jobs and counts["lost"] == 0 and ledger.ok
    return 0 if ok else 1


def _counts(database: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:

        def one(sql: str) -> int:
            return int(conn.execute(sql).fetchone()[0])

        return {
            "retried": one("SELECT COUNT(*) FROM failures"),
            "lost": one(
                "SELECT COUNT(*) FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE"
                " j.status = 'completed' AND t.kind = 'render' AND (t.status != 'completed'"
                " OR t.result_sha IS NULL)"
            ),
            "backups": one("SELECT COUNT(*) FROM tasks WHERE kind = 'backup'"),
            "samples": one("SELECT COUNT(*) FROM tasks WHERE kind = 'verify'"),
        }
    finally:
        conn.close()


if __name__ == "__main__":
    raise SystemExit(main())

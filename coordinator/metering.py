"""Metering: what a job's scene really costs per pixel-sample, from its providers' renders.

The requester's `scene_cost` is only an estimate (it sizes the escrow). The bill follows
this measurement: for every accepted render tile, the seconds the coordinator itself
measured from lease to accepted upload, times the node's benchmark score (how much
faster than the reference machine it is), divided by the seconds the reference machine
needs for the tile's pixel-samples of the benchmark scene. That is the tile's scene cost
in the pricing's units (1.0 = the benchmark scene).

The job's measured cost is robust to any one party:
- per provider account, the lower quartile of its tiles: a tile's measured time only
  ever grows with what is not the work (a cold first tile that also fetched the bundle
  and loaded the scene, a busy machine, a slow upload), so the low end is the work;
- across providers, the lower median of those: a provider that renders (or uploads)
  slowly cannot raise it, and with two providers the faster one sets it;
- the job owner's own nodes are left out whenever another provider measured, so a
  requester cannot lower the bill with a node that claims to be slow;
- nothing the requester declares enters it.

Pure reads: this module never writes, pays or changes a status.
"""

from __future__ import annotations

import sqlite3
import statistics
from collections import defaultdict
from dataclasses import dataclass

from protocol.models import TaskKind, TaskStatus

__all__ = [
    "MAX_SCENE_COST",
    "MIN_SCENE_COST",
    "REFERENCE_SECONDS_PER_UNIT",
    "Measurement",
    "measure",
    "robust_cost",
]

#: Seconds the reference machine needs for one work unit (a million pixel-samples) of the
#: benchmark scene: farm_node.benchmark's REFERENCE_SECONDS (0.40 s) for its frame of
#: 160x90 pixels at 16 samples (a test keeps the two in step).
REFERENCE_SECONDS_PER_UNIT = 0.40 / (160 * 90 * 16 / 1e6)
#: The bounds JobSpec puts on a declared scene cost; a measurement is clamped to them.
MIN_SCENE_COST = 0.01
MAX_SCENE_COST = 1000.0


@dataclass(frozen=True, slots=True)
class Measurement:
    """A job's measured scene cost and what it rests on."""

    scene_cost: float
    tiles: int
    providers: int


def tile_cost(seconds: float, score: float | None, pixel_samples: float) -> float:
    """The scene cost one tile shows: its benchmark-normalised seconds per work unit,
    relative to the reference machine's on the benchmark scene. A node without a score
    counts as the reference machine."""
    speed = score if score and score > 0 else 1.0
    units = max(pixel_samples, 1.0) / 1e6
    return seconds * speed / (units * REFERENCE_SECONDS_PER_UNIT)


def robust_cost(per_provider: dict[str, list[float]]) -> float | None:
    """Lower median across providers of each provider's lower quartile; None if empty."""
    medians = [sorted(costs)[(len(costs) - 1) // 4] for costs in per_provider.values() if costs]
    if not medians:
        return None
    return min(MAX_SCENE_COST, max(MIN_SCENE_COST, statistics.median_low(medians)))


def measure(conn: sqlite3.Connection, job_id: str, job_owner: str) -> Measurement | None:
    """The job's measured scene cost from its accepted render tiles so far, or None when
    none was measured yet."""
    rows = conn.execute(
        "SELECT n.owner AS owner, t.render_seconds AS seconds,"
        " json_extract(n.capabilities, '$.benchmark_score') AS score,"
        " (json_extract(t.assignment, '$.render_region.x1')"
        "  - json_extract(t.assignment, '$.render_region.x0'))"
        " * (json_extract(t.assignment, '$.render_region.y1')"
        "  - json_extract(t.assignment, '$.render_region.y0'))"
        " * json_extract(t.assignment, '$.samples') AS pixel_samples"
        " FROM tasks t JOIN nodes n ON n.id = t.node_id WHERE t.job_id = ? AND t.kind = ?"
        " AND t.status = ? AND t.render_seconds > 0 AND t.assignment IS NOT NULL",
        (job_id, TaskKind.RENDER.value, TaskStatus.COMPLETED.value),
    ).fetchall()
    per_provider: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["pixel_samples"]:
            tile = tile_cost(row["seconds"], row["score"], float(row["pixel_samples"]))
            per_provider[row["owner"]].append(tile)
    if len(per_provider) > 1:
        per_provider.pop(job_owner, None)
    cost = robust_cost(per_provider)
    if cost is None:
        return None
    return Measurement(
        scene_cost=cost,
        tiles=sum(len(c) for c in per_provider.values()),
        providers=len(per_provider),
    )

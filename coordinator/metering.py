"""Metering: what a job's scene really costs per pixel-sample, from its providers' renders.

The requester's `scene_cost` is only an estimate (it sizes the escrow). The bill follows
this measurement: for every accepted render tile, the seconds the coordinator itself
measured from lease to accepted upload, times the node's benchmark score (how much
faster than the reference machine it is), divided by the seconds the reference machine
needs for the tile's pixel-samples of the benchmark scene. That is the tile's scene cost
in the pricing's units (1.0 = the benchmark scene).

The job's measured cost is robust to any one party:
- each node's first tile of the job is left out when it rendered more (it also fetched
  the bundle and loaded the scene);
- per provider account, the ratio of sums: all its tiles' normalised seconds over all
  their work units (tiles of a frame differ in weight, sky against a detailed object: a
  sum weighs them as the bill does, where a median or a quantile of tiles would pick
  the light or heavy ones);
- across providers, the lower median of those: a provider that renders (or uploads)
  slowly, or stalls on purpose, cannot raise it; with two providers the faster one sets
  it, with three the middle one;
- the job owner's own nodes are left out whenever another provider measured, so a
  requester cannot lower the bill with a node that claims to be slow;
- nothing the requester declares enters it.

Pure reads: this module never writes, pays or changes a status.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from protocol.models import TaskKind, TaskStatus

__all__ = [
    "MAX_SCENE_COST",
    "MIN_SCENE_COST",
    "REFERENCE_SECONDS_PER_UNIT",
    "Measurement",
    "Tile",
    "measure",
    "provider_cost",
    "robust_cost",
    "tile",
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


@dataclass(frozen=True, slots=True)
class Tile:
    """One measured tile: seconds as the reference machine would have taken (the node's
    seconds times its benchmark score), and its work units at scene cost 1."""

    seconds: float
    units: float

    @property
    def cost(self) -> float:
        return self.seconds / (self.units * REFERENCE_SECONDS_PER_UNIT)


def tile(seconds: float, score: float | None, pixel_samples: float) -> Tile:
    """A tile measured on a node of benchmark `score` (none: the reference machine)."""
    speed = score if score and score > 0 else 1.0
    return Tile(seconds * speed, max(pixel_samples, 1.0) / 1e6)


def provider_cost(tiles: list[Tile]) -> float:
    """A provider's scene cost: its normalised seconds over its work units."""
    units = sum(t.units for t in tiles)
    return sum(t.seconds for t in tiles) / (units * REFERENCE_SECONDS_PER_UNIT)


def robust_cost(per_provider: dict[str, list[Tile]]) -> float | None:
    """Lower median across providers of each provider's cost; None if none measured."""
    costs = [provider_cost(tiles) for tiles in per_provider.values() if tiles]
    if not costs:
        return None
    return min(MAX_SCENE_COST, max(MIN_SCENE_COST, statistics.median_low(costs)))


def _tile_row(row: Any, scores: dict[str, Any]) -> dict[str, Any] | None:
    """An accepted tile's owner, seconds, benchmark score and pixel-samples, or None
    when its stored assignment cannot say (an unreadable row is not measured).
    `scores`: benchmark scores by capabilities JSON already read (one per node)."""
    try:
        assignment = json.loads(row["assignment"])
        region = assignment["render_region"]
        samples = assignment["samples"]
        caps = row["caps"]
        if caps not in scores:
            scores[caps] = json.loads(caps).get("benchmark_score")
        score = scores[caps]
        pixel_samples = (region["x1"] - region["x0"]) * (region["y1"] - region["y0"]) * samples
    except (ValueError, KeyError, TypeError):
        return None
    if not pixel_samples:
        return None
    return {
        "owner": row["owner"],
        "seconds": row["seconds"],
        "score": score,
        "pixel_samples": pixel_samples,
    }


def measure(conn: sqlite3.Connection, job_id: str, job_owner: str) -> Measurement | None:
    """The job's measured scene cost from its accepted render tiles so far, or None when
    none was measured yet."""
    # JSON is read here, not in SQL: SQLite and PostgreSQL spell it differently.
    rows = conn.execute(
        "SELECT n.owner AS owner, t.node_id AS node, t.render_seconds AS seconds,"
        " n.capabilities AS caps, t.assignment AS assignment FROM tasks t JOIN nodes n ON"
        " n.id = t.node_id WHERE t.job_id = ? AND t.kind = ? AND t.status = ? AND"
        " t.render_seconds > 0 AND t.assignment IS NOT NULL ORDER BY t.leased_at",
        (job_id, TaskKind.RENDER.value, TaskStatus.COMPLETED.value),
    ).fetchall()
    per_node: dict[str, list[dict[str, Any]]] = defaultdict(list)
    scores: dict[str, Any] = {}
    for row in rows:
        measured = _tile_row(row, scores)
        if measured is not None:
            per_node[row["node"]].append(measured)
    per_provider: dict[str, list[Tile]] = defaultdict(list)
    for node_rows in per_node.values():
        for row in node_rows[1:] if len(node_rows) > 1 else node_rows:
            per_provider[row["owner"]].append(
                tile(row["seconds"], row["score"], float(row["pixel_samples"]))
            )
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

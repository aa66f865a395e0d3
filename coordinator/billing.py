"""Billing: what an accepted task is paid, the true-up of a job's bill to the measured
scene cost when it settles, and the budget check that keeps a job within its cap.

The order problem (docs/billing.md): the first tiles are accepted before a robust
measurement exists. So a task is paid when it is accepted at a *provisional* scene cost:
PROVISIONAL_SHARE of the lower of the requester's estimate and the measurement so far
(it always fits the escrow, which was sized on the estimate, and the share leaves room
for the measurement to fall as tiles come in); when the job settles (completed, failed or
canceled) every accepted task is trued up, once (`adjust:<task_id>`), to the job's final
measured scene cost. A provisional payment is never taken back: it is the task's floor.
While the job runs, `budget` projects the bill at the measured cost: the escrow is topped
up from the requester when it falls short, and the job pauses, with the reason, when the
projection would pass its `max_credits` or the requester's balance; a cap is never
exceeded, since no payment ever leaves more than the escrow holds.

This module moves credits only through `coordinator.ledger`, inside its caller's
transaction, and never changes a task's or job's status (it returns why a job should
pause; `coordinator.task_states` pauses it).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from coordinator import ledger
from coordinator.config import CoordinatorConfig
from coordinator.core import node_caps
from coordinator.metering import Measurement, measure
from coordinator.pricing import denoise_units, estimate_milli, render_units
from protocol.models import JobSpec, NodeCapabilities, RenderAssignment, TaskKind, TaskStatus

__all__ = [
    "MIN_TILES_TO_STEER",
    "PROVISIONAL_SHARE",
    "Budget",
    "budget",
    "provisional_scene_cost",
    "task_amount",
    "true_up",
]

#: The share of the provisional scene cost a task is paid when it is accepted.
PROVISIONAL_SHARE = 0.8
#: Tiles measured before the projection may top up the escrow or pause a job (a first
#: tile also fetched the bundle and loaded the scene: one alone says little).
MIN_TILES_TO_STEER = 3


def task_amount(spec: JobSpec, row: sqlite3.Row, caps: NodeCapabilities, scene_cost: float) -> int:
    """What the task is worth at `scene_cost`, at the node's price capped by the job's."""
    price = min(caps.price, spec.max_price)
    if price <= 0:
        return 0
    if row["kind"] in (TaskKind.DENOISE.value, TaskKind.FINISH.value):
        units = denoise_units(spec)  # whole-frame work, priced by its pixels
    else:
        assignment = RenderAssignment.model_validate_json(row["assignment"])
        units = render_units(spec, assignment, scene_cost)
    return ledger.cost_milli(units, price)


def provisional_scene_cost(
    conn: sqlite3.Connection, spec: JobSpec, job_id: str, owner: str
) -> float:
    """The scene cost a task is paid at when accepted: PROVISIONAL_SHARE of the estimate,
    or of the measurement so far when it is lower (the true-up at settle pays the rest)."""
    measured = measure(conn, job_id, owner)
    if measured is None:
        return PROVISIONAL_SHARE * spec.scene_cost
    return PROVISIONAL_SHARE * min(spec.scene_cost, measured.scene_cost)


def final_scene_cost(spec: JobSpec, measured: Measurement | None) -> float:
    """The scene cost the job is billed at: measured, or the estimate when nothing was."""
    return spec.scene_cost if measured is None else measured.scene_cost


def true_up(
    conn: sqlite3.Connection, config: CoordinatorConfig, spec: JobSpec, job_id: str, owner: str
) -> int:
    """Pay every accepted task of the job up to its price at the final measured scene
    cost, once, topping the escrow up from the owner within the job's cap and the owner's
    balance; what the escrow cannot cover is not paid. Returns milli-credits paid."""
    scene_cost = final_scene_cost(spec, measure(conn, job_id, owner))
    rows = conn.execute(
        "SELECT t.*, n.owner AS node_owner, n.capabilities AS caps,"
        " EXISTS (SELECT 1 FROM ledger_txns p WHERE p.id = 'pay:' || t.id) AS has_pay,"
        " EXISTS (SELECT 1 FROM ledger_txns a WHERE a.id = 'adjust:' || t.id) AS has_adjust"
        " FROM tasks t JOIN nodes n ON n.id = t.node_id WHERE t.job_id = ? AND t.status = ?"
        " ORDER BY t.id",
        (job_id, TaskStatus.COMPLETED.value),
    ).fetchall()
    owed: list[tuple[sqlite3.Row, int]] = []
    for row in rows:
        if row["has_adjust"]:
            continue
        target = task_amount(spec, row, node_caps(row["caps"]), scene_cost)
        delta = target - ledger.paid_for_task(conn, row["id"])
        if delta > 0:
            owed.append((row, delta))
    need = sum(delta for _, delta in owed)
    held = ledger.balance_in(conn, ledger.escrow_account(job_id))
    if need > held:
        _top_up(conn, spec, job_id, owner, need - held)
    paid = 0
    for row, delta in owed:
        move = ledger.adjust if row["has_pay"] else ledger.pay
        got = move(conn, row["id"], job_id, row["node_owner"], delta, config.fee_rate)
        if got:
            conn.execute(
                "UPDATE nodes SET earned_milli = earned_milli + ? WHERE id = ?",
                (got, row["node_id"]),
            )
            paid += got
    return paid


def _top_up(conn: sqlite3.Connection, spec: JobSpec, job_id: str, owner: str, want: int) -> int:
    """Top the escrow up by `want`, or as much of it as the cap and the balance allow."""
    escrowed = ledger.escrowed_in(conn, job_id)
    room = want
    if spec.max_credits is not None:
        room = min(room, ledger.to_milli(spec.max_credits) - escrowed)
    room = min(room, ledger.balance_in(conn, ledger.user(owner)))
    if room <= 0:
        return 0
    step = ledger.topups_in(conn, job_id) + 1
    return room if ledger.topup(conn, job_id, owner, room, step) else 0


@dataclass(frozen=True, slots=True)
class Budget:
    """What the budget check did: the escrow topped up by `topped_up`, or why the job
    must pause (`pause`, a sentence for its owner)."""

    topped_up: int = 0
    pause: str = ""


def budget(
    conn: sqlite3.Connection, config: CoordinatorConfig, spec: JobSpec, job_id: str, owner: str
) -> Budget:
    """Project the job's bill at its measured scene cost (the same upper bound as the
    estimate: every tile and a sample of each, at the max price); top the escrow up to it,
    or say why the job must pause: over its `max_credits`, or over the owner's balance."""
    measured = measure(conn, job_id, owner)
    if measured is None or measured.tiles < MIN_TILES_TO_STEER or spec.max_price <= 0:
        return Budget()
    at_measure = spec.model_copy(update={"scene_cost": measured.scene_cost})
    projected = estimate_milli(at_measure, config)
    escrowed = ledger.escrowed_in(conn, job_id)
    if projected <= escrowed:
        return Budget()
    what = (
        f"The measured work (scene cost {measured.scene_cost:.3g}; {spec.scene_cost:.3g} was"
        f" declared) may cost up to {ledger.credits(projected):.4g} credits"
    )
    if spec.max_credits is not None and projected > ledger.to_milli(spec.max_credits):
        return Budget(
            pause=f"{what}, more than the job's max_credits of {spec.max_credits:g}: paused."
            " Cancel it and submit it again with a higher --max-credits."
        )
    want = projected - escrowed
    have = ledger.balance_in(conn, ledger.user(owner))
    if have < want:
        return Budget(
            pause=f"{what}; {ledger.credits(want):g} more must be held and the balance is"
            f" {ledger.credits(have):g}: paused. Ask an admin for credits, then resume it."
        )
    step = ledger.topups_in(conn, job_id) + 1
    return Budget(topped_up=want if ledger.topup(conn, job_id, owner, want, step) else 0)

"""Pricing: what a task is worth in work units and what a job may cost. Pure functions.

One work unit is what a million pixel-samples of the benchmark scene cost, on any node:
a slow node earns no more. Amounts are the ledger's milli-credits.
"""

from __future__ import annotations

import random

from coordinator import ledger
from coordinator.config import CoordinatorConfig
from coordinator.errors import InvalidRequestError
from coordinator.planning import plan_for
from coordinator.verify.judge import window_assignment
from protocol.models import JobSpec, Region, RenderAssignment

__all__ = [
    "denoise_units",
    "estimate_milli",
    "over_max_credits",
    "render_units",
    "sample_units",
]


def render_units(spec: JobSpec, region: Region) -> float:
    """Work units of a render task: region pixels x effective samples / 1e6, times the
    scene's cost relative to the benchmark scene."""
    pixels = (region.x1 - region.x0) * (region.y1 - region.y0)
    return pixels * spec.effective_samples / 1e6 * spec.scene_cost


def denoise_units(spec: JobSpec) -> float:
    """Work units of a denoise task: frame pixels / 1e6."""
    width, height = spec.effective_size()
    return width * height / 1e6


def sample_units(spec: JobSpec, tile: RenderAssignment, config: CoordinatorConfig) -> float:
    """Work units of one duplicate sample of `tile` (its size is fixed, its place random)."""
    window = window_assignment(tile, spec, config.verification, random.Random(0))
    return render_units(spec, window.render_region)


def estimate_milli(
    spec: JobSpec, assignments: list[RenderAssignment], config: CoordinatorConfig
) -> int:
    """The most a job can cost at its max price: every tile, one duplicate sample of each
    (new providers are sampled on every tile), and the denoise of each tiled frame."""
    estimate = 0
    for assignment in assignments:
        units = render_units(spec, assignment.render_region)
        if config.verification.enabled and not assignment.denoise_in_render:
            units += sample_units(spec, assignment, config)
        estimate += ledger.cost_milli(units, spec.max_price, round_up=True)
    if spec.wants_denoise and not plan_for(spec).is_whole_frame:
        per_frame = ledger.cost_milli(denoise_units(spec), spec.max_price, round_up=True)
        estimate += per_frame * len(spec.frames.frames())
    return estimate


def over_max_credits(spec: JobSpec, estimate: int) -> InvalidRequestError | None:
    """The refusal of a job whose estimate exceeds its max_credits."""
    if spec.max_credits is None or estimate <= ledger.to_milli(spec.max_credits):
        return None
    return InvalidRequestError(
        f"This job may cost up to {ledger.credits(estimate):g} credits, more than its"
        f" max_credits of {spec.max_credits:g}.",
        hint="Raise --max-credits, lower --max-price, or render fewer samples/frames.",
    )

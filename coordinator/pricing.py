"""Pricing: what a task is worth in work units and what a job may cost. Pure functions.

One work unit is what a million pixel-samples of the benchmark scene cost, on any node:
a slow node earns no more. Amounts are the ledger's milli-credits.
"""

from __future__ import annotations

import random

from coordinator import ledger
from coordinator.config import CoordinatorConfig
from coordinator.errors import InvalidRequestError
from coordinator.planning import frame_assignments, plan_for
from coordinator.verify.judge import window_assignment
from protocol.models import MAX_CREDITS, JobSpec, RenderAssignment

__all__ = [
    "denoise_units",
    "estimate_milli",
    "over_max_credits",
    "render_units",
    "sample_units",
]


def render_units(
    spec: JobSpec, assignment: RenderAssignment, scene_cost: float | None = None
) -> float:
    """Work units of a render task: its region's pixels x the samples it names / 1e6,
    times the scene's cost relative to the benchmark scene (`scene_cost`: the measured
    one, `coordinator.metering`; else the spec's estimate). The assignment's own numbers
    (what the node is told to render), never the file's."""
    region = assignment.render_region
    pixels = (region.x1 - region.x0) * (region.y1 - region.y0)
    cost = spec.scene_cost if scene_cost is None else scene_cost
    return pixels * assignment.samples / 1e6 * cost


def denoise_units(spec: JobSpec) -> float:
    """Work units of a denoise or a finish task: frame pixels / 1e6."""
    width, height = spec.effective_size()
    return width * height / 1e6


def sample_units(spec: JobSpec, tile: RenderAssignment, config: CoordinatorConfig) -> float:
    """Work units of one duplicate sample of `tile` (its size is fixed, its place random)."""
    window = window_assignment(tile, spec, config.verification, random.Random(0))
    return render_units(spec, window)


def estimate_milli(spec: JobSpec, config: CoordinatorConfig) -> int:
    """The most a job can cost at its max price: every tile, one duplicate sample of each
    (new providers are sampled on every tile), the denoise of each tiled frame and the
    finish of each frame.

    Every frame of a job has the same tiles, so one frame is priced and multiplied:
    the work is bounded by the tiles of a frame, whatever the number of frames.
    """
    frames = len(spec.frames.frames())
    per_frame = 0
    for _, assignment in frame_assignments(spec, spec.frames.start):
        units = render_units(spec, assignment)
        if config.verification.enabled and not assignment.denoise_in_render:
            units += sample_units(spec, assignment, config)
        per_frame += ledger.cost_milli(units, spec.max_price, round_up=True)
    if spec.wants_denoise and not plan_for(spec).is_whole_frame:
        per_frame += ledger.cost_milli(denoise_units(spec), spec.max_price, round_up=True)
    if spec.finish:
        per_frame += ledger.cost_milli(denoise_units(spec), spec.max_price, round_up=True)
    return per_frame * frames


def over_max_credits(spec: JobSpec, estimate: int) -> InvalidRequestError | None:
    """The refusal of a job whose estimate exceeds its max_credits, or any amount the
    ledger can hold."""
    if estimate > ledger.to_milli(MAX_CREDITS):
        return InvalidRequestError(
            f"This job may cost up to {ledger.credits(estimate):.3g} credits, more than the"
            f" farm accepts for one job ({MAX_CREDITS:g}).",
            hint="Lower --max-price, or render fewer samples, pixels or frames.",
        )
    if spec.max_credits is None or estimate <= ledger.to_milli(spec.max_credits):
        return None
    return InvalidRequestError(
        f"This job may cost up to {ledger.credits(estimate):g} credits, more than its"
        f" max_credits of {spec.max_credits:g}.",
        hint="Raise --max-credits, lower --max-price, or render fewer samples/frames.",
    )

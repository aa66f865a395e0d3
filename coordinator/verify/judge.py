"""Duplicate samples: plan the window a second provider re-renders, and judge the answers.

A sampled tile waits in the `checking` state while a provider of another account renders
a small window of it (a `verify` task). `judge` compares what came back: one sample that
agrees confirms the tile; a disagreement asks a third provider, whose window decides who
was wrong. The pixels are compared exactly when both renders come from the same kind of
machine (device, Blender build, CPU kernel and model, or GPU model); otherwise within a
tolerance measured from the window's own noise (`renderers.compare`).

This module reads result files and decides; it never writes the database.
`coordinator.verify.samples` applies a `Verdict` in one transaction (payments,
reputation, re-queues).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from coordinator.planning import margin_for
from coordinator.store import Store
from coordinator.verify.policy import VerificationPolicy, choose_window
from protocol.models import JobSpec, NodeCapabilities, Region, RenderAssignment
from renderers.compare import WindowComparison, compare_windows
from renderers.exr import read_exr
from renderers.regions import PixelRect

__all__ = [
    "Comparison",
    "Result",
    "Verdict",
    "judge",
    "render_class",
    "window_assignment",
]


@dataclass(frozen=True, slots=True)
class Result:
    """One uploaded render of the window's pixels: the checked tile or a sample."""

    task_id: str
    owner: str
    capabilities: NodeCapabilities | None
    sha256: str
    assignment: RenderAssignment


@dataclass(frozen=True, slots=True)
class Comparison:
    task_id: str
    sample_task_id: str
    other_task_id: str
    outcome: WindowComparison


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do after a sample came back (all task ids; owners are accounts)."""

    #: Results to accept and pay (the checked tile and/or samples).
    confirmed: tuple[str, ...] = ()
    #: Samples that lost (never paid).
    rejected: tuple[str, ...] = ()
    #: The checked tile was wrong: render it again elsewhere, unpaid.
    requeue_tile: bool = False
    #: Hold the sample and ask a third provider (the first sample disagreed).
    arbitrate: bool = False
    penalised: tuple[str, ...] = ()
    verified: tuple[str, ...] = ()
    reason: str = ""
    comparisons: tuple[Comparison, ...] = field(default_factory=tuple)


def window_assignment(
    tile: RenderAssignment,
    spec: JobSpec,
    policy: VerificationPolicy,
    rng: random.Random,
    around: tuple[int, int] | None = None,
) -> RenderAssignment:
    """A verify task's assignment: a random window of the tile's core (centred near
    `around`, a frame pixel, when given), with the margin adaptive sampling needs (so its
    pixels equal the tile's), and the tile's settings."""
    core = tile.core_region
    window = choose_window(PixelRect(core.x0, core.y0, core.x1, core.y1), policy, rng, around)
    margin = margin_for(spec)
    render = Region(
        x0=max(0, window.x0 - margin),
        y0=max(0, window.y0 - margin),
        x1=min(tile.width, window.x1 + margin),
        y1=min(tile.height, window.y1 + margin),
    )
    return tile.model_copy(
        update={
            "render_region": render,
            "core_region": Region(x0=window.x0, y0=window.y0, x1=window.x1, y1=window.y1),
            "whole_frame": False,
            "denoise_in_render": False,
        }
    )


def render_class(caps: NodeCapabilities | None, device: str) -> tuple[object, ...] | None:
    """What must match for two renders to be bit-identical; None when nothing is known
    to be (the comparison then uses the tolerance).

    Measured: CPU renders differ between CPU kernels (AVX2 vs SSE4.2) and between CPU
    families with the same kernel, so the CPU model is part of the class. GPU renders
    are not known to repeat bit for bit (no GPU render has been checked yet), so they
    always get the tolerance.
    """
    if caps is None or device not in ("CPU", "ANY", "") or not caps.cpu_kernel:
        return None
    return ("CPU", tuple(sorted(caps.blender_versions)), caps.cpu_kernel, caps.cpu)


def judge(tile: Result, samples: list[Result], device: str, store: Store) -> Verdict:
    """Decide after the latest of `samples` came back (one sample, or two after a dispute).

    `samples[0]` is the first sample; `samples[1]`, when present, the arbiter's.
    """
    window = samples[-1].assignment.core_region
    pixels = {r.task_id: window_pixels(store, r, window) for r in (tile, *samples)}

    def compare(sample: Result, other: Result) -> Comparison:
        a, b = render_class(sample.capabilities, device), render_class(other.capabilities, device)
        exact = a is not None and a == b
        outcome = compare_windows(pixels[sample.task_id], pixels[other.task_id], exact=exact)
        return Comparison(tile.task_id, sample.task_id, other.task_id, outcome)

    if len(samples) == 1:
        (first,) = samples
        check = compare(first, tile)
        if check.outcome.agree:
            return Verdict(
                confirmed=(tile.task_id, first.task_id),
                verified=(tile.owner, first.owner),
                reason=f"confirmed by {first.owner}: {check.outcome.detail}",
                comparisons=(check,),
            )
        return Verdict(
            arbitrate=True,
            reason=f"{first.owner}'s sample disagrees: {check.outcome.detail}",
            comparisons=(check,),
        )
    first, arbiter = samples[0], samples[-1]
    with_tile, with_first = compare(arbiter, tile), compare(arbiter, first)
    checks = (with_tile, with_first)
    everyone = (tile.task_id, first.task_id, arbiter.task_id)
    if with_tile.outcome.agree and with_first.outcome.agree:
        return Verdict(
            confirmed=everyone,
            verified=(tile.owner, first.owner, arbiter.owner),
            reason="the third render agrees with both",
            comparisons=checks,
        )
    if with_tile.outcome.agree:
        return Verdict(
            confirmed=(tile.task_id, arbiter.task_id),
            rejected=(first.task_id,),
            penalised=(first.owner,),
            verified=(tile.owner, arbiter.owner),
            reason=f"the third render sides with the tile: {with_first.outcome.detail}",
            comparisons=checks,
        )
    if with_first.outcome.agree:
        return Verdict(
            confirmed=(first.task_id, arbiter.task_id),
            requeue_tile=True,
            penalised=(tile.owner,),
            verified=(first.owner, arbiter.owner),
            reason=f"two other providers agree the tile is wrong: {with_tile.outcome.detail}",
            comparisons=checks,
        )
    # Three different answers: nobody can be blamed; render the tile again, unpaid.
    return Verdict(
        confirmed=(arbiter.task_id,),
        rejected=(first.task_id,),
        requeue_tile=True,
        reason="three renders of the window all differ",
        comparisons=checks,
    )


def window_pixels(store: Store, result: Result, window: Region) -> npt.NDArray[np.float32]:
    """The Combined RGBA of `window` (frame pixels) cut from `result`'s EXR."""
    image = read_exr(store.path(result.sha256))
    rgba = image.combined_rgba()
    origin = result.assignment.render_region
    x0, y0 = window.x0 - origin.x0, window.y0 - origin.y0
    return rgba[y0 : y0 + (window.y1 - window.y0), x0 : x0 + (window.x1 - window.x0)]

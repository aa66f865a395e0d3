"""Who gets checked, how much, and where: the duplicate-sampling policy.

Pure functions and small records, no database and no HTTP: the farm asks this module
whether an accepted tile gets a duplicate sample (`sampling_rate`, `should_verify`),
which window of the tile to re-render (`choose_window`), and what a provider's record
means for its standing (`reputation`, `suspension_reason`). The benchmarks simulate the
same functions, so what they measure is what the coordinator does.

The comparison of pixels itself lives in `renderers/compare.py`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # renderers.regions loads numpy: not at every CLI command's start
    from renderers.regions import PixelRect


@dataclass(frozen=True, slots=True)
class VerificationPolicy:
    """How hard the coordinator looks. See docs/verification.md for the reasoning.

    A provider is on probation (every tile sampled) until `probation` of its tiles have
    been confirmed by other providers; after that the rate falls as ``probation / verified``
    down to `min_rate`. A provider whose reputation is below `doubt_below` is sampled on
    every tile again. `suspend_after` rejected results suspend it.
    """

    enabled: bool = True
    probation: int = 50
    min_rate: float = 0.1
    doubt_below: float = 0.9
    suspend_after: int = 3
    #: Side of the re-rendered window as a fraction of the tile's side (both axes),
    #: bounded in pixels: a few hundred pixels judge a tile, and a bigger window only
    #: costs more (see docs/verification.md).
    window_fraction: float = 0.1
    min_window: int = 8
    max_window: int = 32


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """One provider account's history of checked results."""

    verified: int = 0
    rejected: int = 0


def reputation(record: ProviderRecord) -> float:
    """0..1: confirmed results count for one, each rejection against ten (Laplace prior)."""
    return (record.verified + 1) / (record.verified + 1 + 10 * record.rejected)


def sampling_rate(record: ProviderRecord, policy: VerificationPolicy) -> float:
    """The share of this provider's accepted tiles that get a duplicate sample."""
    if not policy.enabled:
        return 0.0
    if record.verified < policy.probation or reputation(record) < policy.doubt_below:
        return 1.0
    return max(policy.min_rate, min(1.0, policy.probation / max(1, record.verified)))


def should_verify(record: ProviderRecord, policy: VerificationPolicy, rng: random.Random) -> bool:
    rate = sampling_rate(record, policy)
    return rate >= 1.0 or rng.random() < rate


def suspension_reason(record: ProviderRecord, policy: VerificationPolicy) -> str | None:
    """Why the provider may no longer lease work, or None."""
    if record.rejected < policy.suspend_after:
        return None
    return (
        f"{record.rejected} results from this provider failed the coordinator's checks or"
        " duplicate samples by other providers"
    )


def choose_window(
    core: PixelRect,
    policy: VerificationPolicy,
    rng: random.Random,
    around: tuple[int, int] | None = None,
) -> PixelRect:
    """A random window inside the tile's core region (pixels of the whole frame); with
    `around`, the window inside the core that is centred as near that pixel as it can."""
    from renderers.regions import PixelRect

    width, height = core.x1 - core.x0, core.y1 - core.y0
    w = min(width, _window_side(width, policy))
    h = min(height, _window_side(height, policy))
    if around is None:
        x0 = core.x0 + rng.randint(0, width - w)
        y0 = core.y0 + rng.randint(0, height - h)
    else:
        x0 = min(max(core.x0, around[0] - w // 2), core.x1 - w)
        y0 = min(max(core.y0, around[1] - h // 2), core.y1 - h)
    return PixelRect(x0, y0, x0 + w, y0 + h)


def _window_side(side: int, policy: VerificationPolicy) -> int:
    wanted = math.ceil(side * policy.window_fraction)
    return max(policy.min_window, min(policy.max_window, wanted))

"""Dishonest nodes on purpose: ways to fake a render, for demonstrating verification.

This module exists for demos, tests and benchmarks of the coordinator's duplicate
sampling (a share of accepted tiles re-rendered by another provider; the loser of a
disagreement is not paid and loses reputation). A node cheats only when started with
``tessera node --cheat MODE`` (`NodeConfig.cheat`); it must never be enabled by default,
and a cheating node says so loudly in its log.

The modes (`CheatMode`):

- ``samples``: renders with a quarter of the samples asked (at least 1). Only the
  request changes, before rendering; the output is what Blender wrote.
- ``copy``: uploads the pixels of the tile this node rendered before (tiled and cropped
  to the size asked); with no earlier tile, the current one shifted by half its size.
- ``noise``: every channel becomes uniform random values in [0, that channel's maximum
  in the real render].
- ``black``: every channel becomes 0, except Combined's alpha, which becomes 1: an
  opaque black tile, what a skipped render or a broken GPU delivers. (A zero alpha would
  be a transparent hole that any alpha check catches; alpha 1 leaves the colour as the
  only tell, as for a render of an opaque scene.)
- ``sometimes``: honest, except for a random 10% of tasks, which it fakes with one of
  the four modes above (drawn at random; pass a seeded `random.Random` for tests).

Render and verify leases are cheated alike (a cheating verifier must lose arbitration);
denoise leases never are. The faked modes render the task honestly first and then
replace its pixels in place, so the file keeps the exact structure of a real render:
the same parts, channels, sizes, pixel types, header attributes and (lossless)
compression. Only a look at the pixels can tell.

`CheatingRunner` wraps the node's real `TaskRunner`: its `render` plans the fake, has
the real runner render, and fakes the output; everything else is the real runner's. The
daemon's render path is the same for honest and cheating nodes.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import OpenEXR

from common.errors import ExrError, UsageError
from farm_node.runner import TaskRunner
from protocol.models import Lease, TaskKind
from renderers.atomic import write_atomically
from renderers.worker import ProgressCallback, RenderResult

__all__ = [
    "FAKES",
    "ROUND_ROBIN",
    "SAMPLES_DIVISOR",
    "SOMETIMES_RATE",
    "Cheat",
    "CheatMode",
    "CheatPlan",
    "CheatingRunner",
    "cheat_modes",
    "parse_cheat",
]

log = logging.getLogger(__name__)


class CheatMode(StrEnum):
    SAMPLES = "samples"
    COPY = "copy"
    NOISE = "noise"
    BLACK = "black"
    SOMETIMES = "sometimes"


#: The ways a task is faked (what `sometimes` draws from).
FAKES = (CheatMode.SAMPLES, CheatMode.COPY, CheatMode.NOISE, CheatMode.BLACK)
#: The order in which `--cheaters K` hands modes to its K nodes.
ROUND_ROBIN = (*FAKES, CheatMode.SOMETIMES)
#: `samples` renders this many times fewer samples than asked.
SAMPLES_DIVISOR = 4
#: The share of tasks `sometimes` fakes.
SOMETIMES_RATE = 0.1

_MODES = ", ".join(mode.value for mode in CheatMode)

Pixels = npt.NDArray[Any]


def parse_cheat(text: str | CheatMode) -> CheatMode:
    """The mode called `text`; UsageError listing the modes otherwise."""
    try:
        return CheatMode(str(text).strip().lower())
    except ValueError:
        raise UsageError(
            f"There is no cheat {str(text)!r}.",
            hint=f"Use one of {_MODES} (cheating exists to demonstrate verification).",
        ) from None


def cheat_modes(count: int) -> list[CheatMode]:
    """The modes of `count` cheating nodes, round-robin in `ROUND_ROBIN` order."""
    if count < 0:
        raise UsageError(f"The number of cheaters must be 0 or more, not {count}.")
    return [ROUND_ROBIN[index % len(ROUND_ROBIN)] for index in range(count)]


@dataclass(frozen=True, slots=True)
class CheatPlan:
    """How one task is done: `lease` is what to render, `fake` how it is faked."""

    lease: Lease
    #: None: rendered honestly. SAMPLES: `lease` asks fewer samples. COPY, NOISE, BLACK:
    #: the output's pixels are replaced after rendering.
    fake: CheatMode | None

    @property
    def honest(self) -> bool:
        return self.fake is None


class Cheat:
    """A node's way of cheating: `plan` a lease before rendering it, `finish` the output.

    Not thread-safe: a node runs one task at a time.
    """

    def __init__(self, mode: CheatMode | str, *, rng: random.Random | None = None) -> None:
        self.mode = parse_cheat(mode)
        self._rng = rng or random.Random()
        #: The real pixels of the last tile rendered (for COPY), by full channel name.
        self._previous: dict[str, Pixels] | None = None

    def __repr__(self) -> str:
        return f"Cheat({self.mode.value!r})"

    def plan(self, lease: Lease) -> CheatPlan:
        """Decide how `lease` is done; a SAMPLES fake gets a lease asking fewer samples."""
        if lease.task.kind is TaskKind.DENOISE or lease.assignment is None:
            return CheatPlan(lease, None)
        fake: CheatMode | None = self.mode
        if self.mode is CheatMode.SOMETIMES:
            fake = self._rng.choice(FAKES) if self._rng.random() < SOMETIMES_RATE else None
        if fake is CheatMode.SAMPLES:
            return CheatPlan(fewer_samples(lease), fake)
        return CheatPlan(lease, fake)

    def finish(self, plan: CheatPlan, output: Path) -> None:
        """Fake `output` (the render of `plan.lease`) in place as `plan` says."""
        keeps_tiles = self.mode in (CheatMode.COPY, CheatMode.SOMETIMES)
        if plan.fake not in (CheatMode.COPY, CheatMode.NOISE, CheatMode.BLACK):
            if plan.fake is CheatMode.SAMPLES:
                self._announce(plan, f"rendered {plan.lease.samples} sample(s) only")
            if keeps_tiles:
                self._previous = _channels(_open(output))
            return
        exr = _open(output)
        real = _channels(exr)
        if plan.fake is CheatMode.BLACK:
            fake = _black(real)
            what = "uploading an opaque black tile"
        elif plan.fake is CheatMode.NOISE:
            fake = _noise(real, np.random.default_rng(self._rng.getrandbits(64)))
            what = "uploading random noise"
        else:
            fake, what = _copy(real, self._previous)
        if keeps_tiles:
            self._previous = real
        _replace_pixels(output, exr, fake)
        self._announce(plan, what)

    def _announce(self, plan: CheatPlan, what: str) -> None:
        lease = plan.lease
        log.warning(
            "CHEATING (%s) on lease %s, %s task %s: %s",
            self.mode.value,
            lease.lease_id,
            lease.task.kind.value,
            lease.task.id,
            what,
        )


class CheatingRunner:
    """The node's real `TaskRunner` with `render` faked as `cheat` plans (a wrapper).

    Denoising, cancelling and closing are the real runner's: denoise leases are never
    faked, and the node's lifecycle is the same as an honest node's.
    """

    def __init__(self, runner: TaskRunner, cheat: Cheat) -> None:
        self.runner = runner
        self.cheat = cheat

    def __repr__(self) -> str:
        return f"CheatingRunner({self.cheat!r})"

    def render(
        self,
        lease: Lease,
        scene: Path,
        output: Path,
        on_progress: ProgressCallback | None = None,
    ) -> RenderResult:
        plan = self.cheat.plan(lease)
        result = self.runner.render(plan.lease, scene, output, on_progress=on_progress)
        self.cheat.finish(plan, result.output)
        return result

    def denoise(
        self, lease: Lease, input_exr: Path, output: Path, samples: int | None = None
    ) -> Path:
        return self.runner.denoise(lease, input_exr, output, samples)

    def finish(self, lease: Lease, scene: Path, input_exr: Path, output: Path) -> Path:
        """Finishes honestly: the cheats are about renders."""
        return self.runner.finish(lease, scene, input_exr, output)

    def cancel(self) -> None:
        self.runner.cancel()


def fewer_samples(lease: Lease) -> Lease:
    """`lease` asking a `SAMPLES_DIVISOR`th of its samples (at least 1)."""
    assignment = lease.assignment
    if assignment is None:
        return lease
    # `Lease.samples` is the effective count (the job's override, else the scene's).
    fewer = max(1, lease.samples // SAMPLES_DIVISOR)
    return lease.model_copy(
        update={
            "assignment": assignment.model_copy(update={"samples": fewer}),
            "samples": fewer,
        }
    )


# --- pixels ---------------------------------------------------------------------------------


def _black(real: dict[str, Pixels]) -> dict[str, Pixels]:
    fake: dict[str, Pixels] = {}
    for name, pixels in real.items():
        alpha = name == "A" or name.endswith(".Combined.A")
        fake[name] = np.full_like(pixels, 1 if alpha else 0)
    return fake


def _noise(real: dict[str, Pixels], rng: np.random.Generator) -> dict[str, Pixels]:
    fake: dict[str, Pixels] = {}
    for name, pixels in real.items():
        finite = pixels[np.isfinite(pixels)] if pixels.dtype.kind == "f" else pixels
        top = max(0.0, float(finite.max())) if finite.size else 0.0
        if pixels.dtype.kind == "u":
            fake[name] = rng.integers(0, int(top) + 1, size=pixels.shape).astype(pixels.dtype)
        else:
            fake[name] = rng.uniform(0.0, top, size=pixels.shape).astype(pixels.dtype)
    return fake


def _copy(
    real: dict[str, Pixels], previous: dict[str, Pixels] | None
) -> tuple[dict[str, Pixels], str]:
    """The earlier tile's pixels fitted to this one's size (and what was done)."""
    if previous:
        fake = {
            name: _fit(previous[name], pixels) if name in previous else _shifted(pixels)
            for name, pixels in real.items()
        }
        # An earlier tile that was this very one (a task given again) would be honest.
        if not all(np.array_equal(fake[name], pixels) for name, pixels in real.items()):
            return fake, "uploading a copy of the tile before"
    shifted = {name: _shifted(pixels) for name, pixels in real.items()}
    return shifted, "uploading this tile shifted (no other tile to copy)"


def _fit(source: Pixels, like: Pixels) -> Pixels:
    """`source` repeated as tiles and cropped to `like`'s shape, in `like`'s type."""
    height, width = like.shape
    reps = (math.ceil(height / source.shape[0]), math.ceil(width / source.shape[1]))
    return np.ascontiguousarray(np.tile(source, reps)[:height, :width].astype(like.dtype))


def _shifted(pixels: Pixels) -> Pixels:
    height, width = pixels.shape
    return np.ascontiguousarray(np.roll(pixels, (height // 2, width // 2), axis=(0, 1)))


# --- the file -------------------------------------------------------------------------------


def _open(path: Path) -> Any:
    try:
        return OpenEXR.File(str(path), separate_channels=True)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ExrError(f"{path} could not be read as an EXR file ({error}).") from error


def _channels(exr: Any) -> dict[str, Pixels]:
    return {
        name: np.array(channel.pixels, copy=True)
        for part in exr.parts
        for name, channel in part.channels.items()
    }


def _replace_pixels(path: Path, exr: Any, pixels: dict[str, Pixels]) -> None:
    """Write `exr` back to `path` with new pixels, every header attribute as it was."""
    for part in exr.parts:
        for name, channel in part.channels.items():
            # OpenEXR writes a non-contiguous array silently wrong (see renderers.exr).
            channel.pixels = np.ascontiguousarray(pixels[name])
    write_atomically(path, lambda temporary: exr.write(str(temporary)), "the faked tile")

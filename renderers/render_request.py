"""What one render asks of the warm worker, and what it gives back.

`RenderRequest` (one frame or one region of it, as a JSON message for
`worker_main.py`), `RenderResult` and the `Progress` of a render in flight. Data only:
the process that renders them is `renderers.worker`, which re-exports these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from renderers.regions import BorderFractions

__all__ = ["Progress", "ProgressCallback", "RenderRequest", "RenderResult"]


@dataclass(frozen=True, slots=True)
class RenderRequest:
    """One render of one frame or one region of it, written to `output` as multilayer EXR."""

    scene: Path
    frame: int
    output: Path
    border: BorderFractions | None = None
    samples: int | None = None
    percentage: int | None = None
    #: The frame's full size (before `percentage`), or None for the file's own: a farm
    #: task names it, so a node renders the size that was paid for, whatever the file says.
    resolution: tuple[int, int] | None = None
    seed: int | None = None
    adaptive_sampling: bool | None = None
    denoise_data: bool = False
    denoise: bool = False
    device: str = "CPU"
    #: The Cycles ids of the devices to turn on (one card of a multi-GPU node); empty:
    #: every device of `device`'s type. See `renderers.worker_devices`.
    device_ids: tuple[str, ...] = ()
    threads: int = 0
    #: The folder the scene must stay in (its bundle), or None for a person's own scene
    #: that may read their files anywhere. See `RenderWorker.render`.
    confine_to: Path | None = None

    def to_message(self) -> dict[str, Any]:
        border = None
        if self.border is not None:
            border = {
                "min_x": self.border.min_x,
                "max_x": self.border.max_x,
                "min_y": self.border.min_y,
                "max_y": self.border.max_y,
            }
        return {
            "op": "render",
            "scene": str(self.scene),
            "frame": self.frame,
            "output": str(self.output),
            "border": border,
            "samples": self.samples,
            "percentage": self.percentage,
            "resolution": None if self.resolution is None else list(self.resolution),
            "seed": self.seed,
            "adaptive_sampling": self.adaptive_sampling,
            "denoise_data": self.denoise_data,
            "denoise": self.denoise,
            "device": self.device,
            "device_ids": list(self.device_ids),
            "threads": self.threads,
            "confine_to": None if self.confine_to is None else str(self.confine_to),
        }


@dataclass(frozen=True, slots=True)
class RenderResult:
    output: Path
    seconds: float
    frame_width: int
    frame_height: int
    device: str
    #: The most memory Cycles reported during the render ("Mem:" in its render stats),
    #: in bytes; 0 when it reported none.
    peak_memory: int = 0
    #: Seconds per stage inside Blender (prepare, startup, sync, trace, write) and `cpu`,
    #: the CPU seconds of all its threads during the render.
    stages: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Progress:
    samples_done: int
    samples_total: int

    @property
    def fraction(self) -> float:
        return self.samples_done / self.samples_total if self.samples_total else 0.0


ProgressCallback = Callable[[Progress], None]

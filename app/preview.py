"""The Submit page's colour preview: a small, few-sample render of one frame as 8-bit
sRGB bytes, which `app.gui.submit_page` turns into a QImage. No Qt here (so it can be
tested and reused without a display); Blender runs only inside the render worker.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from renderers.exr import read_exr
from renderers.scene_info import SceneInfo
from renderers.worker import RenderRequest, RenderWorker

#: The Submit page's colour preview fits this many pixels on each side...
COLOUR_PREVIEW_SIDE = 160
#: ...and has at most this many samples per pixel (it shows the framing, not the noise).
COLOUR_PREVIEW_SAMPLES = 8


@dataclass(frozen=True, slots=True)
class ColourPreview:
    """A small render of one frame: 8-bit sRGB, RGB888 rows, row 0 at the top."""

    frame: int
    width: int
    height: int
    rgb: bytes


def render_colour_preview(
    worker: RenderWorker,
    info: SceneInfo,
    frame: int | None = None,
    *,
    max_side: int = COLOUR_PREVIEW_SIDE,
    samples: int = COLOUR_PREVIEW_SAMPLES,
    timeout: float | None = 120.0,
) -> ColourPreview:
    """Render `frame` (default: the scene's first) of the inspected scene small enough to
    fit `max_side` pixels, at few samples, seed 0, no denoising, through `worker`.
    Raises the worker's errors when the render fails."""
    side = max(info.resolution_x, info.resolution_y)
    percentage = max(1, min(100, max_side * 100 // side))
    shown = info.frame_start if frame is None else frame
    with tempfile.TemporaryDirectory(prefix="tessera-preview-") as scratch:
        result = worker.render(
            RenderRequest(
                scene=info.path,
                frame=shown,
                output=Path(scratch) / "preview.exr",
                samples=max(1, min(samples, info.samples)),
                percentage=percentage,
                seed=0,
                adaptive_sampling=False,
                denoise=False,
                device="CPU",
            ),
            timeout=timeout,
        )
        linear = read_exr(result.output).combined_rgba()[..., :3].astype(np.float64)
    height, width = linear.shape[:2]
    return ColourPreview(shown, width, height, _to_srgb8(linear).tobytes())


def _to_srgb8(linear: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    """Scene-linear RGB to 8-bit sRGB (clipped; not Blender's view transform)."""
    clipped = np.clip(np.nan_to_num(linear, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    encoded = np.where(
        clipped <= 0.0031308, clipped * 12.92, 1.055 * np.power(clipped, 1 / 2.4) - 0.055
    )
    result: npt.NDArray[np.uint8] = np.ascontiguousarray(np.round(encoded * 255).astype(np.uint8))
    return result

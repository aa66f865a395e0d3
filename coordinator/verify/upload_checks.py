"""What the coordinator checks in an uploaded result before it accepts (and pays for) it.

`check_result` looks at one uploaded EXR against the task it answers and returns None
when it is sound, or a short reason that completes "The result was refused: ...". The
checks, in order (the first failure is the reason):

1. its header (read alone, before any pixel is decoded: `header_problem`) is that of
   an EXR of the expected size with at most MAX_RESULT_CHANNELS float or half channels
   in a lossless codec, so a small file claiming gigabytes of pixels is never decoded;
   then it is a readable EXR;
2. its size: the render region for render and verify tasks, the whole frame
   (`JobSpec.effective_size`) for denoise tasks;
3. its structure: every part the same size (`read_exr` refuses anything else) and a
   Combined pass with R, G, B and A in its (first) view layer; for render and verify
   tasks, the denoising data passes Blender writes when the assignment asks for
   `denoise_data`, and none of them when it does not;
4. every channel is float or half (Blender writes nothing else);
5. a lossless codec (NONE, RLE, ZIPS, ZIP, PIZ): lossy ones (PXR24 is lossy for float32,
   B44, B44A, DWAA, DWAB) and any codec this list does not know are refused, because a
   lossy tile would not merge into the same frame a one-piece render gives;
6. every value finite (no NaN or infinity in any channel: Cycles sanitises what it adds
   to its light passes, so a non-finite value means a broken render or device);

`inspect_result` adds a doubt that never refuses: for render tasks whose frame has a
submit-time preview (`FramePreview`, see renderers/scene_probe.py), a core of one flat
colour (all black included) where the preview shows something else (`flat_tile_doubt`;
its statistics keep it from doubting an honest tile of an honest preview). The preview
is the requester's word, and nothing the requester declares judges a provider: a doubt
only asks another provider for a confirming render of the window where the preview
differs (`coordinator.results`), and a confirmed tile marks the job's previews
untrustworthy.

The duplicate sampling (a window of the tile re-rendered elsewhere) catches what these
structural checks cannot; these are the cheap checks every upload gets.

This module reads files and does arithmetic only: no database, no HTTP, no Blender (the
coordinator never imports bpy), no decision about payment or reputation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from common.errors import ExrError
from protocol.models import FramePreview, JobSpec, Region, RenderAssignment, TaskKind
from renderers.exr import LOSSLESS_COMPRESSIONS, ExrHeader, ExrImage, read_exr, read_exr_header

__all__ = [
    "DENOISING_DATA_PASSES",
    "FALSE_REFUSAL_BOUND",
    "LOSSY_COMPRESSIONS",
    "MAX_RESULT_CHANNELS",
    "PREVIEW_EROSION",
    "PREVIEW_MAX_SAMPLES",
    "Doubt",
    "check_result",
    "false_refusal_bound",
    "flat_tile_doubt",
    "flat_tile_problem",
    "header_problem",
    "inspect_result",
]

#: The passes Blender adds to every view layer when "Denoising Data" is on (bpy 5.0.1).
DENOISING_DATA_PASSES = ("Denoising Normal", "Denoising Albedo", "Denoising Depth")

#: Codecs that lose information: PXR24 rounds float32 to 24 bits, B44/B44A and DWAA/DWAB
#: are perceptual. (B44 happens to store float32 channels exactly, but a tile must not
#: depend on that: it would lose half channels.)
LOSSY_COMPRESSIONS = ("pxr24", "b44", "b44a", "dwaa", "dwab")

#: Channels a result may have, in all its parts: every pass Cycles writes, for several
#: view layers, fits far below this; a file claiming more is refused from its header,
#: since the memory it takes decoded grows with it.
MAX_RESULT_CHANNELS = 256

_CODEC_NAMES = {"none": "no compression", "rle": "RLE", "zips": "ZIPS", "zip": "ZIP", "piz": "PIZ"}

# --- the flat-tile check: its thresholds and why ------------------------------------------
#
# An honest tile is exactly one colour c over its whole core only when every camera sample
# there returned c (e.g. a constant world colour, or nothing at all: black). The submit-time
# preview of that frame was rendered with at most PREVIEW_MAX_SAMPLES samples per preview
# pixel. If a preview pixel's luminance differs from c, at least one of its samples did not
# return c. Let r be the chance that one sample in that pixel's area does not return c, and
# y = (1 - r) ** PREVIEW_MAX_SAMPLES. The chance that the preview pixel differs from c AND
# all M tile samples in the same area return c is at most (1 - y) * y ** C with
# C = M / PREVIEW_MAX_SAMPLES, whose maximum over every possible scene (every r) is
#     p1 = C ** C / (C + 1) ** (C + 1)          (1/4 for C = 1; about 1/(e (C + 1)) for big C).
# Preview pixels and tile pixels are independent renders, so for a tile whose core covers
# n whole preview pixels, the chance that k or more of them differ from an honest flat
# tile is at most  sum(comb(n, s) * p1 ** s for s >= k)  (`false_refusal_bound`). A flat
# tile is refused only when that bound is below FALSE_REFUSAL_BOUND, whatever the scene.
#
# Margins on top of the bound:
# - only preview pixels lying wholly inside the tile's core count, and PREVIEW_EROSION more
#   are dropped on every side: Cycles' pixel filter (1.5 px wide by default) lets a preview
#   pixel see 0.75 preview pixels beyond its edge, which is a lot of frame at preview size,
#   and the preview's aspect ratio may differ from the frame's by a rounding (at most
#   0.6 preview pixels at an edge for a 64-pixel-wide preview). 2 pixels cover a filter up
#   to 4 pixels wide plus the rounding;
# - M counts whole frame pixels only (floor of frame pixels per preview pixel on each axis)
#   and one sample per pixel when adaptive sampling is on (it may stop that early);
# - a preview pixel "differs" only by more than FLAT_ABSOLUTE + FLAT_RELATIVE * |lum(c)|
#   in luminance: far above float rounding (1e-7 relative), the preview's 6 significant
#   digits and a CPU/GPU or Blender-version difference in a constant colour, and still
#   small next to what a faked tile changes (1e-3 is 3/255 in sRGB);
# - only raw renders are judged: a whole frame denoised in Blender
#   (`denoise_in_render`) is not, since the denoiser may flatten a dark, sparsely lit
#   region and the statistics above are about Monte Carlo samples.
#
# So a tile rendered with few samples at about the preview's size may never be refused
# (C small, p1 near 1), while a tile of a real frame (C in the hundreds) is refused as
# soon as a handful of preview pixels inside it are lit. Both are intended.

#: The most samples the submit-time probe renders a preview with (renderers/scene_probe.py
#: PREVIEW_MAX_SAMPLES; the coordinator cannot import the probe, a test ties the two).
PREVIEW_MAX_SAMPLES = 16
#: Preview pixels dropped on every side of the tile's core before counting (see above).
PREVIEW_EROSION = 2
#: The largest chance of refusing an honest flat tile that the check accepts.
FALSE_REFUSAL_BOUND = 1e-9
#: Luminance differences a preview pixel needs to count as different from the tile.
FLAT_ABSOLUTE = 1e-3
FLAT_RELATIVE = 0.05

_REC709 = (0.2126, 0.7152, 0.0722)

RgbPixels = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Doubt:
    """Why a structurally sound result looks wrong against the requester's preview.

    Never a refusal: it only asks for a confirming render by another provider."""

    reason: str
    #: Frame pixels (x, y) at the centres of the preview pixels that differ from the tile.
    points: tuple[tuple[int, int], ...] = ()


def check_result(
    path: Path, kind: TaskKind, assignment: RenderAssignment | None, spec: JobSpec
) -> str | None:
    """None if the EXR at `path` is a sound answer to its task, else why it is not.

    `assignment` is the task's render assignment (None for a denoise task, whose result
    is a whole frame); `spec` is the job's spec (frame size and samples).
    """
    return inspect_result(path, kind, assignment, spec, previews=False)[0]


def inspect_result(
    path: Path,
    kind: TaskKind,
    assignment: RenderAssignment | None,
    spec: JobSpec,
    *,
    previews: bool = True,
) -> tuple[str | None, Doubt | None]:
    """(why the result is refused, why it is doubted): see the module's docstring.

    `previews`: whether the job's previews may still raise a doubt (a confirmed tile
    showed them untrustworthy). Only render and backup tiles are doubted: a verify
    window is judged against the tile it samples.
    """
    rendered = kind in (TaskKind.RENDER, TaskKind.VERIFY, TaskKind.BACKUP)
    if rendered and assignment is None:
        return f"a {kind.value} task needs a render assignment to check its result against", None
    if rendered and assignment is not None:
        expected = _size(assignment.render_region)
    else:
        expected = spec.effective_size()
    # The header first: a few kilobytes can claim gigabytes of pixels, so nothing is
    # decoded before its size, channels and codec are known to be what the task asks.
    try:
        header = read_exr_header(path)
    except ExrError as exc:
        return f"it is not a readable EXR ({_without_path(exc, path)})", None
    problem = header_problem(header, expected)
    if problem is not None:
        return problem, None
    try:
        # No `max_pixels`: `header_problem` just bounded every part to `expected` from
        # this header, and `read_exr` would parse it again (a third of a small tile's check).
        image = read_exr(path)
    except ExrError as exc:
        return f"it is not a readable EXR ({_without_path(exc, path)})", None
    if (image.width, image.height) != expected:
        return (
            f"it is {image.width}x{image.height} pixels; the task asked for "
            f"{expected[0]}x{expected[1]}"
        ), None
    problem = _structure_problem(image)
    if problem is None and rendered and assignment is not None:
        problem = _denoising_data_problem(image, assignment.denoise_data)
    if problem is None:
        problem = _pixel_type_problem(image)
    if problem is None:
        problem = _compression_problem(image.compression)
    if problem is None:
        problem = _finite_problem(image)
    if problem is not None:
        return problem, None
    doubted = previews and kind in (TaskKind.RENDER, TaskKind.BACKUP)
    if doubted and assignment is not None:
        return None, flat_tile_doubt(image, assignment, spec)
    return None, None


# --- the header, before any pixel is decoded -------------------------------------------------


def header_problem(header: ExrHeader, expected: tuple[int, int]) -> str | None:
    """Why a file whose header is `header` cannot be the result of a task of size
    `expected`, judged before decoding: every part that size, at most
    MAX_RESULT_CHANNELS float or half channels in all, a lossless codec, scanlines."""
    width, height = expected
    if not header.parts:
        return "it has no parts"
    if header.deep:
        return "it holds deep data; tiles are flat images"
    for part in header.parts:
        if (part.width, part.height) != expected:
            name = _quoted([part.name or "(unnamed)"])
            return (
                f"its part {name} is {max(part.width, 0)}x{max(part.height, 0)} pixels; the"
                f" task asked for {width}x{height} (refused before decoding)"
            )
    channels = sum(len(part.channels) for part in header.parts)
    if channels > MAX_RESULT_CHANNELS:
        return (
            f"it has {channels} channels, more than the {MAX_RESULT_CHANNELS} a result may"
            " have (refused before decoding)"
        )
    for part in header.parts:
        for name, kind in part.channels.items():
            if kind not in ("float", "half"):
                shown = {"uint": "uint32"}.get(kind, kind)
                return f"channel {_quoted([name])} holds {shown} values; tiles hold float or half"
        # A codec the header parser has no name for ("#13") is judged after decoding,
        # which is bounded now that the size is known, by its proper name.
        if not part.compression.startswith("#"):
            problem = _compression_problem(part.compression)
            if problem is not None:
                return problem
    return None


def _without_path(exc: ExrError, path: Path) -> str:
    return exc.message.replace(str(path), "the file")


# --- structure ------------------------------------------------------------------------------


def _size(region: Region) -> tuple[int, int]:
    return region.x1 - region.x0, region.y1 - region.y0


def _structure_problem(image: ExrImage) -> str | None:
    layers = image.view_layers()
    if not layers:
        return "it has no view layers, so no Combined pass (Blender names parts 'Layer.Pass')"
    layer = layers[0]
    names = set(image.channel_names())
    missing = [c for c in "RGBA" if f"{layer}.Combined.{c}" not in names]
    if len(missing) == 4:
        return f"it has no Combined pass in view layer {layer!r}"
    if missing:
        return f"its Combined pass in view layer {layer!r} lacks channel(s) {', '.join(missing)}"
    return None


def _denoising_data_problem(image: ExrImage, denoise_data: bool) -> str | None:
    parts = {part.name for part in image.parts}
    layers = image.view_layers()
    if denoise_data:
        absent = [
            f"{layer}.{name}"
            for layer in layers
            for name in DENOISING_DATA_PASSES
            if f"{layer}.{name}" not in parts
        ]
        if absent:
            return f"it lacks the denoising data pass(es) {_quoted(absent)} that the task asked for"
        return None
    present = [
        f"{layer}.{name}"
        for layer in layers
        for name in DENOISING_DATA_PASSES
        if f"{layer}.{name}" in parts
    ]
    if present:
        return f"it has denoising data pass(es) {_quoted(present)} that the task did not ask for"
    return None


def _pixel_type_problem(image: ExrImage) -> str | None:
    for part in image.parts:
        for name, pixels in part.channels.items():
            if pixels.dtype not in (np.float32, np.float16):
                return f"channel {name!r} holds {pixels.dtype} values; tiles hold float or half"
    return None


def _compression_problem(compression: str) -> str | None:
    if compression in LOSSLESS_COMPRESSIONS:
        return None
    lossless = ", ".join(_CODEC_NAMES[name] for name in LOSSLESS_COMPRESSIONS)
    if compression in LOSSY_COMPRESSIONS:
        return (
            f"it is compressed with {compression.upper()}, a lossy codec; tiles must be "
            f"lossless ({lossless})"
        )
    shown = compression.upper() or "an unknown codec"
    return f"it is compressed with {shown}, which the farm does not accept; use {lossless}"


def _finite_problem(image: ExrImage) -> str | None:
    for part in image.parts:
        for name, pixels in part.channels.items():
            if not np.isfinite(pixels).all():
                return f"channel {name!r} contains NaN or infinite values"
    return None


def _quoted(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- flat tiles -----------------------------------------------------------------------------


def flat_tile_problem(image: ExrImage, assignment: RenderAssignment, spec: JobSpec) -> str | None:
    """`flat_tile_doubt`'s reason, or None."""
    doubt = flat_tile_doubt(image, assignment, spec)
    return None if doubt is None else doubt.reason


def flat_tile_doubt(image: ExrImage, assignment: RenderAssignment, spec: JobSpec) -> Doubt | None:
    """Why the tile's core is a flat colour where the frame's preview is not, or None.

    Only Combined RGB of the first view layer is looked at (alpha is not: a faked opaque
    black tile keeps alpha 1). Returns None when the job has no preview of this frame,
    when Blender denoised the render, when the core is not one exact colour, or when
    `false_refusal_bound` does not rule out an honest render (see the comment block
    above `PREVIEW_MAX_SAMPLES`).
    """
    preview = next((p for p in spec.previews if p.frame == assignment.frame), None)
    if preview is None or assignment.denoise_in_render:
        return None
    render, core = assignment.render_region, assignment.core_region
    x0, y0 = max(core.x0, render.x0) - render.x0, max(core.y0, render.y0) - render.y0
    x1, y1 = min(core.x1, render.x1) - render.x0, min(core.y1, render.y1) - render.y0
    if x1 <= x0 or y1 <= y0:
        return None
    rgb: RgbPixels = image.combined_rgba()[y0:y1, x0:x1, :3]
    colour = rgb[0, 0]
    if not (rgb == colour).all():
        return None
    area = _preview_area(preview, core, assignment.width, assignment.height)
    if area is None:
        return None
    tile_luminance = _luminance(colour)
    luminance = np.asarray(preview.luminance, dtype=np.float64).reshape(
        preview.height, preview.width
    )[area]
    differs = np.abs(luminance - tile_luminance) > FLAT_ABSOLUTE + FLAT_RELATIVE * abs(
        tile_luminance
    )
    different = int(np.count_nonzero(differs))
    ratio = _samples_ratio(assignment, spec, preview)
    if false_refusal_bound(different, luminance.size, ratio) >= FALSE_REFUSAL_BOUND:
        return None
    rows, columns = area
    points = tuple(
        (
            int((columns.start + j + 0.5) * assignment.width / preview.width),
            int((rows.start + i + 0.5) * assignment.height / preview.height),
        )
        for i, j in zip(*np.nonzero(differs), strict=True)
    )
    share = f"{different} of the {luminance.size} preview pixels inside it"
    if not colour.any():
        return Doubt(
            f"it is entirely black, but the scene's preview of frame {assignment.frame}"
            f" shows light there ({share} are not black)",
            points,
        )
    shown = ", ".join(f"{float(v):.4g}" for v in colour)
    return Doubt(
        f"it is one flat colour (RGB {shown}), but the scene's preview of frame"
        f" {assignment.frame} varies there ({share} differ)",
        points,
    )


def false_refusal_bound(different: int, pixels: int, ratio: float) -> float:
    """An upper bound on the chance that an honest flat tile meets `different` or more of
    `pixels` preview pixels that differ from it, when the tile has `ratio` times as many
    samples per preview pixel as the preview had (see the comment block above)."""
    if different <= 0 or pixels <= 0 or different > pixels or ratio <= 0:
        return 1.0
    log_p1 = ratio * math.log(ratio) - (ratio + 1) * math.log(ratio + 1)
    log_n = math.lgamma(pixels + 1)
    total = 0.0
    for count in range(different, pixels + 1):
        log_comb = log_n - math.lgamma(count + 1) - math.lgamma(pixels - count + 1)
        total += math.exp(log_comb + count * log_p1)
    return min(1.0, total)


def _preview_area(
    preview: FramePreview, core: Region, width: int, height: int
) -> tuple[slice, slice] | None:
    """Rows and columns of the preview pixels wholly inside `core`, eroded on every side."""
    columns = _inner_span(core.x0, core.x1, width, preview.width)
    rows = _inner_span(core.y0, core.y1, height, preview.height)
    if columns is None or rows is None:
        return None
    return slice(*rows), slice(*columns)


def _inner_span(start: int, end: int, frame: int, preview: int) -> tuple[int, int] | None:
    # Preview pixel j covers frame pixels [j * frame / preview, (j + 1) * frame / preview).
    first = -((-start * preview) // frame) + PREVIEW_EROSION
    stop = (end * preview) // frame - PREVIEW_EROSION
    first, stop = max(first, 0), min(stop, preview)
    return (first, stop) if stop > first else None


def _samples_ratio(assignment: RenderAssignment, spec: JobSpec, preview: FramePreview) -> float:
    """Tile samples per preview pixel, over the preview's samples (a lower bound)."""
    # Adaptive sampling may stop a converged pixel after one sample.
    samples = 1 if spec.scene.adaptive_sampling else assignment.samples or spec.effective_samples
    pixels = (assignment.width // preview.width) * (assignment.height // preview.height)
    return pixels * samples / PREVIEW_MAX_SAMPLES


def _luminance(rgb: RgbPixels) -> float:
    return float(sum(weight * float(value) for weight, value in zip(_REC709, rgb, strict=True)))

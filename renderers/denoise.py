"""Denoise a merged frame once, so tiled renders have no seams.

Tiles render with the denoiser off and the denoising data passes on (their noisy
Combined, Albedo and Normal are bit-identical to a one-piece render). After the merge
this module hands the whole frame to Cycles' own file denoiser (OpenImageDenoise, the
same one Blender uses in-render) through the render worker, then rebuilds Blender's
usual layout: `Combined` denoised, `Noisy Image` the noisy original, data passes kept.

Cycles' file denoiser reads a SINGLE-part EXR whose view layer has Combined, Denoising
Normal, Denoising Albedo and Vector channels (measured with bpy 5.0.1: Blender 5's own
multi-part files are refused). Vector only matters for temporal denoising, so a zero
Vector is supplied when the scene has none. This module never imports bpy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.errors import ExrError
from renderers.exr import ExrImage, ExrPart, read_exr, write_single_part_exr

if TYPE_CHECKING:
    from renderers.worker import RenderWorker

REQUIRED_PASSES = ("Combined", "Denoising Albedo", "Denoising Normal")
NOISY_PASS = "Noisy Image"


def denoisable_layers(image: ExrImage) -> list[str]:
    """View layers of `image` that carry everything the denoiser needs."""
    part_names = {part.name for part in image.parts}
    return [
        layer
        for layer in image.view_layers()
        if all(f"{layer}.{name}" in part_names for name in REQUIRED_PASSES)
    ]


def denoise_frame(
    worker: RenderWorker,
    merged: ExrImage,
    *,
    samples: int,
    timeout: float | None = None,
) -> ExrImage:
    """Denoise every view layer of a merged frame that has the denoising data passes."""
    layers = denoisable_layers(merged)
    if not layers:
        raise ExrError(
            "The frame has no view layer with Combined, Denoising Albedo and Denoising "
            "Normal passes, so it cannot be denoised.",
            hint="Render the tiles with denoise_data=True.",
        )
    with tempfile.TemporaryDirectory(prefix="tessera-denoise-") as scratch:
        source = Path(scratch) / "noisy.exr"
        target = Path(scratch) / "denoised.exr"
        write_single_part_exr(source, _denoiser_input(merged, layers, samples))
        worker.denoise(source, target, timeout=timeout)
        denoised = read_exr(target)
    return _blender_layout(merged, denoised, layers)


def _denoiser_input(merged: ExrImage, layers: list[str], samples: int) -> ExrImage:
    parts = [part for part in merged.parts if part.name.rsplit(".", 1)[-1] != NOISY_PASS]
    part_names = {part.name for part in parts}
    zeros = np.zeros((merged.height, merged.width), dtype=np.float32)
    attributes: dict[str, str] = {}
    for layer in layers:
        attributes[f"cycles.{layer}.samples"] = str(samples)
        if f"{layer}.Vector" not in part_names:
            channels = {f"{layer}.Vector.{axis}": zeros for axis in "XYZW"}
            parts.append(ExrPart(name=f"{layer}.Vector", channels=channels, attributes={}))
    first = parts[0]
    parts[0] = ExrPart(first.name, first.channels, {**first.attributes, **attributes})
    return ExrImage(width=merged.width, height=merged.height, parts=parts)


def _blender_layout(merged: ExrImage, denoised: ExrImage, layers: list[str]) -> ExrImage:
    """Combined from the denoiser, Noisy Image from the merge, everything else unchanged."""
    parts: list[ExrPart] = []
    for part in merged.parts:
        layer, _, pass_name = part.name.rpartition(".")
        if layer not in layers or pass_name == NOISY_PASS:
            parts.append(part)
            continue
        if pass_name != "Combined":
            parts.append(part)
            continue
        clean = {
            name: np.ascontiguousarray(denoised.channel(name), dtype=np.float32)
            for name in part.channels
        }
        parts.append(ExrPart(part.name, clean, part.attributes))
        noisy = {
            name.replace(f"{layer}.Combined.", f"{layer}.{NOISY_PASS}."): pixels
            for name, pixels in part.channels.items()
        }
        parts.append(ExrPart(f"{layer}.{NOISY_PASS}", noisy, {}))
    return ExrImage(width=merged.width, height=merged.height, parts=parts)

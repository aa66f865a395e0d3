"""Denoising after the merge: no seams, and no worse than Monte Carlo noise itself.

The reference is Blender's own in-render denoise of the whole frame. A tiled, merged,
then denoised frame must differ from it by no more than that reference differs from
itself across two seeds; and the tiled result must equal our one-piece result exactly,
which rules out seams (per-tile denoising changes every pixel near a tile edge).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from renderers.exr import ExrImage, read_exr
from renderers.local_render import LocalRenderOptions, render_frame_local
from renderers.worker import RenderWorker
from tests.scene_tools import render_denoised_in_blender

FRAME, PERCENTAGE, SAMPLES = 5, 10, 16


def _rgb(image: ExrImage) -> np.ndarray:
    return image.combined_rgba()[..., :3].astype(np.float64)


def _rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


@pytest.fixture(scope="module")
def renders(
    worker: RenderWorker, demo_scene: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, ExrImage]:
    folder = tmp_path_factory.mktemp("denoise")
    out: dict[str, ExrImage] = {}
    for name, grid in (("tiled", (3, 3)), ("whole", (1, 1))):
        options = LocalRenderOptions(
            frame=FRAME,
            grid=grid,
            percentage=PERCENTAGE,
            samples=SAMPLES,
            seed=0,
            denoise=True,
            preview=False,
        )
        render_frame_local(worker, demo_scene, folder / f"{name}.exr", options)
        out[name] = read_exr(folder / f"{name}.exr")
    for seed in (0, 1):
        path = render_denoised_in_blender(
            demo_scene,
            folder / f"blender_seed{seed}.exr",
            frame=FRAME,
            percentage=PERCENTAGE,
            samples=SAMPLES,
            seed=seed,
        )
        out[f"blender_seed{seed}"] = read_exr(path)
    return out


def test_denoised_frame_keeps_blenders_layout(renders: dict[str, ExrImage]) -> None:
    parts = [part.name for part in renders["tiled"].parts]
    assert parts[:2] == ["ViewLayer.Combined", "ViewLayer.Noisy Image"]
    assert {"ViewLayer.Denoising Albedo", "ViewLayer.Denoising Normal"} <= set(parts)
    assert "ViewLayer.Vector" not in parts, "the zero Vector fed to the denoiser is dropped"


def test_denoising_changed_the_image(renders: dict[str, ExrImage]) -> None:
    tiled = renders["tiled"]
    noisy = tiled.channel("ViewLayer.Noisy Image.R")
    assert np.count_nonzero(tiled.channel("ViewLayer.Combined.R") != noisy) > noisy.size // 2


def test_tiled_denoise_is_within_the_seed_to_seed_noise(renders: dict[str, ExrImage]) -> None:
    reference = _rgb(renders["blender_seed0"])
    seed_noise = _rms(reference, _rgb(renders["blender_seed1"]))
    tiled_error = _rms(reference, _rgb(renders["tiled"]))
    assert seed_noise > 0
    assert tiled_error <= seed_noise, f"tiled {tiled_error:.5f} vs seeds {seed_noise:.5f}"


def test_no_seams_tiled_equals_one_piece_after_denoise(renders: dict[str, ExrImage]) -> None:
    tiled, whole = renders["tiled"], renders["whole"]
    for name in whole.channel_names():
        assert np.array_equal(tiled.channel(name), whole.channel(name)), name


def test_no_seams_error_is_not_concentrated_on_tile_edges(renders: dict[str, ExrImage]) -> None:
    """Against Blender's own denoise, pixels next to tile edges are no worse than others."""
    error = np.abs(_rgb(renders["tiled"]) - _rgb(renders["blender_seed0"])).mean(axis=2)
    height, width = error.shape
    edge = np.zeros_like(error, dtype=bool)
    for i in (1, 2):
        x, y = i * width // 3, i * height // 3
        edge[:, max(0, x - 2) : x + 2] = True
        edge[max(0, y - 2) : y + 2, :] = True
    assert error[edge].mean() <= 1.5 * error[~edge].mean() + 1e-6

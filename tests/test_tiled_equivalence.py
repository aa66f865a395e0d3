"""The central invariant: a frame rendered in tiles equals, pixel for pixel, the same frame
rendered in one piece (CPU, same build), with adaptive sampling on and off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from renderers import regions
from renderers.auto_tiles import choose_grid
from renderers.exr import ExrImage, read_exr
from renderers.local_render import LocalRenderOptions, render_frame_local
from renderers.worker import RenderWorker
from tests.scene_tools import prepare_scene


def _render(
    worker: RenderWorker, scene: Path, out: Path, grid: tuple[int, int], **options: object
) -> ExrImage:
    settings: dict[str, object] = {"frame": 3, "grid": grid, "denoise": False, "preview": False}
    settings.update(options)
    render_frame_local(worker, scene, out, LocalRenderOptions(**settings))  # type: ignore[arg-type]
    return read_exr(out)


def _assert_identical(tiled: ExrImage, whole: ExrImage) -> None:
    assert (tiled.width, tiled.height) == (whole.width, whole.height)
    assert tiled.channel_names() == whole.channel_names()
    for name in whole.channel_names():
        a, b = tiled.channel(name), whole.channel(name)
        mismatched = int(np.count_nonzero(a != b))
        assert mismatched == 0, f"{name}: {mismatched} pixels differ (max {np.abs(a - b).max()})"


@pytest.fixture(scope="module")
def bat_with_cameras(bat_scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("bat-cameras")
    return [
        prepare_scene(
            bat_scenes / name,
            folder / name,
            add_camera=True,
            engine="CYCLES",
            resolution_x=64,
            resolution_y=48,
            resolution_percentage=100,
            samples=8,
        )
        for name in ("basic_file.blend", "multiple_materials.blend")
    ]


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive-on", "adaptive-off"])
def test_demo_scene_3x3_equals_one_piece(
    worker: RenderWorker, demo_scene: Path, tmp_path: Path, adaptive: bool
) -> None:
    common = {"percentage": 10, "samples": 8, "adaptive_sampling": adaptive}
    whole = _render(worker, demo_scene, tmp_path / "whole.exr", (1, 1), **common)
    tiled = _render(worker, demo_scene, tmp_path / "tiled.exr", (3, 3), **common)
    _assert_identical(tiled, whole)
    assert float(whole.channel("ViewLayer.Combined.R").max()) > 0.01, "not a black frame"


@pytest.mark.parametrize("index", [0, 1], ids=["basic_file", "multiple_materials"])
@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive-on", "adaptive-off"])
def test_shared_scenes_3x3_equal_one_piece(
    worker: RenderWorker, bat_with_cameras: list[Path], tmp_path: Path, index: int, adaptive: bool
) -> None:
    scene = bat_with_cameras[index]
    whole = _render(worker, scene, tmp_path / "whole.exr", (1, 1), adaptive_sampling=adaptive)
    tiled = _render(worker, scene, tmp_path / "tiled.exr", (3, 3), adaptive_sampling=adaptive)
    _assert_identical(tiled, whole)
    assert float(whole.combined_rgba()[..., 3].max()) > 0, "the camera sees something"


def test_uneven_grid_with_percentage_equals_one_piece(
    worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    common = {"percentage": 11, "samples": 4}  # 70x39: tiles of unequal sizes
    whole = _render(worker, demo_scene, tmp_path / "whole.exr", (1, 1), **common)
    tiled = _render(worker, demo_scene, tmp_path / "tiled.exr", (4, 3), **common)
    assert (whole.width, whole.height) == (70, 39)
    _assert_identical(tiled, whole)


@pytest.fixture(scope="module")
def converging_scene(demo_scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo scene with a loose adaptive threshold, so that pixels really stop early
    (at the demo's own settings few pixels converge before the last sample)."""
    return prepare_scene(
        demo_scene,
        tmp_path_factory.mktemp("adaptive") / "adaptive.blend",
        adaptive_threshold=0.1,
        adaptive_min_samples=4,
    )


@pytest.mark.parametrize("frame", [4, 13, 19])
def test_converging_adaptive_sampling_needs_and_gets_its_margin(
    worker: RenderWorker, converging_scene: Path, tmp_path: Path, frame: int
) -> None:
    common = {"frame": frame, "percentage": 10, "samples": 512}
    whole = _render(worker, converging_scene, tmp_path / "whole.exr", (1, 1), **common)
    tiled = _render(worker, converging_scene, tmp_path / "tiled.exr", (4, 4), **common)
    _assert_identical(tiled, whole)
    # Without the margin, the convergence mask differs along tile edges: the check bites.
    naive = _render(worker, converging_scene, tmp_path / "naive.exr", (4, 4), margin=0, **common)
    assert _differing(naive, whole) > 0


def _differing(a: ExrImage, b: ExrImage) -> int:
    return sum(int(np.count_nonzero(a.channel(n) != b.channel(n))) for n in b.channel_names())


@pytest.mark.parametrize(("samples", "passes"), [(32, 1), (48, 2)])
def test_derived_margin_of_one_pixel_per_filter_pass_is_exact(
    worker: RenderWorker, converging_scene: Path, tmp_path: Path, samples: int, passes: int
) -> None:
    """Threshold 0.1, minimum 4 samples: Cycles filters after samples 16, 32, ...; at 32
    samples one pass changes what is sampled, at 48 two. The margin is that many pixels,
    and it is enough; no margin is not."""
    assert regions.adaptive_filter_passes(samples, 0.1, 4) == passes
    common = {"frame": 4, "percentage": 10, "samples": samples}
    whole = _render(worker, converging_scene, tmp_path / "whole.exr", (1, 1), **common)
    options = LocalRenderOptions(grid=(4, 4), denoise=False, preview=False, **common)  # type: ignore[arg-type]
    result = render_frame_local(worker, converging_scene, tmp_path / "tiled.exr", options)
    assert result.plan.margin == passes
    _assert_identical(read_exr(tmp_path / "tiled.exr"), whole)
    naive = _render(worker, converging_scene, tmp_path / "naive.exr", (4, 4), margin=0, **common)
    assert _differing(naive, whole) > 0


def _grids_auto_picks(width: int, height: int) -> list[tuple[int, int]]:
    """Every grid `--tiles auto` picks for one frame of this size, on 1 to 299 nodes."""
    choices = (choose_grid(width, height, nodes=n, frames=1, margin=0) for n in range(1, 300))
    return sorted({(choice.columns, choice.rows) for choice in choices})


def test_every_grid_tiles_auto_picks_for_the_demo_is_exact(
    worker: RenderWorker, converging_scene: Path, tmp_path: Path
) -> None:
    """All grids `--tiles auto` picks for the demo's 640x360 frame (14 of them, up to
    5x5), and the 8x8 it picks for 960x540, rendered at a small size (64x36 px) with
    adaptive sampling that really converges (2 filter passes, a 2 px margin): every one
    equals the one-piece frame."""
    grids = _grids_auto_picks(640, 360)
    assert len(grids) >= 10 and (5, 5) in grids
    big = choose_grid(960, 540, nodes=64, frames=1, margin=0)
    assert (big.columns, big.rows) == (8, 8)
    grids.append((big.columns, big.rows))
    common = {"frame": 13, "percentage": 10, "samples": 48}
    whole = _render(worker, converging_scene, tmp_path / "whole.exr", (1, 1), **common)
    for columns, rows in grids:
        out = tmp_path / f"tiled-{columns}x{rows}.exr"
        _assert_identical(_render(worker, converging_scene, out, (columns, rows), **common), whole)


def test_the_8x8_grid_is_exact_with_adaptive_sampling_off(
    worker: RenderWorker, converging_scene: Path, tmp_path: Path
) -> None:
    common = {"frame": 13, "percentage": 10, "samples": 48, "adaptive_sampling": False}
    whole = _render(worker, converging_scene, tmp_path / "whole.exr", (1, 1), **common)
    _assert_identical(
        _render(worker, converging_scene, tmp_path / "t.exr", (8, 8), **common), whole
    )

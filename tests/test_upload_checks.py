"""Tests of the coordinator's upload checks (coordinator/verify/upload_checks.py) on real renders.

Tiles are rendered by the real Blender worker, exactly as a node renders an assignment;
every refusal is made by changing one thing in a real tile and writing it back, and every
honest tile (whole frames, tiles with margins, verify windows, genuinely black or flat
regions) must pass, undoubted. A flat tile where the preview is lit is doubted (another
provider is asked to confirm it), never refused: the preview is the requester's word.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import OpenEXR
import pytest

from app.job_spec import frame_preview
from coordinator.verify import upload_checks
from coordinator.verify.upload_checks import check_result, false_refusal_bound, inspect_result
from protocol.models import JobSpec, Region, RenderAssignment, TaskKind
from renderers import scene_probe
from renderers.exr import ExrImage, ExrPart, read_exr, write_exr
from renderers.regions import ADAPTIVE_SAMPLING_MARGIN, PixelRect, border_fractions, plan_grid
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.scene_probe import SceneProbe, probe_scene
from renderers.worker import RenderRequest, RenderWorker
from tests.farm_tools import job_spec
from tests.scene_tools import prepare_scene

SAMPLES = 4


@dataclass(frozen=True)
class Rendered:
    path: Path
    assignment: RenderAssignment


@dataclass(frozen=True)
class Scene:
    path: Path
    info: SceneInfo
    probe: SceneProbe
    percentage: int

    def spec(self, **options: object) -> JobSpec:
        fields: dict[str, object] = {
            "percentage": self.percentage,
            "samples": SAMPLES,
            "previews": [frame_preview(p) for p in self.probe.previews],
        }
        fields.update(options)
        return job_spec(self.info, "0" * 64, frames="1", tiles=(1, 1), **fields)


def _scene(worker: RenderWorker, path: Path, percentage: int) -> Scene:
    info = inspect_scene(worker, path)
    # The scene is its own benchmark here: only the previews matter to these tests.
    probe = probe_scene(worker, path, [1], samples=SAMPLES, info=info, benchmark_scene=path)
    return Scene(info.path, info, probe, percentage)


def _render(
    worker: RenderWorker,
    scene: Scene,
    core: PixelRect,
    output: Path,
    *,
    margin: int = 0,
    denoise_data: bool = False,
    samples: int = SAMPLES,
) -> Rendered:
    """Render `core` (grown by `margin`) of frame 1 as a node renders an assignment."""
    width, height = scene.spec().effective_size()
    region = PixelRect(
        max(0, core.x0 - margin),
        max(0, core.y0 - margin),
        min(width, core.x1 + margin),
        min(height, core.y1 + margin),
    )
    whole = region == PixelRect(0, 0, width, height)
    worker.render(
        RenderRequest(
            scene=scene.path,
            frame=1,
            output=output,
            border=None if whole else border_fractions(region, width, height),
            samples=samples,
            percentage=scene.percentage,
            denoise_data=denoise_data,
        )
    )
    assignment = RenderAssignment(
        frame=1,
        width=width,
        height=height,
        render_region=Region(x0=region.x0, y0=region.y0, x1=region.x1, y1=region.y1),
        core_region=Region(x0=core.x0, y0=core.y0, x1=core.x1, y1=core.y1),
        whole_frame=whole,
        samples=samples,
        percentage=scene.percentage,
        resolution_x=scene.spec().scene.resolution_x,
        resolution_y=scene.spec().scene.resolution_y,
        denoise_data=denoise_data,
    )
    return Rendered(output, assignment)


def _grid(
    worker: RenderWorker, scene: Scene, folder: Path, columns: int, rows: int
) -> list[Rendered]:
    width, height = scene.spec().effective_size()
    plan = plan_grid(width, height, columns, rows)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        _render(
            worker,
            scene,
            tile.core,
            folder / f"tile-{tile.index}.exr",
            margin=ADAPTIVE_SAMPLING_MARGIN,
        )
        for tile in plan.tiles
    ]


@pytest.fixture(scope="module")
def demo(worker: RenderWorker, demo_scene: Path) -> Scene:
    # 25 % of 640x360: a 160x90 frame, 2x2 frame pixels per pixel of the 64x36 preview.
    return _scene(worker, demo_scene, percentage=25)


@pytest.fixture(scope="module")
def demo_tiles(
    worker: RenderWorker, demo: Scene, tmp_path_factory: pytest.TempPathFactory
) -> list[Rendered]:
    return _grid(worker, demo, tmp_path_factory.mktemp("demo-tiles"), 3, 3)


@pytest.fixture(scope="module")
def cube_scenes(
    worker: RenderWorker, bat_scenes: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Scene]:
    """A lit cube in the middle of an empty frame: a transparent film (black, alpha 0
    around the cube) and an opaque one (the world's flat grey around it)."""
    folder = tmp_path_factory.mktemp("cube")
    scenes = {}
    for name, transparent in (("black", True), ("grey", False)):
        path = prepare_scene(
            bat_scenes / "basic_file.blend",
            folder / f"cube-{name}.blend",
            add_camera=True,
            film_transparent=transparent,
            samples=SAMPLES,
        )
        # 10 % of 1920x1080: a 192x108 frame, 3x3 frame pixels per pixel of the preview.
        scenes[name] = _scene(worker, path, percentage=10)
    return scenes


def _flat_core(rendered: Rendered) -> bool:
    region, core = rendered.assignment.render_region, rendered.assignment.core_region
    rgb = read_exr(rendered.path).combined_rgba()[
        core.y0 - region.y0 : core.y1 - region.y0, core.x0 - region.x0 : core.x1 - region.x0, :3
    ]
    return bool((rgb == rgb[0, 0]).all())


def _rewrite(rendered: Rendered, target: Path, change: Callable[[ExrImage], None]) -> Path:
    """Write a copy of the tile with `change(image)` applied (in place) to its pixels."""
    image = read_exr(rendered.path)
    change(image)
    write_exr(target, image)
    return target


def _set_combined_rgb(image: ExrImage, value: float) -> None:
    layer = image.view_layers()[0]
    for component in "RGB":
        image.channel(f"{layer}.Combined.{component}")[...] = value
    image.channel(f"{layer}.Combined.A")[...] = 1.0


def _refusal(path: Path, rendered: Rendered, spec: JobSpec) -> str:
    problem = check_result(path, TaskKind.RENDER, rendered.assignment, spec)
    assert problem is not None, "the result was accepted"
    return problem


def _clean(path: Path, kind: TaskKind, assignment: RenderAssignment | None, spec: JobSpec) -> bool:
    """Neither refused nor doubted."""
    return inspect_result(path, kind, assignment, spec) == (None, None)


def _doubt(path: Path, rendered: Rendered, spec: JobSpec) -> str:
    """Why a tile is doubted against the preview; it must not be refused."""
    problem, doubt = inspect_result(path, TaskKind.RENDER, rendered.assignment, spec)
    assert problem is None, f"a doubt refused the tile: {problem}"
    assert doubt is not None, "the tile was not doubted"
    assert doubt.points, "a doubt says where the preview differs"
    return doubt.reason


# --- honest results are accepted -----------------------------------------------------------


def test_honest_demo_tiles_are_accepted(demo: Scene, demo_tiles: list[Rendered]) -> None:
    spec = demo.spec()
    assert spec.previews and spec.previews[0].frame == 1
    for tile in demo_tiles:
        assert _clean(tile.path, TaskKind.RENDER, tile.assignment, spec)


def test_honest_whole_frame_is_accepted_as_a_render_and_as_a_denoise_result(
    worker: RenderWorker, demo: Scene, tmp_path: Path
) -> None:
    width, height = demo.spec().effective_size()
    frame = _render(worker, demo, PixelRect(0, 0, width, height), tmp_path / "frame.exr")
    assert frame.assignment.whole_frame
    spec = demo.spec()
    assert _clean(frame.path, TaskKind.RENDER, frame.assignment, spec)
    assert _clean(frame.path, TaskKind.DENOISE, None, spec)


def test_honest_verify_windows_are_accepted(
    worker: RenderWorker, demo: Scene, tmp_path: Path
) -> None:
    spec = demo.spec()
    for index, window in enumerate(
        [PixelRect(0, 0, 8, 8), PixelRect(70, 40, 90, 52), PixelRect(150, 80, 160, 90)]
    ):
        rendered = _render(
            worker, demo, window, tmp_path / f"w{index}.exr", margin=ADAPTIVE_SAMPLING_MARGIN
        )
        assert _clean(rendered.path, TaskKind.VERIFY, rendered.assignment, spec)


def test_honest_denoising_data_tile_is_accepted(
    worker: RenderWorker, demo: Scene, tmp_path: Path
) -> None:
    rendered = _render(
        worker, demo, PixelRect(40, 30, 100, 60), tmp_path / "dd.exr", denoise_data=True
    )
    assert _clean(rendered.path, TaskKind.RENDER, rendered.assignment, demo.spec())


@pytest.mark.parametrize("film", ["black", "grey"])
def test_honest_black_and_flat_tiles_are_accepted(
    worker: RenderWorker, cube_scenes: dict[str, Scene], film: str, tmp_path: Path
) -> None:
    scene = cube_scenes[film]
    tiles = _grid(worker, scene, tmp_path, 6, 4)
    spec = scene.spec()
    flat = [tile for tile in tiles if _flat_core(tile)]
    # The left and right columns hold nothing but the film: the test must meet flat tiles.
    assert len(flat) >= 4
    if film == "black":
        assert all(not read_exr(t.path).combined_rgba()[..., :3].any() for t in flat)
    for tile in tiles:
        assert _clean(tile.path, TaskKind.RENDER, tile.assignment, spec)


# --- each refusal ----------------------------------------------------------------------------


def test_an_unreadable_file_is_refused(
    demo: Scene, demo_tiles: list[Rendered], tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.exr"
    garbage.write_bytes(b"\x76\x2f\x31\x01" + b"not really an EXR" * 10)
    problem = _refusal(garbage, demo_tiles[0], demo.spec())
    assert problem.startswith("it is not a readable EXR")
    assert str(garbage) not in problem  # the coordinator's paths stay private


def test_a_result_of_the_wrong_size_is_refused(demo: Scene, demo_tiles: list[Rendered]) -> None:
    first, other = demo_tiles[0], demo_tiles[4]
    problem = _refusal(other.path, first, demo.spec())
    width = first.assignment.render_region.x1 - first.assignment.render_region.x0
    height = first.assignment.render_region.y1 - first.assignment.render_region.y0
    assert f"the task asked for {width}x{height}" in problem
    # A denoise result must be the whole frame.
    whole = check_result(first.path, TaskKind.DENOISE, None, demo.spec())
    assert whole is not None and "the task asked for 160x90" in whole


def test_a_result_without_combined_is_refused(
    demo: Scene, demo_tiles: list[Rendered], tmp_path: Path
) -> None:
    tile = demo_tiles[0]
    image = read_exr(tile.path)
    combined = image.part("ViewLayer.Combined")
    renamed = ExrPart(
        "ViewLayer.Emit",
        {n.replace(".Combined.", ".Emit."): p for n, p in combined.channels.items()},
    )
    write_exr(tmp_path / "no-combined.exr", ExrImage(image.width, image.height, [renamed]))
    assert "no Combined pass" in _refusal(tmp_path / "no-combined.exr", tile, demo.spec())
    no_alpha = ExrPart(
        combined.name, {n: p for n, p in combined.channels.items() if not n.endswith(".A")}
    )
    write_exr(tmp_path / "rgb.exr", ExrImage(image.width, image.height, [no_alpha]))
    assert "lacks channel(s) A" in _refusal(tmp_path / "rgb.exr", tile, demo.spec())


def test_missing_denoising_data_passes_are_refused(demo: Scene, demo_tiles: list[Rendered]) -> None:
    tile = demo_tiles[0]
    asked = replace(tile, assignment=tile.assignment.model_copy(update={"denoise_data": True}))
    problem = _refusal(tile.path, asked, demo.spec())
    assert "lacks the denoising data pass(es)" in problem
    assert "'ViewLayer.Denoising Normal'" in problem


def test_unexpected_denoising_data_passes_are_refused(
    worker: RenderWorker, demo: Scene, tmp_path: Path
) -> None:
    rendered = _render(
        worker, demo, PixelRect(0, 0, 40, 30), tmp_path / "dd.exr", denoise_data=True
    )
    not_asked = replace(
        rendered, assignment=rendered.assignment.model_copy(update={"denoise_data": False})
    )
    problem = _refusal(rendered.path, not_asked, demo.spec())
    assert "that the task did not ask for" in problem


def test_honest_tile_of_a_scene_saved_with_denoising_data_is_accepted(
    worker: RenderWorker, demo: Scene, tmp_path: Path
) -> None:
    script = tmp_path / "store_passes.py"
    saved = tmp_path / "denoising-data.blend"
    script.write_text(
        "import sys, bpy\n"
        "bpy.ops.wm.open_mainfile(filepath=sys.argv[-2], load_ui=False, use_scripts=False)\n"
        "for layer in bpy.context.scene.view_layers:\n"
        "    layer.cycles.denoising_store_passes = True\n"
        "bpy.ops.wm.save_as_mainfile(filepath=sys.argv[-1])\n"
    )
    subprocess.run(
        [sys.executable, "-I", str(script), str(demo.path), str(saved)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    scene = replace(demo, path=saved)
    rendered = _render(worker, scene, PixelRect(0, 0, 40, 30), tmp_path / "tile.exr")
    assert _clean(rendered.path, TaskKind.RENDER, rendered.assignment, demo.spec())


def test_integer_channels_are_refused(
    demo: Scene, demo_tiles: list[Rendered], tmp_path: Path
) -> None:
    tile = demo_tiles[0]
    image = read_exr(tile.path)
    combined = image.part("ViewLayer.Combined")
    combined.channels["ViewLayer.Combined.A"] = np.ones((image.height, image.width), np.uint32)
    write_exr(tmp_path / "uint.exr", image)
    assert "holds uint32 values" in _refusal(tmp_path / "uint.exr", tile, demo.spec())


def _write_with_codec(source: Path, target: Path, codec: object) -> None:
    """The tile's channels in one part with `codec` (write_exr writes lossless only)."""
    image = read_exr(source)
    channels = {
        name: np.ascontiguousarray(pixels)
        for part in image.parts
        for name, pixels in part.channels.items()
    }
    header = {"compression": codec, "type": OpenEXR.scanlineimage}
    OpenEXR.File(header, channels).write(str(target))


@pytest.mark.parametrize("codec", ["DWAA", "DWAB", "B44", "B44A", "PXR24"])
def test_lossy_codecs_are_refused(
    demo: Scene, demo_tiles: list[Rendered], tmp_path: Path, codec: str
) -> None:
    tile = demo_tiles[0]
    target = tmp_path / f"{codec}.exr"
    _write_with_codec(tile.path, target, getattr(OpenEXR, f"{codec}_COMPRESSION"))
    assert read_exr(target).compression == codec.lower()
    problem = _refusal(target, tile, demo.spec())
    assert problem.startswith(f"it is compressed with {codec}, a lossy codec")
    assert "tiles must be lossless" in problem


@pytest.mark.parametrize("codec", ["NO", "RLE", "ZIPS", "ZIP", "PIZ"])
def test_lossless_codecs_are_accepted(
    demo: Scene, demo_tiles: list[Rendered], tmp_path: Path, codec: str
) -> None:
    tile = demo_tiles[0]
    target = tmp_path / f"{codec}.exr"
    _write_with_codec(tile.path, target, getattr(OpenEXR, f"{codec}_COMPRESSION"))
    assert read_exr(target).compression == ("none" if codec == "NO" else codec.lower())
    assert _clean(target, TaskKind.RENDER, tile.assignment, demo.spec())


def test_a_codec_the_farm_does_not_know_is_refused(
    demo: Scene, demo_tiles: list[Rendered], tmp_path: Path
) -> None:
    tile = demo_tiles[0]
    target = tmp_path / "zstd.exr"
    _write_with_codec(tile.path, target, OpenEXR.ZSTD_COMPRESSION)
    problem = _refusal(target, tile, demo.spec())
    assert problem.startswith("it is compressed with ZSTD, which the farm does not accept")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused(
    demo: Scene, demo_tiles: list[Rendered], tmp_path: Path, value: float
) -> None:
    tile = demo_tiles[4]

    def poison(image: ExrImage) -> None:
        image.channel("ViewLayer.Combined.G")[3, 5] = value

    target = _rewrite(tile, tmp_path / "bad.exr", poison)
    problem = _refusal(target, tile, demo.spec())
    assert problem == "channel 'ViewLayer.Combined.G' contains NaN or infinite values"


def test_a_black_tile_where_the_preview_is_lit_is_doubted_not_refused(
    worker: RenderWorker,
    demo: Scene,
    demo_tiles: list[Rendered],
    cube_scenes: dict[str, Scene],
    tmp_path: Path,
) -> None:
    # The opaque black tile a skipped render delivers (alpha 1), in the demo's lit frame.
    spec = demo.spec()
    for index, tile in enumerate(demo_tiles):
        target = _rewrite(tile, tmp_path / f"black-{index}.exr", lambda i: _set_combined_rgb(i, 0))
        problem = _doubt(target, tile, spec)
        assert problem.startswith("it is entirely black, but the scene's preview of frame 1")
    # Without a preview of that frame, the coordinator cannot tell: accepted.
    no_preview = demo.spec(previews=[])
    assert _clean(target, TaskKind.RENDER, demo_tiles[-1].assignment, no_preview)
    # The cube on a transparent film: black around it, lit where it is.
    cube = cube_scenes["black"]
    middle = _render(worker, cube, PixelRect(72, 40, 120, 68), tmp_path / "cube.exr")
    assert _clean(middle.path, TaskKind.RENDER, middle.assignment, cube.spec())
    black = _rewrite(middle, tmp_path / "cube-black.exr", lambda i: _set_combined_rgb(i, 0))
    assert _doubt(black, middle, cube.spec()).startswith("it is entirely black")


def test_a_flat_tile_where_the_preview_varies_is_doubted_not_refused(
    worker: RenderWorker, cube_scenes: dict[str, Scene], tmp_path: Path
) -> None:
    scene = cube_scenes["grey"]
    spec = scene.spec()
    # The middle of the frame shows the cube's three faces and the world around them.
    rendered = _render(worker, scene, PixelRect(64, 27, 128, 81), tmp_path / "middle.exr")
    assert _clean(rendered.path, TaskKind.RENDER, rendered.assignment, spec)
    grey = _rewrite(rendered, tmp_path / "grey.exr", lambda i: _set_combined_rgb(i, 0.5))
    problem = _doubt(grey, rendered, spec)
    assert problem.startswith("it is one flat colour (RGB 0.5, 0.5, 0.5), but the scene's")
    assert "preview of frame 1 varies there" in problem
    # The world's own grey, pasted over the cube, is doubted too.
    world = float(read_exr(rendered.path).combined_rgba()[0, 0, 0])
    pasted = _rewrite(rendered, tmp_path / "world.exr", lambda i: _set_combined_rgb(i, world))
    assert "one flat colour" in _doubt(pasted, rendered, spec)
    # And an all-black one as black.
    black = _rewrite(rendered, tmp_path / "black.exr", lambda i: _set_combined_rgb(i, 0.0))
    assert _doubt(black, rendered, spec).startswith("it is entirely black")


def test_a_flat_tile_is_not_doubted_when_an_honest_render_could_be_flat(
    worker: RenderWorker, demo: Scene, tmp_path: Path
) -> None:
    # A small window at one sample per pixel of a frame no larger than the preview: too
    # few samples to rule out an honest render that found no light, however lit the
    # preview is (16 preview pixels inside, each matched by 1/16 of its samples).
    small = replace(demo, percentage=10)
    window = _render(
        worker, small, PixelRect(20, 10, 28, 18), tmp_path / "w.exr", margin=4, samples=1
    )
    spec = small.spec(samples=1)
    assert _clean(window.path, TaskKind.VERIFY, window.assignment, spec)
    black = _rewrite(window, tmp_path / "black.exr", lambda i: _set_combined_rgb(i, 0.0))
    assert _clean(black, TaskKind.RENDER, window.assignment, spec)
    # A black window of the 25 % frame covering 12x12 preview pixels (after the erosion),
    # each matched by 2x2 frame pixels: doubted.
    window = _render(worker, demo, PixelRect(40, 20, 80, 60), tmp_path / "w25.exr", margin=4)
    black = _rewrite(window, tmp_path / "black25.exr", lambda i: _set_combined_rgb(i, 0.0))
    problem, doubt = inspect_result(black, TaskKind.RENDER, window.assignment, demo.spec())
    assert problem is None and doubt is not None
    assert doubt.reason.startswith("it is entirely black")
    # A verify window is judged against its tile, never against the preview.
    assert _clean(black, TaskKind.VERIFY, window.assignment, demo.spec())


def test_a_frame_denoised_in_blender_is_not_judged_flat(
    worker: RenderWorker, demo: Scene, tmp_path: Path
) -> None:
    width, height = demo.spec().effective_size()
    frame = _render(worker, demo, PixelRect(0, 0, width, height), tmp_path / "frame.exr")
    black = _rewrite(frame, tmp_path / "black.exr", lambda i: _set_combined_rgb(i, 0.0))
    assert _doubt(black, frame, demo.spec()).startswith("it is entirely black")
    denoised = frame.assignment.model_copy(update={"denoise_in_render": True})
    assert _clean(black, TaskKind.RENDER, denoised, demo.spec())


# --- the statistics ------------------------------------------------------------------------------


def test_the_false_refusal_bound() -> None:
    # Equal sample counts (ratio 1): each differing preview pixel is a 1-in-4 coincidence.
    assert false_refusal_bound(16, 16, 1.0) == pytest.approx(0.25**16)
    assert false_refusal_bound(0, 16, 1.0) == 1.0
    assert false_refusal_bound(5, 0, 1.0) == 1.0
    assert false_refusal_bound(5, 5, 0.0) == 1.0  # no tile samples: anything is possible
    # More differing pixels, or more tile samples, make an honest flat tile less likely.
    assert false_refusal_bound(20, 30, 1.0) < false_refusal_bound(15, 30, 1.0)
    assert false_refusal_bound(20, 30, 4.0) < false_refusal_bound(20, 30, 1.0)
    assert false_refusal_bound(30, 30, 0.25) > upload_checks.FALSE_REFUSAL_BOUND


def test_the_coordinator_knows_the_probe_sample_limit() -> None:
    assert upload_checks.PREVIEW_MAX_SAMPLES == scene_probe.PREVIEW_MAX_SAMPLES

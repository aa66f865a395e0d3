"""Tests of multilayer EXR I/O on a real Blender render and on synthetic images."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import OpenEXR
import pytest

from common.errors import ExrError
from renderers.exr import (
    LOSSLESS_COMPRESSIONS,
    ExrImage,
    ExrPart,
    crop,
    read_exr,
    same_pixels,
    set_io_threads,
    write_exr,
    write_single_part_exr,
)
from renderers.regions import PixelRect

RENDER_SCRIPT = textwrap.dedent(
    """
    import sys
    import bpy

    output = sys.argv[sys.argv.index("--") + 1]
    bpy.ops.wm.read_factory_settings(use_empty=False)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 4
    scene.cycles.use_denoising = False
    scene.render.resolution_x = 64
    scene.render.resolution_y = 48
    scene.render.resolution_percentage = 100
    scene.render.use_motion_blur = False
    settings = scene.render.image_settings
    settings.media_type = "MULTI_LAYER_IMAGE"
    settings.file_format = "OPEN_EXR_MULTILAYER"
    settings.color_depth = "32"
    settings.exr_codec = "ZIP"
    view_layer = scene.view_layers[0]
    view_layer.cycles.denoising_store_passes = True
    view_layer.use_pass_vector = True
    scene.render.filepath = output
    bpy.ops.render.render(write_still=True)
    """
)

BLENDER_CHECK_SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    import bpy

    single_part, denoised, multi_part = sys.argv[sys.argv.index("--") + 1 :]
    bpy.ops.cycles.denoise_animation(input_filepath=single_part, output_filepath=denoised)
    image = bpy.data.images.load(multi_part)
    image.reload()
    tree = bpy.data.node_groups.new("Check", "CompositorNodeTree")
    node = tree.nodes.new("CompositorNodeImage")
    node.image = image
    report = {"type": image.type, "outputs": [output.name for output in node.outputs]}
    print("TESSERA-CHECK " + json.dumps(report))
    """
)

EXPECTED_PARTS = [
    "ViewLayer.Combined",
    "ViewLayer.Vector",
    "ViewLayer.Denoising Normal",
    "ViewLayer.Denoising Albedo",
    "ViewLayer.Denoising Depth",
]


def run_blender_script(script: str, *args: str, cwd: Path) -> str:
    """Run a bpy script in a child process, wait for it and return its output."""
    script_path = cwd / "script.py"
    script_path.write_text(script)
    completed = subprocess.run(
        [sys.executable, str(script_path), "--", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=cwd,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    return completed.stdout


@pytest.fixture(scope="session")
def blender_exr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 64x48 multilayer EXR rendered by Cycles (denoising data + vector passes)."""
    folder = tmp_path_factory.mktemp("blender_render")
    output = folder / "frame.exr"
    run_blender_script(RENDER_SCRIPT, str(output), cwd=folder)
    assert output.is_file()
    return output


def synthetic_image(width: int = 40, height: int = 30, seed: int = 0) -> ExrImage:
    rng = np.random.default_rng(seed)

    def plane(dtype: type[np.generic]) -> np.ndarray:
        return rng.standard_normal((height, width)).astype(dtype)

    return ExrImage(
        width,
        height,
        [
            ExrPart(
                "ViewLayer.Combined",
                {f"ViewLayer.Combined.{c}": plane(np.float32) for c in "RGBA"},
                {"Camera": "Camera", "cycles.ViewLayer.samples": "16"},
            ),
            ExrPart(
                "ViewLayer.Denoising Albedo",
                {f"ViewLayer.Denoising Albedo.{c}": plane(np.float16) for c in "RGB"},
            ),
            ExrPart("ViewLayer.Depth", {"ViewLayer.Depth.Z": plane(np.float32)}),
            ExrPart(
                "ViewLayer.IndexOB",
                {"ViewLayer.IndexOB.X": rng.integers(0, 2**32, (height, width), dtype=np.uint32)},
            ),
        ],
    )


# --- real Blender output ---------------------------------------------------------------------


def test_reads_blender_parts_channels_and_attributes(blender_exr: Path) -> None:
    image = read_exr(blender_exr)
    assert (image.width, image.height) == (64, 48)
    assert [part.name for part in image.parts] == EXPECTED_PARTS
    assert image.view_layers() == ["ViewLayer"]
    combined = image.part("ViewLayer.Combined")
    assert sorted(combined.channels) == [f"ViewLayer.Combined.{c}" for c in "ABGR"]
    for pixels in combined.channels.values():
        assert pixels.shape == (48, 64)
        assert pixels.dtype == np.float32
        assert pixels.flags.c_contiguous
    assert image.channel("ViewLayer.Denoising Depth.Z").shape == (48, 64)
    assert combined.attributes["cycles.ViewLayer.samples"] == "4"
    assert combined.attributes["Camera"] == "Camera"
    for part in image.parts:
        assert "Date" not in part.attributes
        assert "RenderTime" not in part.attributes
        assert not any(key.endswith("_time") for key in part.attributes)


def test_combined_rgba_of_a_real_render(blender_exr: Path) -> None:
    image = read_exr(blender_exr)
    rgba = image.combined_rgba()
    assert rgba.shape == (48, 64, 4)
    assert rgba.dtype == np.float32
    assert np.array_equal(rgba[..., 0], image.channel("ViewLayer.Combined.R"))
    assert np.array_equal(rgba[..., 3], image.channel("ViewLayer.Combined.A"))
    assert rgba[..., :3].max() > 0.05  # the default cube is lit, not black
    assert np.array_equal(image.combined_rgba("ViewLayer"), rgba)


@pytest.mark.parametrize("compression", LOSSLESS_COMPRESSIONS)
def test_real_render_round_trips_exactly(
    blender_exr: Path, tmp_path: Path, compression: str
) -> None:
    original = read_exr(blender_exr)
    copy_path = tmp_path / "copy.exr"
    write_exr(copy_path, original, compression=compression)
    copy = read_exr(copy_path)
    assert [p.name for p in copy.parts] == [p.name for p in original.parts]
    assert copy.channel_names() == original.channel_names()
    assert same_pixels(original, copy)
    assert copy.parts[0].attributes == original.parts[0].attributes
    assert not list(tmp_path.glob("*.tmp"))


def test_single_part_file_reads_back_as_the_same_passes(blender_exr: Path, tmp_path: Path) -> None:
    original = read_exr(blender_exr)
    single_path = tmp_path / "single.exr"
    write_single_part_exr(single_path, original, extra_attributes={"tessera.tiles": "4"})
    raw = OpenEXR.File(str(single_path), header_only=True)
    assert len(raw.parts) == 1
    single = read_exr(single_path)
    assert sorted(p.name for p in single.parts) == sorted(EXPECTED_PARTS)
    assert same_pixels(original, single)
    assert single.parts[0].attributes["tessera.tiles"] == "4"
    assert single.parts[0].attributes["cycles.ViewLayer.samples"] == "4"


def test_blender_reads_what_we_write(blender_exr: Path, tmp_path: Path) -> None:
    # Cycles' file denoiser needs every pass in one part; it refuses Blender 5's own
    # multi-part output ("Could not find a render layer containing denoising data").
    original = read_exr(blender_exr)
    single_part, denoised_path, multi_part = (
        tmp_path / "noisy.exr",
        tmp_path / "denoised.exr",
        tmp_path / "multi.exr",
    )
    write_single_part_exr(single_part, original)
    write_exr(multi_part, original)
    output = run_blender_script(
        BLENDER_CHECK_SCRIPT, str(single_part), str(denoised_path), str(multi_part), cwd=tmp_path
    )
    denoised = read_exr(denoised_path)
    assert (denoised.width, denoised.height) == (64, 48)
    assert not np.array_equal(
        denoised.channel("ViewLayer.Combined.R"), original.channel("ViewLayer.Combined.R")
    )
    line = next(line for line in output.splitlines() if line.startswith("TESSERA-CHECK "))
    report = json.loads(line.removeprefix("TESSERA-CHECK "))
    assert report["type"] == "MULTILAYER"
    passes = [name.split(".", 1)[1] for name in EXPECTED_PARTS]
    assert sorted(report["outputs"]) == sorted(["Alpha", *passes])


def test_crop_of_a_real_render(blender_exr: Path) -> None:
    image = read_exr(blender_exr)
    rect = PixelRect(5, 7, 30, 40)
    cropped = crop(image, rect)
    assert (cropped.width, cropped.height) == (25, 33)
    for name in image.channel_names():
        expected = image.channel(name)[7:40, 5:30]
        assert np.array_equal(cropped.channel(name), expected)
        assert cropped.channel(name).flags.c_contiguous


# --- synthetic images ------------------------------------------------------------------------


def test_synthetic_round_trip_keeps_types(tmp_path: Path) -> None:
    image = synthetic_image()
    path = tmp_path / "synthetic.exr"
    write_exr(path, image)
    back = read_exr(path)
    assert same_pixels(image, back)
    assert back.channel("ViewLayer.Denoising Albedo.R").dtype == np.float16
    assert back.channel("ViewLayer.IndexOB.X").dtype == np.uint32
    # OpenEXR swaps the arrays of a dict it is given for Channel objects; ours are intact.
    assert all(isinstance(v, np.ndarray) for p in image.parts for v in p.channels.values())
    assert back.part("ViewLayer.Combined").attributes == {
        "Camera": "Camera",
        "cycles.ViewLayer.samples": "16",
    }


def test_non_contiguous_channels_are_written_correctly(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    rgba = rng.random((30, 50, 4), dtype=np.float32)
    views = {f"ViewLayer.Combined.{c}": rgba[..., i] for i, c in enumerate("RGBA")}
    assert not views["ViewLayer.Combined.R"].flags.c_contiguous
    image = ExrImage(50, 30, [ExrPart("ViewLayer.Combined", views)])
    path = tmp_path / "views.exr"
    write_exr(path, image)
    back = read_exr(path)
    assert np.array_equal(back.combined_rgba(), rgba)
    write_single_part_exr(path, image)
    assert np.array_equal(read_exr(path).combined_rgba(), rgba)


def test_plain_rgb_exr_gives_combined_with_opaque_alpha(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rgb = {c: rng.random((8, 6), dtype=np.float32) for c in "RGB"}
    path = tmp_path / "plain.exr"
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    # OpenEXR replaces the dict's arrays with Channel objects in place: pass a copy.
    OpenEXR.File(header, dict(rgb)).write(str(path))
    image = read_exr(path)
    assert image.view_layers() == []
    rgba = image.combined_rgba()
    assert np.array_equal(rgba[..., 1], rgb["G"])
    assert (rgba[..., 3] == 1.0).all()


@pytest.mark.parametrize("codec", ["dwaa", "DWAB", "b44", "b44a", "pxr24"])
def test_lossy_codecs_are_refused(tmp_path: Path, codec: str) -> None:
    with pytest.raises(ExrError, match="lossy") as caught:
        write_exr(tmp_path / "lossy.exr", synthetic_image(), compression=codec)
    assert "zip" in caught.value.hint
    with pytest.raises(ExrError, match="lossy"):
        write_single_part_exr(tmp_path / "lossy.exr", synthetic_image(), compression=codec)
    assert not list(tmp_path.iterdir())


def test_unknown_codec_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExrError, match="Unknown"):
        write_exr(tmp_path / "x.exr", synthetic_image(), compression="jpeg")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ExrError, match="does not exist") as caught:
        read_exr(tmp_path / "nope.exr")
    assert caught.value.hint


def test_text_file_is_not_an_exr(tmp_path: Path) -> None:
    path = tmp_path / "notes.exr"
    path.write_text("this is not an image\n")
    with pytest.raises(ExrError, match="not an EXR") as caught:
        read_exr(path)
    assert caught.value.hint


def test_directory_is_not_an_exr(tmp_path: Path) -> None:
    with pytest.raises(ExrError, match="not a file"):
        read_exr(tmp_path)


@pytest.mark.parametrize("keep", [0.3, 0.9, -1])
def test_truncated_file_is_an_error_not_fewer_passes(
    blender_exr: Path, tmp_path: Path, keep: float
) -> None:
    # OpenEXR silently drops a part it cannot decode; even one missing byte loses a pass.
    data = blender_exr.read_bytes()
    cut = len(data) - 1 if keep == -1 else int(len(data) * keep)
    path = tmp_path / "truncated.exr"
    path.write_bytes(data[:cut])
    with pytest.raises(ExrError, match=r"truncated or corrupt|could not be read"):
        read_exr(path)


def test_write_into_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ExrError, match="Cannot write"):
        write_exr(tmp_path / "missing" / "x.exr", synthetic_image())


def test_write_replaces_an_existing_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "frame.exr"
    write_exr(path, synthetic_image(seed=1))
    write_exr(path, synthetic_image(seed=2))
    assert same_pixels(read_exr(path), synthetic_image(seed=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame.exr"]


def test_write_refuses_bad_channels(tmp_path: Path) -> None:
    wrong_size = ExrImage(4, 4, [ExrPart("L.P", {"L.P.R": np.zeros((3, 4), np.float32)})])
    with pytest.raises(ExrError, match=re.escape("L.P.R")):
        write_exr(tmp_path / "a.exr", wrong_size)
    float64 = ExrImage(4, 4, [ExrPart("L.P", {"L.P.R": np.zeros((4, 4), np.float64)})])
    with pytest.raises(ExrError, match="float64"):
        write_exr(tmp_path / "a.exr", float64)
    twice = ExrImage(
        4,
        4,
        [
            ExrPart("L.P", {"L.P.R": np.zeros((4, 4), np.float32)}),
            ExrPart("L.P", {"L.P.G": np.zeros((4, 4), np.float32)}),
        ],
    )
    with pytest.raises(ExrError, match="several parts"):
        write_exr(tmp_path / "a.exr", twice)
    with pytest.raises(ExrError, match="no channels"):
        write_exr(tmp_path / "a.exr", ExrImage(4, 4, []))
    unnamed = ExrImage(
        4,
        4,
        [
            ExrPart("", {"R": np.zeros((4, 4), np.float32)}),
            ExrPart("L.P", {"L.P.G": np.zeros((4, 4), np.float32)}),
        ],
    )
    with pytest.raises(ExrError, match="name for every part"):
        write_exr(tmp_path / "a.exr", unnamed)
    assert not list(tmp_path.iterdir())


def test_part_and_channel_lookup_errors_name_what_exists() -> None:
    image = synthetic_image()
    with pytest.raises(ExrError, match=re.escape("ViewLayer.Combined")) as caught:
        image.part("ViewLayer.Normal")
    assert "ViewLayer.Normal" in caught.value.message
    with pytest.raises(ExrError, match=re.escape("ViewLayer.Normal.X")):
        image.channel("ViewLayer.Normal.X")
    with pytest.raises(ExrError, match="Other"):
        image.combined_rgba("Other")


def test_view_layers_allow_dots_in_layer_names() -> None:
    plane = np.zeros((2, 2), np.float32)
    image = ExrImage(
        2,
        2,
        [
            ExrPart("Fore.ground.Combined", {"Fore.ground.Combined.R": plane}),
            ExrPart("Back.Combined", {"Back.Combined.R": plane}),
            ExrPart("Fore.ground.Depth", {"Fore.ground.Depth.Z": plane}),
        ],
    )
    assert image.view_layers() == ["Fore.ground", "Back"]


def test_same_pixels() -> None:
    a = synthetic_image(seed=4)
    b = synthetic_image(seed=4)
    assert same_pixels(a, b)
    b.part("ViewLayer.Depth").channels["ViewLayer.Depth.Z"][3, 3] += 1.0
    assert not same_pixels(a, b)
    assert same_pixels(a, b, channels=["ViewLayer.Combined.R", "ViewLayer.Combined.G"])
    assert not same_pixels(a, b, channels=["ViewLayer.Missing.R"])
    a.part("ViewLayer.Depth").channels["ViewLayer.Depth.Z"][0, 0] = np.nan
    c = synthetic_image(seed=4)
    c.part("ViewLayer.Depth").channels["ViewLayer.Depth.Z"][0, 0] = np.nan
    assert same_pixels(a, c)
    assert not same_pixels(a, crop(a, PixelRect(0, 0, 10, 10)))
    half = synthetic_image(seed=4)
    half.parts[0].channels = {k: v.astype(np.float16) for k, v in half.parts[0].channels.items()}
    assert not same_pixels(synthetic_image(seed=4), half)


def test_crop_outside_the_image_is_refused() -> None:
    with pytest.raises(ExrError, match="outside"):
        crop(synthetic_image(), PixelRect(0, 0, 41, 10))


def test_io_threads_are_set_process_wide(tmp_path: Path) -> None:
    # OpenEXR's Python module starts single-threaded and ignores per-file num_threads.
    try:
        assert set_io_threads(0) == 0
        assert OpenEXR.global_thread_count() == 0
        image = synthetic_image()
        write_exr(tmp_path / "serial.exr", image)
        assert OpenEXR.global_thread_count() == 0  # an explicit choice is kept
        assert same_pixels(read_exr(tmp_path / "serial.exr"), image)
        with pytest.raises(ExrError):
            set_io_threads(-1)
    finally:
        default = set_io_threads()
    assert default >= 1
    assert OpenEXR.global_thread_count() == default

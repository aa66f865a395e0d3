"""Scene inspection on real files: what it reports, and a clear error for each bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import (
    CorruptSceneError,
    NoCameraError,
    NotABlendFileError,
    SceneNotFoundError,
    UnsupportedEngineError,
)
from renderers.exr import read_exr
from renderers.scene_info import check_scene_file, inspect_scene
from renderers.worker import RenderRequest, RenderWorker
from tests.scene_tools import prepare_scene


def test_demo_scene_is_described(worker: RenderWorker, demo_scene: Path) -> None:
    info = inspect_scene(worker, demo_scene)
    assert info.engine == "CYCLES"
    assert (info.frame_start, info.frame_end, info.frame_count) == (1, 24, 24)
    assert (info.width, info.height) == (640, 360)
    assert info.adaptive_sampling and info.denoising
    assert info.camera is not None
    assert [layer.name for layer in info.view_layers] == ["ViewLayer"]
    assert info.python_warnings == ()
    assert info.blender_version == "5.0.1"


def test_missing_path(worker: RenderWorker, tmp_path: Path) -> None:
    with pytest.raises(SceneNotFoundError, match="not found"):
        inspect_scene(worker, tmp_path / "nope.blend")


def test_folder_instead_of_a_file(worker: RenderWorker, tmp_path: Path) -> None:
    with pytest.raises(NotABlendFileError, match="folder"):
        inspect_scene(worker, tmp_path)


def test_text_file_named_blend(worker: RenderWorker, tmp_path: Path) -> None:
    fake = tmp_path / "notes.blend"
    fake.write_text("these are not the pixels you are looking for")
    with pytest.raises(NotABlendFileError, match="not a Blender file"):
        inspect_scene(worker, fake)


def test_corrupt_file_with_only_the_magic(worker: RenderWorker, bat_scenes: Path) -> None:
    with pytest.raises(CorruptSceneError) as caught:
        inspect_scene(worker, bat_scenes / "corrupt_only_magic.blend")
    assert caught.value.hint, "a corrupt file comes with advice"


def test_truncated_file(worker: RenderWorker, demo_scene: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.blend"
    truncated.write_bytes(demo_scene.read_bytes()[:5000])
    with pytest.raises(CorruptSceneError):
        inspect_scene(worker, truncated)


def test_unreadable_file(demo_scene: Path, tmp_path: Path) -> None:
    """Root reads everything, so as root the check runs without the capabilities that
    bypass file permissions (setpriv, from util-linux)."""
    locked = tmp_path / "locked.blend"
    shutil.copy(demo_scene, locked)
    locked.chmod(0)
    code = (
        "from pathlib import Path; import sys; from renderers.scene_info import "
        "check_scene_file; check_scene_file(Path(sys.argv[1]))"
    )
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "util-linux's setpriv is needed to drop root's file capabilities"
        prefix = [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]
    completed = subprocess.run(
        [*prefix, sys.executable, "-c", code, str(locked)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=60,
        check=False,
    )
    assert completed.returncode != 0
    assert "SceneUnreadableError" in completed.stderr
    assert "permission denied" in completed.stderr


def test_scene_without_a_camera(worker: RenderWorker, bat_scenes: Path, tmp_path: Path) -> None:
    scene = prepare_scene(
        bat_scenes / "basic_file.blend",
        tmp_path / "nocam.blend",
        remove_camera=True,
        engine="CYCLES",
    )
    with pytest.raises(NoCameraError, match="no active camera") as caught:
        inspect_scene(worker, scene)
    assert "Ctrl+Numpad0" in caught.value.hint


def test_eevee_scene_is_refused(worker: RenderWorker, demo_scene: Path, tmp_path: Path) -> None:
    scene = prepare_scene(demo_scene, tmp_path / "eevee.blend", engine="BLENDER_EEVEE")
    with pytest.raises(UnsupportedEngineError, match="EEVEE"):
        inspect_scene(worker, scene)


def test_unknown_engine_is_refused(worker: RenderWorker, demo_scene: Path, tmp_path: Path) -> None:
    scene = prepare_scene(demo_scene, tmp_path / "addon.blend", engine="ADDON_ENGINE")
    with pytest.raises(UnsupportedEngineError, match="Cycles only"):
        inspect_scene(worker, scene)


def test_scene_python_never_runs_and_is_reported(
    worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    canary = tmp_path / "scene-python-ran.txt"
    scene = prepare_scene(
        demo_scene, tmp_path / "scripted.blend", python_driver=True, registered_text=str(canary)
    )
    info = inspect_scene(worker, scene)
    warnings = " ".join(info.warnings)
    assert "Text block 'autorun.py'" in warnings
    assert "Python expression" in warnings
    worker.render(
        RenderRequest(scene=scene, frame=2, output=tmp_path / "out.exr", samples=1, percentage=5)
    )
    assert not canary.exists(), "a registered text block ran inside the worker"


def test_video_output_scene_is_inspected_as_a_movie_and_renders_exr_tiles(
    worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    scene = prepare_scene(demo_scene, tmp_path / "video.blend", output_format="FFMPEG")
    info = inspect_scene(worker, scene)
    assert info.output_format == "FFMPEG"
    # The farm finishes a movie scene as lossless frames and encodes its movie; a codec
    # it could not encode would be a warning (renderers.scene_info.movie_problem).
    assert info.output is not None and info.output.is_movie
    result = worker.render(
        RenderRequest(scene=scene, frame=1, output=tmp_path / "v.exr", samples=2, percentage=5)
    )
    assert read_exr(result.output).width == 32


def test_linked_library_is_listed(worker: RenderWorker, bat_scenes: Path) -> None:
    info = inspect_scene(worker, bat_scenes / "linked_cube.blend", require_renderable=False)
    assert any(lib.endswith("basic_file.blend") for lib in info.libraries)


def test_zstd_compressed_file_passes_the_magic_check(bat_scenes: Path) -> None:
    assert check_scene_file(bat_scenes / "basic_file_compressed_zstd.blend").is_file()

"""A requester's scene cannot read the provider's files (issue 17, finding 3).

Every attack in tests/confinement_scenes.py is first shown to be live (rendered
unconfined, the provider's green picture fills the frame), then refused when confined
to its bundle: by the trace before Blender opens the file (renderers.scene_paths), by
the check inside Blender after loading (worker_main, with the trace switched off), and,
where bubblewrap works, by the sandbox alone (with both checks switched off, Blender
cannot see the file at all and renders the missing-texture pink).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.errors import ExternalPathError
from renderers import sandbox as sandbox_module
from renderers import worker as worker_module
from renderers.builds import BlenderBuild
from renderers.exr import read_exr
from renderers.scene_paths import bundle_root, check_scene_paths, outside
from renderers.worker import RenderLimits, RenderRequest, RenderWorker, find_bwrap
from tests.confinement_scenes import ATTACKS, BLENDER_ATTACKS, build_scenes

BAT_SCENES = Path(__file__).resolve().parents[2] / "shared" / "scenes" / "bat"
#: In CI (`CI=true`) a missing bubblewrap fails these tests instead of skipping them:
#: `make test` installs it, so a skip there would hide a broken install step.
needs_bwrap = pytest.mark.skipif(
    find_bwrap() is None and not os.environ.get("CI"), reason="bubblewrap is not usable here"
)
SANDBOXES = ("off", pytest.param("bwrap", marks=needs_bwrap))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_scenes(tmp_path_factory.mktemp("confinement"))


def _render(worker: RenderWorker, scene: Path, out: Path, confine_to: Path | None) -> Path:
    request = RenderRequest(scene=scene, frame=1, output=out, samples=1, confine_to=confine_to)
    return worker.render(request, timeout=120).output


def _colour(path: Path) -> tuple[float, float, float]:
    part = read_exr(path).parts[0]
    channel = {name.rsplit(".", 1)[-1]: pixels for name, pixels in part.channels.items()}
    return tuple(float(np.mean(channel[c])) for c in "RGB")  # type: ignore[return-value]


def _is_green(rgb: tuple[float, float, float]) -> bool:
    return rgb[1] > 0.9 and rgb[0] < 0.1 and rgb[2] < 0.1


# --- the trace, without Blender --------------------------------------------------------


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_trace_refuses_every_path_out_of_the_bundle(bundle: Path, attack: str) -> None:
    with pytest.raises(ExternalPathError, match="outside the scene's bundle") as refused:
        check_scene_paths(bundle / "shots" / f"{attack}.blend", bundle)
    name = "lib.blend" if attack == "library" else "Backdrop"
    assert f"'{name}'" in str(refused.value), "the message names the datablock"
    assert "hint:" in str(refused.value)


def test_a_block_the_tracer_cannot_follow_is_left_to_blender(
    bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """BAT 1.23 fails on Blender 5 geometry-nodes modifiers; the trace goes on without
    that object (and says so) rather than refuse every geometry-nodes scene."""
    caplog.set_level(logging.WARNING, logger="renderers.scene_paths")
    check_scene_paths(bundle / "shots" / "geometry_import.blend", bundle)
    assert any("OBImporter" in r.getMessage() for r in caplog.records)


def test_the_trace_accepts_files_inside_and_missing_files(bundle: Path) -> None:
    check_scene_paths(bundle / "shots" / "inside.blend", bundle)
    check_scene_paths(bundle / "shots" / "missing.blend", bundle)
    with pytest.raises(ExternalPathError, match="not inside its bundle"):
        check_scene_paths(bundle / "shots" / "inside.blend", bundle / "textures")


def test_the_trace_on_the_asset_tracer_scenes() -> None:
    root = BAT_SCENES
    for ok in ("basic_file", "linked_cube", "doubly_linked", "missing_textures"):
        check_scene_paths(root / f"{ok}.blend", root)
    for bad, what in (
        ("absolute_path", "image 'buildings_roof_04-color.png'"),
        ("linked_cube_compressed", "library 'Lib'"),  # zstd, library by absolute path
        ("image_sequencer", "//../../../../cloud/pillar/testfiles/video-tiny.mkv"),
    ):
        with pytest.raises(ExternalPathError, match=what):
            check_scene_paths(root / f"{bad}.blend", root)
    with pytest.raises(ExternalPathError, match="library 'Lib'"):  # //../ from subdir
        check_scene_paths(root / "subdir" / "doubly_linked_up.blend", root / "subdir")


def test_outside_follows_symlinks_and_dotdot(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "link").symlink_to(tmp_path)
    assert not outside(tmp_path / "b" / "x.png", tmp_path / "b")
    assert outside(tmp_path / "b" / ".." / "x.png", tmp_path / "b")
    assert outside(tmp_path / "b" / "link" / "x.png", tmp_path / "b")
    assert outside(tmp_path / "bb" / "x.png", tmp_path / "b"), "a prefix is not a parent"


def test_bundle_root_from_the_leases_scene_path(tmp_path: Path) -> None:
    assert bundle_root(tmp_path / "a.blend", "a.blend") == tmp_path
    assert bundle_root(tmp_path / "shots" / "x" / "a.blend", "shots/x/a.blend") == tmp_path


# --- the worker: both defences, with and without the sandbox ---------------------------------


@pytest.fixture(params=SANDBOXES)
def confined_worker(
    request: pytest.FixtureRequest, bpy_build: BlenderBuild
) -> Iterator[RenderWorker]:
    with RenderWorker(bpy_build, limits=RenderLimits(sandbox=request.param)) as own:
        yield own


def test_confined_render_refuses_a_scene_reading_the_providers_files(
    confined_worker: RenderWorker, bundle: Path, tmp_path: Path
) -> None:
    for attack in ATTACKS:
        scene = bundle / "shots" / f"{attack}.blend"
        live = _render(confined_worker, scene, tmp_path / f"{attack}-live.exr", confine_to=None)
        assert _is_green(_colour(live)), f"the {attack} attack is not live: it proves nothing"
        out = tmp_path / f"{attack}.exr"
        starts = confined_worker.starts
        with pytest.raises(ExternalPathError, match="outside the scene's bundle"):
            _render(confined_worker, scene, out, confine_to=bundle)
        assert not out.exists()
        assert confined_worker.starts == starts, "refused before Blender opens the file"


def test_blender_refuses_it_too_when_the_trace_misses_it(
    confined_worker: RenderWorker,
    bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second line of defence: worker_main checks bpy.data after loading."""
    monkeypatch.setattr(worker_module, "check_scene_paths", lambda scene, root: None)
    for attack in ATTACKS + BLENDER_ATTACKS:
        scene = bundle / "shots" / f"{attack}.blend"
        with pytest.raises(ExternalPathError, match="outside the scene's bundle") as refused:
            _render(confined_worker, scene, tmp_path / "f.exr", confine_to=bundle)
        message = str(refused.value)
        assert any(f"'{name}'" in message for name in ("lib.blend", "Backdrop", "ImportSecret"))
        with pytest.raises(ExternalPathError):
            confined_worker.inspect(scene, confine_to=bundle)
        assert confined_worker.is_alive(), "a refused scene does not cost the warm process"


def test_the_geometry_import_attack_is_live(
    bpy_build: BlenderBuild, bundle: Path, tmp_path: Path
) -> None:
    with RenderWorker(bpy_build, limits=RenderLimits(sandbox="off")) as own:
        scene = bundle / "shots" / "geometry_import.blend"
        assert _is_green(_colour(_render(own, scene, tmp_path / "live.exr", confine_to=None)))


def test_confined_render_of_a_clean_bundle_works(
    confined_worker: RenderWorker, bundle: Path, tmp_path: Path
) -> None:
    inside = _render(
        confined_worker, bundle / "shots" / "inside.blend", tmp_path / "in.exr", bundle
    )
    r, g, b = _colour(inside)
    assert b > 0.9 and r < 0.1 and g < 0.1, "the bundle's own texture renders"
    missing = _render(
        confined_worker, bundle / "shots" / "missing.blend", tmp_path / "m.exr", bundle
    )
    r, g, b = _colour(missing)
    assert r > 0.9 and b > 0.9 and g < 0.1, "a texture the bundle lacks renders pink"
    info = confined_worker.inspect(bundle / "shots" / "inside.blend", confine_to=bundle)
    assert info["camera"]


@needs_bwrap
def test_the_sandbox_alone_shows_blender_nothing_outside_the_bundle(
    bpy_build: BlenderBuild, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both path checks off: the provider's picture is simply not there to read."""

    def view_only(
        self: RenderWorker, scene: Path, root: Path | None, message: dict[str, object]
    ) -> object:
        message["confine_to"] = None  # no check in Blender either
        return None if root is None else (root.absolute(),)

    monkeypatch.setattr(RenderWorker, "_confine", view_only)
    with RenderWorker(bpy_build, limits=RenderLimits(sandbox="bwrap")) as own:
        for attack in ("absolute", "relative", "sequence", "symlink"):
            scene = bundle / "shots" / f"{attack}.blend"
            out = _render(own, scene, tmp_path / f"{attack}.exr", confine_to=bundle)
            r, g, b = _colour(out)
            assert g < 0.1 and r > 0.9 and b > 0.9, f"{attack}: pink, not the secret"
        for attack in ("library", "geometry_import"):
            scene = bundle / "shots" / f"{attack}.blend"
            out = _render(own, scene, tmp_path / f"{attack}.exr", confine_to=bundle)
            assert not _is_green(_colour(out)), f"{attack}: the provider's file is not there"
        assert own.sandboxed
        pid = own.pid
        assert pid is not None
        root = Path(f"/proc/{pid}/root")
        assert not (root / "home").exists() or not any((root / "home").iterdir())
        assert not (root / "root" / ".bashrc").exists()
        assert (root / str(bundle).lstrip("/") / "shots" / "inside.blend").exists()
        assert not (root / str(bundle.parent / "provider").lstrip("/")).exists()
        assert not (root / "tmp").exists() or str(bundle).startswith("/tmp")


def test_confined_sandbox_command_binds_no_root(tmp_path: Path) -> None:
    bundle_folder = tmp_path / "bundle"
    bundle_folder.mkdir()
    argv = sandbox_module.sandbox_command(
        "/usr/bin/bwrap",
        tmp_path / "scratch",
        ["/usr/bin/python3", "-I"],
        readable=[bundle_folder],
        install=[Path("/usr")],
    )
    pairs = [tuple(argv[i + 1 : i + 3]) for i, a in enumerate(argv) if a.endswith("bind-try")]
    assert ("/", "/") not in pairs and "/" not in argv[argv.index("--new-session") + 1 :][:3]
    assert (str(bundle_folder), str(bundle_folder)) in pairs
    assert not any(dest in {"/home", "/root", "/tmp", "/var", "/opt"} for _, dest in pairs)
    assert "--unshare-all" in argv and "--die-with-parent" in argv
    writable = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--bind"]
    assert writable == [str((tmp_path / "scratch").resolve())]


def test_without_a_sandbox_the_warning_says_what_is_unprotected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(sandbox_module, "_NO_SANDBOX_WARNED", threading.Event())
    sandbox_module.find_bwrap.cache_clear()
    caplog.set_level(logging.WARNING, logger="renderers.sandbox")
    try:
        assert sandbox_module.resolve_sandbox("auto") is None
    finally:
        sandbox_module.find_bwrap.cache_clear()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "read every file this user can" in warning
    assert "network" in warning


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_a_node_refuses_every_attack_from_its_bundle(
    bpy_build: BlenderBuild, bundle: Path, tmp_path: Path, sandbox: str
) -> None:
    """The node's own runner (farm_node), as it renders a lease: the scene's paths are
    confined to the bundle it was extracted to, with bubblewrap and without it."""
    from farm_node.failures import failure_kind
    from farm_node.runner import TaskRunner
    from tests.test_node_runner import make_lease

    with TaskRunner(
        bpy_build, tmp_path / "scratch", limits=RenderLimits(sandbox=sandbox)
    ) as runner:
        for attack in ATTACKS:
            lease = make_lease(lease_id=attack).model_copy(
                update={"scene_path": f"shots/{attack}.blend"}
            )
            scene = bundle / "shots" / f"{attack}.blend"
            with pytest.raises(ExternalPathError) as refused:
                runner.render(lease, scene, tmp_path / f"{attack}.exr")
            assert failure_kind(refused.value).value == "unsafe_bundle"
            assert not (tmp_path / f"{attack}.exr").exists()

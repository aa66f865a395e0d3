"""Packing scenes into bundles with blender-asset-tracer, on the real BAT test scenes.

The scenes in ../shared/scenes/bat are only read (a test checks that packing wrote
nothing there). Packed bundles are extracted to tmp_path and checked twice: BAT traces
the extracted copy (every dependency that existed must resolve inside it), and Blender
opens it in a subprocess (libraries load, linked objects are there, images and strips
point at files that exist).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from blender_asset_tracer import blendfile, trace
from blender_asset_tracer.trace import file_sequence

from app.packing import OUTSIDE_PROJECT, PackProgress, PackResult, pack_scene
from common.errors import BundleError, CorruptSceneError, NotABlendFileError, SceneNotFoundError
from protocol.client import sha256_file

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

#: Opens each .blend given and prints what Blender resolved, as JSON lines.
BLENDER_VIEW = r"""
import json, os, sys
import bpy

for path in json.loads(sys.argv[-1]):
    bpy.ops.wm.open_mainfile(filepath=path, load_ui=False, use_scripts=False)
    def exists(p, lib=None):
        return os.path.exists(bpy.path.abspath(p, library=lib))
    strips = []
    for scene in bpy.data.scenes:
        editor = scene.sequence_editor
        if editor is None:
            continue
        everything = editor.strips_all if hasattr(editor, "strips_all") else editor.sequences_all
        for strip in everything:
            if strip.type == "IMAGE":
                folder = bpy.path.abspath(strip.directory)
                strips.append([strip.directory, all(
                    os.path.exists(os.path.join(folder, e.filename)) for e in strip.elements
                )])
    print("VIEW " + json.dumps({
        "path": path,
        "libraries": [[lib.filepath, exists(lib.filepath)] for lib in bpy.data.libraries],
        "objects": sorted(
            [o.name, o.library.filepath if o.library else None] for o in bpy.data.objects
        ),
        "images": [
            [im.filepath, exists(im.filepath, im.library)]
            for im in bpy.data.images if im.source == "FILE" and im.filepath
        ],
        "strips": strips,
    }), flush=True)
"""

#: Saves a zstd-compressed scene whose library and image are named by ABSOLUTE paths in a
#: sibling folder: a/scene.blend -> /.../b/lib.blend, /.../b/tex.png.
MAKE_ABSOLUTE_SCENE = r"""
import sys
import bpy

root = sys.argv[-1]
bpy.ops.wm.read_factory_settings(use_empty=True)
bpy.data.scenes[0].collection.objects.link(bpy.data.objects.new("LibEmpty", None))
bpy.ops.wm.save_as_mainfile(filepath=f"{root}/b/lib.blend")
bpy.ops.wm.read_factory_settings(use_empty=True)
image = bpy.data.images.new("tex", 4, 4)
image.filepath_raw = f"{root}/b/tex.png"
image.file_format = "PNG"
image.save()
image.use_fake_user = True
with bpy.data.libraries.load(f"{root}/b/lib.blend", link=True, relative=False) as (_, into):
    into.objects = ["LibEmpty"]
for obj in into.objects:
    bpy.data.scenes[0].collection.objects.link(obj)
bpy.ops.wm.save_as_mainfile(filepath=f"{root}/a/scene.blend", relative_remap=False, compress=True)
"""


def blender_view(*blends: Path) -> dict[str, Any]:
    """What Blender sees in each .blend (one Blender process for all of them)."""
    completed = subprocess.run(
        [sys.executable, "-I", "-c", BLENDER_VIEW, json.dumps([str(b) for b in blends])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    views = [
        json.loads(line[5:]) for line in completed.stdout.splitlines() if line.startswith("VIEW ")
    ]
    return {view["path"]: view for view in views}


def extract(result: PackResult, folder: Path) -> Path:
    with zipfile.ZipFile(result.zip_path) as archive:
        archive.extractall(folder)
    return folder


def unresolved_dependencies(blend: Path) -> list[Path]:
    """Dependencies of `blend` (libraries' included) that do not exist, per BAT."""
    try:
        missing = []
        for usage in trace.deps(blend):
            if usage.is_sequence:
                try:
                    if not any(p.exists() for p in file_sequence.expand_sequence(usage.abspath)):
                        missing.append(usage.abspath)
                except file_sequence.DoesNotExist:
                    missing.append(usage.abspath)
            elif not usage.abspath.exists():
                missing.append(usage.abspath)
        return missing
    finally:
        blendfile.close_all_cached()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def shared_scenes_untouched(bat_scenes: Path) -> Iterator[Path]:
    before = snapshot(bat_scenes)
    yield bat_scenes
    assert snapshot(bat_scenes) == before, "packing wrote into the shared scenes folder"


@pytest.fixture()
def bat(shared_scenes_untouched: Path) -> Path:
    return shared_scenes_untouched


def test_a_scene_without_dependencies(bat: Path, tmp_path: Path) -> None:
    result = pack_scene(bat / "basic_file.blend", tmp_path / "out")
    assert result.files == ("basic_file.blend",)
    assert result.scene_path == "basic_file.blend"
    assert result.missing == () and result.warnings == ()
    assert result.zip_path == tmp_path / "out" / f"{result.sha256}.zip"
    assert sha256_file(result.zip_path) == result.sha256
    assert result.size == result.zip_path.stat().st_size
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [result.zip_path.name]
    with zipfile.ZipFile(result.zip_path) as archive:
        assert archive.read("basic_file.blend") == (bat / "basic_file.blend").read_bytes()


def test_linked_libraries_are_packed_and_resolve(bat: Path, tmp_path: Path) -> None:
    linked = pack_scene(bat / "linked_cube.blend", tmp_path / "out")
    doubly = pack_scene(bat / "doubly_linked.blend", tmp_path / "out")
    assert linked.files == ("basic_file.blend", "linked_cube.blend")
    assert doubly.files == ("basic_file.blend", "doubly_linked.blend", "linked_cube.blend")
    # doubly_linked also links a material library that is not in the test set
    assert doubly.missing == (bat / "material_textures.blend",)
    assert doubly.warnings == (f"Missing file: {bat / 'material_textures.blend'}",)

    linked_dir = extract(linked, tmp_path / "linked")
    doubly_dir = extract(doubly, tmp_path / "doubly")
    assert unresolved_dependencies(linked_dir / linked.scene_path) == []
    assert unresolved_dependencies(doubly_dir / doubly.scene_path) == [
        doubly_dir / "material_textures.blend"
    ]
    views = blender_view(linked_dir / linked.scene_path, doubly_dir / doubly.scene_path)
    cube = views[str(linked_dir / "linked_cube.blend")]
    assert cube["libraries"] == [["//basic_file.blend", True]]
    assert cube["objects"] == [["ümlaut", "//basic_file.blend"]]  # the linked object
    doubly_libraries = dict(views[str(doubly_dir / "doubly_linked.blend")]["libraries"])
    assert doubly_libraries["//linked_cube.blend"] is True
    assert doubly_libraries["//basic_file.blend"] is True


def test_zstd_compressed_scene(bat: Path, tmp_path: Path) -> None:
    result = pack_scene(bat / "basic_file_compressed_zstd.blend", tmp_path / "out")
    assert result.files == ("basic_file_compressed_zstd.blend",)
    with zipfile.ZipFile(result.zip_path) as archive:
        packed = archive.read(result.scene_path)
    assert packed[:4] == ZSTD_MAGIC  # not rewritten, so copied as it was
    folder = extract(result, tmp_path / "x")
    view = blender_view(folder / result.scene_path)[str(folder / result.scene_path)]
    assert view["objects"]


def test_image_sequence_is_packed_with_its_folder(bat: Path, tmp_path: Path) -> None:
    result = pack_scene(bat / "image_sequencer.blend", tmp_path / "out")
    frames = [f"imgseq/{n:06d}.png" for n in range(210, 215)]
    assert result.files == ("image_sequencer.blend", *frames)
    assert "imgseq/LICENSE.txt" not in result.files  # only the sequence's own files
    # Its movie strip points at a file that is not in the test set (a missing file). The
    # path climbs four folders up, so where it lands depends on where shared/ sits.
    movie = Path(os.path.normpath(bat / "../../../../cloud/pillar/testfiles/video-tiny.mkv"))
    assert result.missing == (movie,)
    folder = extract(result, tmp_path / "x")
    view = blender_view(folder / result.scene_path)[str(folder / result.scene_path)]
    assert view["strips"] == [["//imgseq/", True]]


@pytest.mark.parametrize(
    ("scene", "missing"),
    [
        (
            "missing_textures.blend",
            [
                "textures/HDRI/Myanmar/Golden Palace 2, Old Bagan-1k.exr",
                "textures/Textures/Marble/marble_decoration-color.png",
            ],
        ),
        (
            "absolute_path.blend",
            [
                "/home/sybren/workspace/bam/blender-asset-tracer/tests/blendfiles/textures/"
                "Textures/Buildings/buildings_roof_04-color.png",
                "textures/Bricks/brick_dotted_04-color.jpg",
            ],
        ),
    ],
)
def test_missing_files_are_listed_and_packing_succeeds(
    bat: Path, tmp_path: Path, scene: str, missing: list[str]
) -> None:
    result = pack_scene(bat / scene, tmp_path / "out")
    assert result.files == (scene,)
    assert sorted(result.missing) == sorted(bat / name for name in missing)
    assert [w for w in result.warnings if w.startswith("Missing file: ")] == [
        f"Missing file: {path}" for path in result.missing
    ]
    assert zipfile.ZipFile(result.zip_path).testzip() is None


def test_project_folder_is_the_common_parent_of_scene_and_dependencies(
    bat: Path, tmp_path: Path
) -> None:
    # subdir/doubly_linked_up.blend links ../linked_cube.blend, outside its own folder
    result = pack_scene(bat / "subdir" / "doubly_linked_up.blend", tmp_path / "out")
    assert result.project == bat
    assert result.scene_path == "subdir/doubly_linked_up.blend"
    assert result.files == (
        "basic_file.blend",
        "linked_cube.blend",
        "subdir/doubly_linked_up.blend",
    )
    folder = extract(result, tmp_path / "x")
    assert unresolved_dependencies(folder / result.scene_path) == [
        folder / "material_textures.blend"
    ]


def test_files_outside_a_forced_project_folder_go_under_outside_project(
    bat: Path, tmp_path: Path
) -> None:
    scene = bat / "subdir" / "doubly_linked_up.blend"
    result = pack_scene(scene, tmp_path / "out", project=bat / "subdir")
    outside = f"{OUTSIDE_PROJECT}{bat}"
    assert result.scene_path == "doubly_linked_up.blend"
    assert result.files == (
        f"{outside}/basic_file.blend",
        f"{outside}/linked_cube.blend",
        "doubly_linked_up.blend",
    )
    assert any(OUTSIDE_PROJECT in warning for warning in result.warnings)
    folder = extract(result, tmp_path / "x")
    view = blender_view(folder / result.scene_path)[str(folder / result.scene_path)]
    libraries = dict(view["libraries"])
    assert libraries[f"//{outside}/linked_cube.blend"] is True
    with pytest.raises(BundleError, match="does not contain the scene"):
        pack_scene(scene, tmp_path / "out", project=tmp_path)


@pytest.fixture(scope="module")
def absolute_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("absolute")
    (root / "a").mkdir()
    (root / "b").mkdir()
    completed = subprocess.run(
        [sys.executable, "-I", "-c", MAKE_ABSOLUTE_SCENE, str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    scene = root / "a" / "scene.blend"
    assert scene.read_bytes()[:4] == ZSTD_MAGIC
    return scene


def test_absolute_paths_are_rewritten_relative_and_the_hash_is_stable(
    absolute_scene: Path, tmp_path: Path
) -> None:
    first = pack_scene(absolute_scene, tmp_path / "one")
    second = pack_scene(absolute_scene, tmp_path / "two")
    assert first.project == absolute_scene.parent.parent
    assert first.files == ("a/scene.blend", "b/lib.blend", "b/tex.png")
    assert first.scene_path == "a/scene.blend"
    # BAT re-gzips the rewritten zstd scene with a timestamp; we store it plain instead
    assert second.sha256 == first.sha256
    assert second.zip_path.read_bytes() == first.zip_path.read_bytes()
    with zipfile.ZipFile(first.zip_path) as archive:
        assert archive.read("a/scene.blend")[:7] == b"BLENDER"
    folder = extract(first, tmp_path / "x")
    view = blender_view(folder / "a" / "scene.blend")[str(folder / "a" / "scene.blend")]
    assert view["libraries"] == [["//../b/lib.blend", True]]
    assert view["images"] == [["//../b/tex.png", True]]
    assert ["LibEmpty", "//../b/lib.blend"] in view["objects"]
    assert absolute_scene.read_bytes()[:4] == ZSTD_MAGIC  # the original is untouched


def test_packing_twice_gives_the_same_bundle(bat: Path, tmp_path: Path) -> None:
    progress: list[PackProgress] = []
    first = pack_scene(bat / "doubly_linked.blend", tmp_path / "one", on_progress=progress.append)
    second = pack_scene(bat / "doubly_linked.blend", tmp_path / "two")
    assert first.sha256 == second.sha256
    assert first.zip_path.name == second.zip_path.name == f"{first.sha256}.zip"
    with zipfile.ZipFile(first.zip_path) as archive:
        infos = archive.infolist()
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    # packing again into the same folder replaces the bundle with identical bytes
    again = pack_scene(bat / "doubly_linked.blend", tmp_path / "one")
    assert again.zip_path == first.zip_path and again.sha256 == first.sha256
    stages = {p.stage for p in progress}
    assert {"trace", "zip"} <= stages
    last_zip = [p for p in progress if p.stage == "zip"][-1]
    assert last_zip.done == last_zip.total > 0


def test_corrupt_and_non_blend_scenes_are_refused(bat: Path, tmp_path: Path) -> None:
    with pytest.raises(CorruptSceneError, match="damaged or truncated") as caught:
        pack_scene(bat / "corrupt_only_magic.blend", tmp_path / "out")
    assert caught.value.hint
    text = tmp_path / "notes.blend"
    text.write_text("not a blend file")
    with pytest.raises(NotABlendFileError):
        pack_scene(text, tmp_path / "out")
    with pytest.raises(SceneNotFoundError):
        pack_scene(tmp_path / "nowhere.blend", tmp_path / "out")
    # nothing half-written is left behind
    assert not any((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else True


def test_a_corrupt_library_is_named(bat: Path, tmp_path: Path) -> None:
    scene = tmp_path / "project" / "linked_cube.blend"
    scene.parent.mkdir()
    scene.write_bytes((bat / "linked_cube.blend").read_bytes())
    (scene.parent / "basic_file.blend").write_bytes(b"BLENDER-v300" + b"\0" * 24)
    with pytest.raises(BundleError, match=r"basic_file\.blend") as caught:
        pack_scene(scene, tmp_path / "out")
    assert "library" in caught.value.message and caught.value.hint
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


def test_packs_leave_no_scratch_files(bat: Path, tmp_path: Path) -> None:
    pack_scene(bat / "linked_cube.blend", tmp_path / "out")
    assert [p.suffix for p in (tmp_path / "out").iterdir()] == [".zip"]  # no .pack-* scratch


def test_dependencies_are_listed_with_their_kind_and_missing_ones_first(
    shared_scenes_untouched: Path,
) -> None:
    from app.packing import list_dependencies

    bat = shared_scenes_untouched
    assert list_dependencies(bat / "basic_file.blend") == []
    doubly = list_dependencies(bat / "doubly_linked.blend")
    assert [(d.path.name, d.kind, d.missing) for d in doubly] == [
        ("material_textures.blend", "library", True),
        ("basic_file.blend", "library", False),
        ("linked_cube.blend", "library", False),
    ]
    textures = list_dependencies(bat / "missing_textures.blend")
    assert {d.kind for d in textures} == {"image"} and all(d.missing for d in textures)
    sequence = {d.path.name: d for d in list_dependencies(bat / "image_sequencer.blend")}
    assert sequence["000210.png"].kind == "image sequence"
    assert not sequence["000210.png"].missing
    assert sequence["video-tiny.mkv"].missing


def test_listing_the_dependencies_of_a_damaged_scene_says_so(bat_scenes: Path) -> None:
    from app.packing import list_dependencies
    from common.errors import CorruptSceneError

    with pytest.raises(CorruptSceneError, match="damaged or truncated"):
        list_dependencies(bat_scenes / "corrupt_only_magic.blend")


@pytest.mark.parametrize(
    ("scene", "path"),
    [
        ("absolute_path.blend", "/home/sybren/workspace/bam/blender-asset-tracer"),
        ("image_sequencer.blend", "//../../../../cloud/pillar/testfiles/video-tiny.mkv"),
    ],
)
def test_a_path_providers_will_refuse_is_a_warning_at_submit(
    bat: Path, tmp_path: Path, scene: str, path: str
) -> None:
    """A path that still leads outside the packed bundle (here, missing files named by an
    absolute path or by one climbing out of the project) is refused by every node
    (issue 17): the artist hears it at packing, naming the path, not from a failed job."""
    result = pack_scene(bat / scene, tmp_path / "out")
    refusals = [w for w in result.warnings if w.startswith("Providers will refuse this scene")]
    assert len(refusals) == 1 and path in refusals[0]


def test_a_packed_scene_inside_its_bundle_has_no_refusal_warning(bat: Path, tmp_path: Path) -> None:
    result = pack_scene(bat / "missing_textures.blend", tmp_path / "out")
    assert not [w for w in result.warnings if w.startswith("Providers will refuse")]

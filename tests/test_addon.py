"""The Blender extension (`blender_addon/`, built by `app.addon_build`): its zip is a valid
Blender 4.2+ extension that vendors blender-asset-tracer, it installs and enables in the
bpy module (a throw-away HOME), and its pure-Python parts (job spec, client, packing)
behave as the desktop client's.

The end-to-end and bad-input cases, which drive the installed extension inside the bpy
module against a real farm, are in test_addon_farm.py.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from app.addon_build import (
    SOURCE,
    AddonBuildError,
    build_extension,
    build_wheel,
    install_extension,
)
from app.packing import pack_scene as desktop_pack_scene
from tests.farm_tools import REPO


def addon_module(name: str) -> ModuleType:
    """One of the extension's bpy-free modules, imported from a stand-in package whose
    __init__ is not run (the real one imports bpy, which only the worker process may
    import here); relative imports between those modules work."""
    if "tessera_addon" not in sys.modules:
        package = ModuleType("tessera_addon")
        package.__path__ = [str(SOURCE)]
        sys.modules["tessera_addon"] = package
    return importlib.import_module(f"tessera_addon.{name}")


def blender_env(home: Path) -> dict[str, str]:
    """An environment whose Blender user folders (config, extensions) are under `home`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HOME=str(home),
        BLENDER_USER_RESOURCES=str(home / "blender"),
        XDG_CONFIG_HOME=str(home / ".config"),
    )
    return env


def test_the_zip_is_a_valid_extension_with_its_wheels(tmp_path: Path) -> None:
    built = build_extension(tmp_path / "out")
    assert built.name == "tessera-0.1.0.zip"
    with zipfile.ZipFile(built) as archive:
        names = archive.namelist()
        manifest = tomllib.loads(archive.read("blender_manifest.toml").decode())
        assert manifest["id"] == "tessera"
        assert manifest["schema_version"] == "1.0.0"
        assert manifest["blender_version_min"] == "4.2.0"
        assert manifest["type"] == "add-on"
        assert set(manifest["permissions"]) == {"network", "files"}
        assert manifest["wheels"], "blender-asset-tracer must be vendored"
        for wheel in manifest["wheels"]:
            assert wheel.removeprefix("./") in names
        assert {"__init__.py", "client.py", "packing.py", "operators.py", "ui.py"} <= set(names)
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        wheel_name = manifest["wheels"][0].removeprefix("./")
        wheel_bytes = archive.read(wheel_name)
        vendored = {w.removeprefix("./wheels/").split("-")[0]: w for w in manifest["wheels"]}
        assert set(vendored) == {"blender_asset_tracer", "zeroconf", "ifaddr"}, vendored
        assert all(w.endswith("-py3-none-any.whl") for w in manifest["wheels"]), vendored
        zeroconf_bytes = archive.read(vendored["zeroconf"].removeprefix("./"))
    # The Tessera extension never ships Tessera's own packages.
    assert not [n for n in names if n.split("/")[0] in {"app", "protocol", "coordinator"}]
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as wheel:
        files = wheel.namelist()
        assert "blender_asset_tracer/__init__.py" in files
        assert "blender_asset_tracer/pack/__init__.py" in files
        assert "blender_asset_tracer-1.23.dist-info/WHEEL" in files
        record = wheel.read("blender_asset_tracer-1.23.dist-info/RECORD").decode()
        rows = list(csv.reader(io.StringIO(record)))
        assert {row[0] for row in rows} == set(files)
        for path, digest, size in rows:
            if not digest:
                continue
            data = wheel.read(path)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == f"sha256={expected.decode()}" and int(size) == len(data), path
    # zeroconf's compiled twins are left out; the Python sources they come from stay.
    with zipfile.ZipFile(io.BytesIO(zeroconf_bytes)) as wheel:
        files = wheel.namelist()
        assert "zeroconf/_services/browser.py" in files and "zeroconf/_dns.py" in files
        assert not [n for n in files if n.endswith((".so", ".pyd", ".pxd", ".c"))], files
        meta = wheel.read("zeroconf-0.154.0.dist-info/WHEEL").decode()
        assert "Root-Is-Purelib: true" in meta and "Tag: py3-none-any" in meta
        rows = list(
            csv.reader(io.StringIO(wheel.read("zeroconf-0.154.0.dist-info/RECORD").decode()))
        )
        assert {row[0] for row in rows} == set(files)
    # Reproducible: the same source gives the same bytes.
    again = build_extension(tmp_path / "again.zip")
    assert again.read_bytes() == built.read_bytes()


def test_a_missing_distribution_cannot_be_vendored(tmp_path: Path) -> None:
    with pytest.raises(AddonBuildError, match="not installed"):
        build_wheel("no_such_distribution_here", tmp_path)


def test_a_distribution_that_needs_its_binaries_cannot_be_vendored(tmp_path: Path) -> None:
    """zstandard's compiled backends have no Python source to fall back on."""
    with pytest.raises(AddonBuildError, match=r"zstandard is not pure Python \(zstandard/"):
        build_wheel("zstandard", tmp_path)
    assert not list(tmp_path.iterdir()), "no half-built wheel is left"


def test_the_extension_installs_and_enables_in_the_bpy_module(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    built = build_extension(tmp_path / "out")
    result = install_extension(built, env=blender_env(home), use_bpy=True)
    assert result.enabled
    assert result.blender.startswith("bpy module")
    assert result.extensions_dir == home / "blender" / "extensions"
    installed = result.extensions_dir / "user_default" / "tessera"
    assert (installed / "blender_manifest.toml").is_file()
    site = result.extensions_dir / ".local" / "lib"
    assert list(site.glob("python3*/site-packages/blender_asset_tracer/__init__.py")), (
        "Blender did not extract the vendored wheel"
    )
    # A fresh Blender that reads that user folder's preferences has the add-on enabled,
    # its operators and panel registered, and imports BAT.
    check = (
        "import bpy, json\n"
        "bpy.ops.wm.read_userpref()\n"  # the bpy module starts with factory preferences
        "import blender_asset_tracer\n"
        "print('CHECK ' + json.dumps({"
        "'enabled': 'bl_ext.user_default.tessera' in bpy.context.preferences.addons,"
        "'submit': hasattr(bpy.types, 'TESSERA_OT_submit_job'),"
        "'panel': hasattr(bpy.types, 'TESSERA_PT_submit'),"
        "'scene': hasattr(bpy.types.Scene, 'tessera'),"
        "'bat': blender_asset_tracer.__file__}))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", check],
        env=blender_env(home),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    line = next(
        (x for x in completed.stdout.splitlines() if x.startswith("CHECK ")), completed.stderr
    )
    assert line.startswith("CHECK "), line[-3000:]
    found = json.loads(line[len("CHECK ") :])
    assert found["enabled"] and found["submit"] and found["panel"] and found["scene"], found
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]


def test_a_named_blender_executable_runs_the_install_in_background(tmp_path: Path) -> None:
    """`--blender PATH`: Blender's own command line (-b, --python SCRIPT -- ZIP), played
    here by a stand-in that runs the bpy module with the same script and zip."""
    home = tmp_path / "home"
    home.mkdir()
    fake = tmp_path / "blender"
    fake.write_text(
        "#!/bin/sh\n"
        '[ "$1 $2 $3 $4 $6" = "-b --python-exit-code 1 --python --" ] || exit 3\n'
        f'exec {sys.executable} "$5" "$7"\n'
    )
    fake.chmod(0o755)
    result = install_extension(build_extension(tmp_path / "out"), fake, env=blender_env(home))
    assert result.blender == str(fake) and result.enabled


def test_installing_something_that_is_not_a_zip_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "tessera.zip"
    bogus.write_text("not a zip")
    with pytest.raises(AddonBuildError, match="not an extension zip"):
        install_extension(bogus, env=blender_env(tmp_path), use_bpy=True)


# --- the bpy-free modules ------------------------------------------------------------


SUMMARY = {
    "name": "Scene",
    "frame_start": 1,
    "frame_end": 10,
    "resolution_x": 64,
    "resolution_y": 48,
    "resolution_percentage": 100,
    "samples": 4,
    "adaptive_sampling": False,
    "denoising": False,
    "camera": "Camera",
    "engine": "CYCLES",
    "blender_version": "5.0.1",
}


def test_the_job_spec_is_one_the_coordinator_accepts() -> None:
    from protocol.models import JobSpec

    spec_module = addon_module("spec")
    spec = spec_module.build_spec(
        SUMMARY,
        name="shot",
        frames=spec_module.parse_frames("2-8x2"),
        tiles=(2, 3),
        priority=70,
        device="CPU",
        max_price=0.5,
        max_credits=12.0,
        bundle="a" * 64,
        scene_path="shots/shot.blend",
    )
    parsed = JobSpec.model_validate(spec)  # the coordinator's own model
    assert parsed.frames.frames() == range(2, 9, 2)
    assert (parsed.tiles.columns, parsed.tiles.rows) == (2, 3)
    assert parsed.max_credits == 12.0 and parsed.device == "CPU"


def test_a_movie_scene_tells_the_farm_its_movie_as_the_app_does() -> None:
    """The add-on names the movie as `tessera submit` does (Blender's rule), and the spec
    it sends asks for the finish and carries the movie the coordinator encodes."""
    from app.job_spec import movie_name as app_movie_name
    from protocol.models import JobSpec

    spec_module = addon_module("spec")
    for path, container in (("render/shot_####", "MPEG4"), ("clip_", "MKV"), ("a/b_##", "OGG")):
        assert spec_module.movie_name(path, 1, 24, container) == app_movie_name(
            path, 1, 24, {"container": container}
        )
    movie = {"name": "render/shot_0001-0010.mp4", "container": "MPEG4", "codec": "H264",
             "fps": 24.0, "crf": "MEDIUM", "preset": "GOOD", "gop": 18,
             "bitrate_kbps": 6000, "color_mode": "RGB"}  # fmt: skip
    spec = spec_module.build_spec(
        {**SUMMARY, "fps": 24.0, "movie": movie}, name="x", frames=spec_module.parse_frames("1")
    )
    parsed = JobSpec.model_validate(spec)
    assert parsed.finish and parsed.scene.movie is not None
    assert parsed.scene.movie.name == "render/shot_0001-0010.mp4"


@pytest.mark.parametrize(
    ("change", "frames", "tiles", "message"),
    [
        ({"camera": None}, "1", (1, 1), "no active camera"),
        ({"engine": "BLENDER_EEVEE_NEXT"}, "1", (1, 1), "Cycles only"),
        ({}, "5-20", (1, 1), "outside the scene's range"),
        ({"resolution_x": 2}, "1", (3, 1), "do not fit"),
    ],
)
def test_a_job_that_cannot_work_is_refused_with_the_reason(
    change: dict[str, object], frames: str, tiles: tuple[int, int], message: str
) -> None:
    spec_module = addon_module("spec")
    with pytest.raises(spec_module.SpecError, match=message):
        spec_module.build_spec(
            {**SUMMARY, **change}, name="x", frames=spec_module.parse_frames(frames), tiles=tiles
        )
    with pytest.raises(spec_module.SpecError, match="not a frame range"):
        spec_module.parse_frames("1..4")


def test_the_panel_shows_progress_credits_and_an_eta() -> None:
    spec_module = addon_module("spec")
    job = {
        "status": "active",
        "progress": {"tasks_total": 8, "tasks_done": 2, "frames_total": 2, "frames_done": 0},
        "credits_spent": 1.5,
        "credits_escrowed": 6.0,
    }
    shown = spec_module.describe_job(job, now=130.0, created=100.0)
    assert shown["status"] == "active" and shown["frames_total"] == 2
    assert shown["credits_spent"] == 1.5
    assert shown["eta"] == pytest.approx(90.0), "2 tasks in 30 s: 6 more take 90 s"
    assert spec_module.describe_job(job, now=130.0, created=None)["eta"] is None
    assert shown["cost"] == [], "an older coordinator sends no cost"
    job["cost"] = {
        "credits_per_frame": 0.75,
        "success_rate": 0.9,
        "wasted_seconds": 3.25,
        "estimate": 2.0,
        "final": 1.5,
    }
    assert spec_module.describe_job(job, now=130.0, created=100.0)["cost"] == [
        "0.75 credits/frame; final 1.5 (estimate 2)",
        "90% of results accepted; 3.2 s wasted",
    ]
    assert spec_module.frame_file_name(7) == "frame_0007.exr"
    assert spec_module.output_folder("/renders/shot_", "/p/a.blend") == "/renders"
    assert spec_module.output_folder("/renders/", "/p/a.blend") == "/renders/"
    assert spec_module.output_folder("", "/p/a.blend") == "/p/tessera_frames"


def test_the_join_proof_is_the_coordinators() -> None:
    from protocol.discovery import join_proof

    client = addon_module("client")
    assert client.join_proof("s3cret", "n" * 32, "artist") == join_proof(
        "s3cret", "n" * 32, "artist"
    )


def test_the_lan_fingerprint_is_the_coordinators() -> None:
    from protocol.discovery import secret_fingerprint

    lan = addon_module("lan")
    assert lan.secret_fingerprint("studio", "s3cret") == secret_fingerprint("studio", "s3cret")
    assert lan.secret_fingerprint("studio", "other") != secret_fingerprint("studio", "s3cret")


@pytest.mark.parametrize(
    ("farm", "secret", "interface", "words"),
    [
        ("", "s", "127.0.0.1", "No farm name"),
        ("studio", "", "127.0.0.1", "No farm secret"),
        ("studio", "s", "not-an-address", "Cannot listen for LAN farms on not-an-address"),
        ("nobody-runs-this", "s", "127.0.0.1", "No coordinator of farm 'nobody-runs-this'"),
    ],
)
def test_finding_a_lan_farm_by_name_fails_with_what_to_check(
    farm: str, secret: str, interface: str, words: str
) -> None:
    lan = addon_module("lan")
    client = addon_module("client")
    with pytest.raises(client.FarmError, match=re.escape(words)):
        lan.find_farm(farm, secret, interface=interface, timeout=1.0)


def test_an_unreachable_coordinator_is_one_sentence() -> None:
    client = addon_module("client")
    with (
        client.FarmClient("http://127.0.0.1:1", "token", timeout=2) as farm,
        pytest.raises(client.FarmError, match="Cannot reach the Tessera coordinator"),
    ):
        farm.me()
    with pytest.raises(client.FarmError, match="No Tessera token"):
        client.FarmClient("http://127.0.0.1:1", "").me()


def test_the_bundle_is_the_desktop_clients(bat_scenes: Path, tmp_path: Path) -> None:
    """Same files at the same paths, the library rewritten relative: the extension's
    packer mirrors app/packing.py (and is reproducible)."""
    project = tmp_path / "project"
    (project / "subdir").mkdir(parents=True)
    for name in ("doubly_linked.blend", "linked_cube.blend", "basic_file.blend"):
        (project / name).write_bytes((bat_scenes / name).read_bytes())
    (project / "subdir" / "doubly_linked_up.blend").write_bytes(
        (bat_scenes / "subdir" / "doubly_linked_up.blend").read_bytes()
    )
    scene = project / "subdir" / "doubly_linked_up.blend"
    packing = addon_module("packing")
    ours = packing.pack_scene(scene, tmp_path / "ours")
    theirs = desktop_pack_scene(scene, tmp_path / "theirs")
    assert ours.scene_path == theirs.scene_path == "subdir/doubly_linked_up.blend"
    assert list(ours.files) == list(theirs.files)
    assert "basic_file.blend" in ours.files
    assert ours.sha256 == theirs.sha256, "the same bundle, byte for byte"
    again = packing.pack_scene(scene, tmp_path / "again")
    assert again.sha256 == ours.sha256
    assert list(ours.missing) == [str(path) for path in theirs.missing]
    assert packing.missing_dependencies(scene) == [str(path) for path in theirs.missing]


def test_a_zstd_compressed_scene_packs_as_the_desktop_client_packs_it(
    bat_scenes: Path, tmp_path: Path
) -> None:
    """Blender's Python ships zstandard (bpy declares it), which BAT needs for these."""
    scene = tmp_path / "basic_file_compressed_zstd.blend"
    scene.write_bytes((bat_scenes / scene.name).read_bytes())
    ours = addon_module("packing").pack_scene(scene, tmp_path / "ours")
    theirs = desktop_pack_scene(scene, tmp_path / "theirs")
    assert (ours.sha256, ours.scene_path) == (theirs.sha256, theirs.scene_path)


def test_missing_files_are_listed(bat_scenes: Path, tmp_path: Path) -> None:
    scene = tmp_path / "missing_textures.blend"
    scene.write_bytes((bat_scenes / "missing_textures.blend").read_bytes())
    missing = addon_module("packing").missing_dependencies(scene)
    assert missing, "missing_textures.blend refers to textures that do not exist"


def test_the_extension_imports_nothing_of_tessera() -> None:
    import ast

    for path in sorted(SOURCE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top = node.module.split(".")[0]
            elif isinstance(node, ast.Import):
                top = node.names[0].name.split(".")[0]
            else:
                continue
            assert top not in {"app", "protocol", "common", "renderers", "PySide6"}, path
    assert (REPO / "blender_addon" / "blender_manifest.toml").is_file()


def test_the_extension_ships_in_tesseras_wheel_and_builds_from_an_install(
    tmp_path: Path,
) -> None:
    """`tessera addon build` from an installed wheel (no source checkout): the wheel
    carries blender_addon/ with its manifest, and the installed copy builds the zip.
    Built from a clean copy of the source (an in-tree build/ would hide a missing entry)."""
    source = tmp_path / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "tests"
        ),
    )
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(source), "-w", "wheels"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("tessera_farm-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site)
    shipped = {
        f"blender_addon/{path.relative_to(SOURCE).as_posix()}"
        for path in SOURCE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert "blender_addon/blender_manifest.toml" in shipped
    assert shipped <= names, sorted(shipped - names)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from app.addon_build import SOURCE, build_extension\n"
        "print('SOURCE', SOURCE)\n"
        "print('BUILT', build_extension(Path(sys.argv[1])))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if " " in line)
    assert Path(lines["SOURCE"]) == site / "blender_addon", lines
    with zipfile.ZipFile(lines["BUILT"]) as built:
        assert {"blender_manifest.toml", "lan.py", "operators.py"} <= set(built.namelist())

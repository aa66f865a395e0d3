"""The `tessera` command line as a user runs it: real processes, real Blender."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from renderers.exr import read_exr
from tests.scene_tools import prepare_scene

REPO = Path(__file__).resolve().parent.parent


def tessera(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_inspect_json(demo_scene: Path) -> None:
    done = tessera("inspect", demo_scene, "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["engine"] == "CYCLES" and info["frame_end"] == 24


def test_inspect_text(demo_scene: Path) -> None:
    done = tessera("inspect", demo_scene)
    assert done.returncode == 0, done.stderr
    assert "Resolution   640x360" in done.stdout
    assert "Warnings:    none" in done.stdout


def test_inspect_bad_file_exits_2_with_a_message(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.blend"
    bogus.write_text("hello")
    done = tessera("inspect", bogus)
    assert done.returncode == 2
    assert "not a Blender file" in done.stderr and "hint:" in done.stderr
    assert "Traceback" not in done.stderr


def test_inspect_bad_file_json_error(tmp_path: Path) -> None:
    done = tessera("inspect", tmp_path / "missing.blend", "--json")
    assert done.returncode == 2
    assert json.loads(done.stdout)["error"]["kind"] == "SceneNotFoundError"


def test_render_local_tiles_writes_exr_and_png(demo_scene: Path, tmp_path: Path) -> None:
    out = tmp_path / "frames" / "f.exr"
    done = tessera(
        "render-local",
        demo_scene,
        "--frame",
        "7",
        "--tiles",
        "2x2",
        "--samples",
        "4",
        "--percentage",
        "10",
        "--out",
        out,
        "--json",
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["tiles"] == 4 and summary["frame"] == 7 and summary["denoised"] is True
    assert (summary["width"], summary["height"]) == (64, 36)
    assert read_exr(out).width == 64
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_local_text_output_says_where_the_files_are(
    demo_scene: Path, tmp_path: Path
) -> None:
    out = tmp_path / "f.exr"
    done = tessera(
        "render-local",
        demo_scene,
        "--samples",
        "2",
        "--percentage",
        "5",
        "--no-denoise",
        "--out",
        out,
    )
    assert done.returncode == 0, done.stderr
    assert f"EXR: {out}" in done.stdout and "tile 1/1" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tiles", "0x3"], "no tiles"),
        (["--tiles", "three"], "CxR"),
        (["--samples", "0"], "--samples must be at least 1"),
        (["--percentage", "0"], "--percentage must be between"),
        (["--tiles", "100x1"], "columns"),
        (["--device", "OPTIX"], "OPTIX"),
        (["--device", "TPU"], "TPU"),
    ],
)
def test_render_local_bad_options(
    demo_scene: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    done = tessera(
        "render-local", demo_scene, "--percentage", "5", *args, "--out", tmp_path / "x.exr"
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.exr").exists()


def test_devices_json_lists_cpu_and_the_bpy_build() -> None:
    done = tessera("devices", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["builds"][0]["version"] == "5.0.1"
    assert report["devices"][0]["type"] == "CPU"


def test_node_refuses_a_negative_price(tmp_path: Path) -> None:
    done = tessera(
        "node",
        "--coordinator",
        "http://127.0.0.1:9",
        "--token",
        "t",
        "--price",
        "-1",
        "--no-benchmark",
        "--data",
        tmp_path / "node",
        timeout=60,
    )
    assert done.returncode != 0
    assert "--price must be 0 or more" in done.stderr


def test_node_connection_files_do_not_mix_with_lan_and_a_missing_one_is_named(
    tmp_path: Path,
) -> None:
    done = tessera("node", "--lan", "--farm", "f", "--token-file", tmp_path / "t", timeout=60)
    assert done.returncode != 0 and "drop --*-file" in done.stderr
    # No token anywhere: --token-file is offered as a way to give one.
    done = tessera("node", "--coordinator", "http://127.0.0.1:9", timeout=60)
    assert done.returncode != 0 and "--token-file" in done.stderr


def test_inspect_lists_the_files_a_scene_uses_with_the_missing_ones_flagged(
    bat_scenes: Path, tmp_path: Path
) -> None:
    for name in ("linked_cube.blend", "basic_file.blend"):
        shutil.copy(bat_scenes / name, tmp_path / name)
    # The same scenes with a camera, saved beside their library (paths stay relative).
    textured = prepare_scene(
        bat_scenes / "missing_textures.blend", tmp_path / "t.blend", add_camera=True
    )
    linked = prepare_scene(tmp_path / "linked_cube.blend", tmp_path / "l.blend", add_camera=True)
    done = tessera("inspect", textured)
    assert done.returncode == 0, done.stderr
    assert "Files:       2" in done.stdout
    assert "MISSING image: " in done.stdout and "marble_decoration-color.png" in done.stdout
    listed = tessera("inspect", linked, "--json")
    assert listed.returncode == 0, listed.stderr
    files = json.loads(listed.stdout)["dependencies"]
    assert [(Path(f["path"]).name, f["kind"], f["missing"]) for f in files] == [
        ("basic_file.blend", "library", False)
    ]


def test_inspect_says_what_a_grid_costs(demo_scene: Path, tmp_path: Path) -> None:
    # 4x4 tiles of the demo at 4096 samples: the derived margin (251 px, one per adaptive
    # filter pass) costs far more pixels than the frame; the estimate says so.
    costly = prepare_scene(demo_scene, tmp_path / "costly.blend", samples=4096)
    done = tessera("inspect", costly, "--tiles", "4x4", "--json")
    assert done.returncode == 0, done.stderr
    tiles = json.loads(done.stdout)["tiles"]
    assert (tiles["columns"], tiles["rows"], tiles["auto"]) == (4, 4, False)
    assert tiles["overhead_estimate"] > 1.0
    assert "estimated overhead" in tiles["text"]
    # The demo's own 64 samples need no margin: no extra pixels.
    done = tessera("inspect", demo_scene, "--tiles", "4x4")
    assert done.returncode == 0, done.stderr
    assert "4x4 tiles: estimated overhead 0.0% extra pixels" in done.stdout


def test_inspect_tiles_auto_chooses_for_the_nodes(demo_scene: Path, tmp_path: Path) -> None:
    one_frame = prepare_scene(demo_scene, tmp_path / "one.blend", frame_end=1)
    done = tessera("inspect", one_frame, "--tiles", "auto", "--nodes", "16", "--json")
    assert done.returncode == 0, done.stderr
    tiles = json.loads(done.stdout)["tiles"]
    # 640x360 in tiles of at least 120x64 px: 16 nodes get 5x5 at most; auto wants 16.
    assert tiles["auto"] and tiles["columns"] * tiles["rows"] >= 16
    assert tiles["overhead_estimate"] == 0.0
    # The whole 24-frame demo keeps 16 nodes busy without tiles.
    done = tessera("inspect", demo_scene, "--tiles", "auto", "--nodes", "16")
    assert "1x1 tiles" in done.stdout and "keep 16 node(s) busy" in done.stdout


@pytest.mark.parametrize("bad", ["autox", "4x", "0x2"])
def test_a_bad_tiles_option_is_a_usage_error(demo_scene: Path, bad: str) -> None:
    done = tessera("inspect", demo_scene, "--tiles", bad)
    assert done.returncode == 2
    assert "tile grid" in done.stderr and "Traceback" not in done.stderr

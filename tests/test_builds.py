"""Tests of renderers.builds: the --version parser on captured output, and real probes.

The probes run real processes: this venv's bpy module, small shell scripts standing in
for a `blender` executable (they print captured --version output), /bin/true. No mocks.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
from pathlib import Path

import pytest

from common.errors import BlenderNotFoundError
from renderers.builds import (
    BlenderBuild,
    clear_probe_cache,
    default_build,
    find_builds,
    parse_blender_version_output,
    probe_bpy,
    probe_executable,
)

FIXTURES = Path(__file__).parent / "fixtures" / "devices"
HASH_RE = re.compile(r"[0-9a-f]{12}")


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(0o755)
    return path


def _fake_blender(directory: Path, fixture: str, name: str = "blender") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    # Absolute cat: some tests leave only tmp folders on PATH.
    cat = shutil.which("cat") or "/bin/cat"
    return _script(directory / name, f"exec {cat} '{FIXTURES / fixture}'\n")


# --- parse_blender_version_output --------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("blender_version_5.0.1.txt", ("5.0.1", "a3db93c5b259")),
        ("blender_version_4.2.3_lts.txt", ("4.2.3", "0e22e4fcea03")),
        ("blender_version_banner_4.2.3.txt", ("4.2.3", "0e22e4fcea03")),
        ("blender_version_no_hash.txt", ("4.1", "unknown")),
    ],
)
def test_parse_captured_version_output(fixture: str, expected: tuple[str, str]) -> None:
    text = (FIXTURES / fixture).read_text(encoding="utf-8")
    assert parse_blender_version_output(text) == expected


@pytest.mark.parametrize("text", ["", "\n\n", "Python 3.11.7\n", "Blender\n", "NotBlender 4.2\n"])
def test_parse_without_version_line_raises(text: str) -> None:
    with pytest.raises(BlenderNotFoundError, match="does not look like Blender"):
        parse_blender_version_output(text)


# --- BlenderBuild ------------------------------------------------------------------------


def test_bpy_build_command_label_and_dict() -> None:
    build = BlenderBuild("bpy", Path("/venv/bin/python"), "5.0.1", "a3db93c5b259")
    assert build.worker_command(Path("/w/worker.py")) == [
        "/venv/bin/python",
        "-I",
        "-u",
        "/w/worker.py",
    ]
    assert build.label == "Blender 5.0.1 (a3db93c5b259, bpy module in /venv/bin/python)"
    assert build.to_dict() == {
        "kind": "bpy",
        "path": "/venv/bin/python",
        "version": "5.0.1",
        "build_hash": "a3db93c5b259",
        "label": build.label,
    }


def test_executable_build_command() -> None:
    build = BlenderBuild("executable", Path("/opt/blender/blender"), "4.2.3", "0e22e4fcea03")
    assert build.worker_command(Path("w.py")) == [
        "/opt/blender/blender",
        "-b",
        "--factory-startup",
        "--disable-autoexec",
        "--python-exit-code",
        "1",
        "--python",
        "w.py",
    ]
    assert build.label == "Blender 4.2.3 (0e22e4fcea03, executable /opt/blender/blender)"


# --- probe_bpy ---------------------------------------------------------------------------


def test_probe_bpy_of_this_venv() -> None:
    build = probe_bpy()
    assert build is not None, "this venv has bpy 5.0.1 installed"
    assert build.kind == "bpy"
    assert build.path == Path(sys.executable).absolute()
    assert build.version == "5.0.1"
    assert HASH_RE.fullmatch(build.build_hash)
    assert probe_bpy() is build  # cached per interpreter


def test_clear_probe_cache_forgets_executables(tmp_path: Path) -> None:
    blender = _fake_blender(tmp_path, "blender_version_4.2.3_lts.txt")
    assert probe_executable(blender).version == "4.2.3"
    _fake_blender(tmp_path, "blender_version_5.0.1.txt")  # upgraded in place
    assert probe_executable(blender).version == "4.2.3"  # cached
    clear_probe_cache()
    assert probe_executable(blender).version == "5.0.1"


def test_probe_bpy_without_bpy_is_none_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    python = _script(
        tmp_path / "python",
        "echo \"ModuleNotFoundError: No module named 'bpy'\" >&2\nexit 1\n",
    )
    with caplog.at_level(logging.WARNING, logger="renderers.builds"):
        assert probe_bpy(python) is None
    assert "No module named 'bpy'" in caplog.text


def test_probe_bpy_missing_interpreter_is_none(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="renderers.builds"):
        assert probe_bpy(Path("/nonexistent/python3.11")) is None
    assert "/nonexistent/python3.11" in caplog.text


# --- probe_executable --------------------------------------------------------------------


def test_probe_executable_parses_fake_blender(tmp_path: Path) -> None:
    blender = _fake_blender(tmp_path, "blender_version_4.2.3_lts.txt")
    build = probe_executable(blender)
    assert build == BlenderBuild("executable", blender, "4.2.3", "0e22e4fcea03")


def test_probe_executable_missing_path(tmp_path: Path) -> None:
    with pytest.raises(BlenderNotFoundError, match="No Blender executable at") as info:
        probe_executable(tmp_path / "blender")
    assert "--blender" in info.value.hint


def test_probe_executable_not_blender() -> None:
    with pytest.raises(BlenderNotFoundError, match="does not look like Blender"):
        probe_executable(Path("/bin/true"))


def test_probe_executable_not_executable(tmp_path: Path) -> None:
    plain = tmp_path / "blender"
    plain.write_text("Blender 5.0.1\n", encoding="utf-8")
    with pytest.raises(BlenderNotFoundError, match="not an executable"):
        probe_executable(plain)


def test_probe_executable_failing(tmp_path: Path) -> None:
    broken = _script(tmp_path / "blender", "echo 'libGL.so.1: cannot open' >&2\nexit 127\n")
    with pytest.raises(BlenderNotFoundError, match=r"exit code 127: libGL\.so\.1"):
        probe_executable(broken)


def test_probe_executable_timeout(tmp_path: Path) -> None:
    slow = _script(tmp_path / "blender", "exec sleep 5\n")
    with pytest.raises(BlenderNotFoundError, match="did not answer --version"):
        probe_executable(slow, timeout=0.2)


# --- find_builds / default_build ---------------------------------------------------------


def test_find_builds_includes_this_venvs_bpy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no blender on PATH
    found = find_builds()
    assert [b.kind for b in found] == ["bpy"]
    assert found[0].version == "5.0.1"


def test_find_builds_finds_blender_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    blender = _fake_blender(bin_dir, "blender_version_4.2.3_lts.txt")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    found = find_builds()
    assert [b.kind for b in found] == ["bpy", "executable"]
    assert found[1] == BlenderBuild("executable", blender, "4.2.3", "0e22e4fcea03")
    assert find_builds(include_bpy=False) == [found[1]]
    assert find_builds(search_path=False, include_bpy=False) == []


def test_find_builds_extras_deduplicated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    blender = _fake_blender(bin_dir, "blender_version_5.0.1.txt")
    other = _fake_blender(tmp_path / "opt", "blender_version_4.2.3_lts.txt")
    link = tmp_path / "blender-link"
    link.symlink_to(blender)
    monkeypatch.setenv("PATH", str(bin_dir))
    found = find_builds([link, other, blender], include_bpy=False)
    assert [(b.path, b.version) for b in found] == [(blender, "5.0.1"), (other, "4.2.3")]


def test_find_builds_skips_broken_blender_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _script(tmp_path / "blender", "exit 1\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="renderers.builds"):
        assert find_builds(include_bpy=False) == []
    assert "Ignoring the blender found on PATH" in caplog.text


def test_find_builds_broken_extra_raises(tmp_path: Path) -> None:
    with pytest.raises(BlenderNotFoundError):
        find_builds([tmp_path / "missing-blender"], search_path=False, include_bpy=False)


def test_default_build_is_bpy_first() -> None:
    assert default_build().kind == "bpy"


def test_default_build_without_any_blender(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_bpy = _script(tmp_path / "python", "exit 1\n")
    monkeypatch.setattr(sys, "executable", str(no_bpy))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BlenderNotFoundError, match="No Blender found") as info:
        default_build()
    assert "pip install bpy" in info.value.hint

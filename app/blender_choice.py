"""Which Blender build a command uses: the one named with --blender, else the bpy module
(unless turned off in the settings), else the first `blender` found. One place, so every
command and the desktop app choose the same way and say the same thing when there is
none (the --blender option itself is `app.cli.options.add_blender_option`).

The bpy module found is remembered in `$TESSERA_HOME/bpy-build.json` with what identifies
its install (module file, size, time): the next command skips the probe (a Python that
imports bpy, about a second) until bpy changes. Named executables are probed every time."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from common.errors import BlenderNotFoundError
from common.settings import Settings
from renderers.builds import BlenderBuild, default_build, find_builds, probe_executable


def choose_build(explicit: Path | None, settings: Settings) -> BlenderBuild:
    if explicit is not None:
        return probe_executable(explicit)
    if settings.use_bpy:
        if settings.blender:  # named executables are checked every time (a broken one fails)
            return default_build(settings.blender)
        remembered = remembered_bpy(settings.home)
        if remembered is not None:
            return remembered
        build = default_build()
        if build.kind == "bpy":
            _remember_bpy(settings.home, build)
        return build
    builds = find_builds(settings.blender, include_bpy=False)
    if not builds:
        raise BlenderNotFoundError(
            "No Blender found: the bpy module is turned off (TESSERA_USE_BPY=false) and no "
            "`blender` executable is on PATH or in TESSERA_BLENDER."
        )
    return builds[0]


#: In $TESSERA_HOME: the bpy build found last time, with what identifies the install.
BPY_CACHE = "bpy-build.json"


def _bpy_identity() -> dict[str, object] | None:
    """What identifies this interpreter's bpy install without importing it (its module
    file's path, size and time): a reinstall changes it. None: no bpy here."""
    try:
        spec = importlib.util.find_spec("bpy")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    try:
        stat = Path(spec.origin).stat()
    except OSError:
        return None
    return {
        "python": sys.executable,
        "origin": spec.origin,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }


def remembered_bpy(home: Path) -> BlenderBuild | None:
    """The bpy build probed before for this very install (saves starting a Python that
    imports bpy, about a second, on every command); None when unknown or changed."""
    identity = _bpy_identity()
    if identity is None:
        return None
    try:
        data = json.loads((home / BPY_CACHE).read_text())
        if data.get("identity") != identity:
            return None
        return BlenderBuild(
            kind="bpy",
            path=Path(sys.executable),
            version=str(data["version"]),
            build_hash=str(data["build_hash"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _remember_bpy(home: Path, build: BlenderBuild) -> None:
    identity = _bpy_identity()
    if identity is None or build.path != Path(sys.executable):
        return
    record = {"identity": identity, "version": build.version, "build_hash": build.build_hash}
    try:
        home.mkdir(parents=True, exist_ok=True)
        partial = home / f".{BPY_CACHE}.{os.getpid()}"
        partial.write_text(json.dumps(record))
        partial.replace(home / BPY_CACHE)
    except OSError:
        pass  # only a shortcut: the next command probes again

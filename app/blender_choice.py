"""Which Blender build a command uses: the one named with --blender, else the bpy module
(unless turned off in the settings), else the first `blender` found. One place, so every
command and the desktop app choose the same way and say the same thing when there is
none (the --blender option itself is `app.cli.options.add_blender_option`).

The bpy module found is remembered in `$TESSERA_HOME/bpy-build.json` with what identifies
its install (`renderers.bpy_memo`): the next command skips the probe (a Python that
imports bpy, about a second) until bpy changes. Named executables are probed every time."""

from __future__ import annotations

from pathlib import Path

from common.errors import BlenderNotFoundError
from common.settings import Settings
from renderers.bpy_memo import remember_bpy, remembered_bpy
from renderers.builds import BlenderBuild, default_build, find_builds, probe_executable


def choose_build(explicit: Path | None, settings: Settings) -> BlenderBuild:
    if explicit is not None:
        return probe_executable(explicit)
    if settings.use_bpy:
        if settings.blender:  # named executables are checked every time (a broken one fails)
            return default_build(settings.blender)
        remembered = remembered_bpy(settings.home / BPY_CACHE)
        if remembered is not None:
            return remembered
        build = default_build()
        remember_bpy(settings.home / BPY_CACHE, build)
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

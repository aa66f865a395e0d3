"""Which Blender build a command uses: the one named with --blender, else the bpy module
(unless turned off in the settings), else the first `blender` found. One place, so every
command and the desktop app choose the same way and say the same thing when there is
none (the --blender option itself is `app.cli.options.add_blender_option`)."""

from __future__ import annotations

from pathlib import Path

from common.errors import BlenderNotFoundError
from common.settings import Settings
from renderers.builds import BlenderBuild, default_build, find_builds, probe_executable


def choose_build(explicit: Path | None, settings: Settings) -> BlenderBuild:
    if explicit is not None:
        return probe_executable(explicit)
    if settings.use_bpy:
        return default_build(settings.blender)
    builds = find_builds(settings.blender, include_bpy=False)
    if not builds:
        raise BlenderNotFoundError(
            "No Blender found: the bpy module is turned off (TESSERA_USE_BPY=false) and no "
            "`blender` executable is on PATH or in TESSERA_BLENDER."
        )
    return builds[0]

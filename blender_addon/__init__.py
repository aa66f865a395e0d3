"""Tessera: submit the open scene to a Tessera render farm from Blender, follow the job
and bring its frames home.

A Blender 4.2+ extension (see blender_manifest.toml). Preferences hold the coordinator's
URL and a token (or a LAN farm's name and secret to join with); the Output properties get
a Tessera panel. The network runs on worker threads in the UI (results handed to
`bpy.app.timers` or a modal timer), synchronously in background mode (`blender -b`), so
scripts can drive it.
"""

from __future__ import annotations

from . import connect, follow, operators, ui


def register() -> None:
    ui.register()
    connect.register()
    follow.register()
    operators.register()


def unregister() -> None:
    operators.unregister()
    follow.unregister()
    connect.unregister()
    ui.unregister()

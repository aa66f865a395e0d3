"""The bpy build, remembered in a file so that a command need not probe it again.

Finding the bpy module's version means starting a Python that imports bpy (about a
second of CPU, `renderers.builds.probe_bpy`). `remembered_bpy(file)` returns the build
stored there by `remember_bpy` when what identifies this interpreter's bpy install (its
module file's path, size and time, found without importing it) is unchanged, so a
reinstall is probed again. The CLI, the app and `tessera node` keep the file in
`$TESSERA_HOME` (`bpy-build.json`).

This module must not import bpy; a file it cannot read or write costs only the saving.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

from common.json_files import write_json_atomically
from renderers.builds import BlenderBuild, probe_bpy


def bpy_identity() -> dict[str, object] | None:
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


def remembered_bpy(memo: Path) -> BlenderBuild | None:
    """The bpy build stored in `memo` for this very install; None when unknown or changed."""
    identity = bpy_identity()
    if identity is None:
        return None
    try:
        data = json.loads(memo.read_text())
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


def remember_bpy(memo: Path, build: BlenderBuild) -> None:
    """Store `build` (this interpreter's bpy build) in `memo`; anything else is ignored."""
    identity = bpy_identity()
    if identity is None or build.kind != "bpy" or build.path != Path(sys.executable):
        return
    record = {"identity": identity, "version": build.version, "build_hash": build.build_hash}
    with contextlib.suppress(OSError):  # only a shortcut: the next command probes again
        write_json_atomically(memo, record)


def probe_bpy_remembered(memo: Path | None) -> BlenderBuild | None:
    """This interpreter's bpy build: from `memo` when it knows it, else probed (and then
    stored there); None without a bpy module. `memo` None: always probed."""
    if memo is not None:
        known = remembered_bpy(memo)
        if known is not None:
            return known
    build = probe_bpy()
    if build is not None and memo is not None:
        remember_bpy(memo, build)
    return build

"""The extra Blender builds a user registered (``tessera blender add PATH``), kept in a file.

A node renders with one main build (`renderers.builds`) and may offer more: a scene saved
by Blender 4.2 renders on a 4.2 build, one saved by 5.0 on a 5.0 build
(`common.blender_versions`). The registry is a small JSON file (``$TESSERA_HOME/
blender-builds.json``): a list of ``{"path", "kind", "version", "build_hash"}``, each
build identified when it is added (``blender --version``, or ``import bpy`` in a Python
interpreter), so a broken path is refused then, with the reason. `load_builds` probes
them again when a node starts (a build replaced or removed since is skipped with a
warning). Writes are atomic (a temporary file renamed over the old one).

This module must not import ``bpy`` or touch the network.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from common.errors import BlenderNotFoundError, UsageError
from renderers.builds import BlenderBuild, probe_bpy, probe_executable

__all__ = ["add_build", "identify_build", "load_builds", "registered", "remove_build"]

log = logging.getLogger(__name__)


def identify_build(path: Path) -> BlenderBuild:
    """The build at `path`: a Blender executable, or a Python interpreter with bpy.

    Raises `BlenderNotFoundError` naming what is wrong.
    """
    absolute = path.expanduser().absolute()
    if absolute.is_file() and absolute.name.startswith("python") and os.access(absolute, os.X_OK):
        build = probe_bpy(absolute)
        if build is None:
            raise BlenderNotFoundError(
                f"{absolute} is a Python interpreter without a usable bpy module.",
                hint="Install bpy into it (pip install bpy==X.Y.Z) or give a Blender executable.",
            )
        return build
    return probe_executable(absolute)


def registered(registry: Path) -> list[dict[str, str]]:
    """The registry's entries, in the order added; [] when there is no file yet."""
    try:
        data = json.loads(registry.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"The Blender build list {registry} cannot be read: {exc}",
            hint="Fix or delete the file, then add the builds again (tessera blender add).",
        ) from exc
    if not isinstance(data, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("path"), str) for entry in data
    ):
        raise UsageError(
            f"The Blender build list {registry} is not a list of builds.",
            hint="Delete the file, then add the builds again (tessera blender add).",
        )
    return data


def add_build(registry: Path, path: Path) -> BlenderBuild:
    """Identify the build at `path` and add it (again: replaced) to the registry."""
    build = identify_build(path)
    entries = [e for e in registered(registry) if Path(e["path"]) != build.path]
    entries.append(
        {
            "path": str(build.path),
            "kind": build.kind,
            "version": build.version,
            "build_hash": build.build_hash,
        }
    )
    _write(registry, entries)
    return build


def remove_build(registry: Path, path: Path) -> bool:
    """Forget the build at `path`; False when it was not registered."""
    absolute = path.expanduser().absolute()
    entries = registered(registry)
    kept = [e for e in entries if Path(e["path"]) != absolute]
    if len(kept) == len(entries):
        return False
    _write(registry, kept)
    return True


def load_builds(registry: Path) -> list[BlenderBuild]:
    """The registered builds that still work (each probed again; broken ones skipped
    with a warning, since a node must start with what it has)."""
    builds: list[BlenderBuild] = []
    for entry in registered(registry):
        try:
            builds.append(identify_build(Path(entry["path"])))
        except BlenderNotFoundError as exc:
            log.warning("Skipping the registered Blender %s: %s", entry["path"], exc.message)
    return builds


def _write(registry: Path, entries: list[dict[str, str]]) -> None:
    registry.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".blender-builds-", dir=registry.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(entries, stream, indent=1)
        Path(temp).replace(registry)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise

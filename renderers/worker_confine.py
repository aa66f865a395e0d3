"""Runs INSIDE Blender, beside worker_main.py: does a loaded scene read only files inside
its bundle? Every datablock with a path, node file paths, modifier caches and bakes,
geometry-nodes file imports and sequencer strips are resolved and compared with the
bundle's folder.

Standard library and bpy only (it is loaded by worker_main.py, which must stay
self-contained); it reads paths and never opens them.
"""

from __future__ import annotations

import os
from typing import Any

import bpy

_SINGULAR = {"libraries": "library", "movieclips": "movie clip", "node_groups": "node group"}


def _external_paths() -> list[tuple[str, str, Any]]:
    """(what, stored path, library) of every file path in bpy.data: the datablocks
    above, any other datablock with a `filepath`, node file paths (IES, OSL scripts),
    modifier caches (mesh cache, ocean, fluid) and sequencer strips."""
    found: list[tuple[str, str, Any]] = []

    def add(what: str, path: Any, library: Any = None) -> None:
        if isinstance(path, str) and path and not path.startswith("<"):
            found.append((what, path, library))

    for name in dir(bpy.data):
        collection = getattr(bpy.data, name, None)
        if not isinstance(collection, bpy.types.bpy_prop_collection):
            continue
        for datablock in collection:
            singular = _SINGULAR.get(name, name.removesuffix("s").replace("_", " "))
            label = f"{singular} '{datablock.name}'"
            owner = getattr(datablock, "library", None)
            if getattr(datablock, "packed_file", None) is not None:
                continue
            add(label, getattr(datablock, "filepath", None), owner)
            tree = getattr(datablock, "node_tree", None)
            for nodes in (getattr(tree, "nodes", ()), getattr(datablock, "nodes", ()) or ()):
                for node in nodes:
                    what = f"{label} node '{node.name}'"
                    add(what, getattr(node, "filepath", None), owner)
                    add(what, getattr(node, "directory", None), owner)
                    for socket in getattr(node, "inputs", ()):
                        # Geometry nodes' Import OBJ/PLY/STL/CSV/Text/VDB read any path.
                        if socket.bl_idname != "NodeSocketStringFilePath":
                            continue
                        if socket.is_linked:
                            found.append((f"{what} ({socket.name})", _COMPUTED, owner))
                        else:
                            add(what, socket.default_value, owner)
            for modifier in getattr(datablock, "modifiers", ()) or ():
                for attr in ("filepath", "cache_directory", "bake_directory"):
                    add(f"{label} modifier '{modifier.name}'", getattr(modifier, attr, ""), owner)
                for bake in getattr(modifier, "bakes", ()) or ():
                    add(f"{label} modifier '{modifier.name}'", bake.directory, owner)
                domain = getattr(modifier, "domain_settings", None)
                add(f"{label} modifier '{modifier.name}'", getattr(domain, "cache_directory", ""))
                cache = getattr(modifier, "point_cache", None)
                if cache is not None and getattr(cache, "use_external", False):
                    add(f"{label} modifier '{modifier.name}'", cache.filepath, owner)
    for scene in bpy.data.scenes:
        editor = scene.sequence_editor
        strips = getattr(editor, "strips_all", None) or getattr(editor, "sequences_all", ())
        for strip in strips or ():
            label = f"sequencer strip '{strip.name}'"
            add(label, getattr(strip, "filepath", None), scene.library)
            directory = getattr(strip, "directory", None)
            if directory:
                for element in getattr(strip, "elements", ()) or ():
                    add(label, directory + element.filename, scene.library)
                add(label, directory, scene.library)
    return found


#: Stands for a file path a node computes: it cannot be checked before it is read.
_COMPUTED = "<a path computed by the node tree>"


def check_confined(root: str | None, failure: type[Exception]) -> None:
    """Refuse (`failure("external_path", ...)`) a loaded file that would read outside
    `root`: the second line of defence behind the parent's trace of the .blend
    (renderers.scene_paths)."""
    if not root:
        return
    real_root = os.path.realpath(root)
    for what, path, library in _external_paths():
        if path == _COMPUTED:
            raise failure(
                "external_path",
                f"The scene's {what} reads a file by a path the node tree computes; this "
                "node renders only files it can check are inside the bundle.",
            )
        absolute = bpy.path.abspath(path, library=library)
        real = os.path.realpath(absolute)
        if os.path.commonpath([real_root, real]) != real_root:
            raise failure(
                "external_path",
                f"The scene's {what} reads '{path}', which is outside the scene's bundle; "
                "this node renders only files inside the bundle.",
            )

"""Confine a scene to its bundle: every file it would read must lie inside one folder.

A requester's scene can name any file on the provider's machine: an image, font, volume,
cache, sound, movie clip or library by an absolute path or by `//../../..`, and Blender
would render the provider's picture into the frame it sends back. `check_scene_paths`
traces the .blend and its libraries with blender-asset-tracer (no Blender, nothing of the
scene runs) and raises `ExternalPathError` naming the first datablock whose path
resolves (symlinks followed) outside the folder. A missing file inside the folder is
fine: Blender renders it pink. Inside Blender, `worker_main` checks the same again on
`bpy.data` after loading (the second line of defence, for anything BAT does not know).

This module never imports bpy and never touches the network.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from blender_asset_tracer import blendfile, trace
from blender_asset_tracer.blendfile.exceptions import BlendFileError, SegmentationFault
from blender_asset_tracer.trace import blocks2assets, file2blocks, file_sequence, result

from common.errors import CorruptSceneError, ExternalPathError

__all__ = ["ScenePath", "bundle_root", "check_scene_paths", "outside", "scene_paths"]

log = logging.getLogger(__name__)

#: BAT keeps a process-wide cache of open .blend files: one trace at a time.
_TRACE_LOCK = threading.Lock()

#: What a two-letter ID code means, for messages a person reads.
_KINDS = {
    b"IM": "image",
    b"LI": "library",
    b"VF": "font",
    b"VO": "volume",
    b"CF": "cache file",
    b"SO": "sound",
    b"MC": "movie clip",
    b"ME": "mesh",
    b"OB": "object",
    b"SC": "scene",
    b"LA": "light",
}


@dataclass(frozen=True, slots=True)
class ScenePath:
    """One external path a scene uses: who uses it, the path as stored, where it leads."""

    datablock: str
    kind: str
    stored: str
    resolved: Path


def bundle_root(scene: Path, scene_path: str) -> Path:
    """The folder a bundle was extracted to, from its scene file and the scene's
    '/'-separated path inside the bundle (`Lease.scene_path`)."""
    return scene.parents[scene_path.strip("/").count("/")]


def outside(path: str | os.PathLike[str], root: Path) -> bool:
    """Whether `path`, with every symlink followed, leads out of `root`."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return os.path.commonpath([real_root, real]) != real_root


def scene_paths(scene: Path) -> Iterator[ScenePath]:
    """Every external path `scene` and its libraries use (sequences expanded to their
    files as well), as blender-asset-tracer reads them. Raises CorruptSceneError for a
    file BAT cannot read."""
    with _TRACE_LOCK:
        try:
            for usage in _deps(scene):
                raw = bytes(usage.block_name).split(b"\0", 1)[0]
                code = raw[:2]
                kind = _KINDS.get(code, usage.block.dna_type_name.lower())
                name = (raw[2:] if code in _KINDS else raw).decode(errors="replace")
                stored = bytes(usage.asset_path).decode(errors="replace")
                path = Path(usage.abspath)
                yield ScenePath(name, kind, stored, path)
                if usage.is_sequence:
                    try:
                        files = list(file_sequence.expand_sequence(path))
                    except file_sequence.DoesNotExist:
                        continue
                    for file in files:
                        yield ScenePath(name, f"{kind} sequence", stored, file)
        except (BlendFileError, OSError) as exc:
            raise CorruptSceneError(f"Cannot trace the files of {scene.name}: {exc}") from exc
        finally:
            blendfile.close_all_cached()


def _deps(scene: Path) -> Iterator[result.BlockUsage]:
    """`trace.deps`, except that a datablock BAT cannot follow (BAT 1.23 fails on some
    Blender 5 geometry-nodes modifiers) is logged and skipped rather than ending the
    trace: worker_main's check after loading and the sandbox still cover it."""
    blocks = file2blocks.BlockIterator()
    seen: set[int] = set()
    for block in trace.asset_holding_blocks(blocks.iter_blocks(blocks.open_blendfile(scene))):
        try:
            usages = list(blocks2assets.iter_assets(block))
        except SegmentationFault as exc:
            log.warning(
                "cannot trace the files of %s in %s (%s); Blender checks it after loading",
                bytes(block.id_name or block.code).decode(errors="replace"),
                scene.name,
                exc,
            )
            continue
        for usage in usages:
            if hash(usage) not in seen:
                seen.add(hash(usage))
                yield usage


def check_scene_paths(scene: Path, root: Path) -> None:
    """Raise ExternalPathError unless `scene` and every file it (or a library of it)
    reads lies inside `root`, symlinks followed. Missing files inside `root` are fine."""
    if outside(scene, root):
        raise ExternalPathError(f"The scene {scene} is not inside its bundle {root}.")
    for used in scene_paths(scene):
        if outside(used.resolved, root):
            raise ExternalPathError(
                f"The scene's {used.kind} '{used.datablock}' reads "
                f"'{used.stored}', which is outside the scene's bundle; this node renders "
                "only files inside the bundle."
            )

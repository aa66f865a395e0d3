"""Slots: the folder a pre-started, confined Blender is shown before its bundle exists.

A confined render's sandbox shows Blender its bundle's folder and nothing else of the
machine, and a sandbox's mounts are fixed when it starts. To start Blender before the
lease arrives (`TaskRunner.prestart`), the runner starts it with the view of an empty
*slot* folder; when a lease for a new bundle comes, `fill_slot` puts the bundle's files
into the slot (hard links from the extracted bundle, a copy where links cannot be made),
and the bind mount shows them to the running Blender at once.

A slot holds exactly one bundle for its whole life: `fill_slot` refuses a slot that is
not empty, and a slot is deleted with its worker (`remove_slot`). Nothing in a slot leads
out of it: the bundle's files are linked or copied, never symlinked, and a symlink met
in the source is refused (the bundle cache never extracts one).

This module only handles files: it never starts Blender or touches the network.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from common.errors import BundleError
from farm_node.errors import UnsafeBundleError

__all__ = ["fill_slot", "make_slot", "remove_slot"]


def make_slot(folder: Path) -> Path:
    """A new, empty slot at `folder` (whatever was there before is deleted first: a
    leftover of a node that died)."""
    remove_slot(folder)
    folder.mkdir(parents=True)
    return folder


def remove_slot(folder: Path) -> None:
    """Delete a slot and every file in it (a missing slot is fine)."""
    shutil.rmtree(folder, ignore_errors=True)


def fill_slot(slot: Path, bundle: Path) -> None:
    """Put every file of the extracted `bundle` into the empty `slot`, at the same
    relative paths: hard links, or copies where the two are on different filesystems
    (or the filesystem refuses links).

    Raises `BundleError` when the slot already holds files (a slot takes one bundle for
    its life), `UnsafeBundleError` when the bundle holds a symbolic link or a special
    file, and OSError for the disk's own failures (a full disk while copying).
    """
    if any(slot.iterdir()):
        raise BundleError(f"The slot {slot} already holds a bundle; a slot takes one bundle.")
    for folder, dirs, files in os.walk(bundle):
        source_dir = Path(folder)
        target_dir = slot / source_dir.relative_to(bundle)
        for name in dirs:
            if (source_dir / name).is_symlink():
                raise UnsafeBundleError(f"Refusing the bundle: {name!r} is a symbolic link.")
            (target_dir / name).mkdir()
        for name in files:
            source = source_dir / name
            if source.is_symlink():
                raise UnsafeBundleError(f"Refusing the bundle: {name!r} is a symbolic link.")
            if not source.is_file():
                raise UnsafeBundleError(f"Refusing the bundle: {name!r} is not a plain file.")
            _link_or_copy(source, target_dir / name)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(source, target, follow_symlinks=False)

"""Entry point of the frozen Tessera app (packaging/tessera.spec builds it with PyInstaller).

The same program is the whole `tessera` CLI (`app.cli:main`); with no arguments it opens
the desktop app, so double-clicking it (or the `tessera-app` executable the spec also
builds, which has no console window on Windows) does what a user expects.

Two things differ when frozen, because there `sys.executable` is this program, not a
Python interpreter:

- Tessera looks for Blender's bpy module by running ``sys.executable -I -c 'import
  bpy'``; a frozen app would only run itself. bpy is not bundled (see the spec), so the
  frozen app turns that probe off (``TESSERA_USE_BPY=false`` unless set) and renders with
  a Blender executable: ``--blender PATH``, ``TESSERA_BLENDER='["/opt/blender/blender"]'``
  or ``blender`` on PATH.
- The local farm that ``tessera render``/``demo`` and ``tessera app --screenshot`` start
  spawns ``sys.executable -m app.cli ARGS``; frozen, that arrives here as ``-m app.cli
  ARGS`` and runs the same CLI.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from app.cli import main

#: What the local farm (app/local_farm.py) puts before the CLI's arguments.
MODULE_PREFIX = ("-m", "app.cli")


def launch_args(argv: Sequence[str], frozen: bool) -> list[str]:
    """The CLI arguments for `argv` (without the program name)."""
    args = list(argv)
    if frozen and tuple(args[: len(MODULE_PREFIX)]) == MODULE_PREFIX:
        return args[len(MODULE_PREFIX) :]
    return args or ["app"]


def run(argv: Sequence[str] | None = None) -> int:
    frozen = bool(getattr(sys, "frozen", False))
    if frozen:
        os.environ.setdefault("TESSERA_USE_BPY", "false")
    return main(launch_args(sys.argv[1:] if argv is None else argv, frozen))


if __name__ == "__main__":
    raise SystemExit(run())

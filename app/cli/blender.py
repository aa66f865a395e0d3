"""`tessera blender add PATH`, `tessera blender list`, `tessera blender remove PATH`: the
extra Blender builds this machine's node offers (`renderers.build_registry`).

A node renders a job with a build of the Blender series that saved its scene; the builds
registered here are offered beside the main one (``tessera node`` reads the list when it
starts). No Qt here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from app.cli.options import Subparsers, add_json_option, print_json
from common.errors import UsageError
from common.settings import Settings

__all__ = ["add_commands", "registry_file"]


def registry_file(settings: Settings) -> Path:
    """Where the registered builds are listed: ``$TESSERA_HOME/blender-builds.json``."""
    return settings.home / "blender-builds.json"


def add_commands(sub: Subparsers) -> None:
    blender = sub.add_parser(
        "blender",
        help="register extra Blender builds for this machine's node",
        description="A node renders each job with a build of the Blender version (major.minor) "
        "that saved its scene. Register more builds here (Blender executables, or Python "
        "interpreters with a bpy module) to serve jobs of other versions.",
    )
    commands = blender.add_subparsers(title="blender commands", metavar="ACTION", required=True)
    add = commands.add_parser("add", help="identify a Blender build and offer it")
    add.add_argument("path", type=Path, help="a blender executable or a python with bpy")
    add_json_option(add)
    add.set_defaults(handler=cmd_blender_add)
    listing = commands.add_parser("list", help="the registered builds")
    add_json_option(listing)
    listing.set_defaults(handler=cmd_blender_list)
    remove = commands.add_parser("remove", help="stop offering a registered build")
    remove.add_argument("path", type=Path)
    remove.set_defaults(handler=cmd_blender_remove)


def cmd_blender_add(args: argparse.Namespace, settings: Settings) -> int:
    from renderers.build_registry import add_build

    build = add_build(registry_file(settings), args.path)
    if args.json:
        print_json(build.to_dict())
    else:
        print(f"Added {build.label}; `tessera node` offers it from its next start.")
    return 0


def cmd_blender_list(args: argparse.Namespace, settings: Settings) -> int:
    from renderers.build_registry import registered

    entries = registered(registry_file(settings))
    if args.json:
        print_json(entries)
    elif not entries:
        print("No extra Blender builds registered (tessera blender add PATH).")
    for entry in entries if not args.json else []:
        print(f"Blender {entry.get('version', '?')}  {entry['path']}")
    return 0


def cmd_blender_remove(args: argparse.Namespace, settings: Settings) -> int:
    from renderers.build_registry import remove_build

    if not remove_build(registry_file(settings), args.path):
        raise UsageError(
            f"{args.path} is not a registered Blender build.",
            hint="See `tessera blender list` for the registered paths.",
        )
    print(f"Removed {args.path}.")
    return 0

"""`tessera addon build` and `tessera addon install`: the Blender extension.

The extension's source is `blender_addon/`; `app.addon_build` makes the installable zip
(with blender-asset-tracer, zeroconf and ifaddr vendored as wheels) and installs it into
a Blender found on this machine. No Qt here.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from app.addon_build import build_extension, install_extension
from app.cli.options import Subparsers, add_json_option
from common.settings import Settings


def add_commands(sub: Subparsers) -> None:
    addon = sub.add_parser(
        "addon",
        help="build or install the Tessera add-on for Blender",
        description="The Tessera extension submits, follows and fetches renders from inside "
        "Blender (Output properties > Tessera).",
    )
    commands = addon.add_subparsers(title="addon commands", metavar="ACTION", required=True)

    build = commands.add_parser(
        "build",
        help="write the extension zip (install it with Blender's Install from Disk)",
    )
    build.add_argument(
        "--out",
        type=Path,
        default=Path("dist"),
        help="the zip to write, or a folder for tessera-VERSION.zip (default: dist/)",
    )
    add_json_option(build)
    build.set_defaults(handler=cmd_addon_build)

    install = commands.add_parser(
        "install",
        help="build the extension and install and enable it in a Blender on this machine",
    )
    install.add_argument(
        "--blender",
        type=Path,
        default=None,
        help="the Blender executable (default: `blender` on PATH, else the bpy module)",
    )
    install.add_argument(
        "--zip", type=Path, default=None, help="install this zip instead of building one"
    )
    add_json_option(install)
    install.set_defaults(handler=cmd_addon_install)


def cmd_addon_build(args: argparse.Namespace, settings: Settings) -> int:
    path = build_extension(args.out)
    if args.json:
        print(json.dumps({"zip": str(path)}, indent=2))
    else:
        print(f"Wrote {path}")
        print("Install it in Blender: Edit > Preferences > Get Extensions > Install from Disk.")
    return 0


def cmd_addon_install(args: argparse.Namespace, settings: Settings) -> int:
    with tempfile.TemporaryDirectory(prefix="tessera-addon-") as folder:
        zip_path = args.zip or build_extension(Path(folder))
        result = install_extension(zip_path, args.blender)
    if args.json:
        print(
            json.dumps(
                {
                    "blender": result.blender,
                    "blender_version": result.blender_version,
                    "extensions_dir": str(result.extensions_dir),
                    "enabled": result.enabled,
                },
                indent=2,
            )
        )
    else:
        state = "enabled" if result.enabled else "installed (enable it in Preferences)"
        print(f"Tessera add-on {state} in {result.blender} (Blender {result.blender_version})")
        print(f"  extensions folder: {result.extensions_dir}")
    return 0

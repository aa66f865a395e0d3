"""The `tessera` command line: parser assembly and dispatch.

Each command family adds its subcommands (`render`: inspect, render-local, devices;
`farm`: coordinator, node, join, app; `jobs`: submit, jobs, job, pause, resume, cancel,
priority, download; `local`: render, demo; `accounts`: nodes, wallet, grant, ledger,
provider, account create/list/revoke; `pools`: pool create/add/remove/list; `addon`:
addon build, addon install; `blender`: blender add/list/remove).
`main` parses, loads the settings once and runs the handler: every `TesseraError`
becomes a message and a hint on stderr with exit status 2; no traceback reaches the user.
No Qt is imported here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from app.cli import accounts, addon, blender, farm, jobs, local, pools, render
from app.cli.options import Handler
from common.errors import TesseraError
from common.settings import load_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 1
    settings = load_settings()
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except TesseraError as error:
        if getattr(args, "json", False):
            print(json.dumps({"error": error.to_dict()}, indent=2))
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera",
        description="Tessera: a distributed render farm for Blender.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    render.add_commands(sub)
    farm.add_commands(sub)
    jobs.add_submit(sub)
    local.add_commands(sub)
    jobs.add_commands(sub)
    accounts.add_commands(sub)
    accounts.add_account_commands(sub)
    pools.add_commands(sub)
    addon.add_commands(sub)
    blender.add_commands(sub)
    farm.add_app(sub)
    return parser

"""The `tessera` command line: parser assembly and dispatch.

Each command family adds its subcommands (`render`: inspect, render-local, devices;
`farm`: coordinator, node, join, app; `jobs`: submit, jobs, job, pause, resume, cancel,
priority, download; `local`: render, demo; `accounts`: nodes, wallet, grant, ledger,
provider, account create/list/revoke; `pools`: pool create/add/remove/list; `addon`:
addon build, addon install; `blender`: blender add/list/remove).
`main` parses, loads the settings once and runs the handler: every `TesseraError`
becomes a message and a hint on stderr with exit status 2; no traceback reaches the user.

Only the family of the command being run is imported (`COMMANDS`): a family's module
pulls in what its handlers need (pydantic models, the HTTP client, numpy...), and the
coordinator and nodes of a local farm are `tessera` processes too, so every module a
command does not need is start-up time paid three times over. `tessera --help`, an
unknown command or no command builds the whole parser. No Qt is imported here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from common.errors import TesseraError

if TYPE_CHECKING:
    from app.cli.options import Handler, Subparsers

#: (family module under app.cli, its function that adds commands, the commands it adds),
#: in the order `tessera --help` lists them. tests/test_cli.py checks it against what
#: each function really adds.
COMMANDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("render", "add_commands", ("inspect", "render-local", "devices")),
    ("farm", "add_commands", ("coordinator", "node", "join")),
    ("jobs", "add_submit", ("submit",)),
    ("local", "add_commands", ("render", "demo")),
    ("jobs", "add_commands", ("jobs", "job", "pause", "resume", "cancel", "priority", "download")),
    ("accounts", "add_commands", ("nodes", "wallet", "grant", "ledger", "provider")),
    ("accounts", "add_account_commands", ("account",)),
    ("pools", "add_commands", ("pool",)),
    ("addon", "add_commands", ("addon",)),
    ("blender", "add_commands", ("blender",)),
    ("farm", "add_app", ("app",)),
)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_of(arguments))
    args = parser.parse_args(arguments)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 1
    from common.settings import load_settings

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


def command_of(arguments: Sequence[str]) -> str | None:
    """The command `arguments` run, when it is one of `COMMANDS` (the first argument:
    `tessera` itself takes no options but --help); None otherwise."""
    if not arguments or arguments[0] not in _FAMILY_OF:
        return None
    return arguments[0]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `tessera` parser: every command, or only those of `command`'s family (whose
    module alone is imported) when it is given."""
    parser = argparse.ArgumentParser(
        prog="tessera",
        description="Tessera: a distributed render farm for Blender.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    wanted = _FAMILY_OF.get(command) if command is not None else None
    for module, function, _commands in COMMANDS:
        if wanted is None or (module, function) == wanted:
            add_family(sub, module, function)
    return parser


def add_family(sub: Subparsers, module: str, function: str) -> None:
    """Import `app.cli.<module>` and let its `function` add its commands to `sub`."""
    getattr(importlib.import_module(f"app.cli.{module}"), function)(sub)


_FAMILY_OF: dict[str, tuple[str, str]] = {
    command: (module, function) for module, function, commands in COMMANDS for command in commands
}

"""The CLI imports only the family of the command being run (app/cli/main.py COMMANDS):
the table matches what each family adds, a partial parser gives each command the same
options and help as the whole one, and a command's start leaves the others' heavy
modules unloaded (docs/render-overhead.md)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli.main import COMMANDS, build_parser, command_of, main

REPO = Path(__file__).resolve().parents[1]


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_table_lists_what_each_family_adds_in_order() -> None:
    for module, function, commands in COMMANDS:
        parser = argparse.ArgumentParser()
        getattr(importlib.import_module(f"app.cli.{module}"), function)(parser.add_subparsers())
        assert tuple(_commands(parser)) == commands, (module, function)
    listed = [command for _, _, commands in COMMANDS for command in commands]
    assert list(_commands(build_parser())) == listed
    assert len(set(listed)) == len(listed)


@pytest.mark.parametrize(
    "command", [command for _, _, commands in COMMANDS for command in commands]
)
def test_a_partial_parser_gives_the_command_the_same_help(command: str) -> None:
    whole = _commands(build_parser())[command]
    partial = _commands(build_parser(command))[command]
    assert partial.format_help() == whole.format_help()


def test_only_a_known_first_argument_picks_a_family() -> None:
    assert command_of(["render", "scene.blend"]) == "render"
    assert command_of(["--help"]) is None
    assert command_of([]) is None
    assert command_of(["rendr"]) is None
    assert command_of(["scene.blend", "render"]) is None


def test_an_unknown_command_is_refused_with_the_whole_list(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["rendr"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'rendr'" in error
    assert "'render'" in error and "'coordinator'" in error and "'pool'" in error


def test_no_command_prints_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 1
    listing = capsys.readouterr().out
    for _, _, commands in COMMANDS:
        for command in commands:
            assert command in listing


_LOADED = """
import json, sys
from app.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)))
"""


def _loaded_by(*argv: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _LOADED, *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    ("argv", "absent"),
    [
        (("coordinator", "--help"), {"app.cli.jobs", "app.cli.local", "app.job_spec", "numpy"}),
        (("node", "--help"), {"app.cli.jobs", "app.cli.accounts", "app.job_spec", "zeroconf"}),
        (("render", "--help"), {"app.cli.farm", "app.cli.accounts", "zeroconf", "fastapi"}),
        (("jobs", "--help"), {"app.cli.local", "app.cli.farm", "numpy", "zeroconf"}),
    ],
)
def test_a_command_loads_only_its_own_family(argv: tuple[str, ...], absent: set[str]) -> None:
    loaded = _loaded_by(*argv)
    assert not loaded & absent, sorted(loaded & absent)
    assert not {name for name in loaded if name.startswith("PySide6")}


def test_the_coordinator_loads_zeroconf_only_for_lan_mode() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "import sys, coordinator.server; print('zeroconf' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"

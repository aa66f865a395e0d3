"""Structural rules that keep the codebase honest: Qt only in app/, Blender only in
renderers/, and every CLI command documented in README.md."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from app.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "renderers", "coordinator", "farm_node", "protocol", "app")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", [p for p in PACKAGES if p != "app"])
def test_no_qt_outside_app(package: str) -> None:
    offenders = [
        str(path.relative_to(REPO))
        for path in _modules(package)
        if _imports(path) & {"PySide6", "PyQt5", "PyQt6", "shiboken6"}
    ]
    assert not offenders, f"Qt imported outside app/: {offenders}"


@pytest.mark.parametrize("package", [p for p in PACKAGES if p != "renderers"])
def test_blender_only_in_renderers(package: str) -> None:
    offenders = [
        str(path.relative_to(REPO))
        for path in _modules(package)
        if _imports(path) & {"bpy", "mathutils", "_cycles"}
    ]
    assert not offenders, f"bpy imported outside renderers/: {offenders}"


def test_bpy_only_in_the_worker_process() -> None:
    offenders = [
        path.name
        for path in _modules("renderers")
        # worker_finish.py is loaded by worker_main.py, inside the same Blender process.
        if "bpy" in _imports(path) and path.name not in ("worker_main.py", "worker_finish.py")
    ]
    assert not offenders, f"bpy imported in the parent process: {offenders}"


def test_renderers_never_touch_the_network() -> None:
    network = {"requests", "socket", "urllib", "http", "zeroconf", "fastapi", "uvicorn"}
    offenders = [path.name for path in _modules("renderers") if _imports(path) & network]
    assert not offenders, offenders


def test_every_cli_command_is_documented_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [name for name in commands.choices if f"tessera {name}" not in readme]
    assert not missing, f"commands without a README section: {missing}"

"""Structural rules that keep the codebase honest: Qt only in app/, Blender only in
renderers/, and every CLI command documented in README.md."""

from __future__ import annotations

import argparse
import ast
import re
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
        # worker_finish.py and worker_confine.py are loaded by worker_main.py, inside the
        # same Blender process.
        if "bpy" in _imports(path) and path.name not in BLENDER_SIDE
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


# --- the coordinator's rooms -----------------------------------------------------------------

MAX_MODULE_LINES = 700
BLENDER_SIDE = ("worker_main.py", "worker_finish.py", "worker_confine.py")
#: SQL that changes a task's or a job's status (or a frame's), or creates a task or job.
STATUS_WRITE = re.compile(
    r"\bUPDATE\s+(?:tasks|jobs|frames)\s+SET\b(?:(?!\bWHERE\b).)*\bstatus\s*="
    r"|\bINSERT\s+(?:OR\s+\w+\s+)?INTO\s+(?:tasks|jobs|frames)\b",
    re.IGNORECASE | re.DOTALL,
)
#: The state machine: tasks and jobs in one module, frames in its sibling.
STATE_MACHINE = (REPO / "coordinator" / "task_states.py", REPO / "coordinator" / "frame_states.py")


def _sql_strings(path: Path) -> list[str]:
    """Every string literal of a module (adjacent literals are one; f-strings joined)."""
    texts: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append(node.value)
        elif isinstance(node, ast.JoinedStr):
            texts.append(
                "".join(
                    part.value if isinstance(part, ast.Constant) else "?" for part in node.values
                )
            )
    return texts


@pytest.mark.parametrize("package", ["coordinator", "protocol"])
def test_no_module_is_over_700_lines(package: str) -> None:
    long = {
        str(path.relative_to(REPO)): lines
        for path in _modules(package)
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split these modules (at most {MAX_MODULE_LINES} lines): {long}"


def test_the_status_pattern_finds_status_writes() -> None:
    assert STATUS_WRITE.search("UPDATE tasks SET status = ?, lease_id = NULL WHERE id = ?")
    assert STATUS_WRITE.search("UPDATE jobs SET message = ?, status = ? WHERE id = ?")
    assert STATUS_WRITE.search("INSERT OR IGNORE INTO tasks (id, job_id) VALUES (?, ?)")
    assert not STATUS_WRITE.search("UPDATE jobs SET priority = ? WHERE id = ? AND status = ?")
    assert not STATUS_WRITE.search("UPDATE nodes SET current_task = NULL WHERE id = ?")


def test_statuses_change_only_in_the_task_state_machine() -> None:
    offenders = [
        f"{path.relative_to(REPO)}: {' '.join(text.split())[:90]}"
        for path in _modules("coordinator")
        if path not in STATE_MACHINE
        for text in _sql_strings(path)
        if STATUS_WRITE.search(text)
    ]
    assert not offenders, f"status written outside the state machine: {offenders}"
    for module in STATE_MACHINE:
        assert any(STATUS_WRITE.search(text) for text in _sql_strings(module))


def test_the_http_layer_runs_no_sql() -> None:
    sql = re.compile(r"\.execute\(|\.executemany\(|\bdb\.query|\bdb\.fetch_one|\bdb\.transaction")
    offenders = [
        str(path.relative_to(REPO))
        for path in (REPO / "coordinator" / "http").rglob("*.py")
        if sql.search(path.read_text()) or {"sqlite3"} & _imports(path)
    ]
    assert not offenders, f"SQL in the HTTP layer: {offenders}"

"""Find the Blender builds this machine can render with, and how to start a worker on one.

Two kinds of build exist: the ``bpy`` module installed in a Python interpreter (``pip
install bpy==5.0.1``, Python 3.11) and a ``blender`` executable. Both are identified by
running them in a SUBPROCESS (``python -I -c 'import bpy ...'`` or ``blender --version``):
this process never imports ``bpy``, since that loads all of Blender (about a second and
hundreds of MB) and cannot be undone.

`parse_blender_version_output` is a pure parser tested on captured ``--version`` output.
Probes are cached per path for the life of the process (`clear_probe_cache` forgets them).
This module must not import ``bpy``, touch the network, or pick a build silently when the
one a user named is broken.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.errors import BlenderNotFoundError

__all__ = [
    "BlenderBuild",
    "clear_probe_cache",
    "default_build",
    "find_builds",
    "parse_blender_version_output",
    "probe_bpy",
    "probe_executable",
]

log = logging.getLogger(__name__)

# "Blender 5.0.1", "Blender 4.2.3 LTS", "Blender 4.3" and the start-up banner
# "Blender 4.2.3 LTS (hash 0e22e4fcea03 built 2024-10-14 23:31:34)".
_VERSION_RE = re.compile(r"^\s*Blender\s+(\d+\.\d+(?:\.\d+)?)\b(?P<rest>.*)$", re.MULTILINE)
_HASH_LINE_RE = re.compile(r"^\s*build hash:\s*([0-9A-Za-z]+)\s*$", re.MULTILINE)
_HASH_BANNER_RE = re.compile(r"\(hash\s+([0-9A-Za-z]+)")
_UNKNOWN_HASH = "unknown"
_EXECUTABLE_HINT = (
    "Pass the path of a Blender executable (e.g. /opt/blender-4.2/blender) with --blender."
)
_PROBE_MARKER = "TESSERA_BPY_PROBE "
# Runs in the interpreter being probed: prints one marked JSON line (Blender may print
# its own messages around it).
_BPY_PROBE_CODE = (
    "import json, bpy\n"
    "h = bpy.app.build_hash\n"
    "print(" + repr(_PROBE_MARKER) + " + json.dumps({"
    "'version': '.'.join(str(p) for p in bpy.app.version), "
    "'version_string': bpy.app.version_string, "
    "'build_hash': h.decode('ascii', 'replace') if isinstance(h, bytes) else str(h)}), "
    "flush=True)\n"
)


@dataclass(frozen=True, slots=True)
class BlenderBuild:
    """One Blender a render worker can be started with."""

    kind: Literal["bpy", "executable"]
    path: Path  # the Python interpreter that has bpy, or the blender executable
    version: str  # "5.0.1"
    build_hash: str  # "a3db93c5b259", or "unknown"

    @property
    def label(self) -> str:
        """A one-line description for people: version, hash and where it lives."""
        where = f"bpy module in {self.path}" if self.kind == "bpy" else f"executable {self.path}"
        return f"Blender {self.version} ({self.build_hash}, {where})"

    def worker_command(self, script: Path) -> list[str]:
        """The argv that runs `script` inside this build (a fresh, isolated process)."""
        if self.kind == "bpy":
            # -I: no user site-packages or PYTHON* variables; -u: unbuffered progress lines.
            return [str(self.path), "-I", "-u", str(script)]
        return [
            str(self.path),
            "-b",
            "--factory-startup",
            "--disable-autoexec",
            "--python-exit-code",
            "1",
            "--python",
            str(script),
        ]

    def to_dict(self) -> dict[str, str]:
        """JSON-ready fields, for ``tessera devices --json`` and node reports."""
        return {
            "kind": self.kind,
            "path": str(self.path),
            "version": self.version,
            "build_hash": self.build_hash,
            "label": self.label,
        }


def parse_blender_version_output(text: str) -> tuple[str, str]:
    """``(version, build_hash)`` from ``blender --version`` output, e.g. ``("4.2.3", "...")``.

    Accepts the full ``--version`` block ("Blender 4.2.3 LTS" then tab-indented ``build
    ...:`` lines) and the start-up banner ("Blender 4.2.3 LTS (hash ... built ...)").
    A missing hash gives ``"unknown"``; no version line raises `BlenderNotFoundError`.
    """
    match = _VERSION_RE.search(text)
    if match is None:
        first = text.strip().splitlines()[0][:80] if text.strip() else "(no output)"
        raise BlenderNotFoundError(
            f"This does not look like Blender: no 'Blender X.Y' line in its --version "
            f"output (first line: {first!r})"
        )
    version = match.group(1)
    hash_match = _HASH_LINE_RE.search(text) or _HASH_BANNER_RE.search(match.group("rest"))
    return version, hash_match.group(1) if hash_match else _UNKNOWN_HASH


@functools.lru_cache(maxsize=32)
def _probe_bpy_cached(python: str, timeout: float) -> BlenderBuild | None:
    try:
        completed = subprocess.run(
            [python, "-I", "-c", _BPY_PROBE_CODE],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("Could not run %s to look for the bpy module: %s", python, exc)
        return None
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(_PROBE_MARKER):
            try:
                data = json.loads(line[len(_PROBE_MARKER) :])
                return BlenderBuild(
                    kind="bpy",
                    path=Path(python),
                    version=str(data["version"]),
                    build_hash=str(data["build_hash"]) or _UNKNOWN_HASH,
                )
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("Unreadable bpy probe output from %s: %s", python, exc)
                return None
    last = completed.stderr.strip().splitlines()[-1:] or ["(no error output)"]
    log.warning("No usable bpy module in %s: %s", python, last[0][:200])
    return None


def probe_bpy(python: Path | None = None, timeout: float = 60) -> BlenderBuild | None:
    """The bpy build importable by `python` (default: this interpreter), or ``None``.

    Runs ``python -I -c 'import bpy ...'`` in a subprocess (about a second) and caches the
    answer per interpreter. A missing bpy, a crash or a timeout logs a warning and gives
    ``None``: having no bpy module is normal on a machine with a Blender executable.
    """
    # Keep the path as given (a venv's python is a link to the base interpreter, which
    # would not see the venv's site-packages).
    interpreter = Path(sys.executable) if python is None else python
    return _probe_bpy_cached(str(interpreter.absolute()), timeout)


@functools.lru_cache(maxsize=32)
def _probe_executable_cached(path: str, timeout: float) -> BlenderBuild:
    hint = _EXECUTABLE_HINT
    try:
        completed = subprocess.run(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BlenderNotFoundError(
            f"{path} did not answer --version within {timeout:g} s", hint=hint
        ) from exc
    except OSError as exc:
        raise BlenderNotFoundError(
            f"Could not run {path}: {exc.strerror or exc}", hint=hint
        ) from exc
    if completed.returncode != 0:
        tail = (completed.stderr.strip().splitlines() or ["(no error output)"])[-1][:200]
        raise BlenderNotFoundError(
            f"{path} --version failed with exit code {completed.returncode}: {tail}", hint=hint
        )
    try:
        version, build_hash = parse_blender_version_output(completed.stdout)
    except BlenderNotFoundError as exc:
        raise BlenderNotFoundError(f"{path}: {exc.message}", hint=hint) from exc
    return BlenderBuild(kind="executable", path=Path(path), version=version, build_hash=build_hash)


def probe_executable(path: Path, timeout: float = 60) -> BlenderBuild:
    """Identify the Blender executable at `path` by running ``path --version``.

    Raises `BlenderNotFoundError` (with a hint) when the file is missing, not executable,
    fails, times out or is not Blender. Successful probes are cached per path.
    """
    absolute = path.absolute()
    hint = _EXECUTABLE_HINT
    if not absolute.exists():
        raise BlenderNotFoundError(f"No Blender executable at {absolute}", hint=hint)
    if not absolute.is_file() or not os.access(absolute, os.X_OK):
        raise BlenderNotFoundError(f"{absolute} is not an executable file", hint=hint)
    return _probe_executable_cached(str(absolute), timeout)


def clear_probe_cache() -> None:
    """Forget every cached probe (after installing or removing a Blender)."""
    _probe_bpy_cached.cache_clear()
    _probe_executable_cached.cache_clear()


def _identity(build: BlenderBuild) -> Path:
    return build.path.resolve()


def find_builds(
    extra_executables: Sequence[Path] = (),
    *,
    search_path: bool = True,
    include_bpy: bool = True,
) -> list[BlenderBuild]:
    """Every usable Blender, best first: this interpreter's bpy, `blender` on PATH, extras.

    Builds are de-duplicated by resolved path. A broken ``blender`` found on PATH is
    skipped with a warning; a broken executable named in `extra_executables` raises
    `BlenderNotFoundError`, since a user asked for it by name.
    """
    builds: list[BlenderBuild] = []
    seen: set[Path] = set()

    def add(build: BlenderBuild) -> None:
        identity = _identity(build)
        if identity not in seen:
            seen.add(identity)
            builds.append(build)

    if include_bpy:
        bpy_build = probe_bpy()
        if bpy_build is not None:
            add(bpy_build)
    if search_path:
        found = shutil.which("blender")
        if found is not None:
            try:
                add(probe_executable(Path(found)))
            except BlenderNotFoundError as exc:
                log.warning("Ignoring the blender found on PATH: %s", exc.message)
    for executable in extra_executables:
        add(probe_executable(executable))
    return builds


def default_build(extra_executables: Sequence[Path] = ()) -> BlenderBuild:
    """The build to render with when none is named: the first of `find_builds`."""
    builds = find_builds(extra_executables)
    if not builds:
        raise BlenderNotFoundError(
            f"No Blender found: no bpy module in {sys.executable} and no blender on PATH"
        )
    return builds[0]

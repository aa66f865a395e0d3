"""Shared fixtures: isolated settings, real Blender builds and scenes, and leak checks.

Every test runs with TESSERA_* settings pointed at a temporary folder (never the user's
real config) and fails if it leaves a thread or a child process behind.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from renderers.builds import BlenderBuild, probe_bpy
from renderers.demo_scene import generate_demo_scene
from renderers.worker import RenderWorker

pytest_plugins = ["tests.coordinator_tools", "tests.postgres_tools"]

REPO = Path(__file__).resolve().parent.parent
SHARED_SCENES = REPO.parent / "shared" / "scenes"
BAT_SCENES = SHARED_SCENES / "bat"


def _child_pids() -> set[int]:
    me = str(os.getpid())
    children: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces: fields after the closing parenthesis.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[1] == me:
            children.add(int(entry.name))
    return children


@pytest.fixture(autouse=True)
def isolated_settings(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    home = tmp_path_factory.mktemp("tessera-home")
    for name in list(os.environ):
        if name.startswith("TESSERA_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TESSERA_HOME", str(home))
    return home


#: Threads that live as long as the process on purpose (renderers.worker's Blender starter).
LASTING = ("blender-start",)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    threads_before = set(threading.enumerate())
    children_before = _child_pids()
    yield
    deadline = time.monotonic() + 5
    while True:
        threads = [
            t
            for t in threading.enumerate()
            if t not in threads_before and t.is_alive() and not t.name.startswith(LASTING)
        ]
        children = _child_pids() - children_before
        if not (threads or children) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not threads, f"test leaked threads: {[t.name for t in threads]}"
    assert not children, f"test leaked child processes: {sorted(children)}"


@pytest.fixture(scope="session")
def bpy_build() -> BlenderBuild:
    build = probe_bpy()
    assert build is not None, "the test venv must have bpy 5.0.1 installed (make test does)"
    return build


@pytest.fixture(scope="session")
def demo_scene(bpy_build: BlenderBuild, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_scene(bpy_build, tmp_path_factory.mktemp("demo") / "demo.blend")


@pytest.fixture(scope="session")
def worker(bpy_build: BlenderBuild) -> Iterator[RenderWorker]:
    """One warm worker shared by tests that do not break it (started eagerly so the leak
    check sees it as already running)."""
    with RenderWorker(bpy_build) as shared:
        shared.start()
        yield shared


@pytest.fixture()
def fresh_worker(bpy_build: BlenderBuild) -> Iterator[RenderWorker]:
    """A worker of the test's own, for tests that crash, cancel or time it out."""
    with RenderWorker(bpy_build) as own:
        yield own


@pytest.fixture(scope="session")
def bat_scenes() -> Path:
    if not BAT_SCENES.is_dir():
        pytest.fail(f"shared test scenes missing at {BAT_SCENES}")
    return BAT_SCENES

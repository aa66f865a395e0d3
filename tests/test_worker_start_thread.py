"""A Blender worker outlives the thread that happened to start it.

A sandboxed Blender dies with the *thread* that started it (bubblewrap's
--die-with-parent uses the kernel's parent-death signal, which follows the thread), and
the threads that first use a worker come and go: a GPU warm-up's, the app's background
pool's. Real Blender, real bubblewrap.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from renderers.builds import BlenderBuild
from renderers.limits import RenderLimits
from renderers.sandbox import find_bwrap
from renderers.worker import RenderWorker

needs_bwrap = pytest.mark.skipif(
    find_bwrap() is None and not os.environ.get("CI"),
    reason="bubblewrap cannot sandbox here (CI installs it and runs this)",
)


@needs_bwrap
def test_a_sandboxed_worker_started_in_a_passing_thread_keeps_running(
    bpy_build: BlenderBuild, tmp_path: Path
) -> None:
    worker = RenderWorker(
        bpy_build, scratch_dir=tmp_path / "w", limits=RenderLimits(sandbox="bwrap")
    )
    try:
        starter = threading.Thread(target=worker.hello)
        starter.start()
        starter.join()
        assert worker.sandboxed and worker.starts == 1
        time.sleep(0.5)  # the parent-death signal, when it comes, comes at once
        assert worker.is_alive(), "the sandbox died with the thread that started it"
        worker.hello()
        assert worker.starts == 1, "the worker had to be started again"
    finally:
        worker.close()

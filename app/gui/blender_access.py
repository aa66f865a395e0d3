"""The one Blender worker the app uses to inspect, probe and pack scenes.

`BlenderAccess.worker()` returns a warm `RenderWorker`, choosing the build the first time
(`app.blender_choice.choose_build`: the bpy module, else a `blender` executable). Call it
only from background work: choosing a build and starting Blender take seconds. A worker
handed in (tests pass their shared one) is used as is and never closed here; one made
here is closed by `close()` when the window closes. No widgets.
"""

from __future__ import annotations

import threading
from pathlib import Path

from app.blender_choice import choose_build
from app.probe_memo import BenchmarkMemo
from common.settings import Settings, load_settings
from renderers.worker import RenderWorker

BUNDLES_FOLDER = "bundles"


class BlenderAccess:
    def __init__(self, settings: Settings | None = None, worker: RenderWorker | None = None):
        self._settings = settings
        self._given = worker
        self._owned: RenderWorker | None = None
        self._lock = threading.Lock()

    def settings(self) -> Settings:
        with self._lock:
            if self._settings is None:
                self._settings = load_settings()
            return self._settings

    def bundles_dir(self) -> Path:
        """Where packed bundles wait for their upload ($TESSERA_HOME/bundles)."""
        return self.settings().home / BUNDLES_FOLDER

    def benchmark_memo(self) -> BenchmarkMemo:
        """The probe's benchmark figure remembered on this machine (background threads
        only: it starts the worker)."""
        return BenchmarkMemo(self.settings().home, self.worker().build)

    def worker(self) -> RenderWorker:
        """The worker (background threads only)."""
        if self._given is not None:
            return self._given
        settings = self.settings()
        with self._lock:
            if self._owned is None:
                self._owned = RenderWorker(choose_build(None, settings))
            return self._owned

    def close(self) -> None:
        """Stop the Blender process this object started (call after background work
        has shut down)."""
        with self._lock:
            owned, self._owned = self._owned, None
        if owned is not None:
            owned.close()

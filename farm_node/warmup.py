"""A GPU worker's warm-up render: its kernels compiled before it takes any work.

Device presence is not readiness: on a card without a prebuilt Cycles kernel (an H100
with bpy 5.0.1) the first GPU render waits minutes for the driver to compile one
(docs/gpu-check.md). `WarmUp` renders the demo scene once, small, on the worker's own
device, in a thread, with its own generous time limit (not a task's); the daemon reports
its `state` to the coordinator, which leases nothing to the worker until it is "ready".
A failed warm-up leaves the worker "failed" with the reason: it never falls back to the
CPU. The compiled kernels stay in the caches of `farm_node.workers.gpu_cache_env`, so
later starts are quick.

This module must not touch the network: the daemon reports what it says.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common.errors import TesseraError
from farm_node.runner import TaskRunner
from protocol.models import Readiness
from protocol.requirements import printable
from renderers.worker import RenderRequest

__all__ = ["DEFAULT_WARMUP_TIMEOUT", "WARMUP_PERCENTAGE", "WARMUP_SAMPLES", "WarmUp"]

log = logging.getLogger(__name__)

#: The warm-up's own limit: long enough for a driver compiling Cycles' kernels from PTX
#: (more than 5 minutes on an H100 with bpy 5.0.1, not finished after 300 s).
DEFAULT_WARMUP_TIMEOUT = 1800.0
#: Of the demo scene's 640x360, and samples: a render that only needs the kernels.
WARMUP_PERCENTAGE = 10
WARMUP_SAMPLES = 4
#: How often a running warm-up says how long it has run, in the log.
LOG_EVERY = 30.0


class WarmUp:
    """One warm-up render of `runner`'s device, started by `start`, watched by `state`."""

    def __init__(
        self,
        runner: TaskRunner,
        scene: Callable[[], Path],
        output: Path,
        *,
        device: str,
        label: str,
        timeout: float = DEFAULT_WARMUP_TIMEOUT,
    ) -> None:
        self.runner = runner
        self.device = device
        self.label = label
        self.timeout = timeout
        self._scene = scene
        self._output = output
        self._state: Readiness = "warming"
        self._reason = ""
        self._started = time.monotonic()
        self._logged = self._started
        self.seconds: float | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"tessera-warmup-{label}", daemon=True
        )

    @property
    def state(self) -> Readiness:
        return self._state

    def start(self) -> None:
        log.info(
            "Warming up %s on %s (the first GPU render compiles its kernels; at most %g s)",
            self.label,
            self.device,
            self.timeout,
        )
        self._started = self._logged = time.monotonic()
        self._thread.start()

    def message(self) -> str:
        """What the node reports while not ready: progress, or why the warm-up failed."""
        if self._state == "failed":
            return printable(f"warm-up on {self.device} failed: {self._reason}")
        if self._state == "ready":
            return f"ready on {self.device}"
        elapsed = time.monotonic() - self._started
        return (
            f"warming up {self.device} (compiling GPU kernels): {elapsed:.0f} s of at most "
            f"{self.timeout:g} s"
        )

    def log_progress(self) -> None:
        """Say in the log, every `LOG_EVERY` seconds, that the warm-up still runs."""
        now = time.monotonic()
        if self._state == "warming" and now - self._logged >= LOG_EVERY:
            self._logged = now
            log.info("%s: %s", self.label, self.message())

    def stop(self) -> None:
        """Cancel a warm-up in flight (the node is stopping)."""
        if not self.done.is_set():
            self.runner.cancel()

    def _run(self) -> None:
        try:
            scene = self._scene()
            request = RenderRequest(
                scene=scene,
                frame=1,
                output=self._output,
                samples=WARMUP_SAMPLES,
                percentage=WARMUP_PERCENTAGE,
                seed=0,
                device=self.device,
            )
            result = self.runner.render_request(request, timeout=self.timeout)
            if result.device != self.device:
                raise TesseraError(f"the warm-up rendered on {result.device}, not on {self.device}")
        except (TesseraError, OSError) as exc:
            text = str(exc).strip().splitlines()
            self._reason = text[0] if text else type(exc).__name__
            self._state = "failed"
            log.error(
                "%s: warm-up on %s failed; this worker takes no work: %s",
                self.label,
                self.device,
                self._reason,
            )
        else:
            self.seconds = time.monotonic() - self._started
            self._state = "ready"
            log.info(
                "%s: warmed up on %s in %.1f s; taking work", self.label, self.device, self.seconds
            )
        finally:
            self._output.unlink(missing_ok=True)
            self.done.set()

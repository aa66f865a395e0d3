"""The thread beside each task: heartbeats, cancels, the stop grace and yielding.

`TaskControl` is what the task and its heartbeat thread share about one lease
(progress, message, why it was cancelled). `HeartbeatThread`, started and joined around
the task (``with HeartbeatThread(...):``), reports progress every
`Lease.heartbeat_interval` seconds and cancels the render when

- the coordinator says so (the job was cancelled) or the lease is gone;
- no heartbeat got through for `NodeConfig.heartbeat_grace` seconds (by then the
  coordinator has given the task to another node);
- the node is stopping and `NodeConfig.stop_grace` is over (or `abort` is set);
- the machine is no longer available (the user came back, outside hours, the GPU too
  hot), asked every `NodeConfig.availability_interval` seconds: the task is *yielded*.

A task cancelled by a stop or a yield is released by the daemon (the coordinator re-queues
it without counting a failure); the others are simply dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

from common.errors import ApiError, CoordinatorUnreachableError, RenderCancelledError
from farm_node.config import NodeConfig
from farm_node.gate import Gate
from farm_node.retry import ProblemLog
from protocol.client import TesseraClient
from protocol.models import Heartbeat, Lease
from renderers.worker import Progress

__all__ = ["LEASE_GONE", "STOPPING", "UPLOADING", "YIELDING", "HeartbeatThread", "TaskControl"]

log = logging.getLogger(__name__)

#: Replies that mean "this lease is over" (expired and re-queued, finished, not ours).
LEASE_GONE = (403, 404, 409, 410)
#: The cancel reason of a task cut short by the node's own stop (its lease is released).
STOPPING = "the node is stopping"
#: The cancel reason of a task handed back because the machine is no longer available
#: (the user returned, outside hours, GPU too hot): its lease is released, no failure.
YIELDING = "yielding the machine"
#: The heartbeat message while the finished result is being delivered.
UPLOADING = "uploading"
#: How often the heartbeat thread looks at the stop event between beats.
_STOP_POLL = 0.1


class TaskControl:
    """What the task thread and its heartbeat thread share about one lease."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.progress = 0.0
        self.message = "starting"
        self.cancel_reason: str | None = None
        self._lock = threading.Lock()

    def on_progress(self, update: Progress) -> None:
        self.progress = min(1.0, max(0.0, update.fraction))
        self.message = f"rendering: {update.samples_done}/{update.samples_total} samples"

    def raise_if_cancelled(self) -> None:
        """Called between steps: a cancel during a download must not start a render."""
        if self.cancel_reason is not None:
            raise RenderCancelledError(f"Cancelled ({self.cancel_reason}).")

    def claim_cancel(self, reason: str) -> bool:
        """Record why the task is cancelled; False when it already was."""
        with self._lock:
            if self.cancel_reason is not None:
                return False
            self.cancel_reason = reason
            return True


class HeartbeatThread:
    """Beats for one lease while its task runs; a context manager around the task."""

    def __init__(
        self,
        lease: Lease,
        control: TaskControl,
        *,
        config: NodeConfig,
        client: TesseraClient,
        gate: Gate,
        cancel_render: Callable[[], None],
        stop: threading.Event,
        abort: threading.Event,
        problems: ProblemLog,
    ) -> None:
        self.lease = lease
        self.control = control
        self.config = config
        self.client = client
        self.gate = gate
        self._cancel_render = cancel_render
        self._stop = stop
        self._abort = abort
        self._problems = problems
        self._thread = threading.Thread(
            target=self._loop, name=f"tessera-heartbeat-{lease.lease_id[:12]}", daemon=True
        )

    def __enter__(self) -> TaskControl:
        self._thread.start()
        return self.control

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.control.done.set()
        self._thread.join()

    def _loop(self) -> None:
        control, config = self.control, self.config
        interval = max(0.05, self.lease.heartbeat_interval)
        last_ok = time.monotonic()
        next_beat = last_ok + interval
        # The first check comes at once: the user may have come back during the poll.
        next_check = last_ok
        stop_seen: float | None = None
        while not control.done.is_set():
            now = time.monotonic()
            if self._stop.is_set() and stop_seen is None:
                stop_seen = now
                log.info("Stopping: the current task has %g s to finish", config.stop_grace)
            if stop_seen is not None and (
                self._abort.is_set() or now >= stop_seen + config.stop_grace
            ):
                self._cancel(STOPPING, "the node is stopping")
            if control.cancel_reason is not None:
                # Again and again until the task ends: a cancel that came just before the
                # runner started its task would otherwise be lost.
                self._cancel_render()
            elif now >= next_beat:
                next_beat = now + interval
                if self._beat():
                    last_ok = time.monotonic()
                grace = config.heartbeat_grace
                if grace is not None and time.monotonic() - last_ok > grace:
                    self._cancel(
                        "lease lost",
                        f"no heartbeat got through for {grace:g} s; the coordinator has "
                        "given the task to another node by now",
                    )
            if (
                control.cancel_reason is None
                and self.gate.availability.active
                and time.monotonic() >= next_check
            ):
                next_check = time.monotonic() + config.availability_interval
                answer = self.gate.may_go_on()
                if not answer.ok:
                    self._cancel(YIELDING, f"{answer.reason}; handing the task back")
            pause = _STOP_POLL
            if control.cancel_reason is None:
                pause = max(0.0, min(pause, next_beat - time.monotonic()))
            control.done.wait(pause)

    def _beat(self) -> bool:
        control = self.control
        beat = Heartbeat(progress=control.progress, message=control.message[:500])
        try:
            reply = self.client.heartbeat(self.lease.lease_id, beat)
        except ApiError as exc:
            if exc.status in LEASE_GONE and control.message == UPLOADING:
                # The upload was accepted and ended the lease while this beat was on its
                # way: nothing to cancel.
                return False
            if exc.status in LEASE_GONE:
                self._cancel("lease lost", f"the coordinator ended the lease: {exc.message}")
            else:
                self._problems.failed(exc)
            return False
        except CoordinatorUnreachableError as exc:
            self._problems.failed(exc)
            return False
        self._problems.recovered()
        if reply.cancel:
            self._cancel("cancelled by the coordinator", "the job was cancelled")
        return True

    def _cancel(self, reason: str, why: str) -> None:
        if self.control.claim_cancel(reason):
            log.warning("Cancelling the current task: %s", why)
            self._cancel_render()

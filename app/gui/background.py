"""Background work for the desktop app: run a callable off the GUI thread, deliver its
result (or its error) back on the GUI thread through a Qt signal.

Every network, disk or Blender call of the app goes through `BackgroundWork.submit`. A
failure becomes an `ErrorReport` (message and hint in the user's language, never a
traceback) and is emitted on `BackgroundWork.failed`, the app's one error sink, which the
main window connects to its error banner. Unexpected exceptions (bugs) are logged with
their traceback and shown as a short plain sentence.

The work runs on a `concurrent.futures.ThreadPoolExecutor` rather than a QThreadPool: its
threads are Python threads, so `shutdown()` really waits for them and the test suite's
thread-leak check sees a worker left running. Results cross back to the GUI thread through
a queued signal of a QObject that lives there. This module must not know about pages,
widgets or the farm: it runs callables, nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from PySide6.QtCore import QObject, Signal

from common.errors import TesseraError

log = logging.getLogger(__name__)
T = TypeVar("T")
#: Enough for a page refresh and a button's action at once; more would only queue on
#: the coordinator.
DEFAULT_THREADS = 2


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """What the user reads when something failed: what went wrong and what to do."""

    message: str
    hint: str = ""


def describe_error(error: BaseException) -> ErrorReport:
    """An error in plain language: a `TesseraError`'s own message and hint, else a short
    sentence naming the failure (its traceback goes to the log, not to the user)."""
    if isinstance(error, TesseraError):
        return ErrorReport(error.message, error.hint)
    log.error("unexpected error in background work", exc_info=error)
    detail = str(error) or type(error).__name__
    return ErrorReport(
        f"Something went wrong: {detail}",
        "This is a bug in Tessera; the details are in the log.",
    )


class BackgroundWork(QObject):
    """Runs callables on worker threads; results and errors arrive on the GUI thread.

    Create it on the GUI thread. `failed` carries an `ErrorReport` for every failure
    whose caller gave no `on_error` of its own (and for errors raised by callbacks).
    Call `shutdown()` before the app exits: it waits for the running work and drops
    whatever result arrives afterwards.
    """

    failed = Signal(object)
    _finished = Signal(object, object, object)  # (callback, value, error) from a worker

    def __init__(self, parent: QObject | None = None, threads: int = DEFAULT_THREADS) -> None:
        super().__init__(parent)
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tessera-gui")
        self._running = 0
        self._closed = False
        self._pending: set[Future[None]] = set()
        # The emitting thread is a worker and this object lives on the GUI thread, so Qt
        # queues the call: the slot runs on the GUI thread.
        self._finished.connect(self._on_work_finished)

    @property
    def busy(self) -> bool:
        """Whether some submitted work has not delivered its result yet."""
        return self._running > 0

    def submit(
        self,
        work: Callable[[], T],
        on_done: Callable[[T], None] | None = None,
        on_error: Callable[[ErrorReport], None] | None = None,
    ) -> None:
        """Run `work()` on a worker thread; then `on_done(result)` or `on_error(report)`
        (default: the `failed` signal) on the GUI thread."""
        if self._closed:
            return
        self._running += 1
        future = self._executor.submit(self._run, work, on_done, on_error)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    def _run(
        self,
        work: Callable[[], Any],
        on_done: Callable[[Any], None] | None,
        on_error: Callable[[ErrorReport], None] | None,
    ) -> None:
        try:
            value = work()
        except Exception as error:
            self._finished.emit((on_done, on_error), None, describe_error(error))
        else:
            self._finished.emit((on_done, on_error), value, None)

    def _on_work_finished(
        self, callbacks: tuple[Any, Any], value: object, error: ErrorReport | None
    ) -> None:
        self._running -= 1
        if self._closed:
            return
        on_done, on_error = callbacks
        try:
            if error is not None:
                (on_error or self.failed.emit)(error)
            elif on_done is not None:
                on_done(value)
        except Exception as callback_error:
            self.failed.emit(describe_error(callback_error))

    def shutdown(self, wait: bool = True, last: Sequence[Callable[[], object]] = ()) -> None:
        """Stop taking work, cancel what has not started, run `last` (clean-ups such as
        stopping a child process; their errors are logged) and wait for all of it."""
        if self._closed:
            self._executor.shutdown(wait=wait)
            return
        self._closed = True
        for future in list(self._pending):
            future.cancel()
        for cleanup in last:
            self._executor.submit(_log_errors, cleanup)
        self._executor.shutdown(wait=wait, cancel_futures=False)


def _log_errors(cleanup: Callable[[], object]) -> None:
    try:
        cleanup()
    except Exception:
        log.exception("clean-up at shutdown failed")


class ProgressRelay(QObject):
    """Carries progress reports from a worker thread to the GUI thread.

    Create it on the GUI thread and connect `changed`; call `report(value)` from the
    work's callbacks (any thread): Qt queues the signal, so the slot runs on the GUI
    thread.
    """

    changed = Signal(object)

    def report(self, value: object) -> None:
        self.changed.emit(value)

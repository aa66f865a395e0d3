"""Waiting out a coordinator that does not answer: backoff delays and quiet logging.

`Backoff` spaces the attempts (exponential, with jitter); `ProblemLog` says a repeated
problem once, not on every attempt, and says once when it is over.
"""

from __future__ import annotations

import logging
import random
import threading

from common.errors import TesseraError

__all__ = ["Backoff", "ProblemLog"]

log = logging.getLogger(__name__)


class Backoff:
    """Exponential backoff with "equal jitter": each delay is half fixed, half random, so
    many nodes that lost one coordinator do not all come back in the same instant."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        base: float = min(self.maximum, self.initial * 2.0**self._attempt)
        self._attempt = min(self._attempt + 1, 62)
        return base / 2 + self._rng.uniform(0, base / 2)

    def reset(self) -> None:
        self._attempt = 0


class ProblemLog:
    """Logs a repeated problem once as a warning (then at debug) and its end once.

    Problems are told apart by kind (and HTTP status), not by message: a connection
    error's text changes on every attempt (it names a new socket object each time).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._current: tuple[str, int | None] | None = None
        self._lock = threading.Lock()

    def failed(self, error: TesseraError) -> None:
        kind = (type(error).__name__, getattr(error, "status", None))
        with self._lock:
            repeated, self._current = self._current == kind, kind
        text = error.message.splitlines()[0] if error.message else type(error).__name__
        if repeated:
            log.debug("%s still fails: %s", self.what, text)
        else:
            log.warning("%s failed: %s (retrying)", self.what, text)

    def recovered(self) -> None:
        with self._lock:
            was, self._current = self._current, None
        if was is not None:
            log.info("%s works again", self.what)

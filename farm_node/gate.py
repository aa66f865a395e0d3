"""Whether the node may take work now: the provider's availability and the free disk.

`Gate` answers the loop ("may I lease?") and the heartbeat thread ("may I go on
rendering?"). It asks the `AvailabilityTracker` (`farm_node.availability`: idle-only or
scheduled providing, a GPU temperature cap) and checks the free disk space renders need
(`RenderLimits.min_free_disk`); after a task was refused for lack of disk space it says
no for `NodeConfig.disk_full_pause` seconds and until the space is back. A change of
answer is logged once, not on every reading, and a paused node tells the coordinator why
every `PAUSE_REPORT_SECONDS`, so it is listed as paused rather than offline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from common.disk_space import no_room_reason
from common.errors import ApiError, CoordinatorUnreachableError
from farm_node.availability import Availability, AvailabilityTracker
from farm_node.config import NodeConfig
from protocol.client import TesseraClient
from protocol.models import Lease, LeaseRequest
from protocol.requirements import printable
from renderers.worker import InsufficientDiskSpaceError, check_free_space, format_bytes

__all__ = ["PAUSE_REPORT_SECONDS", "Gate", "disk_full"]

log = logging.getLogger(__name__)

#: How often a paused node reminds the coordinator why (it is offline after 120 s unheard).
PAUSE_REPORT_SECONDS = 30.0


class Gate:
    """The node's "may I work?" (thread-safe: the loop and the heartbeat thread ask)."""

    def __init__(
        self, config: NodeConfig, availability: AvailabilityTracker, folders: Sequence[Path]
    ) -> None:
        """`folders`: where renders write (each must keep `min_free_disk` free)."""
        self.config = config
        self.availability = availability
        self.folders = tuple(folders)
        self._lock = threading.Lock()
        self._shown: tuple[bool, str] | None = None
        self._paused_reason: str | None = None
        self._reported_pause: tuple[str | None, float] = (None, 0.0)
        self._disk_paused_until = 0.0
        self._disk_problem = ""

    @property
    def paused_reason(self) -> str | None:
        """Why the node takes no work right now (in plain words), None when it does."""
        with self._lock:
            return self._paused_reason

    def may_lease(self) -> bool:
        """Whether to ask for work now: the machine is available and has disk space."""
        answer: Availability | None = None
        with self._lock:
            if time.monotonic() < self._disk_paused_until:
                answer = Availability(False, f"paused: {self._disk_problem}", "disk")
        if answer is None:
            problem = self.disk_shortage()
            if problem is not None:
                answer = Availability(False, f"paused: {problem}", "disk")
            else:
                answer = self.availability.check()
        self._show(answer)
        return answer.ok

    def may_go_on(self) -> Availability:
        """The answer while a task renders (no disk check: the render has its space)."""
        answer = self.availability.check(rendering=True)
        self._show(answer)
        return answer

    def disk_shortage(self) -> str | None:
        """What is short of disk space for a render here, None when nothing is."""
        needed = self.config.limits.min_free_disk
        try:
            for folder in self.folders:
                check_free_space(folder, needed)
        except InsufficientDiskSpaceError as exc:
            return exc.message
        return None

    def pause_for_disk(self, problem: str) -> None:
        """Take no work for `disk_full_pause` seconds (and then only with space free)."""
        pause = self.config.disk_full_pause
        with self._lock:
            self._disk_paused_until = time.monotonic() + pause
            self._disk_problem = f"{problem.splitlines()[0]} (the last task was handed back)"
        log.warning(
            "Not taking work for %g s, and then only with %s free: %s",
            pause,
            format_bytes(self.config.limits.min_free_disk),
            problem.splitlines()[0],
        )

    def report_pause(
        self, client: TesseraClient, node_id: str | None, release: Callable[[Lease], None]
    ) -> None:
        """Tell the coordinator why this node takes no work (when the reason changes and
        every `PAUSE_REPORT_SECONDS`), so it lists the node as paused, not offline."""
        reason = self.paused_reason
        now = time.monotonic()
        if reason is None or node_id is None:
            return
        if (
            reason == self._reported_pause[0]
            and now - self._reported_pause[1] < PAUSE_REPORT_SECONDS
        ):
            return
        self._reported_pause = (reason, now)
        try:
            lease = client.lease(node_id, LeaseRequest(wait=0, paused=printable(reason)))
        except (ApiError, CoordinatorUnreachableError) as exc:
            log.debug("Could not tell the coordinator this node is paused: %s", exc)
            return
        if lease is not None:  # a coordinator that ignores `paused`: hand it back
            release(lease)

    def _show(self, answer: Availability) -> None:
        """Log a change of availability once (not every reading) and remember it."""
        key = (answer.ok, answer.cause)
        with self._lock:
            changed, self._shown = self._shown != key, key
            was_paused = self._paused_reason is not None
            self._paused_reason = None if answer.ok else answer.reason
        if not changed:
            return
        if not answer.ok:
            # The provider's own choice (idle, hours, heat) is news; a problem is a warning.
            level = logging.WARNING if answer.cause in ("disk", "state") else logging.INFO
            log.log(level, "Not taking work: %s", answer.reason)
        elif was_paused:
            log.info("Taking work again (%s)", answer.reason)


def disk_full(error: BaseException) -> str | None:
    """What says `error` (or an error it was raised from) is a full disk, else None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, InsufficientDiskSpaceError):
            return current.message
        current = current.__cause__ or current.__context__
    return no_room_reason(error)

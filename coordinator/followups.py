"""Frames before new work: the node whose result completed a frame takes its next step.

When a node's upload completes a frame (its last tile, or its denoise), the frame is
merged by the assembler thread and then needs one more task: its denoise, or its finish
(the scene's compositor and output files). The node asks for its next lease within
milliseconds of its upload, before that task exists, and would start the next frame's
render instead: with one node, every frame's files then arrive one render late. So the
node's long poll is held (up to `HOLD_SECONDS`) while that frame is still being merged;
the assembler's new task wakes the poll and, ordered by frame, is what it leases. The
node also has the bundle's Blender warm for it.

Only a long poll is held (a lease asked with `wait=0` wants an answer now), only for a
step that will follow, and never past `HOLD_SECONDS`: a failed merge costs the node that
long at most. Holds are this replica's memory; the frame's state is read from the
database, so the merge may run on any replica. No SQL here beyond that one read, no HTTP.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from coordinator.db import Database
from protocol.models import FrameStatus, JobSpec, TaskKind

__all__ = ["HOLD_SECONDS", "FrameFollowUps", "expects_follow_up"]

#: The longest a node's poll waits for the frame it completed (a merge takes well under
#: a second; a 4K frame's a little more).
HOLD_SECONDS = 3.0


def expects_follow_up(kind: TaskKind, spec: JobSpec, whole_frame: bool) -> bool:
    """Whether a frame completed by a task of `kind` gets another task after its merge:
    a tiled frame's denoise, or any frame's finish."""
    if kind is TaskKind.RENDER or kind is TaskKind.BACKUP:
        return spec.finish or (spec.wants_denoise and not whole_frame)
    return kind is TaskKind.DENOISE and spec.finish


@dataclass(frozen=True, slots=True)
class _Hold:
    job_id: str
    frame: int
    until: float


class FrameFollowUps:
    def __init__(self, db: Database, hold_seconds: float = HOLD_SECONDS) -> None:
        self.db = db
        self.hold_seconds = hold_seconds
        self._lock = threading.Lock()
        self._holds: dict[str, _Hold] = {}

    def completed(self, node_id: str, job_id: str, frame: int) -> None:
        """`node_id`'s result completed `frame` of `job_id`, which has a step to follow."""
        with self._lock:
            self._holds[node_id] = _Hold(job_id, frame, time.monotonic() + self.hold_seconds)

    def holds(self, node_id: str) -> bool:
        """Whether the node's poll should wait: its frame is still being merged."""
        with self._lock:
            hold = self._holds.get(node_id)
            if hold is None:
                return False
            if time.monotonic() >= hold.until:
                del self._holds[node_id]
                return False
        row = self.db.query_one(
            "SELECT status FROM frames WHERE job_id = ? AND frame = ?", (hold.job_id, hold.frame)
        )
        if row is not None and row["status"] == FrameStatus.PENDING.value:
            return True
        with self._lock:
            if self._holds.get(node_id) is hold:
                del self._holds[node_id]
        return False

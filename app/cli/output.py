"""How the farm commands talk to the terminal: tables, clipped messages, sizes and
durations, and the progress lines on stderr (`Status`, `JobProgress`). Results go to
stdout, progress and warnings to stderr, so `JOB=$(tessera submit scene.blend)` captures
just the id.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from protocol.models import FINISHED_JOB_STATES, Job

if TYPE_CHECKING:
    from app.follow import FrameFiles
    from app.packing import PackProgress
    from app.submit import Prepared

MESSAGE_WIDTH = 60


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    table = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    )


def clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def percent(done: int, total: int) -> int:
    return 100 * done // total if total else 0


def size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Status:
    """Progress and warnings on stderr: one rewritten line on a terminal, plain lines
    (fewer of them) otherwise; silent with --json."""

    def __init__(self, stream: TextIO, *, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.interactive = enabled and stream.isatty()
        self._transient = False
        self._uploaded = False
        self._last_plain = 0.0

    def line(self, text: str) -> None:
        if self.enabled:
            self.end_line()
            print(text, file=self.stream, flush=True)

    def warn(self, text: str) -> None:
        self.end_line()
        print(f"warning: {text}", file=self.stream, flush=True)

    def transient(self, text: str, *, force: bool = False) -> None:
        """A progress line: rewritten in place on a terminal, else printed now and then."""
        if not self.enabled:
            return
        if self.interactive:
            print(f"\r{text}\x1b[K", end="", file=self.stream, flush=True)
            self._transient = True
        elif force or time.monotonic() - self._last_plain >= 5.0:
            self._last_plain = time.monotonic()
            print(text, file=self.stream, flush=True)

    def end_line(self) -> None:
        """Finish a progress line so the next output starts on a fresh line."""
        if self._transient:
            print(file=self.stream, flush=True)
            self._transient = False

    def pack(self, progress: PackProgress) -> None:
        if self.interactive and progress.stage == "trace":
            self.transient(f"packing: {progress.done} dependencies found")
        elif self.interactive and progress.stage == "zip" and progress.total:
            self.transient(f"packing: {100 * progress.done // progress.total}% zipped")

    def packed(self, prepared: Prepared) -> None:
        bundle = prepared.bundle
        self.line(
            f"Packed {len(bundle.files)} file(s) into bundle {bundle.sha256[:12]} "
            f"({size(bundle.size)}), scene {bundle.scene_path}"
        )

    def upload(self, sent: int, total: int) -> None:
        self._uploaded = True
        percent = 100 * sent // total if total else 100
        self.transient(f"uploading: {percent}% of {size(total)}", force=sent == total)

    def uploaded(self, prepared: Prepared) -> None:
        if not self._uploaded:
            self.line("The farm already has this bundle; upload skipped")


class JobProgress:
    """Tiles done/total, frames done and an ETA from the rate since following began."""

    def __init__(self, status: Status) -> None:
        self.status = status
        self.started = time.monotonic()
        self.baseline: int | None = None
        self.last: tuple[int, int, str] | None = None

    def update(self, job: Job) -> None:
        progress = job.progress
        if self.baseline is None:
            self.baseline = progress.tasks_done
        state = (progress.tasks_done, progress.frames_done, job.status.value)
        if state == self.last:
            return
        changed_frames = self.last is None or self.last[1] != progress.frames_done
        self.last = state
        eta = self._eta(progress.tasks_done, progress.tasks_total)
        text = (
            f"job {job.id} {job.status.value}: tiles {progress.tasks_done}/"
            f"{progress.tasks_total}, frames {progress.frames_done}/{progress.frames_total}"
            f", ETA {eta}"
        )
        if job.message and job.status not in FINISHED_JOB_STATES:
            text += f" ({clip(job.message, MESSAGE_WIDTH)})"
        self.status.transient(text, force=changed_frames or job.status in FINISHED_JOB_STATES)

    def _eta(self, done: int, total: int) -> str:
        finished = done - (self.baseline or 0)
        elapsed = time.monotonic() - self.started
        if done >= total:
            return "0:00"
        if finished <= 0 or elapsed <= 0:
            return "--"
        return duration((total - done) * elapsed / finished)

    def frame(self, files: FrameFiles) -> None:
        names = ", ".join(str(path) for path in files.files)
        self.status.line(f"frame {files.frame}: {names}")

    def finish(self) -> None:
        self.status.end_line()

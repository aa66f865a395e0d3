"""The crash-safe outbox: finished EXRs kept in ``results/`` until the coordinator has them.

A result is an EXR named by its lease plus a JSON note (lease id, task id, SHA-256,
size) written atomically after it: a result with a note is complete, an EXR without
one is debris that `Outbox.prepare` deletes. Losing the coordinator, or the node
itself, between a render and its upload therefore loses no finished work: the next
start (or the next loop) delivers what is pending, oldest first.

A delivered result may be kept a little longer (`deliver(..., keep=True)`): a frame
rendered whole, or denoised, is the input of its finish task, which the same node
usually leases next; `take_delivered` hands that EXR back by its SHA-256 so the node
does not download its own upload again. One such file at most, without a note (the
next start deletes it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import ApiError, CoordinatorUnreachableError
from farm_node.retry import ProblemLog
from protocol.client import TesseraClient, sha256_file

__all__ = ["SAFE_ID", "Outbox", "PendingResult"]

log = logging.getLogger(__name__)

#: What a lease id must look like to name files (the coordinator's are hex).
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True, slots=True)
class PendingResult:
    """A finished task's EXR waiting in ``results/`` to be delivered."""

    lease_id: str
    task_id: str
    sha256: str
    size: int
    path: Path

    @property
    def note(self) -> Path:
        return self.path.with_suffix(".json")

    def save_note(self) -> None:
        """Write the JSON note atomically: a result with a note is complete."""
        data = {
            "lease_id": self.lease_id,
            "task_id": self.task_id,
            "sha256": self.sha256,
            "size": self.size,
            "created_at": time.time(),
        }
        handle, temp = tempfile.mkstemp(prefix=".note-", dir=self.path.parent)
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(data, stream, indent=1)
                stream.flush()
                os.fsync(stream.fileno())
            Path(temp).replace(self.note)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def discard(self) -> None:
        # The note goes first: a crash in between leaves an EXR without a note, which the
        # next start deletes, never a note whose EXR is gone.
        self.note.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)

    @classmethod
    def load(cls, note: Path) -> PendingResult | None:
        """The pending result described by `note`, or None when it is unusable."""
        try:
            data = json.loads(note.read_text())
            result = cls(
                lease_id=str(data["lease_id"]),
                task_id=str(data["task_id"]),
                sha256=str(data["sha256"]),
                size=int(data["size"]),
                path=note.with_suffix(".exr"),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("Dropping unreadable pending result %s (%s)", note.name, exc)
            return None
        if result.path.stem != result.lease_id or not SAFE_ID.match(result.lease_id):
            log.warning("Dropping pending result %s: it names another lease", note.name)
            return None
        try:
            size = result.path.stat().st_size
        except OSError:
            size = -1
        if size != result.size:
            log.warning("Dropping pending result %s: its EXR is missing or changed", note.name)
            return None
        return result


class Outbox:
    """The ``results/`` folder: `keep` a finished EXR, `deliver` it, list what is `pending`."""

    def __init__(self, folder: Path, client: TesseraClient, problems: ProblemLog) -> None:
        self.folder = folder
        self.client = client
        self._problems = problems
        #: The last result delivered with `keep=True`: (its SHA-256, its file).
        self._delivered: tuple[str, Path] | None = None

    def prepare(self) -> None:
        """Create the folder and delete EXRs whose note was never written."""
        self.folder.mkdir(parents=True, exist_ok=True)
        notes = {note.stem for note in self.folder.glob("*.json")}
        for leftover in self.folder.iterdir():
            if leftover.is_file() and leftover.suffix != ".json" and leftover.stem not in notes:
                leftover.unlink(missing_ok=True)

    def pending(self) -> list[PendingResult]:
        """Finished results not delivered yet, oldest first (unusable notes are dropped)."""
        notes = sorted(self.folder.glob("*.json"), key=_mtime)
        found: list[PendingResult] = []
        for note in notes:
            result = PendingResult.load(note)
            if result is None:
                note.unlink(missing_ok=True)
            else:
                found.append(result)
        return found

    def keep(self, lease_id: str, task_id: str, output: Path) -> PendingResult:
        """Move `output` into the outbox with its note; OSError (a full disk) keeps nothing."""
        target = self.folder / f"{lease_id}.exr"
        output.replace(target)
        try:
            result = PendingResult(
                lease_id=lease_id,
                task_id=task_id,
                sha256=sha256_file(target),
                size=target.stat().st_size,
                path=target,
            )
            result.save_note()
        except BaseException:
            target.unlink(missing_ok=True)  # an EXR without its note is not a result
            raise
        return result

    def deliver_all(self) -> bool:
        """Try to deliver every pending result; False if some must wait (coordinator down)."""
        return all(self.deliver(result) for result in self.pending())

    def deliver(self, result: PendingResult, *, keep: bool = False) -> bool:
        """Upload one result; True when it is settled (delivered, or refused for good).
        `keep`: once accepted, keep its EXR for `take_delivered` (replacing the one
        kept before)."""
        try:
            receipt = self.client.upload_result(result.lease_id, result.path, result.sha256)
        except CoordinatorUnreachableError as exc:
            self._problems.failed(exc)
            log.info("Keeping the result of lease %s to deliver later", result.lease_id)
            return False
        except ApiError as exc:
            if exc.status >= 500 or exc.status == 429:
                self._problems.failed(exc)
                log.info("Keeping the result of lease %s to deliver later", result.lease_id)
                return False
            log.warning(
                "The coordinator refused the result of lease %s (%d): %s; dropping it",
                result.lease_id,
                exc.status,
                exc.message,
            )
            result.discard()
            return True
        self._problems.recovered()
        log.info(
            "Delivered lease %s (task %s): %s",
            result.lease_id,
            receipt.task_id,
            "accepted" if receipt.accepted else "not accepted",
        )
        if keep and receipt.accepted and receipt.sha256 == result.sha256:
            self._keep_delivered(result)
        else:
            result.discard()
        return True

    def take_delivered(self, sha256: str) -> Path | None:
        """The kept EXR of a delivered result whose SHA-256 is `sha256`, now the
        caller's to delete; None when it is not the one kept (that one is deleted)."""
        kept, self._delivered = self._delivered, None
        if kept is None:
            return None
        if kept[0] == sha256 and kept[1].is_file():
            return kept[1]
        kept[1].unlink(missing_ok=True)
        return None

    def _keep_delivered(self, result: PendingResult) -> None:
        """Keep a delivered result's EXR (without its note: not a result any more)."""
        result.note.unlink(missing_ok=True)
        target = self.folder / f"delivered-{result.lease_id}.exr"
        try:
            result.path.replace(target)
        except OSError as exc:
            log.debug("Not keeping the delivered result of %s: %s", result.lease_id, exc)
            result.path.unlink(missing_ok=True)
            return
        self.take_delivered("")  # deletes the one kept before
        self._delivered = (result.sha256, target)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0

"""Scene bundles: stored once under their SHA-256, checked when a job names one, and
readable only by those who have a job (or a lease) that uses it."""

from __future__ import annotations

import lzma
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

from coordinator.accounts import Principal
from coordinator.core import Core
from coordinator.errors import InvalidRequestError, NotFoundError, UploadTooLargeError
from coordinator.store import SpooledUpload, TooLargeError
from protocol.models import JobSpec, Role, TaskStatus
from renderers.scene_info import BLEND_MAGICS

__all__ = ["Bundles"]

#: Zip methods a node unpacks (Python's zipfile without extra modules).
_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "LZMA",
}
_PACK_HINT = "Pack the scene again with `tessera submit` (a plain zip, no password)."


def _entry_problem(entry: zipfile.ZipInfo) -> str | None:
    """Why a node could not unpack this entry, from the zip's directory alone."""
    if entry.flag_bits & 0x1:
        return "is encrypted"
    if entry.compress_type not in _METHODS:
        return (
            f"uses compression method {entry.compress_type}; the farm unpacks only"
            f" {', '.join(_METHODS.values())}"
        )
    return None


def _quoted(name: str, limit: int = 120) -> str:
    """A name from a stranger's file, bounded and quoted for a message."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


def _short(exc: BaseException, limit: int = 160) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


class Bundles:
    def __init__(self, core: Core) -> None:
        self.core = core

    def exists(self, sha256: str) -> bool:
        return self.core.store.exists(sha256)

    def put(self, sha256: str, upload: SpooledUpload) -> int:
        """Adopt a spooled bundle under its hash (a hash that is not `sha256` keeps
        nothing). Returns its size."""
        if self.core.store.exists(sha256):
            upload.path.unlink(missing_ok=True)
            return self.core.store.size(sha256)
        self.core.store.adopt(upload, sha256)
        return upload.size

    @property
    def max_bytes(self) -> int:
        return self.core.config.max_bundle_bytes

    def spool(self, chunks: Iterable[bytes]) -> SpooledUpload:
        """Spool an in-memory bundle (the HTTP layer spools its request body itself)."""
        try:
            return self.core.store.spool_chunks(chunks, self.max_bytes)
        except TooLargeError as exc:
            raise self.too_large(exc) from None

    @staticmethod
    def too_large(exc: TooLargeError) -> UploadTooLargeError:
        return UploadTooLargeError(
            exc.message, hint="Split the scene or raise the coordinator's limit."
        )

    def check(self, spec: JobSpec) -> None:
        """Refuse a job whose bundle is missing, is not a zip a node can unpack, or has no
        readable .blend at its scene_path.

        Only the zip's directory and the scene's first bytes are read: every entry's
        flags and method are checked from the directory (an encrypted entry, or a
        method other than stored, deflate, bzip2 and LZMA, is refused: nodes could not
        unpack it), and reading the scene's start catches a corrupt stream.
        """
        store = self.core.store
        if not store.exists(spec.bundle):
            raise InvalidRequestError(
                f"Bundle {spec.bundle[:12]}... has not been uploaded.",
                hint="Upload it first (PUT /api/v1/bundles/<sha256>).",
            )
        scene = _quoted(spec.scene_path)
        try:
            with zipfile.ZipFile(store.path(spec.bundle)) as archive:
                for entry in archive.infolist():
                    problem = _entry_problem(entry)
                    if problem is not None:
                        raise InvalidRequestError(
                            f"The bundle's entry {_quoted(entry.filename)} {problem}"
                            + (" (it is the scene)." if entry.filename == spec.scene_path else "."),
                            hint=_PACK_HINT,
                        )
                try:
                    with archive.open(spec.scene_path) as stream:
                        head = stream.read(8)
                except KeyError:
                    raise InvalidRequestError(
                        f"The bundle has no file {scene}.",
                        hint="scene_path must name the .blend inside the bundle.",
                    ) from None
        except InvalidRequestError:
            raise
        except zipfile.BadZipFile as exc:
            raise InvalidRequestError(
                f"The bundle is not a readable zip archive, or its scene {scene} is corrupt"
                f" ({_short(exc)}).",
                hint=_PACK_HINT,
            ) from None
        except (
            zlib.error,
            lzma.LZMAError,
            EOFError,
            OSError,
            RuntimeError,
            NotImplementedError,
            ValueError,
        ) as exc:
            raise InvalidRequestError(
                f"The bundle's scene {scene} cannot be read: {type(exc).__name__} ({_short(exc)}).",
                hint=_PACK_HINT,
            ) from None
        if not head.startswith(BLEND_MAGICS):
            raise InvalidRequestError(
                f"{scene} in the bundle is not a .blend file.",
                hint="Point scene_path at a Blender file.",
            )

    def download(self, who: Principal, sha256: str) -> Path:
        """The bundle's file, for admins; the requester whose job uses the bundle; a
        provider whose node holds a live lease on a task of such a job."""
        if not self.core.store.exists(sha256) or not self._may_read(who, sha256):
            raise NotFoundError(f"No bundle {sha256[:12]}...")
        return self.core.store.path(sha256)

    def _may_read(self, who: Principal, sha256: str) -> bool:
        if who.role is Role.ADMIN:
            return True
        if who.role is Role.REQUESTER:
            sql = "SELECT 1 FROM jobs WHERE bundle = ? AND owner = ? LIMIT 1"
            return self.core.db.query_one(sql, (sha256, who.account)) is not None
        # A live lease only: a finished task keeps its lease id, and its node has no
        # business with the scene any more.
        sql = (
            "SELECT 1 FROM tasks t JOIN jobs j ON j.id = t.job_id JOIN nodes n ON n.id ="
            " t.node_id WHERE j.bundle = ? AND n.owner = ? AND t.lease_id IS NOT NULL"
            " AND t.status = ? LIMIT 1"
        )
        params = (sha256, who.account, TaskStatus.ACTIVE.value)
        return self.core.db.query_one(sql, params) is not None

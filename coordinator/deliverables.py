"""Deliverables: the files a job hands back, named and placed as Blender names them.

A finish task's upload is a zip of the files Blender wrote for one frame (the scene's
frame file and File Output nodes' files) with a `manifest.json` (`FinishManifest`).
`check_finish_upload` refuses, from the provider's bytes alone, anything that is not
exactly that: entries not in the manifest, unsafe names, encryption, links, more than
the manifest says, a frame file of another size than the job's frame. `unpack_finish`
stores every file content-addressed. `Deliverables` records and lists them per job
(the raw EXR of every pass, the finish's files, the movie and the preview video), for
the job's owner.

No status is written here (see `coordinator.task_states`/`frame_states`), and nothing
here trusts a name: every path is checked by `protocol.models.relative_output_path`.
"""

from __future__ import annotations

import shutil
import sqlite3
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from common.errors import ExrError
from coordinator.core import Core
from coordinator.store import Store
from protocol.models import (
    JobSpec,
)
from protocol.output import (
    FINISH_MANIFEST,
    Deliverable,
    DeliverableKind,
    FinishManifest,
)
from renderers.exr_header import read_exr_header

__all__ = [
    "MANIFEST",
    "Deliverables",
    "StoredFile",
    "check_finish_upload",
    "finish_warnings",
    "raw_exr_name",
    "unpack_finish",
]

MANIFEST = FINISH_MANIFEST
#: zip methods a finish upload may use (stored, deflated).
_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
#: A finish's files may inflate to this many times the upload limit, no more.
_INFLATE_LIMIT = 8
_EXR_MAGIC = b"\x76\x2f\x31\x01"
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One deliverable in the store."""

    path: str
    kind: DeliverableKind
    sha256: str
    size: int
    frame: int | None


def raw_exr_name(frame: int) -> str:
    """The raw multilayer EXR of every pass, delivered beside the scene's files."""
    return f"frame_{frame:04d}.exr"


def check_finish_upload(path: Path, spec: JobSpec, max_bytes: int) -> str | None:
    """Why a finish task's upload is refused (None: it is sound)."""
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = _manifest(archive)
            if isinstance(manifest, str):
                return manifest
            problem = _entries_problem(archive, manifest, max_bytes)
            if problem:
                return problem
            frame_entry = next(f.path for f in manifest.files if f.kind == "frame")
            with tempfile.TemporaryDirectory() as scratch:
                target = Path(scratch) / "frame"
                with archive.open(frame_entry) as source, target.open("wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
                size = _image_size(target)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"the finish upload is not a readable zip archive ({exc})"
    expected = spec.effective_size()
    if size is not None and size != expected:
        return (
            f"the frame file {frame_entry} is {size[0]}x{size[1]} pixels; the job's frames "
            f"are {expected[0]}x{expected[1]}"
        )
    return None


def unpack_finish(store: Store, upload: Path, frame: int) -> list[StoredFile]:
    """Store every file of a checked finish upload; their deliverable rows."""
    files: list[StoredFile] = []
    with zipfile.ZipFile(upload) as archive:
        manifest = _manifest(archive)
        if isinstance(manifest, str):
            raise ValueError(manifest)  # checked at upload: a stored upload changed
        with tempfile.TemporaryDirectory(dir=store.tmp) as scratch:
            for index, entry in enumerate(manifest.files):
                target = Path(scratch) / str(index)
                with archive.open(entry.path) as source, target.open("wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
                sha = store.put_file(target)
                files.append(StoredFile(entry.path, entry.kind, sha, store.size(sha), frame))
    return files


def finish_warnings(upload: Path) -> list[str]:
    """What the node said the finish could not honour (shown as the job's message)."""
    with zipfile.ZipFile(upload) as archive:
        manifest = _manifest(archive)
    return [] if isinstance(manifest, str) else list(manifest.warnings)


class Deliverables:
    """The deliverables table: one row per file of a job, by its path."""

    def __init__(self, core: Core) -> None:
        self.core = core

    @staticmethod
    def record(conn: sqlite3.Connection, job_id: str, files: list[StoredFile]) -> None:
        conn.executemany(
            "INSERT INTO deliverables (job_id, path, frame, kind, sha, size)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT (job_id, path) DO UPDATE SET"
            " frame = excluded.frame, kind = excluded.kind, sha = excluded.sha,"
            " size = excluded.size",
            [(job_id, f.path, f.frame, f.kind, f.sha256, f.size) for f in files],
        )

    def of_job(self, job_id: str) -> list[Deliverable]:
        rows = self.core.db.query(
            "SELECT * FROM deliverables WHERE job_id = ? ORDER BY frame IS NULL, frame, path",
            (job_id,),
        )
        return [
            Deliverable(
                frame=row["frame"],
                path=row["path"],
                sha256=row["sha"],
                size=row["size"],
                kind=row["kind"],
            )
            for row in rows
        ]

    def frames_of_kind(self, job_id: str, kind: DeliverableKind) -> list[StoredFile]:
        """A job's deliverables of one kind, in frame order."""
        rows = self.core.db.query(
            "SELECT * FROM deliverables WHERE job_id = ? AND kind = ? ORDER BY frame, path",
            (job_id, kind),
        )
        return [
            StoredFile(row["path"], row["kind"], row["sha"], row["size"], row["frame"])
            for row in rows
        ]

    def has(self, job_id: str, sha256: str) -> bool:
        return (
            self.core.db.query_one(
                "SELECT 1 FROM deliverables WHERE job_id = ? AND sha = ?", (job_id, sha256)
            )
            is not None
        )


def _manifest(archive: zipfile.ZipFile) -> FinishManifest | str:
    try:
        info = archive.getinfo(MANIFEST)
    except KeyError:
        return f"the finish upload has no {MANIFEST}"
    if info.file_size > 1 << 20:
        return f"the finish upload's {MANIFEST} is larger than 1 MiB"
    try:
        manifest = FinishManifest.model_validate_json(archive.read(MANIFEST))
    except ValidationError as exc:
        return f"the finish upload's {MANIFEST} is not valid: {exc.errors()[0]['msg']}"
    paths = [f.path for f in manifest.files]
    if len(set(paths)) != len(paths):
        return f"the finish upload's {MANIFEST} names a file twice"
    if MANIFEST in paths:
        return f"the finish upload's {MANIFEST} lists itself"
    if sum(f.kind == "frame" for f in manifest.files) != 1:
        return f"the finish upload's {MANIFEST} must name exactly one frame file"
    return manifest


def _entries_problem(
    archive: zipfile.ZipFile, manifest: FinishManifest, max_bytes: int
) -> str | None:
    listed = {f.path for f in manifest.files} | {MANIFEST}
    infos = archive.infolist()
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        return "the finish upload holds two entries of one name"
    if set(names) != listed:
        extra = sorted(set(names) - listed)[:3]
        missing = sorted(listed - set(names))[:3]
        return (
            f"the finish upload's entries do not match its {MANIFEST} "
            f"(not listed: {extra}, missing: {missing})"
        )
    for info in infos:
        file_type = stat.S_IFMT(info.external_attr >> 16)
        if info.flag_bits & 0x1:
            return f"the finish upload's entry {info.filename!r} is encrypted"
        if info.compress_type not in _METHODS:
            method = info.compress_type
            return f"the finish upload's entry {info.filename!r} uses compression {method}"
        if file_type not in (0, stat.S_IFREG) or info.is_dir():
            return f"the finish upload's entry {info.filename!r} is not a plain file"
    if sum(info.file_size for info in infos) > _INFLATE_LIMIT * max_bytes:
        return "the finish upload inflates to more than the farm accepts"
    return None


def _image_size(path: Path) -> tuple[int, int] | None:
    """Width and height of an image file, or None for a format read by nothing here
    (DPX, Cineon, HDR... are checked by their Blender-made names only)."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if head == _EXR_MAGIC:
        try:
            part = read_exr_header(path).parts[0]
        except ExrError as exc:
            raise ValueError(f"the frame file is not a readable EXR: {exc}") from exc
        return part.width, part.height
    try:
        with Image.open(path) as image:
            return image.size
    except UnidentifiedImageError:
        return None

"""Where a job's deliverables land on the artist's disk, and fetching them safely.

The coordinator lists a job's files (`GET /jobs/{id}/deliverables`) with paths relative
to the farm's output root: the .blend's folder for a `//` (or relative) output path, so
'//render/shot_####' comes back as 'render/shot_0001.png'; for an absolute output path
the farm drops its root ('/renders/shot_' -> 'renders/shot_0001.png'). Each file goes
where Blender would have written it, and never outside the scene's output root: a path
that is absolute, has '..', a drive, a backslash or a control character, or that leads
out through a symbolic link, is refused (the other files still come). A file already
there with the right SHA-256 is not downloaded again; a download whose bytes do not hash
to the listed SHA-256 is thrown away.

No bpy here (the scene's paths are passed in): it runs on the following thread.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .client import FarmClient, FarmError, sha256_file

KINDS = frozenset({"frame", "file_output", "raw_exr", "movie", "preview_video"})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DRIVE = re.compile(r"^[A-Za-z]:")
MAX_PATH = 500


class UnsafePathError(FarmError):
    """A listed path would land outside the scene's output root."""


@dataclass(frozen=True)
class OutputRoot:
    """The folder deliverable paths are placed under, and the leading folders the farm
    gave an absolute output path (stripped, so its files land in that very folder)."""

    folder: Path
    strip: str = ""

    def target(self, relative: str) -> Path:
        """Where `relative` goes. Raises `UnsafePathError` for a path that could leave
        `folder`."""
        check_relative(relative)
        if self.strip and relative.startswith(self.strip):
            relative = relative[len(self.strip) :]
        target = self.folder.joinpath(*PurePosixPath(relative).parts)
        root = os.path.realpath(self.folder)
        if os.path.commonpath([root, os.path.realpath(target)]) != root:
            raise UnsafePathError(
                f"The farm listed '{relative}', which leads outside {self.folder} (a link):"
                " it was not written."
            )
        return target


def check_relative(path: str) -> None:
    """Refuse a path that is not plainly relative and '/'-separated."""
    parts = path.split("/")
    if (
        not path
        or len(path) > MAX_PATH
        or path.startswith("/")
        or "\\" in path
        or _DRIVE.match(path)
        or any(part in ("", ".", "..") for part in parts)
        or any(ord(ch) < 32 for ch in path)
    ):
        raise UnsafePathError(
            f"The farm listed '{path[:100]}', which is not a path inside the scene's output"
            " folder: it was not written."
        )


def output_root(render_filepath: str, blend_path: str) -> OutputRoot:
    """The output root of a scene whose `render.filepath` is `render_filepath` (as typed,
    e.g. '//render/shot_') saved at `blend_path`."""
    blend_folder = Path(blend_path).parent
    path = render_filepath or ""
    if path.startswith("//") or not (path.startswith(("/", "\\")) or _DRIVE.match(path)):
        return OutputRoot(blend_folder)
    # Absolute: the farm dropped the root; its folders are the scene's output folder.
    mapped = _DRIVE.sub("", path).replace("\\", "/").lstrip("/")
    folder, _, _name = mapped.rpartition("/")
    if not folder:  # frames at the filesystem's root: never write there, but beside the .blend
        return OutputRoot(blend_folder)
    absolute = Path(path) if not path.endswith(("/", "\\")) else Path(path) / "_"
    return OutputRoot(absolute.parent, f"{folder}/")


def parse_listing(body: Any) -> list[dict[str, Any]]:
    """The `files` of a deliverables answer, each checked for shape (not for safety)."""
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, list):
        raise FarmError("The coordinator's list of deliverables is malformed (no 'files').")
    checked: list[dict[str, Any]] = []
    for entry in files:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("sha256"), str)
            and _SHA256.fullmatch(entry["sha256"])
            and isinstance(entry.get("size"), int)
            and entry.get("kind") in KINDS
            and (entry.get("frame") is None or isinstance(entry.get("frame"), int))
        ):
            raise FarmError(f"The coordinator listed a malformed deliverable: {entry!r:.200}.")
        checked.append(entry)
    return checked


def listing(client: FarmClient, job_id: str) -> list[dict[str, Any]] | None:
    """The job's deliverables, or None when the coordinator has no deliverables API (it
    answers 404: an older coordinator; the caller falls back to frame downloads)."""
    response = client.request("GET", f"/jobs/{job_id}/deliverables", ok=(200, 404))
    if response.status_code == 404:
        return None
    try:
        body = response.json()
    except ValueError as exc:
        raise FarmError("The coordinator's list of deliverables is not JSON.") from exc
    return parse_listing(body)


def has_file(target: Path, sha256: str, size: int) -> bool:
    return target.is_file() and target.stat().st_size == size and sha256_file(target) == sha256


@dataclass
class Fetched:
    """What one pass over the listing did."""

    #: (entry, where it is) for every file now on disk, downloaded or already there.
    placed: list[tuple[dict[str, Any], Path]]
    downloaded: int
    refused: list[str]


def fetch_all(
    client: FarmClient,
    job_id: str,
    files: list[dict[str, Any]],
    root: OutputRoot,
    done: frozenset[str] = frozenset(),
) -> Fetched:
    """Bring every listed file not in `done` (keys of `key()`) under `root`."""
    fetched = Fetched(placed=[], downloaded=0, refused=[])
    for entry in files:
        if key(entry) in done:
            continue
        try:
            target = root.target(entry["path"])
        except UnsafePathError as exc:
            fetched.refused.append(str(exc))
            continue
        if not has_file(target, entry["sha256"], entry["size"]):
            client.download_checked(
                f"/jobs/{job_id}/deliverables/{entry['sha256']}", target, entry["sha256"]
            )
            fetched.downloaded += 1
        fetched.placed.append((entry, target))
    return fetched


def key(entry: dict[str, Any]) -> str:
    """What the scene remembers of a file it has (its hash and path)."""
    return f"{entry['sha256']} {entry['path']}"

"""One poll of a submitted job: its status, and its files brought home (the coordinator's
deliverables, placed by deliverables.py; from a coordinator without them, the finished
frames as `frame_####.exr` in the scene's output folder).

No bpy here (the scene's settings come in a `PollTarget`): it runs on the following
thread, and the results are applied on Blender's main thread by follow.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .client import FarmClient, FarmError
from .deliverables import OutputRoot, fetch_all, key, listing
from .spec import frame_file_name


@dataclass(frozen=True)
class PollTarget:
    """One scene's job to poll and where its files go (read on the main thread)."""

    url: str
    token: str
    job_id: str
    #: Where frames go when the coordinator has no deliverables (`frame_####.exr`).
    frames_folder: Path
    kinds: tuple[str, ...]
    root: OutputRoot
    downloaded_frames: frozenset[int] = frozenset()
    downloaded_files: frozenset[str] = frozenset()


def poll_job(target: PollTarget) -> dict[str, Any]:
    """Fetch the job and bring home its files not downloaded yet: its deliverables, or
    its finished frames from a coordinator without deliverables (404). No bpy: it runs on
    a thread. Returns {"job", "frames": [(frame, path)], "files": [key], "refused":
    [message], "error": message or None}."""
    result: dict[str, Any] = {
        "job_id": target.job_id,
        "job": None,
        "frames": [],
        "files": [],
        "refused": [],
        "error": None,
    }
    where = target.root.folder
    try:
        with FarmClient(target.url, target.token) as client:
            job = client.job(target.job_id)
            result["job"] = job
            files = listing(client, target.job_id)
            if files is None:
                where = target.frames_folder
                _poll_frames(client, target, job, result)
            else:
                fetched = fetch_all(
                    client, target.job_id, files, target.root, target.downloaded_files
                )
                result["refused"] = fetched.refused
                result["files"] = [key(entry) for entry, _path in fetched.placed]
                frames = [
                    (entry["frame"], str(path))
                    for entry, path in fetched.placed
                    if entry["kind"] == "frame" and entry["frame"] is not None
                ]
                result["frames"] = sorted(frames)
    except FarmError as exc:
        result["error"] = str(exc)
    except OSError as exc:
        result["error"] = f"Cannot write the job's files to {where}: {exc.strerror or exc}."
    return result


def _poll_frames(
    client: FarmClient, target: PollTarget, job: dict[str, Any], result: dict[str, Any]
) -> None:
    """Frame by frame, as `frame_####.exr` (and .png) in the scene's output folder (files
    of an earlier job in the same folder are replaced)."""
    folder, kinds = target.frames_folder, target.kinds
    for frame in sorted(set(job.get("frames_done") or []) - target.downloaded_frames):
        for kind in kinds:
            client.download_frame(target.job_id, frame, folder / frame_file_name(frame, kind), kind)
        result["frames"].append((frame, str(folder / frame_file_name(frame, kinds[0]))))

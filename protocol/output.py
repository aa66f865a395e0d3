"""Wire models of what a job delivers: the scene's movie settings, the files a finish
task uploads (`FinishManifest`) and the deliverables a client downloads.

Every path here is relative to the scene's output folder and checked by
`relative_output_path`: a name from a stranger can never climb out of it. Data shapes
only: no I/O.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from protocol.base import Sha256, Strict

__all__ = [
    "FINISH_MANIFEST",
    "MAX_FINISH_FILES",
    "Deliverable",
    "DeliverableKind",
    "Deliverables",
    "FinishManifest",
    "FinishedEntry",
    "MovieOutput",
    "relative_output_path",
]


class MovieOutput(Strict):
    """A scene's movie settings, as the submitter's inspection read them."""

    #: Blender's name for the movie, relative to the scene's output folder.
    name: str = Field(min_length=1, max_length=500)
    container: str = Field(min_length=1, max_length=40)
    codec: str = Field(min_length=1, max_length=40)
    fps: float = Field(gt=0, le=1000)
    crf: str = Field(default="MEDIUM", max_length=40)
    preset: str = Field(default="GOOD", max_length=40)
    gop: int = Field(default=18, ge=0, le=1000)
    bitrate_kbps: int = Field(default=6000, ge=1, le=1_000_000)
    color_mode: str = Field(default="RGB", max_length=10)

    @field_validator("name")
    @classmethod
    def _relative_name(cls, value: str) -> str:
        return relative_output_path(value)


def relative_output_path(value: str) -> str:
    """A deliverable's path: relative, '/'-separated, no '..', no odd characters."""
    parts = value.split("/")
    if (
        value.startswith("/")
        or "\\" in value
        or any(part in ("", ".", "..") for part in parts)
        or len(value) > 500
        or any(ord(ch) < 32 or ch in ':*?"<>|' for ch in value)
    ):
        raise ValueError(f"'{value[:100]}' is not a relative path inside the output folder")
    return value


#: What a deliverable is: the scene's own frame file, a File Output node's file, the raw
#: multilayer EXR of every pass, the scene's movie, or the job's preview MP4.
DeliverableKind = Literal["frame", "file_output", "raw_exr", "movie", "preview_video"]
#: At most this many files come back from one finish (File Output nodes write several).
MAX_FINISH_FILES = 256


class Deliverable(Strict):
    """One file of a job's output, under the scene's output folder."""

    frame: int | None = None
    path: str = Field(min_length=1, max_length=500)
    sha256: Sha256
    size: int = Field(ge=0)
    kind: DeliverableKind

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        return relative_output_path(value)


class Deliverables(Strict):
    """GET /jobs/{id}/deliverables: every file a client downloads into DIR/<scene>/."""

    scene: str
    files: list[Deliverable]


class FinishedEntry(Strict):
    path: str = Field(min_length=1, max_length=500)
    kind: Literal["frame", "file_output"]

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        return relative_output_path(value)


#: The name of a finish upload's `FinishManifest` inside its zip.
FINISH_MANIFEST = "manifest.json"


class FinishManifest(Strict):
    """`manifest.json` of a finish task's upload (a zip of the files it wrote)."""

    files: list[FinishedEntry] = Field(min_length=1, max_length=MAX_FINISH_FILES)
    warnings: list[Annotated[str, Field(max_length=1000)]] = Field(
        default_factory=list, max_length=50
    )

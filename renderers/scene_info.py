"""Scene inspection: what a .blend will render, and every reason it cannot, before any work.

`inspect_scene` checks the path and the file's magic bytes here, then asks a render
worker to open the file with scripts disabled and describe it, then refuses scenes that
cannot render on the farm (no camera, unsupported engine). Warnings (Python drivers,
registered text blocks, missing files, compositing) are reported, not fatal.

Nothing here imports bpy; Blender runs only inside the worker process.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import (
    NoCameraError,
    NotABlendFileError,
    SceneNotFoundError,
    SceneUnreadableError,
    UnsupportedEngineError,
)
from renderers.video import CODECS, CONTAINERS

if TYPE_CHECKING:
    from renderers.worker import RenderWorker

#: Uncompressed, gzip (Blender < 3.0) and zstd (Blender >= 3.0) .blend files.
BLEND_MAGICS = (b"BLENDER", b"\x1f\x8b", b"\x28\xb5\x2f\xfd")
SUPPORTED_ENGINES = ("CYCLES",)
KNOWN_UNSUPPORTED_ENGINES = {
    "BLENDER_EEVEE": "EEVEE",
    "BLENDER_EEVEE_NEXT": "EEVEE",
    "BLENDER_WORKBENCH": "Workbench",
}


@dataclass(frozen=True, slots=True)
class ViewLayerInfo:
    name: str
    use: bool
    passes: tuple[str, ...]
    denoising_store_passes: bool


@dataclass(frozen=True, slots=True)
class OutputInfo:
    """What the finish step needs to know about a scene's output (worker_finish.py's
    `describe_output`): format, depth, path, compositor in use and what it reads."""

    media_type: str
    file_format: str
    color_depth: str
    color_mode: str
    exr_codec: str
    #: The output path as stored ('//render/shot_####', templates unexpanded).
    filepath: str
    #: Blender's name for the current frame relative to the .blend's folder, or None
    #: when `path_error` says why not.
    frame_path: str | None
    path_error: str | None
    view_transform: str
    look: str
    compositor: bool
    #: 'ViewLayer.Pass' for every pass the compositor reads ('Combined' for Image).
    compositor_passes: tuple[str, ...]
    file_outputs: tuple[str, ...]
    #: The scene's movie settings (container, codec, fps...) when it outputs a movie.
    movie: dict[str, Any] | None
    #: What the finish cannot honour (files outside the bundle, other scenes).
    warnings: tuple[str, ...]
    #: Why the finish refuses this scene (a sequencer edit), or None.
    refusal: str | None

    @property
    def is_movie(self) -> bool:
        return self.movie is not None

    @classmethod
    def from_worker(cls, raw: dict[str, Any]) -> OutputInfo:
        return cls(
            media_type=str(raw["media_type"]),
            file_format=str(raw["file_format"]),
            color_depth=str(raw["color_depth"]),
            color_mode=str(raw["color_mode"]),
            exr_codec=str(raw["exr_codec"]),
            filepath=str(raw["filepath"]),
            frame_path=raw["frame_path"],
            path_error=raw["path_error"],
            view_transform=str(raw["view_transform"]),
            look=str(raw["look"]),
            compositor=bool(raw["compositor"]),
            compositor_passes=tuple(raw["compositor_passes"]),
            file_outputs=tuple(raw["file_outputs"]),
            movie=raw["movie"],
            warnings=tuple(raw["warnings"]),
            refusal=raw["refusal"],
        )


@dataclass(frozen=True, slots=True)
class SceneInfo:
    """What a scene asks for, as read by Blender (see worker_main._describe_scene)."""

    path: Path
    name: str
    frame_start: int
    frame_end: int
    frame_step: int
    fps: float
    resolution_x: int
    resolution_y: int
    resolution_percentage: int
    width: int
    height: int
    engine: str
    samples: int
    adaptive_sampling: bool
    adaptive_threshold: float
    denoising: bool
    denoiser: str
    seed: int
    animated_seed: bool
    camera: str | None
    cameras: tuple[str, ...]
    output_format: str
    use_compositing: bool
    view_layers: tuple[ViewLayerInfo, ...]
    python_warnings: tuple[str, ...]
    missing_files: tuple[str, ...]
    libraries: tuple[str, ...]
    blender_version: str
    file_version: str
    warnings: tuple[str, ...] = field(default=())
    #: The scene's output as the finish step sees it (None from an older worker).
    output: OutputInfo | None = None
    #: `cycles.adaptive_min_samples` (0: automatic; None from an older worker).
    adaptive_min_samples: int | None = None

    @classmethod
    def from_worker(cls, path: Path, raw: dict[str, Any]) -> SceneInfo:
        layers = tuple(
            ViewLayerInfo(
                name=str(layer["name"]),
                use=bool(layer["use"]),
                passes=tuple(layer["passes"]),
                denoising_store_passes=bool(layer["denoising_store_passes"]),
            )
            for layer in raw["view_layers"]
        )
        info = cls(
            path=path,
            name=str(raw["name"]),
            frame_start=int(raw["frame_start"]),
            frame_end=int(raw["frame_end"]),
            frame_step=int(raw["frame_step"]),
            fps=float(raw["fps"]),
            resolution_x=int(raw["resolution_x"]),
            resolution_y=int(raw["resolution_y"]),
            resolution_percentage=int(raw["resolution_percentage"]),
            width=int(raw["width"]),
            height=int(raw["height"]),
            engine=str(raw["engine"]),
            samples=int(raw["samples"]),
            adaptive_sampling=bool(raw["adaptive_sampling"]),
            adaptive_threshold=float(raw["adaptive_threshold"]),
            adaptive_min_samples=(
                None
                if raw.get("adaptive_min_samples") is None
                else int(raw["adaptive_min_samples"])
            ),
            denoising=bool(raw["denoising"]),
            denoiser=str(raw["denoiser"]),
            seed=int(raw["seed"]),
            animated_seed=bool(raw["animated_seed"]),
            camera=raw["camera"],
            cameras=tuple(raw["cameras"]),
            output_format=str(raw["output_format"]),
            use_compositing=bool(raw["use_compositing"]),
            view_layers=layers,
            python_warnings=tuple(raw["python_warnings"]),
            missing_files=tuple(raw["missing_files"]),
            libraries=tuple(raw["libraries"]),
            blender_version=str(raw["blender_version"]),
            file_version=str(raw["file_version"]),
            output=OutputInfo.from_worker(raw["output"]) if raw.get("output") else None,
        )
        return _with_warnings(info)

    @property
    def frame_count(self) -> int:
        return len(range(self.frame_start, self.frame_end + 1, max(1, self.frame_step)))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def movie_problem(output: OutputInfo) -> str | None:
    """Why the farm cannot encode the scene's movie (its frames still come back), or None.
    Old files often name a codec Blender 5 no longer knows."""
    if output.movie is None:
        return None
    container, codec = output.movie.get("container"), output.movie.get("codec")
    if container in CONTAINERS and codec in CODECS:
        return None
    return (
        f"The scene's movie ({container or 'no container'}, {codec or 'no codec'}) cannot be "
        "encoded by the farm; its frames are delivered as 16-bit PNG instead. Choose a "
        "codec in Output Properties > Encoding to get the movie."
    )


def _with_warnings(info: SceneInfo) -> SceneInfo:
    warnings = list(info.python_warnings)
    if info.output is not None:
        warnings.extend(info.output.warnings)
        if info.output.refusal:
            warnings.append(info.output.refusal)
        if (problem := movie_problem(info.output)) is not None:
            warnings.append(problem)
    warnings.extend(f"Missing file: {path}" for path in info.missing_files)
    return replace(info, warnings=tuple(warnings))


def check_scene_file(path: Path) -> Path:
    """Refuse paths that are missing, unreadable or not a .blend, before Blender starts."""
    if not path.exists():
        raise SceneNotFoundError(f"Scene file not found: {path}")
    if path.is_dir():
        raise NotABlendFileError(f"{path} is a folder, not a .blend file.")
    if not os.access(path, os.R_OK):
        raise SceneUnreadableError(f"Cannot read {path}: permission denied.")
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise SceneUnreadableError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
    if not head.startswith(BLEND_MAGICS):
        raise NotABlendFileError(
            f"{path} is not a Blender file (it does not start with a .blend header)."
        )
    return path.resolve()


def validate_renderable(info: SceneInfo) -> None:
    """Raise the first reason this scene cannot be rendered on the farm, if any."""
    if info.engine not in SUPPORTED_ENGINES:
        friendly = KNOWN_UNSUPPORTED_ENGINES.get(info.engine)
        if friendly:
            raise UnsupportedEngineError(
                f"{info.path.name} uses {friendly} ({info.engine}); Tessera renders with "
                "Cycles only (EEVEE has no GPU-free headless path fast enough for a farm)."
            )
        raise UnsupportedEngineError(
            f"{info.path.name} uses an unknown render engine '{info.engine}' "
            "(an add-on engine?); Tessera renders with Cycles only."
        )
    if info.camera is None:
        where = (
            f" It has cameras ({', '.join(info.cameras)}) but none is active."
            if info.cameras
            else " It has no camera object at all."
        )
        raise NoCameraError(f"{info.path.name} (scene '{info.name}') has no active camera.{where}")


def inspect_scene(
    worker: RenderWorker, path: Path, *, require_renderable: bool = True
) -> SceneInfo:
    """Check, open and describe a scene; raise a SceneError subclass if it cannot render."""
    resolved = check_scene_file(path)
    info = SceneInfo.from_worker(resolved, worker.inspect(resolved))
    if require_renderable:
        validate_renderable(info)
    return info

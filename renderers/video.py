"""Movies from finished frames: the scene's own movie and a preview MP4.

A scene whose output is a movie (FFMPEG) is finished frame by frame as lossless 16-bit
PNGs (renderers.worker_finish); once every frame is done, `encode_movie` encodes them
with the scene's container and codec as far as ffmpeg's command line maps them
(`MovieSpec`, read from the scene by the finish). `encode_preview` makes the quick-look
video every job gets (like Flamenco's preview task): H.264 in MP4, yuv420p, even
dimensions (padded by one pixel where needed). `probe_video` reads a movie's size,
codec and frame count back.

The ffmpeg binary is imageio-ffmpeg's (a static build with libx264). Pure functions:
frames in, one file out (written atomically), `VideoError` on any failure. Blender's
own movie writer converts to display space and quantises to 8 bit before its YUV
conversion; this encoder starts from the same display-space frames in 16 bit, so the
movie matches Blender's in content but is not bit-identical (no lossy codec would be).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import TesseraError

__all__ = [
    "MovieSpec",
    "VideoError",
    "VideoInfo",
    "encode_movie",
    "encode_preview",
    "ffmpeg_binary",
    "probe_video",
]


class VideoError(TesseraError):
    """A movie could not be encoded or read."""


#: Blender's container (`render.ffmpeg.format`) -> ffmpeg muxer.
CONTAINERS = {
    "MPEG4": "mp4",
    "MKV": "matroska",
    "WEBM": "webm",
    "AVI": "avi",
    "QUICKTIME": "mov",
    "OGG": "ogg",
    "FLASH": "flv",
    "MPEG1": "mpeg",
    "MPEG2": "dvd",
    "DV": "dv",
}
#: Blender's codec -> (ffmpeg encoder, pixel format).
CODECS = {
    "H264": ("libx264", "yuv420p"),
    "H265": ("libx265", "yuv420p"),
    "MPEG4": ("mpeg4", "yuv420p"),
    "AV1": ("libaom-av1", "yuv420p"),
    "WEBM": ("libvpx-vp9", "yuv420p"),
    "THEORA": ("libtheora", "yuv420p"),
    "MPEG1": ("mpeg1video", "yuv420p"),
    "MPEG2": ("mpeg2video", "yuv420p"),
    "DV": ("dvvideo", "yuv411p"),
    "FLASH": ("flv", "yuv420p"),
    "FFV1": ("ffv1", "rgb48le"),
    "HUFFYUV": ("huffyuv", "rgb24"),
    "PNG": ("png", "rgb24"),
    "QTRLE": ("qtrle", "rgb24"),
    "DNXHD": ("dnxhd", "yuv422p"),
    "PRORES": ("prores_ks", "yuv422p10le"),
}
#: Blender's constant_rate_factor -> x264/x265 CRF (Blender's own table).
CRF = {
    "LOSSLESS": 0,
    "PERC_LOSSLESS": 17,
    "HIGH": 20,
    "MEDIUM": 23,
    "LOW": 26,
    "VERYLOW": 29,
    "LOWEST": 32,
}
_PRESETS = {"BEST": "slower", "GOOD": "medium", "REALTIME": "superfast"}
_CRF_CODECS = ("H264", "H265", "AV1", "WEBM")
#: Pads the right/bottom edge by one pixel where a dimension is odd.
_EVEN_PAD = "pad=ceil(iw/2)*2:ceil(ih/2)*2:0:0"
#: RGB -> Rec.709 YUV with accurate rounding (measured: swscale's default path from
#: 16-bit PNG darkened a preview by ~5/255), tagged so players decode it the same way.
_TO_YUV = "scale=flags=accurate_rnd+full_chroma_int:out_color_matrix=bt709:out_range=tv"
_YUV_TAGS = ["-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "iec61966-2-1"]


@dataclass(frozen=True, slots=True)
class MovieSpec:
    """A scene's movie output, as the finish read it from `render.ffmpeg`."""

    #: Blender's own name for the whole range, relative to the output folder
    #: (e.g. render/shot_0001-0010.mp4).
    name: str
    container: str
    codec: str
    fps: float
    frame_start: int
    frame_end: int
    crf: str = "MEDIUM"
    preset: str = "GOOD"
    gop: int = 18
    bitrate_kbps: int = 6000
    color_mode: str = "RGB"

    @classmethod
    def from_worker(cls, raw: dict[str, Any]) -> MovieSpec:
        return cls(
            name=str(raw["name"]),
            container=str(raw["container"]),
            codec=str(raw["codec"]),
            fps=float(raw["fps"]) / float(raw.get("fps_base") or 1.0),
            frame_start=int(raw["frame_start"]),
            frame_end=int(raw["frame_end"]),
            crf=str(raw.get("crf", "MEDIUM")),
            preset=str(raw.get("preset", "GOOD")),
            gop=int(raw.get("gop", 18)),
            bitrate_kbps=int(raw.get("bitrate_kbps", 6000)),
            color_mode=str(raw.get("color_mode", "RGB")),
        )

    def ffmpeg_arguments(self) -> list[str]:
        """Encoder arguments for this spec; VideoError for what ffmpeg cannot write."""
        if self.container not in CONTAINERS:
            raise VideoError(f"Unknown movie container {self.container!r}.")
        if self.codec not in CODECS:
            raise VideoError(
                f"Movie codec {self.codec!r} cannot be encoded here "
                f"(known: {', '.join(sorted(CODECS))})."
            )
        encoder, pixel_format = CODECS[self.codec]
        if self.codec in ("PNG", "QTRLE") and self.color_mode == "RGBA":
            pixel_format = "argb" if self.codec == "QTRLE" else "rgba"
        arguments = ["-c:v", encoder, "-pix_fmt", pixel_format, "-g", str(self.gop)]
        if pixel_format.startswith("yuv4"):  # chroma subsampling needs even dimensions
            arguments = ["-vf", f"{_EVEN_PAD},{_TO_YUV}", *arguments, *_YUV_TAGS]
        if self.codec in _CRF_CODECS and self.crf in CRF:
            arguments += ["-crf", str(CRF[self.crf])]
            if self.codec in ("H264", "H265"):
                arguments += ["-preset", _PRESETS.get(self.preset, "medium")]
            if self.codec in ("WEBM", "AV1"):
                arguments += ["-b:v", "0"]
        elif encoder in ("mpeg4", "mpeg1video", "mpeg2video", "flv", "libtheora"):
            arguments += ["-b:v", f"{self.bitrate_kbps}k"]
        if self.codec == "DNXHD":
            arguments += ["-profile:v", "dnxhr_hq"]
        return [*arguments, "-f", CONTAINERS[self.container]]


@dataclass(frozen=True, slots=True)
class VideoInfo:
    width: int
    height: int
    frames: int
    codec: str
    pixel_format: str


def ffmpeg_binary() -> str:
    """imageio-ffmpeg's ffmpeg executable."""
    try:
        import imageio_ffmpeg  # type: ignore[import-untyped]

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError) as exc:
        raise VideoError(f"No ffmpeg binary: {exc}", hint="pip install imageio-ffmpeg") from exc


def encode_movie(
    frames: Sequence[Path], spec: MovieSpec, output: Path, *, timeout: float = 1800
) -> Path:
    """Encode the finished frames (in order) as the scene's movie at `output`."""
    arguments = spec.ffmpeg_arguments()
    return _encode(frames, spec.fps, arguments, output, timeout)


def encode_preview(
    frames: Sequence[Path],
    output: Path,
    *,
    fps: float = 24.0,
    crf: int = 23,
    max_height: int | None = None,
    timeout: float = 1800,
) -> Path:
    """A preview video: H.264 MP4, yuv420p, even dimensions (a one-pixel pad on the
    right/bottom edge where odd), optionally scaled down to `max_height`."""
    filters = []
    if max_height is not None:
        filters.append(f"scale=-2:'min({int(max_height)},ih)':flags=lanczos")
    filters += [_EVEN_PAD, _TO_YUV]
    arguments = [
        *("-vf", ",".join(filters)),
        *_YUV_TAGS,
        *("-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), "-preset", "medium"),
        *("-g", "18", "-movflags", "+faststart", "-f", "mp4"),
    ]
    return _encode(frames, fps, arguments, output, timeout)


def probe_video(path: Path, *, timeout: float = 120) -> VideoInfo:
    """Size, codec, pixel format and frame count of a movie (decoded, not guessed)."""
    ffmpeg = ffmpeg_binary()
    if not path.is_file():
        raise VideoError(f"No movie at {path}.")
    probe = subprocess.run(
        [ffmpeg, "-hide_banner", "-i", str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    match = re.search(r"Video: (\w+)[^,]*, (\w+)(?:\([^)]*\))?, (\d+)x(\d+)", probe.stderr)
    if match is None:
        raise VideoError(f"{path.name} is not a readable movie:\n{probe.stderr[-800:]}")
    count = subprocess.run(
        [ffmpeg, "-hide_banner", "-i", str(path), "-map", "0:v:0", "-f", "null", "-"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    frames = re.findall(r"frame=\s*(\d+)", count.stderr)
    if count.returncode != 0 or not frames:
        raise VideoError(f"Decoding {path.name} failed:\n{count.stderr[-800:]}")
    return VideoInfo(
        width=int(match.group(3)),
        height=int(match.group(4)),
        frames=int(frames[-1]),
        codec=match.group(1),
        pixel_format=match.group(2),
    )


def _encode(
    frames: Sequence[Path], fps: float, arguments: list[str], output: Path, timeout: float
) -> Path:
    if not frames:
        raise VideoError("No frames to encode.")
    missing = [str(frame) for frame in frames if not frame.is_file()]
    if missing:
        raise VideoError(f"Frames missing: {', '.join(missing[:5])}")
    if fps <= 0:
        raise VideoError(f"A movie needs a positive frame rate, got {fps}.")
    suffix = {frame.suffix.lower() for frame in frames}
    if len(suffix) != 1:
        raise VideoError(f"Frames must share one format, got {sorted(suffix)}.")
    ffmpeg = ffmpeg_binary()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tessera-video-", dir=output.parent) as scratch:
        # A numbered sequence of links: ffmpeg's image2 demuxer reads it in order.
        pattern = Path(scratch) / f"%06d{suffix.pop()}"
        for index, frame in enumerate(frames):
            Path(str(pattern) % index).symlink_to(frame.resolve())
        partial = Path(scratch) / ("partial" + output.suffix)
        command = [
            *(ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y"),
            *("-framerate", f"{fps:g}", "-start_number", "0", "-i", str(pattern)),
            *arguments,
            str(partial),
        ]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise VideoError(f"ffmpeg took longer than {timeout:g} s for {output.name}.") from exc
        if done.returncode != 0 or not partial.is_file():
            raise VideoError(
                f"ffmpeg could not encode {output.name} (exit {done.returncode}):\n"
                f"{done.stderr.strip()[-1200:]}"
            )
        partial.replace(output)
    return output

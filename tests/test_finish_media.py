"""After the finish: a movie scene's movie, the preview MP4, and deliverable thumbnails.

The movie scene (tests/finish_tools.py, 63x47 so the H.264 encoders must pad) is finished
frame by frame from merged EXRs, then encoded with imageio-ffmpeg's binary. Thumbnails
are made from finished files of every kind the finish writes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from renderers.finish import FinishRequest
from renderers.local_render import LocalRenderOptions, render_frame_local
from renderers.preview import ThumbnailError, write_thumbnail
from renderers.video import (
    MovieSpec,
    VideoError,
    encode_movie,
    encode_preview,
    ffmpeg_binary,
    probe_video,
)
from renderers.worker import RenderWorker
from tests.finish_tools import make_finish_scenes

THUMBNAIL_CASES = ("agx_punchy_png16", "standard_curves_jpeg", "tiff16", "exr_half")


@pytest.fixture(scope="module")
def media(
    worker: RenderWorker, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[Path] | MovieSpec]:
    """Finished frames 1-4 of the movie scene, and frame 3 of each thumbnail case."""
    folder = tmp_path_factory.mktemp("finish-media")
    scenes = make_finish_scenes(folder, ["movie", *THUMBNAIL_CASES, "exr_multilayer"])
    frames, spec = [], None
    for frame in range(1, 5):
        merged = folder / f"movie_{frame}.exr"
        options = LocalRenderOptions(frame=frame, grid=(2, 2), preview=False)
        render_frame_local(worker, scenes["movie"], merged, options)
        result = worker.finish(FinishRequest(scenes["movie"], merged, frame, folder / "movie"))
        frames.append(result.frame_file)
        spec = result.movie
    assert spec is not None
    out: dict[str, list[Path] | MovieSpec] = {"frames": frames, "spec": spec}
    for case in (*THUMBNAIL_CASES, "exr_multilayer"):
        merged = folder / f"{case}.exr"
        render_frame_local(worker, scenes[case], merged, LocalRenderOptions(frame=3, preview=False))
        result = worker.finish(FinishRequest(scenes[case], merged, 3, folder / case))
        out[case] = [result.frame_file]
    return out


def _frames(media: dict[str, list[Path] | MovieSpec]) -> list[Path]:
    frames = media["frames"]
    assert isinstance(frames, list)
    return frames


def _first_frame_rgb(movie: Path, width: int, height: int) -> np.ndarray:
    raw = subprocess.run(
        [
            *(ffmpeg_binary(), "-v", "error", "-i", str(movie), "-frames:v", "1"),
            *("-vf", "scale=in_color_matrix=bt709:in_range=tv"),
            *("-f", "rawvideo", "-pix_fmt", "rgb24", "-"),
        ],
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(raw, np.uint8).reshape(height, width, 3)


def test_movie_scene_finishes_as_png_frames_and_encodes_its_movie(
    media: dict[str, list[Path] | MovieSpec],
) -> None:
    frames, spec = _frames(media), media["spec"]
    assert isinstance(spec, MovieSpec)
    assert [f.name for f in frames] == [f"shot_{n:04d}.png" for n in range(1, 5)]
    with Image.open(frames[0]) as first:
        assert first.size == (63, 47)
    assert spec.name == "render/shot_0001-0004.mp4"
    assert (spec.container, spec.codec, spec.fps, spec.frame_start, spec.frame_end) == (
        "MPEG4",
        "H264",
        24.0,
        1,
        4,
    )
    movie = encode_movie(frames, spec, frames[0].parent.parent / spec.name)
    info = probe_video(movie)
    assert (info.codec, info.frames, info.width, info.height) == ("h264", 4, 64, 48)


def test_preview_mp4_is_h264_yuv420p_even_and_matches_the_first_frame(
    media: dict[str, list[Path] | MovieSpec], tmp_path: Path
) -> None:
    frames = _frames(media)
    preview = encode_preview(frames, tmp_path / "preview.mp4", fps=24)
    info = probe_video(preview)
    assert (info.codec, info.pixel_format, info.frames) == ("h264", "yuv420p", 4)
    assert (info.width, info.height) == (64, 48)  # 63x47 padded to even
    decoded = _first_frame_rgb(preview, 64, 48)[:47, :63].astype(np.int32)
    with Image.open(frames[0]) as first:
        source = np.asarray(first.convert("RGB")).astype(np.int32)
    # Codec tolerance in 8-bit units (CRF 23 on a 63x47 frame with a hot emitter's sharp
    # edges): no colour shift, small average error.
    bias = (decoded - source).mean(axis=(0, 1))
    assert np.abs(bias).max() < 1.5, bias
    assert np.abs(decoded - source).mean() < 6.0


def test_video_errors_are_clear(media: dict[str, list[Path] | MovieSpec], tmp_path: Path) -> None:
    frames = _frames(media)
    with pytest.raises(VideoError, match="No frames"):
        encode_preview([], tmp_path / "none.mp4")
    with pytest.raises(VideoError, match="missing"):
        encode_preview([tmp_path / "gone.png"], tmp_path / "gone.mp4")
    spec = media["spec"]
    assert isinstance(spec, MovieSpec)
    from dataclasses import replace

    with pytest.raises(VideoError, match="CINEPAK"):
        encode_movie(frames, replace(spec, codec="CINEPAK"), tmp_path / "x.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a movie")
    with pytest.raises(VideoError, match="not a readable movie"):
        probe_video(junk)
    with pytest.raises(VideoError, match="No movie"):
        probe_video(tmp_path / "absent.mp4")
    assert not (tmp_path / "none.mp4").exists() and not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("case", [*THUMBNAIL_CASES, "exr_multilayer"])
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_thumbnail_of_each_deliverable(
    media: dict[str, list[Path] | MovieSpec], tmp_path: Path, case: str, suffix: str
) -> None:
    (deliverable,) = media[case]  # type: ignore[misc]
    thumbnail = write_thumbnail(deliverable, tmp_path / f"thumb{suffix}", max_size=32)
    with Image.open(thumbnail) as image:
        assert max(image.size) == 32 and image.size == (32, 24)
        assert image.format == ("PNG" if suffix == ".png" else "JPEG")
        assert image.info.get("icc_profile")
        pixels = np.asarray(image.convert("RGB")).astype(np.float64)
    assert pixels.mean() > 10, "not a black thumbnail"
    if case == "agx_punchy_png16":
        # Display-referred deliverables are shown as they are: the thumbnail is the
        # deliverable scaled down, not the raw render.
        with Image.open(deliverable) as full:
            small = np.asarray(
                full.convert("RGB").resize((32, 24), Image.Resampling.LANCZOS)
            ).astype(np.float64)
        assert np.abs(small - pixels).mean() < 6


def test_thumbnail_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ThumbnailError):
        write_thumbnail(junk, tmp_path / "t.png")
    with pytest.raises(ThumbnailError, match="PNG or JPEG"):
        write_thumbnail(junk, tmp_path / "t.gif")
    with pytest.raises(ThumbnailError, match="Cannot read"):
        write_thumbnail(tmp_path / "missing.exr", tmp_path / "t.png")

"""Helpers for the mixed-attack soak (issue 17): a real `tessera node` process, a black
copy of the demo scene, a small honest job spec, a recorder of attack replies, and a
check of a finished frame."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocol.models import FrameRange, JobSpec, SceneSummary, TileGrid
from tests.farm_tools import REPO

#: The demo scene as `renderers/demo_scene` writes it (resources/scenes/make_demo.py).
DEMO_SUMMARY: dict[str, Any] = {
    "name": "Scene",
    "frame_start": 1,
    "frame_end": 24,
    "resolution_x": 640,
    "resolution_y": 360,
    "resolution_percentage": 100,
    "samples": 64,
    "adaptive_sampling": True,
    "denoising": True,
    "camera": "Camera",
}

_BLACKEN = r"""
import sys
import bpy
src, dst = sys.argv[-2], sys.argv[-1]
bpy.ops.wm.open_mainfile(filepath=src, load_ui=False, use_scripts=False)
scene = bpy.context.scene
for obj in list(bpy.data.objects):
    if obj.type == "LIGHT":
        bpy.data.objects.remove(obj)
    elif obj.type == "MESH":
        obj.data.materials.clear()
scene.world = None
bpy.ops.wm.save_as_mainfile(filepath=dst, compress=False, relative_remap=False)
print("camera", scene.camera.name if scene.camera else None, "scene", scene.name)
"""


def black_scene(source: Path, target: Path) -> Path:
    """`source` with no lights, no world and no materials (so no emission): it renders black."""
    script = target.with_suffix(".blacken.py")
    script.write_text(_BLACKEN)
    done = subprocess.run(
        [sys.executable, "-I", str(script), str(source), str(target)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0 or not target.exists():
        raise RuntimeError(f"blackening {source.name} failed:\n{done.stderr[-3000:]}")
    return target


def demo_spec(
    bundle: str,
    name: str,
    frames: tuple[int, int],
    *,
    tiles: tuple[int, int] = (2, 2),
    samples: int | None = 2,
    **fields: Any,
) -> dict[str, Any]:
    """A job of the demo scene at 10% (64x36), no denoising, as JSON."""
    scene = SceneSummary(**{**DEMO_SUMMARY, **fields.pop("scene", {})})
    spec = JobSpec(
        name=name,
        bundle=bundle,
        scene_path="scene.blend",
        scene=scene,
        frames=FrameRange(start=frames[0], end=frames[1]),
        tiles=TileGrid(columns=tiles[0], rows=tiles[1]),
        percentage=10,
        samples=samples,
        denoise=False,
        **fields,
    )
    return spec.model_dump(mode="json")


@dataclass
class RealNode:
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@contextmanager
def real_node(
    url: str, token: str, folder: Path, name: str = "honest", price: float = 1.0
) -> Iterator[RealNode]:
    """`tessera node` as its own process (one render thread, no benchmark) against `url`;
    Ctrl-C'd (then killed) on the way out."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "node.log"
    argv = [
        sys.executable, "-m", "app.cli", "node",
        "--coordinator", url, "--token", token, "--name", name,
        "--threads", "1", "--data", str(folder / "data"), "--no-benchmark",
        "--price", str(price), "--task-timeout", "120", "--min-free-disk", "0",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield RealNode(process, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


@dataclass
class Tally:
    """What every attack got back, by attack; and what should never have happened."""

    replies: dict[str, Counter[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, attack: str, outcome: int | str) -> None:
        with self.lock:
            self.replies.setdefault(attack, Counter())[str(outcome)] += 1

    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.problems) < 200:
                self.problems.append(text)

    def expect(self, attack: str, status: int, allowed: set[int], text: str = "") -> None:
        """Note `status`; a status outside `allowed` (429 and 503 always allowed: the
        farm's own flood limits) is a problem."""
        self.note(attack, status)
        if status not in allowed | {429, 503}:
            self.problem(f"{attack}: {status} {text[:200]!r} (want one of {sorted(allowed)})")

    def summary(self) -> str:
        return json.dumps({k: dict(v) for k, v in sorted(self.replies.items())}, sort_keys=True)


def check_frame(data: bytes, folder: Path, name: str, size: tuple[int, int]) -> list[str]:
    """Problems with a finished frame of the lit demo scene: its size, non-finite
    pixels, a quarter (a tile of 2x2) that is black."""
    from renderers.exr import read_exr

    path = folder / name
    path.write_bytes(data)
    rgba = read_exr(path).combined_rgba()
    width, height = size
    if rgba.shape[:2] != (height, width):
        return [f"{name}: {rgba.shape[1]}x{rgba.shape[0]}, want {width}x{height}"]
    problems = []
    if not np.isfinite(rgba).all():
        problems.append(f"{name}: non-finite pixels")
    hx, hy = width // 2, height // 2
    for label, quarter in (
        ("top-left", rgba[:hy, :hx]),
        ("top-right", rgba[:hy, hx:]),
        ("bottom-left", rgba[hy:, :hx]),
        ("bottom-right", rgba[hy:, hx:]),
    ):
        if float(quarter[..., :3].mean()) < 1e-3:
            problems.append(f"{name}: the {label} quarter is black")
    return problems


def wait_until(predicate: Any, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())

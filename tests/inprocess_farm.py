"""An in-process coordinator (`Farm` on a real SQLite file and content store) with a
small job and two provider nodes, for tests of the coordinator's rules that need to
control time or state directly. Results are synthetic EXRs cut from one known image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.farm import Farm, Principal
from protocol.models import FrameRange, JobSpec, NodeCapabilities, Role, SceneSummary, TileGrid
from renderers.exr import ExrImage, ExrPart, write_exr
from tests.farm_tools import make_bundle

#: The "true" pixels of a 64x48 frame: every honest result is cut from it.
TRUTH = np.random.default_rng(1).uniform(0, 1, (48, 64, 4)).astype(np.float32)
CAPS = NodeCapabilities(name="n", blender_versions=["5.0.1"], cpu="EPYC", cpu_kernel="AVX2")


def write_tile_exr(path: Path, rgba: npt.NDArray[np.floating[Any]]) -> Path:
    """A one-pass multilayer EXR of `rgba`, as a node would upload."""
    channels = {
        f"ViewLayer.Combined.{c}": np.ascontiguousarray(rgba[..., i].astype(np.float32))
        for i, c in enumerate("RGBA")
    }
    part = ExrPart("ViewLayer.Combined", channels)
    write_exr(path, ExrImage(rgba.shape[1], rgba.shape[0], [part]))
    return path


def small_spec() -> JobSpec:
    """A 64x48 job of 2x1 tiles (64 x 48 at 10% of the scene's size), without denoising."""
    scene = SceneSummary(
        name="Scene",
        frame_start=1,
        frame_end=10,
        resolution_x=640,
        resolution_y=480,
        resolution_percentage=100,
        samples=8,
        adaptive_sampling=False,
        denoising=False,
        camera="Camera",
    )
    return JobSpec(
        name="job",
        bundle="0" * 64,
        scene_path="scene.blend",
        scene=scene,
        frames=FrameRange(start=1, end=1),
        tiles=TileGrid(columns=2, rows=1),
        percentage=10,
        max_price=1.0,
    )


def setup_farm(farm: Farm, spec: JobSpec, demo_scene: Path, folder: Path) -> tuple[str, list[str]]:
    """A submitted 2-tile job and two online nodes of two provider accounts."""
    farm.create_account("artist", Role.REQUESTER)
    farm.grant_credits(Principal("admin", Role.ADMIN), "artist", 100)
    path, sha = make_bundle(demo_scene, folder)
    farm.put_bundle(sha, iter([path.read_bytes()]))
    job = farm.submit(Principal("artist", Role.REQUESTER), spec.model_copy(update={"bundle": sha}))
    nodes = []
    for name in ("a", "b"):
        farm.create_account(name, Role.PROVIDER)
        caps = CAPS.model_copy(update={"name": name, "price": 1.0})
        nodes.append(farm.register_node(Principal(name, Role.PROVIDER), caps).node_id)
    return job.id, nodes


def task_status(farm: Farm, task_id: str) -> str:
    return str(farm.db.fetch_one("SELECT status FROM tasks WHERE id = ?", (task_id,))[0])

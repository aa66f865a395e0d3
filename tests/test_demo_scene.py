"""The demo scene generator (resources/scenes/make_demo.py), checked in real Blender.

The script is run in a subprocess with this interpreter (the venv's bpy), the result is
opened in another subprocess with scripts disabled, and what it contains is reported back
as JSON: render settings, lights, materials, animation, and anything the farm refuses to
run (Python drivers, text blocks).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
GENERATOR = REPO / "resources" / "scenes" / "make_demo.py"
RESULT_PREFIX = "TESSERA-RESULT:"

INSPECT = r"""
import json, sys
import bpy

def socket_value(node, name):
    socket = node.inputs.get(name)
    return None if socket is None else socket.default_value

def material_kinds(mat):
    kinds = set()
    if mat.node_tree is None:
        return kinds
    for node in mat.node_tree.nodes:
        if node.type == "BSDF_PRINCIPLED":
            colour = socket_value(node, "Emission Color")
            if socket_value(node, "Emission Strength") > 0 and max(colour[:3]) > 0:
                kinds.add("emissive")
            if socket_value(node, "Transmission Weight") >= 0.99:
                kinds.add("glass")
        elif node.type == "EMISSION" and socket_value(node, "Strength") > 0:
            kinds.add("emissive")
        elif node.type in {"BSDF_GLASS", "BSDF_REFRACTION"}:
            kinds.add("glass")
    return kinds

def animated_ids():
    for name in dir(bpy.data):
        collection = getattr(bpy.data, name, None)
        if not isinstance(collection, bpy.types.bpy_prop_collection):
            continue
        for item in collection:
            if not isinstance(item, bpy.types.ID):
                continue
            yield item
            tree = getattr(item, "node_tree", None)
            if tree is not None:
                yield tree

def matrices(scene, frame):
    scene.frame_set(frame)
    return {o.name: [round(v, 5) for row in o.matrix_world for v in row] for o in scene.objects}

def inspect(path):
    bpy.ops.wm.open_mainfile(filepath=path, load_ui=False, use_scripts=False)
    scene = bpy.context.scene
    drivers = []
    for item in animated_ids():
        anim = getattr(item, "animation_data", None)
        if anim is not None:
            drivers += [(item.name, d.data_path, d.driver.type) for d in anim.drivers]
    first, mid, last = matrices(scene, 1), matrices(scene, 12), matrices(scene, 24)
    used = {
        slot.material.name
        for o in scene.objects
        for slot in o.material_slots
        if o.type == "MESH" and slot.material is not None
    }
    return {
        "engine": scene.render.engine,
        "camera": scene.camera.name if scene.camera else None,
        "camera_type": scene.camera.type if scene.camera else None,
        "frames": [scene.frame_start, scene.frame_end],
        "resolution": [
            scene.render.resolution_x,
            scene.render.resolution_y,
            scene.render.resolution_percentage,
        ],
        "film_transparent": scene.render.film_transparent,
        "device": scene.cycles.device,
        "samples": scene.cycles.samples,
        "adaptive": scene.cycles.use_adaptive_sampling,
        "denoising": scene.cycles.use_denoising,
        "animated_seed": scene.cycles.use_animated_seed,
        "max_bounces": scene.cycles.max_bounces,
        "lights": sorted(o.data.type for o in scene.objects if o.type == "LIGHT"),
        "emissive": sorted(m.name for m in bpy.data.materials if "emissive" in material_kinds(m)),
        "glass": sorted(m.name for m in bpy.data.materials if "glass" in material_kinds(m)),
        "used_materials": sorted(used),
        "world": scene.world is not None,
        "texts": [t.name for t in bpy.data.texts],
        "libraries": [lib.filepath for lib in bpy.data.libraries],
        "images": [i.filepath for i in bpy.data.images if i.filepath],
        "drivers": drivers,
        "scripted_drivers": [d for d in drivers if d[2] == "SCRIPTED"],
        "animated": sorted(n for n in first if first[n] != mid[n] or first[n] != last[n]),
        "frame12": mid,
    }

print("TESSERA-RESULT:" + json.dumps([inspect(path) for path in sys.argv[1:]]))
"""


def generate(output: Path, *, blender_style: bool = False) -> Path:
    """Run make_demo.py with this interpreter, the way renderers.demo_scene does (-I)."""
    args = ["--", str(output)] if blender_style else [str(output)]
    completed = subprocess.run(
        [sys.executable, "-I", str(GENERATOR), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert output.is_file(), completed.stdout[-3000:]
    return output


def inspect(*paths: Path) -> list[dict[str, Any]]:
    """Open each .blend in a fresh Blender (scripts disabled) and report what is in it."""
    completed = subprocess.run(
        [sys.executable, "-I", "-c", INSPECT, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert len(lines) == 1, completed.stdout[-3000:]
    reports: list[dict[str, Any]] = json.loads(lines[0].removeprefix(RESULT_PREFIX))
    return reports


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Reports on two independent runs of the generator, inspected in one Blender.

    The first run uses the Blender command-line form (output after "--"), the second the
    plain form, so both ways of passing the output path are exercised.
    """
    folder = tmp_path_factory.mktemp("demo")
    first = generate(folder / "demo.blend", blender_style=True)
    second = generate(folder / "again.blend")
    return inspect(first, second)


def test_demo_scene_contents(reports: list[dict[str, Any]]) -> None:
    info = reports[0]

    assert info["engine"] == "CYCLES"
    assert info["camera"] is not None
    assert info["camera_type"] == "CAMERA"
    assert info["frames"] == [1, 24]
    assert info["resolution"] == [640, 360, 100]
    assert info["film_transparent"] is False
    assert info["device"] == "CPU"
    assert info["samples"] == 64
    assert info["adaptive"] is True
    assert info["denoising"] is True
    assert info["animated_seed"] is False
    assert info["max_bounces"] <= 8
    assert info["world"] is True

    assert "AREA" in info["lights"]
    assert info["emissive"], "no emissive material"
    assert info["glass"], "no glass / transmissive material"
    used = set(info["used_materials"])
    assert used & set(info["emissive"]), "the emissive material is on no mesh"
    assert used & set(info["glass"]), "the glass material is on no mesh"

    # Nothing that needs Python on the farm, nothing from outside the file.
    assert info["texts"] == []
    assert info["scripted_drivers"] == []
    assert info["libraries"] == []
    assert info["images"] == []

    # Animation exists: some object moves between frames.
    assert info["animated"], "no object's world matrix changes over the frame range"


def test_generator_is_deterministic(reports: list[dict[str, Any]]) -> None:
    first, second = reports

    assert len(first["frame12"]) >= 7  # floor, four props, light, camera
    assert sorted(first["frame12"]) == sorted(second["frame12"])  # same object names
    assert first["frame12"] == second["frame12"]  # same world matrices at frame 12
    assert first == second

"""Scene Python never runs: .blend files built to run code on load, on frame change and
on render are inspected and rendered by the real worker, and nothing they try happens.

Each attack is first shown to be live (the same file, opened with scripts enabled in a
throwaway Blender, leaves its marker), so a passing test cannot be a dead attack.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from renderers.exr import read_exr
from renderers.scene_info import inspect_scene
from renderers.worker import RenderRequest, RenderWorker

BUILD_HOSTILE = r"""
import json, sys
import bpy

src, dst, marker, attack = sys.argv[-4], sys.argv[-3], sys.argv[-2], sys.argv[-1]
bpy.ops.wm.open_mainfile(filepath=src, load_ui=False, use_scripts=False)
scene = bpy.context.scene
obj = next(o for o in scene.objects if o.type == "MESH")
touch = f"__import__('pathlib').Path({marker!r})"

if attack == "text_on_load":
    text = bpy.data.texts.new("autorun.py")
    text.write(f"{touch}.write_text('text ran')\n")
    text.use_module = True
elif attack == "app_handlers":
    text = bpy.data.texts.new("hooks.py")
    text.write(
        "import bpy\n"
        "@bpy.app.handlers.persistent\n"
        f"def hook(*args):\n    {touch}.write_text('handler ran')\n"
        "for name in ('load_post', 'render_pre', 'render_post', 'frame_change_pre',\n"
        "             'depsgraph_update_post', 'render_init'):\n"
        "    getattr(bpy.app.handlers, name).append(hook)\n"
    )
    text.use_module = True
elif attack == "python_driver":
    # Evaluated whenever the depsgraph updates the object: on load, frame change, render.
    fcurve = obj.driver_add("location", 2)
    fcurve.driver.type = "SCRIPTED"
    fcurve.driver.expression = f"{touch}.write_text('driver ran') * 0 + frame * 0"
elif attack == "namespace_driver":
    # A registered text puts a function in the driver namespace; a driver calls it.
    text = bpy.data.texts.new("namespace.py")
    text.write(
        "import bpy\n"
        f"bpy.app.driver_namespace['payload'] = lambda: {touch}.write_text('ns ran') and 0\n"
    )
    text.use_module = True
    fcurve = obj.driver_add("location", 0)
    fcurve.driver.type = "SCRIPTED"
    fcurve.driver.expression = "payload() + obj_x"
    var = fcurve.driver.variables.new()
    var.name = "obj_x"
    var.targets[0].id = obj
    var.targets[0].data_path = "location.y"
else:
    raise SystemExit(f"unknown attack {attack}")
# An animated scene: rendering another frame is a frame change.
scene.frame_start, scene.frame_end = 1, 5
bpy.ops.wm.save_as_mainfile(filepath=dst, compress=False, relative_remap=False)
print(json.dumps({"saved": dst}))
"""

OPEN_TRUSTED = r"""
import sys
import bpy
bpy.context.preferences.filepaths.use_scripts_auto_execute = True
bpy.ops.wm.open_mainfile(filepath=sys.argv[-1], load_ui=False, use_scripts=True)
bpy.context.scene.frame_set(3)
"""

ATTACKS = ("text_on_load", "app_handlers", "python_driver", "namespace_driver")


def _run_bpy(script: str, tmp_path: Path, *args: str) -> None:
    path = tmp_path / "script.py"
    path.write_text(script)
    completed = subprocess.run(
        [sys.executable, "-I", str(path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"Blender script failed:\n{completed.stderr[-3000:]}")


def _hostile_scene(demo_scene: Path, tmp_path: Path, attack: str, marker: Path) -> Path:
    target = tmp_path / f"{attack}.blend"
    _run_bpy(BUILD_HOSTILE, tmp_path, str(demo_scene), str(target), str(marker), attack)
    assert target.exists()
    assert not marker.exists(), "building the scene must not run it"
    return target


@pytest.mark.parametrize("attack", ATTACKS)
def test_scene_python_has_no_effect_in_inspection_or_render(
    worker: RenderWorker, demo_scene: Path, tmp_path: Path, attack: str
) -> None:
    armed = tmp_path / "armed"
    armed.mkdir()
    live_marker = armed / "ran.txt"
    live = _hostile_scene(demo_scene, armed, attack, live_marker)
    _run_bpy(OPEN_TRUSTED, armed, str(live))
    assert live_marker.exists(), f"the {attack} attack is not live: the test proves nothing"

    marker = tmp_path / "ran.txt"
    scene = _hostile_scene(demo_scene, tmp_path, attack, marker)
    info = inspect_scene(worker, scene)
    assert info.python_warnings, "the file's Python is reported to the requester"
    for frame in (1, 4):  # a render of another frame is a frame change
        result = worker.render(
            RenderRequest(
                scene=scene,
                frame=frame,
                output=tmp_path / f"f{frame}.exr",
                samples=1,
                percentage=5,
            )
        )
        assert read_exr(result.output).width == 32
    assert not marker.exists(), f"scene Python ran in the worker ({attack})"


def test_python_driver_is_reported_by_name_and_left_unevaluated(
    worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran.txt"
    scene = _hostile_scene(demo_scene, tmp_path, "python_driver", marker)
    info = inspect_scene(worker, scene)
    warning = next(w for w in info.python_warnings if "Driver" in w)
    assert "location" in warning
    assert "will not be evaluated" in warning
    assert not marker.exists()


def test_worker_keeps_scripts_disabled_after_serving_a_hostile_scene(
    worker: RenderWorker, demo_scene: Path, tmp_path: Path
) -> None:
    """A scene cannot flip the worker's own setting for the next scene it opens."""
    first = _hostile_scene(demo_scene, tmp_path, "text_on_load", tmp_path / "one.txt")
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = _hostile_scene(demo_scene, second_dir, "app_handlers", second_dir / "two.txt")
    for scene in (first, second, first):
        inspect_scene(worker, scene)
    worker.render(
        RenderRequest(scene=second, frame=2, output=tmp_path / "o.exr", samples=1, percentage=5)
    )
    assert not (tmp_path / "one.txt").exists()
    assert not (second_dir / "two.txt").exists()
    assert json.loads(json.dumps(worker.hello()))["version"] == "5.0.1"

"""Generate the demo scene (`resources/scenes/demo.blend`) by running its committed script
in Blender. The .blend itself is never committed: it is rebuilt when missing or older
than the script. Runs Blender in a subprocess; imports no bpy here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from common.errors import WorkerError
from renderers.builds import BlenderBuild

SCENES_DIR = Path(__file__).resolve().parent.parent / "resources" / "scenes"
DEMO_SCRIPT = SCENES_DIR / "make_demo.py"
DEMO_SCENE = SCENES_DIR / "demo.blend"


def generate_demo_scene(build: BlenderBuild, output: Path, timeout: float = 300) -> Path:
    """Run make_demo.py with `build` and write the scene to `output`."""
    if build.kind == "bpy":
        command = [str(build.path), "-I", str(DEMO_SCRIPT), str(output)]
    else:
        command = [
            str(build.path),
            "-b",
            "--factory-startup",
            "--python-exit-code",
            "1",
            "--python",
            str(DEMO_SCRIPT),
            "--",
            str(output),
        ]
    output.parent.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False
    )
    if completed.returncode != 0 or not output.exists():
        raise WorkerError(
            f"Generating the demo scene failed (exit {completed.returncode}):\n"
            f"{completed.stderr[-2000:]}"
        )
    return output


def ensure_demo_scene(build: BlenderBuild, output: Path = DEMO_SCENE) -> Path:
    """The demo scene, generated first if it is missing or older than its script."""
    if output.exists() and output.stat().st_mtime >= DEMO_SCRIPT.stat().st_mtime:
        return output
    return generate_demo_scene(build, output)

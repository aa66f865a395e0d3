"""Make the README's screenshot of the Blender add-on's panel (docs/screenshots/addon-panel.png).

Runs a real Blender with its UI on a virtual X display (Xvfb, software OpenGL), loads the
add-on from `blender_addon/` the legacy way (a copy named `tessera` in a throw-away
BLENDER_USER_SCRIPTS/addons/, with a `bl_info` appended to the copy: Blender before 4.2
needs one, 4.2+ extensions ignore it), opens Properties > Output with the Tessera panel
expanded, fills the panel with example values and a made-up job being followed (nothing
talks to a farm), grabs the screen and crops it to the Properties editor.

Needs (Debian: `apt-get install -y blender xvfb xdotool imagemagick python3-requests`):
`blender` (any with a UI: Debian 12's is 3.4.1 and uses the system Python, hence
python3-requests; the add-on targets 4.2+, whose bundled Python has `requests`), `Xvfb`,
`xdotool` (drags the Properties editor wider and taller: `screen.area_move` will not run
from a script), ImageMagick's `import`; Pillow (in the project's venv) or `convert` crops.

Run from the repository root: `python -m resources.addon_screenshot [--out FILE]
[--blender PATH] [--full]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ADDON_SRC = REPO / "blender_addon"
DEFAULT_OUT = REPO / "docs" / "screenshots" / "addon-panel.png"
WIDTH, HEIGHT = 1600, 1000
PROPS_WIDTH = 520  # the Properties editor, dragged wider
OUTLINER_HEIGHT = 190  # the Outliner above it, dragged shorter (top bar included)

BL_INFO = """

# Added by resources/addon_screenshot.py to this throw-away copy: Blender < 4.2 loads
# add-ons (not extensions) and needs a bl_info.
bl_info = {
    "name": "Tessera Render Farm",
    "author": "Tessera developers",
    "version": (0, 1, 0),
    "blender": (3, 4, 0),
    "location": "Properties > Output > Tessera Render Farm",
    "category": "Render",
}
"""

# Runs inside Blender (--python). READY is the file to write once the UI is set up.
STARTUP = r'''
import os
import bpy
import addon_utils

READY = os.environ["TESSERA_SHOT_READY"]
LAYOUT = READY + ".layout"
GO = READY + ".go"
PROPS_WIDTH = int(os.environ["TESSERA_SHOT_PROPS_WIDTH"])
OUTLINER_HEIGHT = int(os.environ["TESSERA_SHOT_OUTLINER_HEIGHT"])

bpy.context.preferences.view.show_splash = False
if addon_utils.enable("tessera", default_set=True) is None:
    raise SystemExit("the tessera add-on did not load")


def output_panels():
    """The Properties > Output panel classes, parents before their children."""
    return [
        cls
        for cls in bpy.types.Panel.__subclasses__()
        if getattr(cls, "bl_space_type", "") == "PROPERTIES"
        and getattr(cls, "bl_context", "") == "output"
        and getattr(cls, "is_registered", False)
    ]


# Panels remember being open or closed once drawn; before the Output tab is first drawn,
# their default state decides. Collapse Blender's own Output panels and open Tessera's,
# as an artist would by clicking their headers: register them again in the same order
# (the order they are shown in).
panels = output_panels()
for cls in reversed(panels):
    bpy.utils.unregister_class(cls)
for cls in panels:
    if cls.__name__ == "TESSERA_PT_submit":
        cls.bl_options = set(cls.bl_options) - {"DEFAULT_CLOSED"}
    elif not getattr(cls, "bl_parent_id", ""):
        cls.bl_options = set(getattr(cls, "bl_options", set())) | {"DEFAULT_CLOSED"}
    bpy.utils.register_class(cls)

# The scene: the default cube, rendered with Cycles, 48 frames.
scene = bpy.context.scene
scene.render.engine = "CYCLES"
scene.frame_start, scene.frame_end = 1, 48
scene.render.resolution_x, scene.render.resolution_y = 1920, 1080

t = scene.tessera
t.use_scene_range = True
t.split = "TILES"
t.tiles_x, t.tiles_y = 2, 2
t.priority = 60
t.device = "GPU"
t.max_price = 0.5
t.use_max_credits = True
t.max_credits = 40.0
t.estimate = "at most 24.00 credits; balance 180.00"
t.preview_video = True
# A job being followed (made up: nothing here talks to a farm).
t.last_job_id = "3f9c2a71b0d4"
t.job_status = "running"
t.frames_done, t.frames_total = 17, 48
t.eta_seconds = 262.0
t.credits_spent = 8.5


def properties_area(window):
    return next(a for a in window.screen.areas if a.type == "PROPERTIES")


def box(window, area):
    """An area's left, top, width, height in X coordinates (origin top left)."""
    return f"{area.x} {window.height - area.y - area.height} {area.width} {area.height}"


def setup():
    window = bpy.context.window_manager.windows[0]
    props = properties_area(window)
    props.spaces[0].context = "OUTPUT"
    # Tell the grabbing script where the Properties editor is: it drags its edges with
    # the mouse (screen.area_move refuses to run from a script while the mouse is over
    # a region), then writes GO.
    with open(LAYOUT, "w") as out:
        out.write(box(window, props) + "\n")
    bpy.app.timers.register(wait_for_go, first_interval=0.5)
    return None


def wait_for_go():
    if not os.path.exists(GO):
        return 0.5
    # The drags reach Blender slowly (software OpenGL): wait until they are done.
    window = bpy.context.window_manager.windows[0]
    props = properties_area(window)
    waited = getattr(wait_for_go, "waited", 0.0)
    wait_for_go.waited = waited + 0.5
    top = window.height - props.y - props.height
    resized = props.width >= PROPS_WIDTH - 20 and top <= OUTLINER_HEIGHT + 20
    if not resized and waited < 30.0:
        return 0.5
    print("Properties editor", box(window, props), "resized" if resized else "NOT resized")
    for area in window.screen.areas:
        area.tag_redraw()
    bpy.app.timers.register(ready, first_interval=2.0)
    return None


def ready():
    window = bpy.context.window_manager.windows[0]
    with open(READY, "w") as out:
        out.write(box(window, properties_area(window)) + "\n")
    return None


bpy.app.timers.register(setup, first_interval=1.0)
'''


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        sys.exit(f"{tool} not found (Debian: apt-get install -y blender xvfb xdotool imagemagick)")
    return path


def _start_xvfb() -> tuple[subprocess.Popen[bytes], str]:
    read, write = os.pipe()
    xvfb = subprocess.Popen(
        [
            _need("Xvfb"),
            "-displayfd",
            str(write),
            "-screen",
            "0",
            f"{WIDTH}x{HEIGHT}x24",
            "-nolisten",
            "tcp",
        ],
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    if not number:
        xvfb.terminate()
        sys.exit("Xvfb did not start")
    return xvfb, f":{number}"


def _drag(
    mouse: list[str], env: dict[str, str], start: tuple[int, int], end: tuple[int, int]
) -> None:
    """Drag with the left mouse button, in steps so that Blender sees the motion."""

    def run(*words: object) -> None:
        subprocess.run([*mouse, *map(str, words)], env=env, check=True)
        time.sleep(0.15)

    run("mousemove", *start)
    run("mousedown", 1)
    for step in range(1, 11):
        run(
            "mousemove",
            start[0] + (end[0] - start[0]) * step // 10,
            start[1] + (end[1] - start[1]) * step // 10,
        )
    run("mouseup", 1)


def _crop(full: Path, out: Path, box: tuple[int, int, int, int]) -> None:
    x, y, w, h = box
    try:
        from PIL import Image
    except ImportError:
        subprocess.run(
            [_need("convert"), str(full), "-crop", f"{w}x{h}+{x}+{y}", "+repage", str(out)],
            check=True,
        )
        return
    with Image.open(full) as image:
        image.crop((x, y, x + w, y + h)).save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--blender", default="blender")
    parser.add_argument("--full", action="store_true", help="keep the whole window, no crop")
    parser.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args()
    blender = _need(args.blender)
    grab = _need("import")

    with tempfile.TemporaryDirectory(prefix="tessera-addon-shot-") as tmp:
        root = Path(tmp)
        addon = root / "scripts" / "addons" / "tessera"
        shutil.copytree(ADDON_SRC, addon, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        init = addon / "__init__.py"
        if "bl_info" not in init.read_text():
            init.write_text(init.read_text() + BL_INFO)
        (root / "config").mkdir()
        startup = root / "startup.py"
        startup.write_text(STARTUP)
        ready = root / "ready.txt"

        xvfb, display = _start_xvfb()
        env = {
            **os.environ,
            "DISPLAY": display,
            "LIBGL_ALWAYS_SOFTWARE": "1",
            "BLENDER_USER_SCRIPTS": str(root / "scripts"),
            "BLENDER_USER_CONFIG": str(root / "config"),
            "TESSERA_SHOT_READY": str(ready),
            "TESSERA_SHOT_PROPS_WIDTH": str(PROPS_WIDTH),
            "TESSERA_SHOT_OUTLINER_HEIGHT": str(OUTLINER_HEIGHT),
        }
        log = (root / "blender.log").open("wb")
        proc = subprocess.Popen(
            [
                blender,
                "--factory-startup",
                "--window-geometry",
                "0",
                "0",
                str(WIDTH),
                str(HEIGHT),
                "--python",
                str(startup),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + args.timeout

            def wait_for(path: Path) -> None:
                while not path.exists():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.flush()
                        sys.stderr.write((root / "blender.log").read_text(errors="replace"))
                        sys.exit("Blender quit or timed out before the panel was shown")
                    time.sleep(0.5)

            wait_for(Path(f"{ready}.layout"))
            time.sleep(6.0)  # until Blender reacts to the mouse (software OpenGL is slow)
            left, top, _width, height = (
                int(v) for v in Path(f"{ready}.layout").read_text().split()
            )
            mouse = [_need("xdotool")]
            xenv = {**os.environ, "DISPLAY": display}
            # Widen the Properties editor (drag its left edge) and make it taller than the
            # Outliner above it (drag its top edge), then park the mouse over the viewport.
            _drag(
                mouse, xenv, (left - 1, top + height // 2), (WIDTH - PROPS_WIDTH, top + height // 2)
            )
            time.sleep(4.0)  # Blender takes a while to catch up (software OpenGL)
            _drag(
                mouse,
                xenv,
                (WIDTH - PROPS_WIDTH // 2, top - 1),
                (WIDTH - PROPS_WIDTH // 2, OUTLINER_HEIGHT),
            )
            subprocess.run([*mouse, "mousemove", "300", "300"], env=xenv, check=True)
            Path(f"{ready}.go").touch()
            wait_for(ready)
            log.flush()
            print((root / "blender.log").read_text(errors="replace").strip().splitlines()[-1])
            time.sleep(2.0)  # a few more redraws
            box = tuple(int(v) for v in ready.read_text().split())
            full = root / "full.png"
            subprocess.run([grab, "-display", display, "-window", "root", str(full)], check=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            if args.full:
                shutil.copyfile(full, args.out)
            else:
                _crop(full, args.out, box)  # type: ignore[arg-type]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            xvfb.terminate()
            xvfb.wait(timeout=10)
            log.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

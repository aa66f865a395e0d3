"""Generate Tessera's demo scene (``demo.blend``), built entirely in code.

The demo scene is what the farm renders in its smoke tests, benchmarks and first-run
experience: a small, clean studio still life that exercises the parts of Cycles a render
farm has to get right (adaptive sampling, denoising, glossy and glass light paths, an
emissive mesh that lights its surroundings, a 24-frame animation) while rendering in well
under a second at thumbnail size.

Usage::

    python resources/scenes/make_demo.py [OUT.blend]
    blender -b --factory-startup --python resources/scenes/make_demo.py -- [OUT.blend]

The output defaults to ``demo.blend`` next to this script.

What the scene must NOT contain, because farm nodes open files with Python auto-execution
disabled and must produce the same pixels as the submitting machine:

* no Python drivers or scripted expressions (animation is plain keyframed F-curves),
* no text blocks, registered scripts, add-on data or app handlers,
* no external files (images, libraries, caches) - everything is procedural,
* nothing random: the generator is deterministic and Cycles uses a fixed seed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

# bpy must be imported first: importing it is what makes Blender's bundled modules
# (bmesh, mathutils, bpy_extras) importable when bpy runs as a Python module.
import bpy

# isort: split
import bmesh
from bpy_extras import anim_utils
from mathutils import Euler, Vector

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "demo.blend"

FRAME_START = 1
FRAME_END = 24

RGB = tuple[float, float, float]


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def output_path(argv: Sequence[str]) -> Path:
    """The .blend to write: the last argument after "--" if present, else the last argument.

    Without "--" a trailing ``*.py`` or ``-option`` is the script itself (``blender --python
    make_demo.py``) or a Blender flag, never an output path, so the default is used instead.
    """
    args = list(argv[argv.index("--") + 1 :]) if "--" in argv else list(argv[1:])
    if args and not args[-1].startswith("-") and not args[-1].endswith(".py"):
        return Path(args[-1]).resolve()
    return DEFAULT_OUTPUT


# --------------------------------------------------------------------------------------
# Meshes
# --------------------------------------------------------------------------------------


def mesh_from_bmesh(name: str, bm: bmesh.types.BMesh, smooth: bool) -> bpy.types.Mesh:
    mesh = bpy.data.meshes.new(name)
    bm.to_mesh(mesh)
    bm.free()
    if smooth:
        mesh.shade_smooth()
    return mesh


def plane_mesh(name: str, size: float) -> bpy.types.Mesh:
    bm = bmesh.new()
    bmesh.ops.create_grid(bm, x_segments=1, y_segments=1, size=size / 2)
    return mesh_from_bmesh(name, bm, smooth=False)


def sphere_mesh(name: str, radius: float) -> bpy.types.Mesh:
    bm = bmesh.new()
    bmesh.ops.create_uvsphere(bm, u_segments=48, v_segments=24, radius=radius)
    return mesh_from_bmesh(name, bm, smooth=True)


def cube_mesh(name: str, size: float) -> bpy.types.Mesh:
    bm = bmesh.new()
    bmesh.ops.create_cube(bm, size=size)
    return mesh_from_bmesh(name, bm, smooth=True)


def monkey_mesh(name: str) -> bpy.types.Mesh:
    bm = bmesh.new()
    bmesh.ops.create_monkey(bm)
    return mesh_from_bmesh(name, bm, smooth=True)


def torus_mesh(name: str, major: float, minor: float, rings: int, sides: int) -> bpy.types.Mesh:
    """A torus around the Z axis (bmesh has no torus primitive)."""
    verts: list[tuple[float, float, float]] = []
    for i in range(rings):
        a = 2.0 * math.pi * i / rings
        for j in range(sides):
            b = 2.0 * math.pi * j / sides
            r = major + minor * math.cos(b)
            verts.append((r * math.cos(a), r * math.sin(a), minor * math.sin(b)))
    faces = [
        (
            i * sides + j,
            ((i + 1) % rings) * sides + j,
            ((i + 1) % rings) * sides + (j + 1) % sides,
            i * sides + (j + 1) % sides,
        )
        for i in range(rings)
        for j in range(sides)
    ]
    mesh = bpy.data.meshes.new(name)
    mesh.from_pydata(verts, [], faces)
    mesh.validate()
    mesh.shade_smooth()
    return mesh


# --------------------------------------------------------------------------------------
# Materials
# --------------------------------------------------------------------------------------


def principled_material(name: str, **inputs: float | RGB) -> bpy.types.Material:
    """A material whose only shader is a Principled BSDF with the given input values.

    Keyword names are the socket names with spaces replaced by underscores.
    """
    mat = bpy.data.materials.new(name)
    tree = mat.node_tree
    bsdf = tree.nodes.get("Principled BSDF")
    if bsdf is None:  # older Blender: materials start without nodes
        mat.use_nodes = True
        tree = mat.node_tree
        bsdf = tree.nodes["Principled BSDF"]
    for key, value in inputs.items():
        socket = bsdf.inputs[key.replace("_", " ")]
        socket.default_value = (*value, 1.0) if isinstance(value, tuple) else value
    base = inputs.get("Base_Color")
    if isinstance(base, tuple):
        mat.diffuse_color = (*base, 1.0)  # viewport colour only
    return mat


# --------------------------------------------------------------------------------------
# Objects and animation
# --------------------------------------------------------------------------------------


def add_object(
    name: str,
    data: bpy.types.ID | None,
    location: tuple[float, float, float],
    *,
    rotation: tuple[float, float, float] = (0.0, 0.0, 0.0),
    scale: float = 1.0,
    material: bpy.types.Material | None = None,
) -> bpy.types.Object:
    obj = bpy.data.objects.new(name, data)
    obj.location = location
    obj.rotation_euler = rotation
    obj.scale = (scale, scale, scale)
    if material is not None:
        obj.data.materials.append(material)
    bpy.context.scene.collection.objects.link(obj)
    return obj


def keyframe(obj: bpy.types.Object, path: str, keys: Sequence[tuple[int, Sequence[float]]]) -> None:
    """Insert plain keyframes on ``obj.<path>`` at the given frames."""
    for frame, value in keys:
        setattr(obj, path, value)
        obj.keyframe_insert(data_path=path, frame=frame)


def set_interpolation(obj: bpy.types.Object, data_path: str, interpolation: str) -> None:
    anim = obj.animation_data
    channelbag = anim_utils.action_get_channelbag_for_slot(anim.action, anim.action_slot)
    for fcurve in channelbag.fcurves:
        if fcurve.data_path == data_path:
            for point in fcurve.keyframe_points:
                point.interpolation = interpolation


def spin_z(obj: bpy.types.Object, turns: float) -> None:
    """Rotate ``obj`` about its Z axis at constant speed; whole turns loop seamlessly."""
    start = Euler(obj.rotation_euler)
    frames = FRAME_END - FRAME_START + 1
    # Linear from frame 1 to 24 so that frame 25 would equal frame 1 again.
    end_angle = start.z + 2.0 * math.pi * turns * (frames - 1) / frames
    keyframe(
        obj,
        "rotation_euler",
        [
            (FRAME_START, (start.x, start.y, start.z)),
            (FRAME_END, (start.x, start.y, end_angle)),
        ],
    )
    set_interpolation(obj, "rotation_euler", "LINEAR")


def look_at(obj: bpy.types.Object, target: tuple[float, float, float]) -> None:
    direction = Vector(target) - obj.location
    obj.rotation_euler = direction.to_track_quat("-Z", "Y").to_euler()


# --------------------------------------------------------------------------------------
# Scene
# --------------------------------------------------------------------------------------


def build_world(scene: bpy.types.Scene) -> None:
    world = bpy.data.worlds.new("Soft Sky")
    tree = world.node_tree
    if tree is None:  # older Blender
        world.use_nodes = True
        tree = world.node_tree
    background = tree.nodes["Background"]
    background.inputs["Color"].default_value = (0.62, 0.68, 0.78, 1.0)
    background.inputs["Strength"].default_value = 0.45
    world.color = (0.62, 0.68, 0.78)
    scene.world = world


def build_objects(scene: bpy.types.Scene) -> None:
    floor_mat = principled_material(
        "Floor", Base_Color=(0.55, 0.55, 0.53), Roughness=0.55, Specular_IOR_Level=0.3
    )
    clay_mat = principled_material("Blue Clay", Base_Color=(0.1, 0.28, 0.62), Roughness=0.9)
    metal_mat = principled_material(
        "Brushed Gold", Base_Color=(0.95, 0.74, 0.42), Metallic=1.0, Roughness=0.16
    )
    glass_mat = principled_material(
        "Glass",
        Base_Color=(0.9, 0.97, 1.0),
        Roughness=0.0,
        IOR=1.45,
        Transmission_Weight=1.0,
    )
    glow_mat = principled_material(
        "Glow",
        Base_Color=(0.0, 0.0, 0.0),
        Roughness=0.5,
        Emission_Color=(1.0, 0.36, 0.08),
        Emission_Strength=8.0,
    )

    add_object("Floor", plane_mesh("Floor", 200.0), (0.0, 0.0, 0.0), material=floor_mat)

    block = add_object(
        "Block",
        cube_mesh("Block", 1.2),
        (-2.15, 0.7, 0.6),
        rotation=(0.0, 0.0, math.radians(20.0)),
        material=clay_mat,
    )
    bevel = block.modifiers.new("Bevel", "BEVEL")
    bevel.width = 0.09
    bevel.segments = 4
    bevel.limit_method = "ANGLE"
    bevel.harden_normals = True
    # A quarter turn over the 24 frames: visible but calm.
    spin_z(block, 0.25)

    monkey = add_object(
        "Glass Monkey",
        monkey_mesh("Glass Monkey"),
        (-0.75, -0.55, 0.78),
        rotation=(0.0, 0.0, math.radians(8.0)),
        scale=0.78,
        material=glass_mat,
    )
    subsurf = monkey.modifiers.new("Subdivision", "SUBSURF")
    subsurf.levels = 1
    subsurf.render_levels = 1
    keyframe(
        monkey,
        "rotation_euler",
        [
            (FRAME_START, (0.0, 0.0, math.radians(8.0))),
            (12, (0.0, 0.0, math.radians(40.0))),
            (FRAME_END, (0.0, 0.0, math.radians(8.0))),
        ],
    )

    sphere = add_object(
        "Gold Sphere", sphere_mesh("Gold Sphere", 0.8), (0.95, 0.55, 0.8), material=metal_mat
    )
    keyframe(
        sphere,
        "location",
        [
            (FRAME_START, (0.95, 0.55, 0.8)),
            (12, (0.95, 0.55, 1.35)),
            (FRAME_END, (0.95, 0.55, 0.8)),
        ],
    )

    ring = add_object(
        "Glow Ring",
        torus_mesh("Glow Ring", 0.48, 0.09, 64, 16),
        (2.4, -0.45, 0.6),
        rotation=(math.radians(90.0), 0.0, math.radians(-30.0)),
        material=glow_mat,
    )
    spin_z(ring, 1.0)

    # Emission sampling so the ring also lights the floor and its neighbours efficiently.
    glow_mat.cycles.emission_sampling = "FRONT_BACK"

    light_data = bpy.data.lights.new("Key Light", "AREA")
    light_data.shape = "DISK"
    light_data.size = 3.0
    light_data.energy = 650.0
    light_data.color = (1.0, 0.96, 0.9)
    key = add_object("Key Light", light_data, (-3.5, -3.0, 5.0))
    look_at(key, (0.0, 0.0, 0.5))

    cam_data = bpy.data.cameras.new("Camera")
    cam_data.lens = 44.0
    cam_data.sensor_fit = "HORIZONTAL"
    cam_data.sensor_width = 36.0
    camera = add_object("Camera", cam_data, (0.4, -9.0, 3.6))
    look_at(camera, (0.15, 0.0, 0.75))
    scene.camera = camera


def configure_render(scene: bpy.types.Scene) -> None:
    scene.frame_start = FRAME_START
    scene.frame_end = FRAME_END
    scene.frame_current = FRAME_START
    scene.render.fps = 24

    render = scene.render
    render.engine = "CYCLES"
    render.resolution_x = 640
    render.resolution_y = 360
    render.resolution_percentage = 100
    render.film_transparent = False
    render.use_persistent_data = False
    render.image_settings.file_format = "PNG"
    render.image_settings.color_mode = "RGBA"
    render.filepath = "//render/demo_"

    cycles = scene.cycles
    cycles.device = "CPU"
    cycles.samples = 64
    cycles.preview_samples = 16
    cycles.use_adaptive_sampling = True
    cycles.adaptive_threshold = 0.02
    cycles.use_denoising = True
    cycles.denoiser = "OPENIMAGEDENOISE"
    cycles.seed = 1234
    cycles.use_animated_seed = False
    cycles.max_bounces = 6
    cycles.diffuse_bounces = 2
    cycles.glossy_bounces = 3
    cycles.transmission_bounces = 6
    cycles.transparent_max_bounces = 8
    cycles.volume_bounces = 0
    cycles.caustics_reflective = False
    cycles.caustics_refractive = False
    cycles.blur_glossy = 1.0
    cycles.sample_clamp_indirect = 10.0

    view = scene.view_settings
    view.view_transform = "AgX"
    view.look = "AgX - Medium High Contrast"
    view.exposure = -0.3


def build_scene() -> bpy.types.Scene:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    configure_render(scene)
    build_world(scene)
    build_objects(scene)
    scene.frame_set(FRAME_START)
    return scene


def main(argv: Sequence[str]) -> Path:
    out = output_path(argv)
    out.parent.mkdir(parents=True, exist_ok=True)
    build_scene()
    bpy.ops.wm.save_as_mainfile(filepath=str(out), compress=False)
    print(f"make_demo: wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv)

"""Scenes that try to read a provider's files, built in a real Blender (the bpy module).

`build_scenes(root)` makes, under `root`:

- `provider/`: the provider's private files: `secret.png` (pure green), an image
  sequence `seq/secret_0001..3.png` and a library `lib.blend` whose object `Secret`
  glows green;
- `bundle/`: a requester's bundle whose scenes sit in `bundle/shots/` and look at the
  world (or the linked or imported object) through a camera, one attack per file
  (`ATTACKS`, `BLENDER_ATTACKS`: a geometry-nodes Import OBJ of `secret.obj`), plus
  `inside.blend` (a blue texture inside the bundle, by `//../textures/ok.png`) and
  `missing.blend` (a texture the bundle lacks: Blender renders it pink).

Green in a render therefore means the provider's file leaked into the frame.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: Attack name -> the scene file in bundle/shots that carries it.
ATTACKS = ("absolute", "relative", "library", "sequence", "symlink")
#: Attacks the .blend trace cannot see (blender-asset-tracer does not know geometry
#: nodes' Import nodes): only the check inside Blender and the sandbox stop them.
BLENDER_ATTACKS = ("geometry_import",)

GENERATOR = r"""
import sys
from pathlib import Path
import bpy

root = Path(sys.argv[-1])
provider, bundle = root / "provider", root / "bundle"
shots = bundle / "shots"
for folder in (provider / "seq", shots, bundle / "textures"):
    folder.mkdir(parents=True, exist_ok=True)


def save_png(path, rgba):
    image = bpy.data.images.new(path.stem, 4, 4)
    image.pixels = list(rgba) * 16
    image.filepath_raw = str(path)
    image.file_format = "PNG"
    image.save()
    bpy.data.images.remove(image)


def fresh_scene():
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.samples = 1
    scene.render.resolution_x, scene.render.resolution_y = 32, 24
    scene.render.resolution_percentage = 100
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(camera)
    camera.location = (0, 0, 5)
    scene.camera = camera
    return scene


def world_image(scene, filepath, source="FILE"):
    world = bpy.data.worlds.new("World")
    scene.world = world
    world.use_nodes = True
    nodes = world.node_tree.nodes
    texture = nodes.new("ShaderNodeTexEnvironment")
    image = bpy.data.images.new("Backdrop", 4, 4)
    image.source = source
    image.filepath = filepath
    texture.image = image
    if source == "SEQUENCE":
        texture.image_user.frame_duration = 3
        texture.image_user.frame_start = 1
    world.node_tree.links.new(texture.outputs["Color"], nodes["Background"].inputs["Color"])


def save(scene, name):
    bpy.ops.wm.save_as_mainfile(filepath=str(shots / name), compress=False, relative_remap=False)


save_png(provider / "secret.png", (0, 1, 0, 1))
for frame in (1, 2, 3):
    save_png(provider / "seq" / f"secret_{frame:04d}.png", (0, 1, 0, 1))
save_png(bundle / "textures" / "ok.png", (0, 0, 1, 1))

# The provider's library: a green glowing plane filling the camera's view.
fresh_scene()
bpy.ops.mesh.primitive_plane_add(size=50)
plane = bpy.context.active_object
plane.name = "Secret"
material = bpy.data.materials.new("SecretGlow")
material.use_nodes = True
nodes = material.node_tree.nodes
nodes.clear()
emission = nodes.new("ShaderNodeEmission")
emission.inputs["Color"].default_value = (0, 1, 0, 1)
output = nodes.new("ShaderNodeOutputMaterial")
material.node_tree.links.new(emission.outputs[0], output.inputs[0])
plane.data.materials.append(material)
bpy.ops.wm.save_as_mainfile(filepath=str(provider / "lib.blend"), compress=False)

scene = fresh_scene()
world_image(scene, str(provider / "secret.png"))
save(scene, "absolute.blend")

scene = fresh_scene()
world_image(scene, "//../../provider/secret.png")
save(scene, "relative.blend")

scene = fresh_scene()
with bpy.data.libraries.load(str(provider / "lib.blend"), link=True) as (source, target):
    target.objects = ["Secret"]
for obj in target.objects:
    scene.collection.objects.link(obj)
save(scene, "library.blend")

scene = fresh_scene()
world_image(scene, str(provider / "seq" / "secret_0001.png"), source="SEQUENCE")
save(scene, "sequence.blend")

scene = fresh_scene()
world_image(scene, "//../textures/link.png")
save(scene, "symlink.blend")

# Geometry nodes import the provider's mesh (green by a Set Material node).
(provider / "secret.obj").write_text(
    "v -50 -50 0\nv 50 -50 0\nv 50 50 0\nv -50 50 0\nf 1 2 3 4\n"
)
scene = fresh_scene()
glow = bpy.data.materials.new("Glow")
glow.use_nodes = True
glow_nodes = glow.node_tree.nodes
glow_nodes.clear()
light = glow_nodes.new("ShaderNodeEmission")
light.inputs["Color"].default_value = (0, 1, 0, 1)
glow.node_tree.links.new(light.outputs[0], glow_nodes.new("ShaderNodeOutputMaterial").inputs[0])
holder = bpy.data.objects.new("Importer", bpy.data.meshes.new("Importer"))
scene.collection.objects.link(holder)
group = bpy.data.node_groups.new("ImportSecret", "GeometryNodeTree")
group.interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
importer = group.nodes.new("GeometryNodeImportOBJ")
importer.inputs["Path"].default_value = str(provider / "secret.obj")
paint = group.nodes.new("GeometryNodeSetMaterial")
paint.inputs["Material"].default_value = glow
out = group.nodes.new("NodeGroupOutput")
group.links.new(importer.outputs[0], paint.inputs["Geometry"])
group.links.new(paint.outputs[0], out.inputs[0])
holder.modifiers.new("Import", "NODES").node_group = group
save(scene, "geometry_import.blend")

scene = fresh_scene()
world_image(scene, "//../textures/ok.png")
save(scene, "inside.blend")

scene = fresh_scene()
world_image(scene, "//../textures/missing.png")
save(scene, "missing.blend")
"""


def build_scenes(root: Path) -> Path:
    """Build the provider's files and the hostile bundle under `root`; returns the
    bundle folder."""
    root.mkdir(parents=True, exist_ok=True)
    script = root / "make_scenes.py"
    script.write_text(GENERATOR)
    completed = subprocess.run(
        [sys.executable, "-I", str(script), str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"building the scenes failed:\n{completed.stderr[-3000:]}")
    # Inside the bundle, a link to the provider's picture.
    (root / "bundle" / "textures" / "link.png").symlink_to(root / "provider" / "secret.png")
    return root / "bundle"

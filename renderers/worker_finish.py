"""The finish step, run INSIDE Blender: a merged multilayer EXR becomes Blender's own files.

Loaded by `worker_main.py` (standard library and bpy only, like it). `finish_frame` turns
the farm's merged EXR of raw passes into exactly what `blender -b scene.blend -f N`
writes: the scene's compositor, colour management, output format and name, and its File
Output nodes. The method (proved pixel-identical with bpy 5.0.1):

1. every Render Layers node of the compositor (also inside node groups) becomes an Image
   node reading the merged EXR (same view layer; socket `Image` -> `Combined`, every
   other pass by name); Cryptomatte nodes reading the render read the EXR instead;
2. every view layer is switched off, so Blender cannot run the 3D engine at all;
3. `frame_start = frame_end = N` and `render(animation=True)`: Blender runs only the
   compositor and writes its files with its own writer ('#', templates, extension).

Output paths are redirected into the request's output folder (see `map_output_path`);
movie formats become 16-bit PNG frames that the parent encodes (renderers.video), and a
multilayer EXR output gets its view-layer passes added by the parent
(renderers.finish.add_view_layer_passes): Blender stores them, a compositor-only run
has none. `describe_output` is the pure inspection behind `SceneInfo.output`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bpy

#: Every file format Blender 5.0 can write; anything else is refused before rendering.
KNOWN_FORMATS = frozenset(
    {
        "PNG",
        "JPEG",
        "JPEG2000",
        "TIFF",
        "OPEN_EXR",
        "OPEN_EXR_MULTILAYER",
        "WEBP",
        "BMP",
        "IRIS",
        "TARGA",
        "TARGA_RAW",
        "CINEON",
        "DPX",
        "HDR",
        "FFMPEG",
    }
)
#: Render Layers socket name -> multilayer Image node socket name, where they differ.
_RL_TO_IMAGE = {"Image": "Combined"}
_GROUP_NODES = ("CompositorNodeGroup", "CompositorNodeCustomGroup")
_FILE_OUTPUT = "CompositorNodeOutputFile"
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")

#: Raises the worker's error event: fail(kind, message) returns the exception to raise.
Fail = Callable[[str, str], Exception]


# --- inspection -------------------------------------------------------------------------


def compositor_tree(scene: Any) -> Any:
    """The compositor node tree in use, or None: Blender 5's `compositing_node_group`,
    or the `node_tree` of a 4.x scene with `use_nodes` on."""
    if not scene.render.use_compositing:
        return None
    tree = getattr(scene, "compositing_node_group", None)
    if tree is None and getattr(scene, "use_nodes", False):
        tree = getattr(scene, "node_tree", None)
    return tree if tree is not None and len(tree.nodes) else None


def iter_trees(tree: Any, seen: set[str] | None = None) -> Iterator[Any]:
    """`tree` and every node group inside it (Render Layers can sit in a group)."""
    seen = set() if seen is None else seen
    if tree is None or tree.name in seen:
        return
    seen.add(tree.name)
    yield tree
    for node in tree.nodes:
        if node.bl_idname in _GROUP_NODES and node.node_tree is not None:
            yield from iter_trees(node.node_tree, seen)


def _nodes(scene: Any) -> Iterator[Any]:
    for tree in iter_trees(compositor_tree(scene)):
        yield from (node for node in tree.nodes if not node.mute)


def compositor_passes(scene: Any) -> list[str]:
    """'ViewLayer.Pass' for every pass the compositor reads (Image is 'Combined')."""
    used: set[str] = set()
    for node in _nodes(scene):
        if node.bl_idname == "CompositorNodeRLayers":
            for socket in node.outputs:
                if socket.is_linked:
                    used.add(f"{node.layer}.{_RL_TO_IMAGE.get(socket.name, socket.name)}")
        elif node.bl_idname == "CompositorNodeCryptomatteV2" and node.source == "RENDER":
            used.add(node.layer_name)
    return sorted(used)


def sequencer_refusal(scene: Any) -> str | None:
    """Why the scene's output cannot be finished from a 3D render, or None."""
    editor = scene.sequence_editor
    strips = len(getattr(editor, "strips_all", ())) if editor is not None else 0
    if scene.render.use_sequencer and strips:
        return (
            f"Scene '{scene.name}' outputs the Video Sequencer's edit ({strips} strips), not "
            "its 3D render: the farm renders and finishes the 3D scene only. Turn off "
            "Output Properties > Post Processing > Sequencer to render the 3D scene."
        )
    return None


def finish_warnings(scene: Any, bundle: str | None) -> list[str]:
    """What the finish cannot honour: files the compositor reads that are not in the
    bundle (`bundle` None: the .blend's folder) and Render Layers of other scenes."""
    warnings: list[str] = []
    root = os.path.realpath(bundle or Path(bpy.data.filepath).parent)
    for node in _nodes(scene):
        if node.bl_idname in ("CompositorNodeRLayers", "CompositorNodeCryptomatteV2"):
            other = getattr(node, "scene", None)
            if other is not None and other != scene:
                warnings.append(
                    f"Compositor node '{node.name}' reads scene '{other.name}'; the farm "
                    "renders one scene, so this node cannot be finished."
                )
        for attr in ("image", "clip"):
            block = getattr(node, attr, None)
            if block is None or getattr(block, "packed_file", None) is not None:
                continue
            path = os.path.realpath(bpy.path.abspath(block.filepath, library=block.library))
            if not Path(path).exists() or os.path.commonpath([root, path]) != root:
                warnings.append(
                    f"Compositor node '{node.name}' reads '{block.filepath}', which is not "
                    "in the bundle; the finish will composite without it."
                )
    refusal = sequencer_refusal(scene)
    if refusal is None and scene.render.use_border:
        warnings.append("The scene renders a border region; the farm finishes the whole frame.")
    return warnings


def describe_output(scene: Any, bundle: str | None = None) -> dict[str, Any]:
    """What the finish step needs to know about a scene's output, without changing it."""
    render = scene.render
    settings = render.image_settings
    try:
        blend_dir = Path(bpy.data.filepath).parent
        frame_path: str | None = os.path.relpath(
            render.frame_path(frame=scene.frame_current), blend_dir
        )
        path_error = None
    except RuntimeError as exc:
        frame_path, path_error = None, str(exc).replace("Error: ", "").strip()
    movie = settings.media_type == "VIDEO"
    return {
        "media_type": settings.media_type,
        "file_format": settings.file_format,
        "color_depth": settings.color_depth,
        "color_mode": settings.color_mode,
        "exr_codec": getattr(settings, "exr_codec", ""),
        "filepath": render.filepath,
        "frame_path": frame_path,
        "path_error": path_error,
        "view_transform": scene.view_settings.view_transform,
        "look": scene.view_settings.look,
        "compositor": compositor_tree(scene) is not None,
        "compositor_passes": compositor_passes(scene),
        "file_outputs": [_file_output_path(node) for node in _file_outputs(scene)],
        "movie": _movie_settings(scene) if movie else None,
        "warnings": finish_warnings(scene, bundle),
        "refusal": sequencer_refusal(scene),
    }


def _movie_settings(scene: Any) -> dict[str, Any]:
    ffmpeg, render = scene.render.ffmpeg, scene.render
    return {
        "container": ffmpeg.format,
        "codec": ffmpeg.codec,
        "fps": render.fps,
        "fps_base": render.fps_base,
        "crf": ffmpeg.constant_rate_factor,
        "preset": ffmpeg.ffmpeg_preset,
        "gop": ffmpeg.gopsize,
        "bitrate_kbps": ffmpeg.video_bitrate,
        "audio_codec": ffmpeg.audio_codec,
        "color_mode": render.image_settings.color_mode,
        "frame_start": scene.frame_start,
        "frame_end": scene.frame_end,
    }


def _file_outputs(scene: Any) -> list[Any]:
    return [node for node in _nodes(scene) if node.bl_idname == _FILE_OUTPUT]


def _file_output_path(node: Any) -> str:
    if hasattr(node, "directory"):  # Blender 5
        return str(node.directory) + str(node.file_name)
    return str(node.base_path)  # Blender 4.x


# --- output paths -----------------------------------------------------------------------


def map_output_path(path: str, output_dir: str, what: str, fail: Fail) -> str:
    """Where a Blender output path ('#' and {templates} left for Blender) goes inside
    `output_dir`.

    '//render/shot_####' -> OUT/render/shot_####; a path relative to the working
    folder likewise; an absolute '/tmp/shot_' -> OUT/tmp/shot_ (its root dropped, so two
    absolute outputs never collide; 'C:\\x' -> OUT/x). Any '..' component is refused:
    a deliverable never lands outside the output folder.
    """
    rest = path[2:] if path.startswith("//") else path
    rest = _WINDOWS_DRIVE.sub("", rest).replace("\\", "/").lstrip("/")
    if ".." in rest.split("/"):
        raise fail(
            "output_path",
            f"{what} '{path}' climbs out of its folder with '..'; the farm writes every "
            "file inside the job's output folder. Use a path below the .blend's folder "
            "(e.g. //render/shot_####).",
        )
    # Path() drops a trailing '/', which Blender reads as "a folder, name the file by frame".
    return str(Path(output_dir, rest)) + ("/" if rest in ("", ".") or rest.endswith("/") else "")


def _inside(path: str, folder: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root


def _frame_path(scene: Any, frame: int, fail: Fail) -> str:
    try:
        return str(scene.render.frame_path(frame=frame))
    except RuntimeError as exc:
        message = str(exc).replace("Error: ", "").strip()
        raise fail("output_path", f"The scene's output path cannot be expanded: {message}") from exc


def _redirect_outputs(scene: Any, output_dir: str, fail: Fail) -> None:
    render = scene.render
    render.filepath = map_output_path(render.filepath, output_dir, "The output path", fail)
    for node in _file_outputs(scene):
        what = f"File Output node '{node.name}' path"
        if hasattr(node, "directory"):
            node.directory = map_output_path(node.directory, output_dir, what, fail)
            names = [str(node.file_name) + item.name for item in node.file_output_items]
        else:
            node.base_path = map_output_path(node.base_path, output_dir, what, fail)
            names = [slot.path for slot in node.file_slots]
        for name in names:
            if ".." in name.replace("\\", "/").split("/") or name.startswith(("/", "\\")):
                raise fail("output_path", f"{what} '{name}' leaves the output folder.")


# --- the finish -------------------------------------------------------------------------


def finish_frame(scene: Any, request: dict[str, Any], fail: Fail) -> dict[str, Any]:
    """Composite and write frame `request['frame']` of `scene` from `request['merged_exr']`
    into `request['output_dir']`; the reply lists the files written (relative paths)."""
    frame, output_dir = int(request["frame"]), str(request["output_dir"])
    render, settings = scene.render, scene.render.image_settings
    refusal = sequencer_refusal(scene)
    if refusal is not None:
        raise fail("finish_refused", refusal)
    if settings.file_format not in KNOWN_FORMATS:
        raise fail(
            "output_format",
            f"The scene's output format {settings.file_format!r} is not one this node can "
            f"write (known: {', '.join(sorted(KNOWN_FORMATS))}).",
        )
    if request.get("resolution"):  # the size the farm rendered (what was paid for)
        render.resolution_x, render.resolution_y = map(int, request["resolution"])
    if request.get("percentage"):
        render.resolution_percentage = int(request["percentage"])
    _check_size(render, request["merged_size"], fail)
    warnings = finish_warnings(scene, request.get("confine_to"))
    blend_dir = Path(bpy.data.filepath).parent
    blender_name = os.path.relpath(_frame_path(scene, frame, fail), blend_dir)
    _redirect_outputs(scene, output_dir, fail)
    movie = None
    if settings.media_type == "VIDEO":
        movie = _movie_settings(scene)
        movie["name"] = os.path.relpath(_frame_path(scene, scene.frame_start, fail), output_dir)
        blender_name = movie["name"]  # one movie of the whole range
        # Movies are encoded once from the finished frames: write a lossless frame.
        settings.media_type = "IMAGE"  # media_type must precede file_format
        settings.file_format = "PNG"
        settings.color_depth = "16"
        settings.compression = 15
    _ensure_compositor(scene)
    _read_merged_exr(scene, str(request["merged_exr"]), fail)
    for layer in scene.view_layers:
        layer.use = False  # no node can make Blender render the 3D scene now
    render.use_sequencer = False
    scene.frame_start = scene.frame_end = frame
    scene.frame_step = 1
    scene.frame_set(frame)
    main = _frame_path(scene, frame, fail)
    if not _inside(main, output_dir):
        raise fail("output_path", f"The output path expands to {main}, outside the output folder.")
    bpy.ops.render.render(animation=True, scene=scene.name)
    if not Path(main).exists():
        raise fail("render_failed", f"The compositor ran but Blender wrote no {main}.")
    files = []
    for path in sorted(p for p in Path(output_dir).rglob("*") if p.is_file()):
        kind = "frame" if path.samefile(main) else "file_output"
        files.append({"path": str(path.relative_to(output_dir)), "kind": kind})
    return {
        "files": files,
        "main": os.path.relpath(main, output_dir),
        "blender_name": blender_name,
        "multilayer_half": (
            settings.color_depth == "16" if settings.media_type == "MULTI_LAYER_IMAGE" else None
        ),
        "movie": movie,
        "warnings": warnings,
    }


def _check_size(render: Any, merged_size: list[int], fail: Fail) -> None:
    """The merged frame must be the size the scene renders (percentage applied)."""
    percentage = render.resolution_percentage
    size = [max(1, n * percentage // 100) for n in (render.resolution_x, render.resolution_y)]
    if list(merged_size) != size:
        width, height = merged_size
        raise fail(
            "finish_refused",
            f"The merged frame is {width}x{height} but the scene renders "
            f"{size[0]}x{size[1]}; finish a frame rendered at the scene's own size.",
        )


def _ensure_compositor(scene: Any) -> None:
    """A scene without a compositor writes its Combined pass: give it Render Layers ->
    Group Output so every scene takes the same path."""
    if compositor_tree(scene) is not None:
        return
    tree = bpy.data.node_groups.new("tessera_passthrough", "CompositorNodeTree")
    tree.interface.new_socket("Image", in_out="OUTPUT", socket_type="NodeSocketColor")
    layer = tree.nodes.new("CompositorNodeRLayers")
    layer.scene = scene
    layer.layer = next((vl.name for vl in scene.view_layers if vl.use), scene.view_layers[0].name)
    output = tree.nodes.new("NodeGroupOutput")
    tree.links.new(layer.outputs["Image"], output.inputs[0])
    scene.compositing_node_group = tree
    scene.render.use_compositing = True


def _read_merged_exr(scene: Any, exr: str, fail: Fail) -> None:
    """Point every Render Layers and Cryptomatte node at the merged EXR."""
    image = bpy.data.images.load(exr, check_existing=True)
    image.source = "FILE"
    # The passes are in the file's scene-linear working space: read them as such.
    working = getattr(getattr(bpy.data, "colorspace", None), "working_space", "")
    if working:
        image.colorspace_settings.name = working
    for tree in iter_trees(compositor_tree(scene)):
        for node in [n for n in tree.nodes if n.bl_idname == "CompositorNodeRLayers"]:
            if node.scene is not None and node.scene != scene:
                raise fail(
                    "finish_refused",
                    f"Render Layers node '{node.name}' reads scene '{node.scene.name}'; the "
                    "farm renders one scene, so this compositor cannot be finished.",
                )
            if not node.mute:
                _replace_render_layers(tree, node, image, exr, fail)
            tree.nodes.remove(node)
        for node in tree.nodes:
            if node.bl_idname == "CompositorNodeCryptomatteV2" and node.source == "RENDER":
                layer_name, matte = node.layer_name, node.matte_id
                node.source = "IMAGE"
                node.image = image
                node.layer_name, node.matte_id = layer_name, matte


def _replace_render_layers(tree: Any, node: Any, image: Any, exr: str, fail: Fail) -> None:
    reader = tree.nodes.new("CompositorNodeImage")
    reader.image = image
    reader.layer = node.layer
    reader.location = node.location
    sockets = {socket.name: socket for socket in reader.outputs}
    for socket in node.outputs:
        if not socket.is_linked:
            continue
        name = _RL_TO_IMAGE.get(socket.name, socket.name)
        if name not in sockets:
            raise fail(
                "finish_refused",
                f"The compositor reads pass '{socket.name}' of view layer '{node.layer}', "
                f"which the merged frame {Path(exr).name} does not have "
                f"(it has: {', '.join(sockets) or 'nothing for that layer'}).",
            )
        for link in list(socket.links):
            tree.links.new(sockets[name], link.to_socket)

"""The program that runs INSIDE Blender: a warm render worker speaking JSON lines.

Started by `renderers.worker.RenderWorker` either as `python -I -u worker_main.py` (the
bpy module) or as `blender -b --factory-startup --disable-autoexec --python
worker_main.py`. It reads one JSON request per line on stdin and writes JSON events on
the original stdout; everything Blender itself prints is sent to stderr so it can never
corrupt the protocol.

Requests (`op`): `hello`, `devices`, `inspect`, `render`, `denoise`, `finish`, `quit`. Every
request carries an `id`; the worker answers with zero or more `progress` events and
exactly one `result` or `error` event with that id.

It must stay self-contained: standard library and bpy only (Blender's bundled Python
has nothing else), and it must never let a scene run Python: files are opened with
scripts disabled, factory settings, and no user add-ons.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# A thread count alone does not bound Blender's CPU use (measured: 'threads = 1' kept two
# cores busy, mostly spinning); an affinity set before Blender starts its threads does.
if os.environ.get("TESSERA_CPUS"):
    os.sched_setaffinity(0, {int(cpu) for cpu in os.environ["TESSERA_CPUS"].split(",")})

# The memory ceiling goes on before Blender allocates anything, soft = hard so nothing
# in this process can raise it again. RLIMIT_DATA counts heap and private anonymous maps
# (what a runaway render grows), not shared libraries, reserved address space or GPU
# memory: CUDA's huge virtual reservations stay possible. No core files either: a
# crashed 20 GB render must not fill the provider's disk.
if os.environ.get("TESSERA_MEMORY_LIMIT"):
    _limit = int(os.environ["TESSERA_MEMORY_LIMIT"])
    resource.setrlimit(resource.RLIMIT_DATA, (_limit, _limit))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

# Keep the real stdout for the protocol, then point fd 1 at stderr so that Cycles'
# C-level prints ("Fra:1 Mem:...") cannot interleave with our JSON lines.
_PROTOCOL = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
os.dup2(2, 1)
sys.stdout = sys.stderr

import bpy  # noqa: E402  (the redirect above must happen before Blender prints anything)


def _load(name: str) -> Any:
    """A module of ours beside this file (-I keeps this folder off sys.path)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


_FINISH = _load("worker_finish")
_CONFINE = _load("worker_confine")
_DEVICES = _load("worker_devices")
GPU_TYPES = ("CUDA", "OPTIX", "HIP", "METAL", "ONEAPI")
SAMPLE_RE = re.compile(r"Sample (\d+)/(\d+)")
#: Cycles' memory in its render stats ("Mem: 20M"); the render's peak is the largest.
MEM_RE = re.compile(r"Mem:\s*(\d+(?:\.\d+)?)\s*([KMGT]?)")
MEM_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


_STATS_LISTENERS: list[Any] = []


# Blender drops app handlers when a file is opened unless they are marked persistent.
@bpy.app.handlers.persistent
def _forward_render_stats(stats: Any, *_: Any) -> None:
    for listener in _STATS_LISTENERS:
        listener(stats)


class WorkerFailureError(Exception):
    """An error with a machine-readable kind, sent back as an `error` event."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def send(event: dict[str, Any]) -> None:
    _PROTOCOL.write(json.dumps(event) + "\n")
    _PROTOCOL.flush()


def send_error(request_id: Any, kind: str, message: str, trace: str | None = None) -> None:
    event = {"event": "error", "id": request_id, "kind": kind, "message": message}
    send({**event, "traceback": trace} if trace else event)


class Worker:
    def __init__(self) -> None:
        self.scene_path: str | None = None
        self.scene_mtime: float | None = None
        self.originals: dict[str, Any] = {}
        self.active_device: str | None = None
        self.active_device_key: tuple[str, tuple[str, ...]] | None = None
        self.current_id: str | None = None
        self.last_progress = 0.0
        #: The largest memory Cycles reported during the current render, in bytes.
        self.peak_memory = 0
        #: Moments of the render in flight (see `_stage_seconds`): monotonic seconds.
        self.marks: dict[str, float] = {}
        # Factory settings already say so; set it anyway, it is what keeps scene Python
        # (registered texts, Python drivers) off. See docs/provider-safety.md.
        bpy.context.preferences.filepaths.use_scripts_auto_execute = False
        _STATS_LISTENERS.append(self._on_render_stats)
        bpy.app.handlers.render_stats.append(_forward_render_stats)
        # What is ours: anything else found after opening a file came from the file.
        self.own_handlers = _handler_snapshot()
        self.own_driver_names = set(bpy.app.driver_namespace.keys())

    # --- protocol ---------------------------------------------------------------------

    def serve(self) -> None:
        send(
            {
                "event": "ready",
                "version": bpy.app.version_string,
                "build_hash": _build_hash(),
                "pid": os.getpid(),
            }
        )
        for raw_line in sys.stdin:
            line = raw_line.strip()
            if not line:
                continue
            try:
                request = json.loads(line)
            except json.JSONDecodeError as exc:
                send_error(None, "bad_request", f"not JSON: {exc}")
                continue
            request_id = request.get("id")
            op = request.get("op")
            if op == "quit":
                send({"event": "result", "id": request_id})
                return
            handler = getattr(self, f"op_{op}", None)
            if handler is None:
                send_error(request_id, "bad_request", f"unknown op {op!r}")
                continue
            self.current_id = request_id
            try:
                result = handler(request)
            except WorkerFailureError as exc:
                send_error(request_id, exc.kind, exc.message)
            except MemoryError:
                send_error(request_id, "out_of_memory", "MemoryError: an allocation was refused")
            except Exception as exc:
                message = str(exc).strip() or type(exc).__name__
                send_error(request_id, "render_failed", message, traceback.format_exc())
            else:
                send({"event": "result", "id": request_id, **result})
            finally:
                self.current_id = None

    def _on_render_stats(self, stats: Any) -> None:
        if self.current_id is None:
            return
        memory = MEM_RE.search(str(stats))
        if memory is not None:
            used = int(float(memory.group(1)) * MEM_UNITS[memory.group(2)])
            self.peak_memory = max(self.peak_memory, used)
        now = time.monotonic()
        _mark_stage(self.marks, str(stats), now)
        match = SAMPLE_RE.search(str(stats))
        if match is None or now - self.last_progress < 0.2:
            return
        self.last_progress = now
        done, total = int(match.group(1)), int(match.group(2))
        send(
            {
                "event": "progress",
                "id": self.current_id,
                "samples_done": done,
                "samples_total": total,
            }
        )

    # --- ops ---------------------------------------------------------------------------

    def op_hello(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"version": bpy.app.version_string, "build_hash": _build_hash(), "pid": os.getpid()}

    def op_devices(self, request: dict[str, Any]) -> dict[str, Any]:
        prefs = _cycles_prefs()
        devices: list[dict[str, str]] = []
        available_types = [t[0] for t in prefs.get_device_types(bpy.context)]
        for device_type in GPU_TYPES:
            if device_type not in available_types:
                continue
            try:
                found = prefs.get_devices_for_type(device_type)
            except Exception:
                continue
            devices.extend(
                {"type": d.type, "name": d.name, "id": d.id} for d in found if d.type == device_type
            )
        cpu_name = _cpu_name()
        devices.insert(0, {"type": "CPU", "name": cpu_name, "id": "CPU"})
        return {"devices": devices, "compute_types": available_types}

    def op_inspect(self, request: dict[str, Any]) -> dict[str, Any]:
        self.scene_path = None  # describe the file as saved, not a render's overrides
        self._open(request["scene"])
        _CONFINE.check_confined(request.get("confine_to"), WorkerFailureError)
        output = _FINISH.describe_output(bpy.context.scene, request.get("confine_to"))
        return {"scene": {**_describe_scene(bpy.context.scene), "output": output}}

    def op_render(self, request: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        self._open(request["scene"])
        _CONFINE.check_confined(request.get("confine_to"), WorkerFailureError)
        scene = bpy.context.scene
        if scene.camera is None:
            raise WorkerFailureError("no_camera", f"Scene '{scene.name}' has no active camera.")
        if scene.render.engine != "CYCLES":
            raise WorkerFailureError(
                "unsupported_engine",
                f"Scene uses render engine {scene.render.engine}; "
                "the farm renders with Cycles only.",
            )
        self._select_device(
            scene, request.get("device", "CPU"), tuple(request.get("device_ids") or ())
        )
        _apply_render_settings(scene, request, self.originals)
        output = request["output"]
        self.last_progress = 0.0
        self.peak_memory = 0
        self.marks = {"start": started, "prepared": time.monotonic()}
        cpu_started = time.process_time()
        bpy.ops.render.render(write_still=True, scene=scene.name)
        self.marks["done"] = time.monotonic()
        # CPU seconds of every Blender thread: what a shared, busy machine cannot blur.
        self.marks["cpu"] = time.process_time() - cpu_started
        if not Path(output).exists():
            raise WorkerFailureError(
                "render_failed", f"Blender rendered but wrote no file at {output}"
            )
        width, height = _render_size(scene)
        return {
            "output": output,
            "seconds": time.monotonic() - started,
            "frame_width": width,
            "frame_height": height,
            "device": self.active_device or "CPU",
            "peak_memory": self.peak_memory,
            "stages": _stage_seconds(self.marks),
        }

    def op_finish(self, request: dict[str, Any]) -> dict[str, Any]:
        """Composite a merged EXR into the scene's own output files (worker_finish.py)."""
        self.scene_path = None  # the file as saved, never a render's overrides
        self._open(request["scene"])
        _CONFINE.check_confined(request.get("confine_to"), WorkerFailureError)
        self.scene_path = None  # the finish rewires the scene: reopen it for what follows
        return _FINISH.finish_frame(bpy.context.scene, request, WorkerFailureError)

    def op_denoise(self, request: dict[str, Any]) -> dict[str, Any]:
        """Denoise a single-part multilayer EXR with Cycles' own OpenImageDenoise path."""
        started = time.monotonic()
        scene = bpy.context.scene
        scene.render.engine = "CYCLES"
        for layer in scene.view_layers:
            layer.cycles.denoising_store_passes = True
        try:
            bpy.ops.cycles.denoise_animation(
                input_filepath=request["input"], output_filepath=request["output"]
            )
        except RuntimeError as exc:
            raise WorkerFailureError("denoise_failed", str(exc).strip()) from exc
        if not Path(request["output"]).exists():
            raise WorkerFailureError("denoise_failed", "the denoiser wrote no output file")
        return {"output": request["output"], "seconds": time.monotonic() - started}

    # --- helpers ------------------------------------------------------------------------

    def _open(self, path: str) -> None:
        mtime = Path(path).stat().st_mtime
        if path == self.scene_path and mtime == self.scene_mtime:
            return
        # Never trust a default: a preference flipped by anything must not let the file's
        # registered texts run, or its Python drivers leave the restricted evaluator.
        bpy.context.preferences.filepaths.use_scripts_auto_execute = False
        try:
            bpy.ops.wm.open_mainfile(filepath=path, load_ui=False, use_scripts=False)
        except RuntimeError as exc:
            self.scene_path = None
            raise WorkerFailureError("corrupt_scene", _clean_blender_error(str(exc))) from exc
        self._drop_foreign_python()
        self.scene_path, self.scene_mtime = path, mtime
        self.active_device = None
        self.active_device_key = None
        self.originals = _snapshot_settings(bpy.context.scene)

    def _drop_foreign_python(self) -> None:
        """Remove app handlers and driver-namespace entries that are not the worker's.

        With scripts disabled nothing in the file can add any (measured with bpy 5.0.1);
        this is the belt to that pair of braces, so that a future Blender that ran
        something on load still could not hook later frames or renders.
        """
        for name, handlers in _handler_lists():
            own = self.own_handlers.get(name, ())
            for handler in list(handlers):
                if not any(handler is mine for mine in own):
                    handlers.remove(handler)
                    print(f"tessera: removed a foreign {name} handler", file=sys.stderr)
        namespace = bpy.app.driver_namespace
        for key in set(namespace.keys()) - self.own_driver_names:
            del namespace[key]

    def _select_device(self, scene: Any, device: str, device_ids: tuple[str, ...] = ()) -> None:
        if device == "CPU":
            if scene.cycles.device != "CPU":
                scene.cycles.device = "CPU"
            self.active_device, self.active_device_key = "CPU", None
            return
        if (device, device_ids) != self.active_device_key:
            prefs = _cycles_prefs()
            available_types = [t[0] for t in prefs.get_device_types(bpy.context)]
            if device not in available_types:
                raise WorkerFailureError(
                    "device_unavailable",
                    f"This Blender build has no {device} support "
                    f"(it offers: {', '.join(available_types) or 'CPU only'}).",
                )
            prefs.compute_device_type = device
            prefs.refresh_devices()
            matching = [d for d in prefs.devices if d.type == device]
            if not matching:
                raise WorkerFailureError(
                    "device_unavailable", f"No {device} device found on this machine."
                )
            devices = list(prefs.devices)
            try:
                # One worker per GPU: only this worker's card is turned on.
                flags = _DEVICES.use_flags([(d.type, d.id) for d in devices], device, device_ids)
            except ValueError as exc:
                raise WorkerFailureError("device_unavailable", str(exc)) from None
            for d, use in zip(devices, flags, strict=True):
                d.use = use
            # With no usable GPU, device='GPU' silently renders on the CPU: refuse instead.
            if not prefs.has_active_device():
                raise WorkerFailureError(
                    "device_unavailable", f"Cycles could not activate any {device} device."
                )
            self.active_device = device
            self.active_device_key = (device, device_ids)
        if scene.cycles.device != "GPU":
            scene.cycles.device = "GPU"


# --- scene settings ------------------------------------------------------------------------

SNAPSHOT_ATTRS: dict[str, tuple[str, ...]] = {
    "render": (
        "resolution_x",
        "resolution_y",
        "resolution_percentage",
        "use_border",
        "use_crop_to_border",
        "border_min_x",
        "border_max_x",
        "border_min_y",
        "border_max_y",
        "use_compositing",
        "use_sequencer",
        "threads_mode",
        "threads",
        "use_persistent_data",
        "filepath",
        "use_file_extension",
    ),
    "cycles": ("samples", "seed", "use_adaptive_sampling", "use_denoising"),
}


def _settings_owner(scene: Any, name: str) -> Any:
    if name.startswith("layer"):
        return scene.view_layers[int(name[len("layer") :])].cycles
    return {"render": scene.render, "cycles": scene.cycles}[name]


def _snapshot_settings(scene: Any) -> dict[str, Any]:
    snapshot: dict[str, Any] = {}
    for owner_name, attrs in SNAPSHOT_ATTRS.items():
        owner = _settings_owner(scene, owner_name)
        for attr in attrs:
            snapshot[f"{owner_name}:{attr}"] = getattr(owner, attr)
    for index, layer in enumerate(scene.view_layers):
        snapshot[f"layer{index}:denoising_store_passes"] = layer.cycles.denoising_store_passes
    return snapshot


def _apply_render_settings(scene: Any, request: dict[str, Any], originals: dict[str, Any]) -> None:
    """Bring the scene to what `request` asks for, starting from the file's own values.

    Only properties whose value differs are written, and the frame is only changed when
    it differs: every write tags the depsgraph, and with persistent data on, a needless
    tag costs a scene re-sync per tile (measured: 1.9x instead of 1.05x for 4x4 tiles).
    """
    desired = dict(originals)
    if request.get("percentage"):
        desired["render:resolution_percentage"] = int(request["percentage"])
    if request.get("resolution"):
        desired["render:resolution_x"], desired["render:resolution_y"] = map(
            int, request["resolution"]
        )
    if request.get("samples"):
        desired["cycles:samples"] = int(request["samples"])
    if request.get("seed") is not None:
        desired["cycles:seed"] = int(request["seed"])
    if request.get("adaptive_sampling") is not None:
        desired["cycles:use_adaptive_sampling"] = bool(request["adaptive_sampling"])
    border = request.get("border")
    desired["render:use_border"] = bool(border)
    if border:
        desired["render:use_crop_to_border"] = True
        for edge in ("min_x", "max_x", "min_y", "max_y"):
            desired[f"render:border_{edge}"] = float(border[edge])
    # Tiles carry raw passes and the denoiser runs once on the merged frame (no seams);
    # only a whole frame may denoise in-render. Compositing/sequencing would act on a
    # tile as if it were the whole frame.
    desired["cycles:use_denoising"] = bool(request.get("denoise"))
    # Set both ways: a scene saved with Denoising Data on must not add passes the task
    # did not ask for (the coordinator refuses results with unexpected passes).
    for index in range(len(scene.view_layers)):
        desired[f"layer{index}:denoising_store_passes"] = bool(request.get("denoise_data"))
    desired["render:use_compositing"] = False
    desired["render:use_sequencer"] = False
    desired["render:use_persistent_data"] = True
    threads = int(request.get("threads") or 0)
    desired["render:threads_mode"] = "FIXED" if threads else "AUTO"
    if threads:
        desired["render:threads"] = threads
    desired["render:filepath"] = request["output"]
    desired["render:use_file_extension"] = False
    if any(key.startswith("cycles:") for key in _set_changed(scene, desired)):
        # Measured: a changed sample count alone is not picked up by the next render of
        # a warm scene (it renders with the old count) unless the scene is tagged.
        scene.update_tag()
    settings = scene.render.image_settings
    # media_type must precede file_format (the other order raises TypeError).
    for attr, value in (
        ("media_type", "MULTI_LAYER_IMAGE"),
        ("file_format", "OPEN_EXR_MULTILAYER"),
        ("color_depth", "32"),
        ("exr_codec", "ZIP"),
    ):
        if getattr(settings, attr) != value:
            setattr(settings, attr, value)
    frame = int(request["frame"])
    if scene.frame_current != frame:
        scene.frame_set(frame)


def _mark_stage(marks: dict[str, float], stats: str, now: float) -> None:
    """Note when a render reaches each stage Cycles reports in its stats line: the first
    line (sync begins), "Sample 0/" (path tracing begins), "Finished" (saving begins)."""
    marks.setdefault("sync", now)
    if "Sample 0/" in stats:
        marks.setdefault("trace", now)
    elif "Finished" in stats:
        marks.setdefault("finished", now)


def _stage_seconds(marks: dict[str, float]) -> dict[str, float]:
    """Seconds per stage of one render request: `prepare` (open the file, apply the
    request), `startup` (the render operator until Cycles' first stats line: depsgraph
    evaluation), `sync` (scene sync, BVH, kernels), `trace` (path tracing), `write` (the
    EXR write and Blender's wrap-up), and `cpu`: the CPU seconds of all Blender's threads
    over the render (not a stage). A stage Cycles did not report counts as 0 s."""
    names = ("prepare", "startup", "sync", "trace", "write")
    stamps = [marks["start"]]
    for key in ("prepared", "sync", "trace", "finished", "done"):
        stamps.append(max(marks.get(key, stamps[-1]), stamps[-1]))
    seconds = {name: round(stamps[i + 1] - stamps[i], 4) for i, name in enumerate(names)}
    return {**seconds, "cpu": round(marks.get("cpu", 0.0), 4)}


def _handler_lists() -> list[tuple[str, Any]]:
    handlers = bpy.app.handlers
    return [
        (name, getattr(handlers, name))
        for name in dir(handlers)
        if not name.startswith("_") and isinstance(getattr(handlers, name), list)
    ]


def _handler_snapshot() -> dict[str, list[Any]]:
    return {name: list(handlers) for name, handlers in _handler_lists()}


def _set_changed(scene: Any, values: dict[str, Any]) -> list[str]:
    """Write the values that differ; the keys written."""
    changed = []
    for key, value in values.items():
        owner_name, attr = key.split(":", 1)
        owner = _settings_owner(scene, owner_name)
        if getattr(owner, attr) != value:
            setattr(owner, attr, value)
            changed.append(key)
    return changed


def _render_size(scene: Any) -> tuple[int, int]:
    render = scene.render
    pct = render.resolution_percentage
    return (max(1, render.resolution_x * pct // 100), max(1, render.resolution_y * pct // 100))


def _describe_scene(scene: Any) -> dict[str, Any]:
    render = scene.render
    width, height = _render_size(scene)
    cameras = sorted(o.name for o in scene.objects if o.type == "CAMERA")
    layers = []
    for layer in scene.view_layers:
        passes = sorted(
            attr[len("use_pass_") :]
            for attr in dir(layer)
            if attr.startswith("use_pass_") and getattr(layer, attr) is True
        )
        layers.append(
            {
                "name": layer.name,
                "use": bool(layer.use),
                "passes": passes,
                "denoising_store_passes": bool(layer.cycles.denoising_store_passes),
            }
        )
    cycles = scene.cycles
    return {
        "name": scene.name,
        "file": bpy.data.filepath,
        "frame_start": scene.frame_start,
        "frame_end": scene.frame_end,
        "frame_step": scene.frame_step,
        "frame_current": scene.frame_current,
        "fps": render.fps / render.fps_base,
        "resolution_x": render.resolution_x,
        "resolution_y": render.resolution_y,
        "resolution_percentage": render.resolution_percentage,
        "width": width,
        "height": height,
        "engine": render.engine,
        "samples": cycles.samples,
        "adaptive_sampling": bool(cycles.use_adaptive_sampling),
        "adaptive_threshold": cycles.adaptive_threshold,
        "adaptive_min_samples": cycles.adaptive_min_samples,
        "denoising": bool(cycles.use_denoising),
        "denoiser": cycles.denoiser,
        "seed": cycles.seed,
        "animated_seed": bool(cycles.use_animated_seed),
        "device": cycles.device,
        "camera": scene.camera.name if scene.camera else None,
        "cameras": cameras,
        "output_format": render.image_settings.file_format,
        "output_path": render.filepath,
        "use_compositing": bool(render.use_compositing and _has_compositor(scene)),
        "view_layers": layers,
        "python_warnings": _python_warnings(),
        "missing_files": _missing_files(),
        "libraries": sorted(lib.filepath for lib in bpy.data.libraries),
        "blender_version": bpy.app.version_string,
        "file_version": ".".join(str(v) for v in bpy.data.version),
    }


def _has_compositor(scene: Any) -> bool:
    tree = getattr(scene, "compositing_node_group", None) or getattr(scene, "node_tree", None)
    return tree is not None and len(tree.nodes) > 0


def _python_warnings() -> list[str]:
    """What in this file relies on Python, which never runs on the farm."""
    warnings: list[str] = []
    for text in bpy.data.texts:
        if text.use_module:
            warnings.append(
                f"Text block '{text.name}' is registered to run on load; "
                "it will not run on the farm."
            )
    seen: set[str] = set()
    for collection_name in (
        "objects",
        "materials",
        "node_groups",
        "meshes",
        "shape_keys",
        "scenes",
        "worlds",
        "cameras",
        "lights",
        "armatures",
    ):
        for datablock in getattr(bpy.data, collection_name, ()):
            anim = getattr(datablock, "animation_data", None)
            if anim is None:
                continue
            for fcurve in anim.drivers:
                driver = fcurve.driver
                if driver.type == "SCRIPTED" and not driver.is_simple_expression:
                    key = f"{datablock.name}:{fcurve.data_path}"
                    if key not in seen:
                        seen.add(key)
                        warnings.append(
                            f"Driver on '{datablock.name}' ({fcurve.data_path}) uses a Python "
                            f"expression '{driver.expression}'; it will not be evaluated."
                        )
    return warnings


def _missing_files() -> list[str]:
    missing: set[str] = set()
    for image in bpy.data.images:
        if image.source in {"FILE", "SEQUENCE", "TILED"} and image.packed_file is None:
            path = bpy.path.abspath(image.filepath, library=image.library)
            if path and not Path(path).exists() and image.source != "SEQUENCE":
                missing.add(path)
    for library in bpy.data.libraries:
        path = bpy.path.abspath(library.filepath)
        if not Path(path).exists():
            missing.add(path)
    return sorted(missing)


def _cycles_prefs() -> Any:
    return bpy.context.preferences.addons["cycles"].preferences


def _cpu_name() -> str:
    try:
        with Path("/proc/cpuinfo").open(encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


def _build_hash() -> str:
    value = bpy.app.build_hash
    return value.decode() if isinstance(value, bytes) else str(value)


def _clean_blender_error(text: str) -> str:
    return text.replace("Error: ", "").strip() or "Blender could not read the file"


if __name__ == "__main__":
    Worker().serve()

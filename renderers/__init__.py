"""Everything that knows Blender. The rest of Tessera enters by a few doors (`__all__`).

Rooms:

- Blender itself: `builds` (find and probe Blender: bpy module or executable), `devices`
  (Cycles devices, NVIDIA probes), `demo_scene`.
- The warm worker: `worker` (`RenderWorker`, `RenderRequest`: the parent side of the
  JSON-lines protocol), `worker_main` (its other side, run inside Blender; the only
  module that imports bpy), `limits` (`RenderLimits`, scrubbed environment, CPU
  pinning, free-disk checks), `sandbox` (bubblewrap: no network, only the bundle and
  Blender's install visible), `scene_paths` (a scene confined to its bundle, traced
  with blender-asset-tracer before Blender opens it).
- Scenes: `scene_info` (inspection, .blend checks), `scene_probe` (previews, probes).
- Pixels: `regions` (tiles and borders), `exr` (EXR I/O, header-only checks),
  `merge`, `compare`, `denoise`, `preview`, `atomic` (atomic writes), `local_render`.

This package never touches the network and never imports Qt, pydantic or the farm
packages; `bpy` is imported only inside the worker process (`worker_main.py`).
"""

__all__ = ["builds", "devices", "exr", "limits", "scene_info", "scene_paths", "worker"]

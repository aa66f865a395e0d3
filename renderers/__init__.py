"""Everything that knows Blender: builds, devices, the warm render worker, regions, EXR I/O,
merging, denoising and scene inspection.

This package never touches the network and never imports Qt, pydantic or the farm
packages; `bpy` is imported only inside the worker process (`worker_main.py`).
"""

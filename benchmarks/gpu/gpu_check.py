"""GPU check for Tessera: capture Cycles devices and NVML, render the default cube per device.

Run INSIDE a Python that has bpy (``python -I gpu_check.py MODE ...``); `run_gpu_check.sh`
drives it on a GPU machine and `docs/gpu-check.md` records what it showed. Modes:

- ``devices OUT.json``: every Cycles device of every compute type, as the render worker
  reports them (``[{"type", "name", "id"}]``, CPU included), plus ``resolve_device``'s
  answer for CPU/GPU/OPTIX/CUDA/HIP when ``--repo`` points at the Tessera checkout;
- ``nvml OUT.json``: ``renderers.devices.nvml_snapshot()``'s raw dict and parsed cards;
- ``render DEVICE OUT_DIR``: the factory-startup cube with Cycles at 640x360, 64 samples,
  denoiser off, on DEVICE (CPU, CUDA, OPTIX, HIP...), rendered ``--repeat`` times in one
  process and timed; writes ``render_<DEVICE><tag>.json`` (after every render, so a
  timeout keeps what was measured) and ``<device><tag>.exr``. A GPU type without a device exits 3
  with ``has_active_device: false`` instead of rendering on the CPU;
- ``compare REF.exr OTHER.exr... OUT.json``: mean and max absolute pixel differences.

This is a measuring script, not product code: it must not be imported by Tessera.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import bpy

WIDTH, HEIGHT, SAMPLES = 640, 360, 64
EXIT_NO_DEVICE = 3


def _log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _cycles_prefs() -> Any:
    return bpy.context.preferences.addons["cycles"].preferences


def capture_devices() -> list[dict[str, str]]:
    """Every device of every compute type Cycles was built with, plus the CPU."""
    prefs = _cycles_prefs()
    compute_types = [entry[0] for entry in prefs.get_device_types(bpy.context)]
    rows: list[dict[str, str]] = []
    for dev_type in [*(t for t in compute_types if t != "NONE"), "CPU"]:
        # get_devices_for_type appends the CPU entries after a type's GPUs, as the
        # worker's report does: the parser de-duplicates.
        for device in prefs.get_devices_for_type(dev_type):
            rows.append({"type": device.type, "name": device.name, "id": device.id})
    return rows


def mode_devices(out: Path, repo: Path | None) -> int:
    prefs = _cycles_prefs()
    compute_types = [entry[0] for entry in prefs.get_device_types(bpy.context)]
    rows = capture_devices()
    _write_json(out, rows)
    _log(f"compute types {compute_types}; {len(rows)} device rows -> {out}")
    if repo is not None:
        sys.path.insert(0, str(repo))
        from common.errors import TesseraError
        from renderers.devices import parse_cycles_devices, resolve_device

        devices = parse_cycles_devices(rows)
        answers: dict[str, str] = {}
        for requested in ("CPU", "GPU", "OPTIX", "CUDA", "HIP", "ONEAPI"):
            try:
                answers[requested] = "-> " + resolve_device(requested, devices)
            except TesseraError as exc:
                answers[requested] = f"{type(exc).__name__}: {exc.message}"
        _write_json(
            out.with_name(out.stem + "_resolve.json"),
            {"compute_types": compute_types, "resolve": answers},
        )
        for requested, answer in answers.items():
            _log(f"resolve_device({requested!r}) {answer}")
    return 0


def mode_nvml(out: Path, repo: Path) -> int:
    sys.path.insert(0, str(repo))
    from renderers.devices import nvml_snapshot, parse_nvml_snapshot

    raw = nvml_snapshot()
    parsed = [
        {name: getattr(gpu, name) for name in gpu.__slots__} for gpu in parse_nvml_snapshot(raw)
    ]
    _write_json(out, raw)
    _write_json(out.with_name(out.stem + "_parsed.json"), parsed)
    _log(f"nvml: {parsed}")
    return 0


def _setup_scene(output: Path) -> Any:
    bpy.ops.wm.read_factory_settings(use_empty=False)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.render.resolution_x = WIDTH
    scene.render.resolution_y = HEIGHT
    scene.render.resolution_percentage = 100
    scene.cycles.samples = SAMPLES
    scene.cycles.use_denoising = False  # OIDN would run on the GPU and blur the comparison
    scene.cycles.seed = 0
    settings = scene.render.image_settings
    settings.file_format = "OPEN_EXR"
    settings.color_mode = "RGBA"
    settings.color_depth = "32"
    settings.exr_codec = "ZIP"
    scene.render.filepath = str(output)
    return scene


def _select_device(scene: Any, dev_type: str) -> dict[str, object]:
    prefs = _cycles_prefs()
    if dev_type == "CPU":
        prefs.compute_device_type = "NONE"
        scene.cycles.device = "CPU"
        return {"has_active_device": None, "devices_used": ["CPU"]}
    prefs.compute_device_type = dev_type
    prefs.refresh_devices()
    used: list[str] = []
    for device in prefs.devices:
        device.use = device.type == dev_type
        if device.use:
            used.append(f"{device.type}:{device.name}:{device.id}")
    scene.cycles.device = "GPU"
    return {"has_active_device": bool(prefs.has_active_device()), "devices_used": used}


def _pixels(path: Path) -> tuple[int, int, array[float]]:
    image = bpy.data.images.load(str(path), check_existing=False)
    try:
        width, height = image.size
        values = array("f", bytes(4 * width * height * 4))
        image.pixels.foreach_get(values)
        return width, height, values
    finally:
        bpy.data.images.remove(image)


def _channel_means(values: array[float]) -> list[float]:
    count = len(values) // 4
    return [sum(values[c::4]) / count for c in range(4)]


def mode_render(dev_type: str, out_dir: Path, repeat: int, tag: str) -> int:
    output = out_dir / f"{dev_type.lower()}{tag}.exr"
    result_path = out_dir / f"render_{dev_type}{tag}.json"
    started = time.perf_counter()
    scene = _setup_scene(output)
    result: dict[str, object] = {
        "device_type": dev_type,
        "tag": tag,
        "blender": bpy.app.version_string,
        "resolution": [WIDTH, HEIGHT],
        "samples": SAMPLES,
        "renders_s": [],
    }
    result.update(_select_device(scene, dev_type))
    result["setup_s"] = round(time.perf_counter() - started, 3)
    _log(f"{dev_type}: {result}")
    _write_json(result_path, result)
    if dev_type != "CPU" and not result["has_active_device"]:
        # The pitfall this guards against: device='GPU' with no GPU renders on the CPU.
        result["error"] = f"no {dev_type} device: has_active_device() is False, not rendering"
        _write_json(result_path, result)
        _log(str(result["error"]))
        return EXIT_NO_DEVICE
    timings: list[float] = []
    for attempt in range(repeat):
        begin = time.perf_counter()
        bpy.ops.render.render(write_still=True)
        timings.append(round(time.perf_counter() - begin, 3))
        result["renders_s"] = timings
        _write_json(result_path, result)
        _log(f"{dev_type}: render {attempt + 1}/{repeat} took {timings[-1]} s")
    width, height, values = _pixels(output)
    result["image"] = {"path": output.name, "size": [width, height]}
    result["mean_rgba"] = [round(v, 6) for v in _channel_means(values)]
    _write_json(result_path, result)
    _log(f"{dev_type}: mean RGBA {result['mean_rgba']}")
    return 0


def mode_compare(reference: Path, others: list[Path], out: Path) -> int:
    ref_w, ref_h, ref = _pixels(reference)
    report: dict[str, object] = {"reference": reference.name}
    for other in others:
        width, height, values = _pixels(other)
        if (width, height) != (ref_w, ref_h):
            report[other.name] = {"error": f"size {width}x{height} != {ref_w}x{ref_h}"}
            continue
        diffs = [abs(a - b) for a, b in zip(ref, values, strict=True)]
        rgb = [d for i, d in enumerate(diffs) if i % 4 != 3]
        report[other.name] = {
            "mean_abs_diff_rgb": sum(rgb) / len(rgb),
            "max_abs_diff_rgb": max(rgb),
            "fraction_rgb_over_0.05": sum(1 for d in rgb if d > 0.05) / len(rgb),
            "mean_rgba": _channel_means(values),
        }
    report["reference_mean_rgba"] = _channel_means(ref)
    _write_json(out, report)
    _log(f"compare: {json.dumps(report)}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    devices = sub.add_parser("devices")
    devices.add_argument("out", type=Path)
    devices.add_argument("--repo", type=Path)
    nvml = sub.add_parser("nvml")
    nvml.add_argument("out", type=Path)
    nvml.add_argument("--repo", type=Path, required=True)
    render = sub.add_parser("render")
    render.add_argument("device")
    render.add_argument("out_dir", type=Path)
    render.add_argument("--repeat", type=int, default=2)
    render.add_argument("--tag", default="", help="suffix of the output names (e.g. _cold)")
    compare = sub.add_parser("compare")
    compare.add_argument("reference", type=Path)
    compare.add_argument("others", type=Path, nargs="+")
    compare.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.mode == "devices":
        return mode_devices(args.out, args.repo)
    if args.mode == "nvml":
        return mode_nvml(args.out, args.repo)
    if args.mode == "render":
        return mode_render(args.device.upper(), args.out_dir, args.repeat, args.tag)
    return mode_compare(args.reference, args.others, args.out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`tessera inspect`, `render-local` and `devices`: Blender on this machine, no farm.

Each handler takes `(args, settings)` and returns the exit status; `app.cli.main` turns
a `TesseraError` into a message. No Qt here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from app.blender_choice import choose_build
from app.cli.options import (
    Subparsers,
    add_blender_option,
    add_json_option,
    grid,
    grid_or_auto,
    positive_int,
)
from common.settings import Settings
from renderers.builds import BlenderBuild, find_builds
from renderers.devices import parse_cycles_devices, probe_nvidia, summarise
from renderers.local_render import LocalRenderOptions, TileDone, render_frame_local
from renderers.scene_info import SceneInfo, inspect_scene
from renderers.worker import Progress, RenderWorker


def add_commands(sub: Subparsers) -> None:
    inspect = sub.add_parser(
        "inspect",
        help="describe a .blend and say whether it can render",
        description="Open a .blend (scripts disabled) and report frames, "
        "resolution, engine, samples, camera, passes and problems.",
    )
    inspect.add_argument("scene", type=Path, help="the .blend file")
    inspect.add_argument(
        "--tiles",
        type=grid_or_auto,
        default=None,
        metavar="CxR|auto",
        help="also say what splitting its frames into this grid costs (auto: the grid "
        "submit --tiles auto would choose for --nodes)",
    )
    inspect.add_argument(
        "--nodes", type=positive_int, default=1, help="nodes for --tiles auto (default 1)"
    )
    add_json_option(inspect)
    add_blender_option(inspect)
    inspect.set_defaults(handler=cmd_inspect)

    local = sub.add_parser(
        "render-local",
        help="render one frame here, tile by tile if asked",
        description="Render one frame through one warm Blender worker, split into tiles if "
        "asked, merge them, denoise once if the scene asks for it, and write a multilayer "
        "EXR plus a PNG preview beside it.",
    )
    local.add_argument("scene", type=Path, help="the .blend file")
    _add_render_options(local)
    local.add_argument("--out", type=Path, required=True, help="output EXR path")
    local.add_argument("--json", action="store_true", help="print a JSON summary")
    add_blender_option(local)
    local.set_defaults(handler=cmd_render_local)

    devices = sub.add_parser(
        "devices",
        help="list Blender builds and render devices",
        description="List the Blender builds Tessera can use and the "
        "devices Cycles sees (with NVIDIA details when available).",
    )
    add_json_option(devices)
    add_blender_option(devices)
    devices.set_defaults(handler=cmd_devices)


def _add_render_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--frame", type=int, default=None, help="frame number (default: the scene's first frame)"
    )
    parser.add_argument(
        "--tiles",
        type=grid,
        default=(1, 1),
        metavar="CxR",
        help="split the frame into C columns x R rows (default 1x1)",
    )
    parser.add_argument("--samples", type=int, default=None, help="override the scene's samples")
    parser.add_argument(
        "--percentage", type=int, default=None, help="override the scene's resolution percentage"
    )
    parser.add_argument(
        "--device",
        default=None,
        help="CPU, GPU (best available), OPTIX, CUDA, HIP, METAL or ONEAPI",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="render threads (default: all cores)"
    )
    parser.add_argument(
        "--no-denoise", action="store_true", help="skip denoising even if the scene asks for it"
    )
    parser.add_argument(
        "--tile-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up on a tile after this many seconds",
    )


def _build(args: argparse.Namespace, settings: Settings) -> BlenderBuild:
    return choose_build(args.blender, settings)


def _worker(args: argparse.Namespace, settings: Settings) -> RenderWorker:
    return RenderWorker(_build(args, settings))


# --- inspect --------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace, settings: Settings) -> int:
    from app.packing import list_dependencies

    with _worker(args, settings) as worker:
        info = inspect_scene(worker, args.scene)
    dependencies = list_dependencies(args.scene)
    tiles = _tile_cost(info, args.tiles, args.nodes)
    if args.json:
        files = [
            {"path": str(dep.path), "kind": dep.kind, "missing": dep.missing}
            for dep in dependencies
        ]
        extra = {} if tiles is None else {"tiles": tiles}
        print(json.dumps({**info.to_dict(), "dependencies": files, **extra}, indent=2))
    else:
        print(format_scene(info))
        if tiles is not None:
            print(f"Tiles:       {tiles['text']}")
        print(f"Files:       {len(dependencies) or 'none'}")
        for dep in dependencies:
            print(f"  {'MISSING ' if dep.missing else ''}{dep.kind}: {dep.path}")
    return 0


def _tile_cost(
    info: SceneInfo, tiles: tuple[int, int] | str | None, nodes: int
) -> dict[str, object] | None:
    """What rendering the scene's frames in `tiles` (or `auto` for `nodes`) costs."""
    from app.job_spec import job_options, tile_choice

    if tiles is None:
        return None
    auto = not isinstance(tiles, tuple)
    columns, rows = (1, 1) if not isinstance(tiles, tuple) else tiles
    options = job_options(tiles={"columns": columns, "rows": rows})
    _, choice = tile_choice(info, options, auto_nodes=nodes if auto else None)
    return {
        "columns": choice.columns,
        "rows": choice.rows,
        "auto": auto,
        "overhead_estimate": round(choice.overhead, 4),
        "text": choice.describe(),
    }


def format_scene(info: SceneInfo) -> str:
    def on_off(flag: bool) -> str:
        return "on" if flag else "off"

    layers = "; ".join(
        f"{layer.name} ({', '.join(layer.passes) or 'combined'})"
        + ("" if layer.use else " [disabled]")
        for layer in info.view_layers
    )
    lines = [
        ("Scene", f"{info.path.name} (scene '{info.name}', saved by Blender {info.file_version})"),
        (
            "Frames",
            f"{info.frame_start}-{info.frame_end} ({info.frame_count} frames, "
            f"step {info.frame_step}) at {info.fps:g} fps",
        ),
        (
            "Resolution",
            f"{info.width}x{info.height} ({info.resolution_x}x{info.resolution_y} "
            f"at {info.resolution_percentage}%)",
        ),
        (
            "Engine",
            f"{info.engine}, {info.samples} samples, adaptive sampling "
            f"{on_off(info.adaptive_sampling)}, denoising {on_off(info.denoising)}"
            + (f" ({info.denoiser})" if info.denoising else ""),
        ),
        ("Camera", info.camera or "none"),
        ("Output", describe_deliverable(info)),
        ("View layers", layers),
        ("Libraries", ", ".join(info.libraries) or "none"),
    ]
    text = "\n".join(f"{label:<12} {value}" for label, value in lines)
    if info.warnings:
        text += "\nWarnings:\n" + "\n".join(f"  - {w}" for w in info.warnings)
    else:
        text += "\nWarnings:    none"
    return text


def describe_deliverable(info: SceneInfo) -> str:
    """What the farm hands back for this scene, in one line."""
    output = info.output
    if output is None:
        return f"{info.output_format}, plus the raw multilayer EXR of every pass"
    if output.is_movie and output.movie is not None:
        movie = f"{output.movie.get('container')}/{output.movie.get('codec')}"
        what = f"a {movie} movie {output.frame_path or ''} (from lossless PNG frames)"
    else:
        depth = f" {output.color_depth}-bit" if output.color_depth else ""
        what = f"{output.file_format}{depth} {output.color_mode} as {output.frame_path or '?'}"
    look = f"{output.view_transform}" + (
        f" + {output.look}" if output.look and output.look != "None" else ""
    )
    extra = ", compositor applied" if output.compositor else ""
    if output.file_outputs:
        extra += f", {len(output.file_outputs)} File Output node(s)"
    return f"{what} ({look}{extra}), plus the raw multilayer EXR of every pass"


# --- render-local ---------------------------------------------------------------------------


def cmd_render_local(args: argparse.Namespace, settings: Settings) -> int:
    options = LocalRenderOptions(
        frame=args.frame,
        grid=args.tiles,
        samples=args.samples,
        percentage=args.percentage,
        denoise=False if args.no_denoise else None,
        device=args.device or settings.device,
        threads=args.threads if args.threads is not None else settings.threads,
        tile_timeout=args.tile_timeout,
    )
    return _render_and_report(args, settings, args.scene, args.out, options)


def _render_and_report(
    args: argparse.Namespace,
    settings: Settings,
    scene: Path,
    out: Path,
    options: LocalRenderOptions,
) -> int:
    reporter = _ProgressReporter(enabled=not args.json)
    with _worker(args, settings) as worker:
        result = render_frame_local(
            worker, scene, out, options, on_tile=reporter.tile_done, on_progress=reporter.samples
        )
    reporter.finish()
    summary: dict[str, Any] = {
        "output": str(result.output),
        "preview": str(result.preview) if result.preview else None,
        "frame": result.frame,
        "width": result.width,
        "height": result.height,
        "tiles": len(result.plan.tiles),
        "grid": [result.plan.columns, result.plan.rows],
        "margin": result.plan.margin,
        "device": result.device,
        "denoised": result.denoised,
        "render_seconds": round(result.render_seconds, 3),
        "merge_seconds": round(result.merge_seconds, 3),
        "denoise_seconds": round(result.denoise_seconds, 3),
        "wall_seconds": round(result.wall_seconds, 3),
        "warnings": list(result.scene.warnings),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for warning in result.scene.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"Rendered frame {result.frame} of {result.scene.path.name} at "
        f"{result.width}x{result.height} in {summary['tiles']} tile(s) on {result.device} "
        f"({result.wall_seconds:.1f} s; denoised: {'yes' if result.denoised else 'no'})"
    )
    print(f"  EXR: {result.output}")
    if result.preview:
        print(f"  PNG: {result.preview}")
    return 0


class _ProgressReporter:
    """One status line on stderr: tiles done and the samples of the tile in flight."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.tiles = "tile 1"

    def samples(self, progress: Progress) -> None:
        if self.interactive:
            print(
                f"\r{self.tiles}: sample {progress.samples_done}/{progress.samples_total}   ",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def tile_done(self, done: TileDone) -> None:
        self.tiles = f"tile {min(done.done + 1, done.total)}/{done.total}"
        if not self.enabled:
            return
        line = f"tile {done.done}/{done.total} rendered in {done.seconds:.2f} s"
        if self.interactive:
            print(f"\r{line}          ", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr)

    def finish(self) -> None:
        if self.interactive:
            print(file=sys.stderr)


# --- devices --------------------------------------------------------------------------------


def cmd_devices(args: argparse.Namespace, settings: Settings) -> int:
    extra = [args.blender] if args.blender else list(settings.blender)
    builds = find_builds(extra, include_bpy=settings.use_bpy)
    build = builds[0] if builds else _build(args, settings)
    with RenderWorker(build) as worker:
        cycles_devices = parse_cycles_devices(worker.devices())
    rows = summarise(cycles_devices, probe_nvidia())
    if args.json:
        print(json.dumps({"builds": [b.to_dict() for b in builds], "devices": rows}, indent=2))
        return 0
    print("Blender builds:")
    for candidate in builds:
        print(f"  {candidate.label}")
    print(f"Devices (as Cycles sees them with {build.version}):")
    for row in rows:
        details = ", ".join(f"{k}={v}" for k, v in row.items() if k not in {"type", "name"})
        print(f"  {row['type']:<7} {row['name']}" + (f"  ({details})" if details else ""))
    return 0

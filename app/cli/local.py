"""`tessera render` and `demo`: a coordinator and nodes started on this machine for one
job, the job submitted and followed, the providers' standing and the ledger's check
printed. The farm itself is `app.local_farm.LocalFarm`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.blender_choice import choose_build
from app.cli.jobs import prepare_job, submit_prepared
from app.cli.options import (
    AUTO,
    Subparsers,
    add_blender_option,
    add_job_options,
    add_json_option,
    count,
    job_options_of,
    positive_int,
    print_json,
)
from app.cli.output import MESSAGE_WIDTH, JobProgress, Status, clip, table
from app.connection import CLI_RETRIES
from app.cost_text import cost_json, cost_lines, rate
from app.local_farm import LOCAL_CREDITS, LOCAL_PRICE
from common.errors import TesseraError
from common.settings import Settings
from protocol.client import TesseraClient
from protocol.models import JobStatus, NodeInfo


def add_commands(sub: Subparsers) -> None:
    _add_render(sub)
    _add_demo(sub)


def _add_render(sub: Subparsers) -> None:
    render = sub.add_parser(
        "render",
        help="render a scene on a farm started just for it on this machine",
        description="Start a coordinator and N node processes on 127.0.0.1, submit the "
        "scene to them, download the frames to DIR/<scene>/frame_####.exr (+ .png) as they "
        "finish, and stop the farm. Prints each provider's accepted and rejected results, "
        "credits and reputation, and whether the credit ledger checks out. With --json, a "
        "summary: frames written, tasks, per-node task counts and render seconds, the "
        "providers, the ledger check, wall time.",
    )
    render.add_argument("scene", type=Path, help="the .blend file")
    render.add_argument("--nodes", type=positive_int, default=2, help="node processes (default 2)")
    render.add_argument(
        "--threads-per-node",
        type=int,
        default=0,
        metavar="N",
        help="render threads of each node (default: the cores shared out)",
    )
    _add_cheaters_option(render)
    _add_probe_option(render)
    add_job_options(render)
    render.add_argument(
        "--out",
        type=Path,
        default=Path("out"),
        metavar="DIR",
        help="where frames go, in DIR/<scene>/ (default: ./out)",
    )
    add_json_option(render)
    add_blender_option(render)
    render.set_defaults(handler=cmd_render, wait=True)


def _add_cheaters_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cheaters",
        type=count,
        default=0,
        metavar="K",
        help="add K nodes that cheat on purpose, to demonstrate verification (default 0); "
        "they take the modes samples, copy, noise, black, sometimes in turn "
        "(see `tessera node --cheat`)",
    )


def _add_probe_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--probe",
        action="store_true",
        help="probe the scene before submitting, as `submit` does (its cost estimate, "
        "previews and memory); a farm of your own nodes needs it only with --cheaters "
        "or --tiles auto, which turn it on",
    )


def local_probe_needed(args: argparse.Namespace, cheats: list[str]) -> bool:
    """Whether a farm of this machine's own nodes needs the scene probe: its previews
    are how the coordinator refuses a cheat's flat or black tiles, and `--tiles auto`
    weighs each render's fixed cost. Otherwise it only sets the escrow's estimate (the
    bill follows the nodes' measured renders) and memory requirements (the nodes are
    this machine), so the job is submitted without it, seconds sooner."""
    return bool(args.probe or cheats or args.tiles == AUTO)


def _cheat_names(count: int) -> list[str]:
    """The `--cheat` modes of `count` cheating nodes (farm_node.cheats, which loads the
    node's renderer, numpy and OpenEXR, is imported only when there are some)."""
    if count == 0:
        return []
    from farm_node.cheats import cheat_modes

    return [mode.value for mode in cheat_modes(count)]


# --- render (a farm of its own) -----------------------------------------------------------


def cmd_render(args: argparse.Namespace, settings: Settings) -> int:
    """Submit to a coordinator and nodes started on this machine for this one job."""
    from app.local_farm import LocalFarm

    started = time.monotonic()
    status = Status(sys.stderr, enabled=not args.json)
    cheats = _cheat_names(getattr(args, "cheaters", 0))
    if cheats and args.nodes + len(cheats) < 3:
        status.warn(
            f"{args.nodes + len(cheats)} providers in all: a disagreement between two of "
            "them has no third provider to settle it (raise --nodes)"
        )
    timings: dict[str, float] = {}

    def mark(phase: str) -> None:
        timings[phase] = round(time.monotonic() - started, 3)

    with tempfile.TemporaryDirectory(prefix="tessera-farm-") as folder:
        cheating = f" and {len(cheats)} cheating node(s)" if cheats else ""
        status.line(f"Starting a local farm: a coordinator and {args.nodes} node(s){cheating}...")
        farm = LocalFarm(
            Path(folder),
            nodes=args.nodes,
            threads_per_node=args.threads_per_node,
            cheats=cheats,
            price=LOCAL_PRICE,
            credits=LOCAL_CREDITS,
            benchmark_cache=settings.home / "local-farm",
        )
        try:
            # The farm starts while the scene is inspected, probed and packed; first of
            # all, so that its processes' start overlaps this one's imports too (a bad
            # option below still fails at once: the farm is stopped).
            farm.start_in_background()
            from app.follow import FrameFiles, follow_job
            from app.submit import bundle_folder

            # The local farm prices its nodes so the run shows who earned what; the job
            # offers at least that price, from credits granted to the local requester.
            options = job_options_of(args)
            options = options.model_copy(update={"max_price": max(options.max_price, LOCAL_PRICE)})
            with bundle_folder(settings.home / "bundles") as bundle_dir:
                prepared = prepare_job(
                    args,
                    settings,
                    status,
                    options,
                    Path(bundle_dir),
                    probe=local_probe_needed(args, cheats),
                )
                if prepared.probe is None:
                    status.line(
                        "Not probed (a farm of this machine's nodes; --probe to measure): the "
                        "cost estimate assumes the benchmark scene's cost; the bill is measured."
                    )
                mark("prepared")
                farm.wait_started()
                mark("farm_started")
                with TesseraClient(farm.url, farm.requester_token, retries=CLI_RETRIES) as client:
                    job = submit_prepared(client, prepared, status)
            mark("submitted")
            with TesseraClient(farm.url, farm.requester_token, retries=CLI_RETRIES) as client:
                progress = JobProgress(status)

                def on_frame(frame: FrameFiles) -> None:
                    timings.setdefault("first_frame", round(time.monotonic() - started, 3))
                    progress.frame(frame)

                result = follow_job(
                    client, job.id, args.out, on_frame=on_frame, on_job=progress.update
                )
                mark("job_done")
                progress.finish()
                tasks = client.tasks(job.id)
                nodes = client.nodes()
                final = client.job(job.id)
            ledger_ok, ledger_problems = _ledger_check(farm.url, farm.admin_token, status)
            local_nodes = list(farm.local_nodes)
            mark("stopping")
            # A completed job leaves no lease to hand back: every process stops at once.
            farm.stop(together=result.job.status is JobStatus.COMPLETED)
        finally:
            farm.stop()  # a no-op after the stop above
        mark("stopped")
    summary: dict[str, Any] = {
        "job": result.job.id,
        "status": result.job.status.value,
        "scene": str(args.scene),
        "folder": str(result.folder),
        "frames_written": [f.frame for f in result.frames],
        "files": [str(p) for f in result.frames for p in f.files],
        "cost": cost_json(final.cost),
        "tasks": len(tasks),
        "render_tasks": sum(t.kind.value == "render" for t in tasks),
        "nodes": [
            {
                "name": n.capabilities.name,
                "tasks": n.tasks_completed,
                "failed": n.tasks_failed,
                "render_seconds": round(n.render_seconds, 3),
            }
            for n in nodes
        ],
        "providers": provider_summary(nodes, {n.name: n.cheat for n in local_nodes}),
        "ledger_ok": ledger_ok,
        "ledger_problems": ledger_problems,
        "wall_seconds": round(time.monotonic() - started, 3),
        # Seconds since the command started at which each step ended (see
        # docs/render-overhead.md).
        "timings": {
            **{name: round(at - started, 3) for name, at in farm.marks.items()},
            **timings,
        },
        "warnings": list(prepared.warnings),
        # Whether the scene was probed (see local_probe_needed): without, `cost.estimate`
        # assumes the benchmark scene's cost per pixel-sample.
        "probed": prepared.probe is not None,
    }
    if args.json:
        print_json(summary)
    completed = result.job.status is JobStatus.COMPLETED
    if completed:
        status.line(
            f"Rendered {len(result.frames)} frame(s) of {args.scene.name} on "
            f"{args.nodes + len(cheats)} node(s) in {summary['wall_seconds']:.1f} s: "
            f"{result.folder}"
        )
    for line in ["Cost:", *(f"  {line}" for line in cost_lines(final))]:
        status.line(line)
    for line in format_providers(summary["providers"], ledger_ok, ledger_problems):
        status.line(line)
    if completed:
        return 0
    print(
        f"error: job {result.job.id} {result.job.status.value}: {result.job.message}",
        file=sys.stderr,
    )
    return 1


def provider_summary(
    nodes: Sequence[NodeInfo], cheats: dict[str, str | None] | None = None
) -> list[dict[str, Any]]:
    """Each node as a provider: accepted and rejected results, credits, standing.

    `cheats` maps node names to their `--cheat` mode (a local farm knows them; the
    coordinator never does). Nodes come in `cheats`' order, then the others by name.
    """
    cheats = cheats or {}
    order = {name: index for index, name in enumerate(cheats)}
    ranked = sorted(
        nodes, key=lambda n: (order.get(n.capabilities.name, len(order)), n.capabilities.name)
    )
    return [
        {
            "name": node.capabilities.name,
            "account": node.owner,
            "cheat": cheats.get(node.capabilities.name),
            "accepted": node.tasks_completed,
            "accepted_seconds": round(node.accepted_seconds, 3),
            "success_rate": node.success_rate,
            "rejected": node.rejected,
            "earned": round(node.earned, 6),
            "reputation": round(node.reputation, 4),
            "suspended": node.suspended,
        }
        for node in ranked
    ]


def format_providers(
    providers: Sequence[dict[str, Any]], ledger_ok: bool | None, problems: Sequence[str] = ()
) -> list[str]:
    """The providers' table and the ledger's verdict, as lines for the terminal."""
    rows = [
        (
            f"  {p['name']}",
            p["cheat"] or "-",
            str(p["accepted"]),
            str(p["rejected"]),
            rate(p.get("success_rate")),
            f"{p['earned']:g}",
            f"{p['reputation']:.2f}",
            "SUSPENDED: " + clip(p["suspended"], MESSAGE_WIDTH) if p["suspended"] else "-",
        )
        for p in providers
    ]
    headers = (
        "  PROVIDER",
        "CHEAT",
        "ACCEPTED",
        "REJECTED",
        "SUCCESS",
        "EARNED",
        "REPUTATION",
        "SUSPENDED",
    )
    lines = table(headers, rows).splitlines()
    if ledger_ok is None:
        lines.append("  Ledger: not checked (" + "; ".join(problems) + ")")
    elif ledger_ok:
        lines.append("  Ledger: checks out (every invariant holds)")
    else:
        lines.append(f"  Ledger: {len(problems)} problem(s)")
        lines += [f"    - {problem}" for problem in problems]
    return lines


def _ledger_check(url: str, admin_token: str, status: Status) -> tuple[bool | None, list[str]]:
    """(ok, problems) of the farm's ledger check; (None, [why]) when it could not run."""
    try:
        with TesseraClient(url, admin_token, retries=CLI_RETRIES) as admin:
            check = admin.ledger_check()
    except TesseraError as exc:
        status.warn(f"could not check the credit ledger: {exc.message}")
        return None, [exc.message]
    return check.ok, list(check.problems)


def _add_demo(sub: Subparsers) -> None:
    demo = sub.add_parser(
        "demo",
        help="render the demo scene on a 2-node farm started on this machine",
        description="Generate the demo scene if needed (resources/scenes/make_demo.py) and "
        "`tessera render` it: a coordinator and 2 nodes on 127.0.0.1, frames 1-4 at 50% "
        "in 2x2 tiles, denoised once per frame; prints where the frames are.",
    )
    demo.add_argument("--nodes", type=positive_int, default=2, help="node processes (default 2)")
    demo.add_argument(
        "--threads-per-node",
        type=int,
        default=0,
        metavar="N",
        help="render threads of each node (default: the cores shared out)",
    )
    _add_cheaters_option(demo)
    _add_probe_option(demo)
    add_job_options(demo)
    demo.set_defaults(frames="1-4", tiles=(2, 2), percentage=50, samples=32)
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("out"),
        metavar="DIR",
        help="where frames go, in DIR/demo/ (default: ./out)",
    )
    add_json_option(demo)
    demo.set_defaults(handler=cmd_demo, wait=True, blender=None)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from renderers.demo_scene import ensure_demo_scene

    args.scene = ensure_demo_scene(choose_build(args.blender, settings))
    return cmd_render(args, settings)

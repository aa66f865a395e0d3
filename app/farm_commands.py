"""The `tessera` commands that talk to a farm: submit, jobs, job, pause, resume, cancel,
priority and nodes.

`add_farm_commands(subparsers)` adds them to the main parser (app/cli.py); `main(argv)`
runs them alone. Each handler takes `(args, settings)` and returns the exit status, as
app/cli.py's do: 0 on success, 1 when a followed job fails or is canceled, and every
`TesseraError` becomes `error: ...` on stderr with status 2 (the caller's `main` does it).
Results go to stdout (a table, the job id, or JSON with --json); progress, warnings and
errors go to stderr, so `JOB=$(tessera submit scene.blend)` captures just the id.

The coordinator and token come from --coordinator/--token, else the TESSERA_COORDINATOR
and TESSERA_TOKEN environment variables, else http://127.0.0.1:8400 and the file
$TESSERA_HOME/token; they are read when a command runs, never at import. No Qt here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pydantic import ValidationError

from app.arg_types import count, positive_int
from app.blender_choice import add_blender_option, choose_build
from common.errors import TesseraError, UsageError
from common.settings import Settings
from protocol.client import TesseraClient
from protocol.models import (
    FINISHED_JOB_STATES,
    FrameRange,
    Job,
    JobStatus,
    NodeInfo,
    Role,
    Task,
    TaskKind,
    TaskStatus,
)
from renderers.regions import parse_grid

if TYPE_CHECKING:
    from app.packing import PackProgress
    from app.submission import FollowResult, FrameFiles, Prepared
    from renderers.builds import BlenderBuild

Handler = Callable[[argparse.Namespace, Settings], int]

DEFAULT_COORDINATOR = "http://127.0.0.1:8400"
COORDINATOR_ENV = "TESSERA_COORDINATOR"
TOKEN_ENV = "TESSERA_TOKEN"
TOKEN_FILE = "token"
DEVICES = ("ANY", "CPU", "GPU", "CUDA", "OPTIX", "HIP", "METAL", "ONEAPI")
#: A CLI answers fast: three tries over 1.5 s, not the client's default five over 7.5 s.
CLI_RETRIES = 2
MESSAGE_WIDTH = 60

#: What each node of a `tessera render`/`demo` farm asks per work unit, and the credits
#: its requester starts with.
LOCAL_PRICE = 1.0
LOCAL_CREDITS = 1_000_000.0


def add_farm_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the farm commands to the `tessera` parser's subcommands."""
    _add_submit(sub)
    _add_render(sub)
    _add_demo(sub)

    jobs = sub.add_parser(
        "jobs",
        help="list your jobs on the farm",
        description="List your jobs: id, name, status, progress, frames, priority, message.",
    )
    add_json_option(jobs)
    _add_connection_options(jobs)
    jobs.set_defaults(handler=cmd_jobs)

    job = sub.add_parser(
        "job",
        help="show one job: frames, tasks and failures",
        description="Show a job's settings and progress, the status of every frame, how "
        "many tasks are in each state, and why tasks failed.",
    )
    job.add_argument("job_id", metavar="ID", help="the job's id (see `tessera jobs`)")
    add_json_option(job)
    _add_connection_options(job)
    job.set_defaults(handler=cmd_job)

    for name, verb, text in (
        ("pause", "pause", "stop starting new tiles of a job (running tiles finish)"),
        ("resume", "resume", "let a paused job run again"),
        ("cancel", "cancel", "cancel a job for good (finished frames stay downloadable)"),
    ):
        control = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        control.add_argument("job_id", metavar="ID", help=f"the job to {verb}")
        add_json_option(control)
        _add_connection_options(control)
        control.set_defaults(handler=cmd_control, action=name)

    priority = sub.add_parser(
        "priority",
        help="change a job's priority",
        description="Set a job's priority from 0 to 100 (default 50); among your jobs, "
        "higher ones get nodes first.",
    )
    priority.add_argument("job_id", metavar="ID", help="the job to change")
    priority.add_argument("priority", metavar="P", type=_priority, help="0 to 100")
    add_json_option(priority)
    _add_connection_options(priority)
    priority.set_defaults(handler=cmd_priority)

    nodes = sub.add_parser(
        "nodes",
        help="list the farm's render nodes",
        description="List the render nodes the coordinator knows: status, devices, "
        "Blender versions, current task, tasks done, failed and rejected by verification, "
        "price, the provider's reputation, credits earned, and SUSPENDED with the reason "
        "when the coordinator suspended the provider.",
    )
    nodes.add_argument(
        "--lan",
        action="store_true",
        help="list the coordinators and nodes advertised on the LAN instead",
    )
    nodes.add_argument(
        "--interface",
        default=None,
        metavar="ADDRESS",
        help="with --lan: listen on this address only (e.g. 127.0.0.1)",
    )
    nodes.add_argument(
        "--seconds", type=float, default=3.0, help="with --lan: how long to listen (default 3)"
    )
    add_json_option(nodes)
    _add_connection_options(nodes)
    nodes.set_defaults(handler=cmd_nodes)
    _add_credit_commands(sub)


def _add_credit_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    wallet = sub.add_parser(
        "wallet",
        help="show your credits: balance, escrow and history",
        description="Show your credit balance, the credits held in escrow for your unfinished "
        "jobs, and your latest ledger entries.",
    )
    add_json_option(wallet)
    _add_connection_options(wallet)
    wallet.set_defaults(handler=cmd_wallet)

    grant = sub.add_parser(
        "grant",
        help="give credits to an account (admin)",
        description="Issue credits to an account. Needs the admin token; grants are the only "
        "source of credits.",
    )
    grant.add_argument("account", metavar="ACCOUNT", help="the account to credit")
    grant.add_argument("amount", metavar="AMOUNT", type=_credits, help="credits to give")
    add_json_option(grant)
    _add_connection_options(grant)
    grant.set_defaults(handler=cmd_grant)

    ledger = sub.add_parser(
        "ledger",
        help="check the credit ledger (admin)",
        description="`tessera ledger check` proves the ledger's invariants (every transaction "
        "balances, no balance is negative, no task is paid twice or paid unaccepted, no escrow "
        "is left on a finished job); it exits 1 and lists the problems if any fails.",
    )
    ledger.add_argument("action", choices=("check",), help="what to do (check)")
    add_json_option(ledger)
    _add_connection_options(ledger)
    ledger.set_defaults(handler=cmd_ledger)

    provider = sub.add_parser(
        "provider",
        help="manage a provider account (admin): lift a suspension",
        description="`tessera provider reinstate ACCOUNT` lets a provider suspended for "
        "failed checks or duplicate samples lease work again (`tessera nodes` shows why it "
        "was suspended). Its next rejected result suspends it again.",
    )
    provider.add_argument("action", choices=("reinstate",), help="what to do (reinstate)")
    provider.add_argument("account", metavar="ACCOUNT", help="the provider account")
    _add_connection_options(provider)
    provider.set_defaults(handler=cmd_provider)


def _add_submit(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    submit_parser = sub.add_parser(
        "submit",
        help="pack a scene and render it on the farm",
        description="Inspect a .blend (a scene that cannot render stops here), pack it with "
        "its textures and libraries, upload it (skipped if the farm already has it) and "
        "submit a job; prints the job id. With --wait, follow the job and download each "
        "frame to DIR/<scene>/frame_####.exr (+ .png) as it finishes.",
    )
    submit_parser.add_argument("scene", type=Path, help="the .blend file")
    _add_job_options(submit_parser)
    submit_parser.add_argument(
        "--max-price",
        type=_non_negative,
        default=0.0,
        metavar="CREDITS",
        help="the most credits per work unit (megapixel x sample) a node may charge "
        "(default 0: free nodes only); the estimate is escrowed from your wallet",
    )
    submit_parser.add_argument(
        "--max-credits",
        type=_non_negative,
        default=None,
        metavar="CREDITS",
        help="refuse the job if its estimated cost is higher",
    )
    submit_parser.add_argument(
        "--estimate",
        action="store_true",
        help="inspect and measure the scene, print what the job would cost (as the farm "
        "would escrow it) and your balance, and exit without packing or submitting; "
        "exit 1 if the farm would refuse it",
    )
    submit_parser.add_argument(
        "--wait",
        action="store_true",
        help="follow the job, download frames as they finish, exit 1 if it fails",
    )
    submit_parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="with --wait: where frames go, in DIR/<scene>/ (default: the current folder)",
    )
    add_json_option(submit_parser)
    add_blender_option(submit_parser)
    _add_connection_options(submit_parser)
    submit_parser.set_defaults(handler=cmd_submit)


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    """The options that shape a job: shared by `submit` and `render`."""
    parser.add_argument(
        "--frames",
        type=_frames,
        default=None,
        metavar="A-B",
        help="frames to render: N, A-B or A-BxSTEP (default: the scene's range)",
    )
    parser.add_argument(
        "--tiles",
        type=_grid,
        default=(1, 1),
        metavar="CxR",
        help="split each frame into C columns x R rows of tiles (default 1x1)",
    )
    parser.add_argument(
        "--samples", type=positive_int, default=None, help="override the scene's samples"
    )
    parser.add_argument(
        "--percentage",
        type=positive_int,
        default=None,
        help="override the scene's resolution percentage",
    )
    parser.add_argument("--priority", type=_priority, default=50, help="0 to 100 (default 50)")
    parser.add_argument(
        "--device",
        type=str.upper,
        choices=DEVICES,
        default="ANY",
        help="the device class nodes must render with (default ANY)",
    )
    parser.add_argument(
        "--no-denoise",
        action="store_true",
        help="skip denoising even if the scene asks for it",
    )
    parser.add_argument("--name", default=None, help="job name (default: the file name)")


def _add_render(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    _add_job_options(render)
    render.add_argument(
        "--out",
        type=Path,
        default=Path("out"),
        metavar="DIR",
        help="where frames go, in DIR/<scene>/ (default: ./out)",
    )
    add_json_option(render)
    add_blender_option(render)
    render.set_defaults(handler=cmd_render, wait=True, coordinator=None, token=None)


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


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("farm connection")
    group.add_argument(
        "--coordinator",
        default=None,
        metavar="URL",
        help=f"the coordinator (default: ${COORDINATOR_ENV}, else {DEFAULT_COORDINATOR})",
    )
    group.add_argument(
        "--token",
        default=None,
        metavar="T",
        help=f"your access token (default: ${TOKEN_ENV}, else the file $TESSERA_HOME/token)",
    )


def _frames(text: str) -> str:
    try:
        FrameRange.parse(text)
    except ValidationError as exc:
        from app.submission import describe_validation_error

        raise argparse.ArgumentTypeError(describe_validation_error(exc)) from exc
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _grid(text: str) -> tuple[int, int]:
    try:
        return parse_grid(text)
    except TesseraError as error:  # argparse only turns ArgumentTypeError into a usage message
        hint = f" ({error.hint})" if error.hint else ""
        raise argparse.ArgumentTypeError(f"{error.message}{hint}") from error


def _credits(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of credits") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"the amount must be a positive number, not {text}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of credits") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"the amount must be 0 or more, not {text}")
    return value


def _priority(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"priority {value} is not between 0 and 100")
    return value


# --- connection ------------------------------------------------------------------------------


def coordinator_url(args: argparse.Namespace) -> str:
    """--coordinator, else $TESSERA_COORDINATOR, else the local default."""
    url = str(args.coordinator or os.environ.get(COORDINATOR_ENV) or DEFAULT_COORDINATOR)
    if not url.startswith(("http://", "https://")):
        raise UsageError(
            f"{url!r} is not a coordinator URL.",
            hint=f"Write it with its scheme, e.g. {DEFAULT_COORDINATOR}.",
        )
    return url.rstrip("/")


def access_token(args: argparse.Namespace, settings: Settings, url: str) -> str:
    """--token, else $TESSERA_TOKEN, else the file $TESSERA_HOME/token."""
    if args.token:
        return str(args.token)
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    path = settings.home / TOKEN_FILE
    try:
        token = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
    except OSError as exc:
        raise UsageError(f"Cannot read the token file {path}: {exc.strerror or exc}.") from exc
    if not token:
        raise UsageError(
            f"No access token for the coordinator at {url}.",
            hint=f"Pass --token TOKEN or set {TOKEN_ENV}=TOKEN (or write it to {path}); "
            "the farm's admin creates tokens.",
        )
    return token


def _client(args: argparse.Namespace, settings: Settings) -> TesseraClient:
    url = coordinator_url(args)
    return TesseraClient(url, access_token(args, settings, url), retries=CLI_RETRIES)


def _render_build(args: argparse.Namespace, settings: Settings) -> BlenderBuild:

    return choose_build(args.blender, settings)


# --- render (a farm of its own) -----------------------------------------------------------


def cmd_render(args: argparse.Namespace, settings: Settings) -> int:
    """Submit to a coordinator and nodes started on this machine for this one job."""
    from app.local_farm import LocalFarm
    from app.submission import follow_job
    from farm_node.cheats import cheat_modes

    started = time.monotonic()
    status = _Status(sys.stderr, enabled=not args.json)
    cheats = [mode.value for mode in cheat_modes(getattr(args, "cheaters", 0))]
    if cheats and args.nodes + len(cheats) < 3:
        status.warn(
            f"{args.nodes + len(cheats)} providers in all: a disagreement between two of "
            "them has no third provider to settle it (raise --nodes)"
        )
    with tempfile.TemporaryDirectory(prefix="tessera-farm-") as folder:
        cheating = f" and {len(cheats)} cheating node(s)" if cheats else ""
        status.line(f"Starting a local farm: a coordinator and {args.nodes} node(s){cheating}...")
        # The local farm prices its nodes so the run shows who earned what; the job
        # offers at least that price, from credits granted to the local requester.
        args.max_price = max(getattr(args, "max_price", 0.0) or 0.0, LOCAL_PRICE)
        with LocalFarm(
            Path(folder),
            nodes=args.nodes,
            threads_per_node=args.threads_per_node,
            cheats=cheats,
            price=LOCAL_PRICE,
            credits=LOCAL_CREDITS,
        ) as farm:
            args.coordinator, args.token = farm.url, farm.requester_token
            with TesseraClient(farm.url, farm.requester_token, retries=CLI_RETRIES) as client:
                prepared, job = _prepare_and_submit(args, settings, client, status)
                progress = _JobProgress(status)
                result = follow_job(
                    client, job.id, args.out, on_frame=progress.frame, on_job=progress.update
                )
                progress.finish()
                tasks = client.tasks(job.id)
                nodes = client.nodes()
            ledger_ok, ledger_problems = _ledger_check(farm.url, farm.admin_token, status)
            local_nodes = list(farm.local_nodes)
    summary: dict[str, Any] = {
        "job": result.job.id,
        "status": result.job.status.value,
        "scene": str(args.scene),
        "folder": str(result.folder),
        "frames_written": [f.frame for f in result.frames],
        "files": [str(p) for f in result.frames for p in f.files],
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
        "warnings": list(prepared.warnings),
    }
    if args.json:
        _print_json(summary)
    completed = result.job.status is JobStatus.COMPLETED
    if completed:
        status.line(
            f"Rendered {len(result.frames)} frame(s) of {args.scene.name} on "
            f"{args.nodes + len(cheats)} node(s) in {summary['wall_seconds']:.1f} s: "
            f"{result.folder}"
        )
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
            f"{p['earned']:g}",
            f"{p['reputation']:.2f}",
            "SUSPENDED: " + _clip(p["suspended"], MESSAGE_WIDTH) if p["suspended"] else "-",
        )
        for p in providers
    ]
    headers = ("  PROVIDER", "CHEAT", "ACCEPTED", "REJECTED", "EARNED", "REPUTATION", "SUSPENDED")
    lines = _table(headers, rows).splitlines()
    if ledger_ok is None:
        lines.append("  Ledger: not checked (" + "; ".join(problems) + ")")
    elif ledger_ok:
        lines.append("  Ledger: checks out (every invariant holds)")
    else:
        lines.append(f"  Ledger: {len(problems)} problem(s)")
        lines += [f"    - {problem}" for problem in problems]
    return lines


def _ledger_check(url: str, admin_token: str, status: _Status) -> tuple[bool | None, list[str]]:
    """(ok, problems) of the farm's ledger check; (None, [why]) when it could not run."""
    try:
        with TesseraClient(url, admin_token, retries=CLI_RETRIES) as admin:
            check = admin.ledger_check()
    except TesseraError as exc:
        status.warn(f"could not check the credit ledger: {exc.message}")
        return None, [exc.message]
    return check.ok, list(check.problems)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    _add_job_options(demo)
    demo.set_defaults(frames="1-4", tiles=(2, 2), percentage=50, samples=32)
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("out"),
        metavar="DIR",
        help="where frames go, in DIR/demo/ (default: ./out)",
    )
    add_json_option(demo)
    demo.set_defaults(handler=cmd_demo, wait=True, coordinator=None, token=None, blender=None)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from renderers.demo_scene import ensure_demo_scene

    args.scene = ensure_demo_scene(_render_build(args, settings))
    return cmd_render(args, settings)


# --- submit --------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here: packing pulls in BAT and Blender helpers the other commands never need.
    from app.submission import follow_job

    if args.out is not None and not args.wait:
        raise UsageError("--out says where --wait puts frames; add --wait, or drop --out.")
    if getattr(args, "estimate", False) and args.wait:
        raise UsageError("--estimate submits nothing, so there is nothing to --wait for.")
    status = _Status(sys.stderr, enabled=not args.json)
    with _client(args, settings) as client:
        me = client.me()  # an unreachable farm or a bad token fails before any work
        if me.role is Role.PROVIDER:
            raise UsageError(
                f"The token of '{me.account}' is a provider token; submitting needs a "
                "requester token.",
                hint="Ask the farm's admin for a requester account.",
            )
        if getattr(args, "estimate", False):
            return _print_estimate(args, settings, client, status)
        prepared, job = _prepare_and_submit(args, settings, client, status)
        summary: dict[str, Any] = {
            "job": job.model_dump(mode="json"),
            "bundle": {
                "sha256": prepared.bundle.sha256,
                "size": prepared.bundle.size,
                "scene_path": prepared.bundle.scene_path,
                "files": list(prepared.bundle.files),
            },
            "missing": [str(path) for path in prepared.missing],
            "warnings": list(prepared.warnings),
        }
        if args.json and not args.wait:
            _print_json(summary)
        elif not args.json:
            print(job.id, flush=True)
        if not args.wait:
            return 0
        progress = _JobProgress(status)
        try:
            result = follow_job(
                client,
                job.id,
                args.out if args.out is not None else Path(),
                on_frame=progress.frame,
                on_job=progress.update,
            )
        except KeyboardInterrupt:
            progress.finish()
            print(
                f"Stopped following job {job.id}; it goes on rendering on the farm "
                f"(`tessera job {job.id}` shows it, `tessera cancel {job.id}` stops it).",
                file=sys.stderr,
            )
            raise
        progress.finish()
    return _report_followed(args, result, summary, status)


def _job_options(args: argparse.Namespace) -> dict[str, Any]:
    """`tessera submit`'s job options, as `describe_job`/`prepare_submission` take them."""
    return {
        "frames": args.frames,
        "tiles": args.tiles,
        "samples": args.samples,
        "percentage": args.percentage,
        "priority": args.priority,
        "denoise": False if args.no_denoise else None,
        "device": args.device,
        "name": args.name,
        "max_price": getattr(args, "max_price", 0.0),
        "max_credits": getattr(args, "max_credits", None),
    }


def _print_estimate(
    args: argparse.Namespace, settings: Settings, client: TesseraClient, status: _Status
) -> int:
    """`tessera submit --estimate`: inspect and probe the scene (no packing), then ask
    the farm what the job would cost; 1 when the farm would refuse it."""
    from app.submission import describe_job
    from renderers.worker import RenderWorker

    status.line(f"Measuring {args.scene.name} in Blender...")
    with RenderWorker(_render_build(args, settings)) as worker:
        described = describe_job(worker, args.scene, **_job_options(args))
    estimate = client.estimate_job(described.spec)
    if args.json:
        _print_json(
            {
                **estimate.model_dump(mode="json"),
                "accepted": estimate.accepted,
                "scene_cost": described.spec.scene_cost,
            }
        )
    else:
        print(format_estimate(estimate.credits, estimate.balance, estimate.max_credits))
    if estimate.accepted:
        return 0
    print(f"error: the farm would refuse this job: {estimate.refusal}", file=sys.stderr)
    if estimate.refusal_hint:
        print(f"  hint: {estimate.refusal_hint}", file=sys.stderr)
    return 1


def format_estimate(cost: float, balance: float, max_credits: float | None = None) -> str:
    """'Estimated cost: up to 12.5 credits (your balance: 100 credits)'."""
    text = f"Estimated cost: up to {cost:g} credits (your balance: {balance:g} credits"
    if max_credits is not None:
        text += f"; --max-credits {max_credits:g}"
    return text + ")"


def _prepare_and_submit(
    args: argparse.Namespace, settings: Settings, client: TesseraClient, status: _Status
) -> tuple[Prepared, Job]:
    """Inspect, pack (in a folder of this run's own), upload and submit."""
    from app.submission import bundle_folder, prepare_submission, submit
    from renderers.worker import RenderWorker

    with bundle_folder(settings.home / "bundles") as bundle_dir:
        with RenderWorker(_render_build(args, settings)) as worker:
            prepared = prepare_submission(
                worker,
                args.scene,
                bundle_dir=Path(bundle_dir),
                on_pack=status.pack,
                **_job_options(args),
            )
        for warning in prepared.warnings:
            status.warn(warning)
        status.packed(prepared)
        job = submit(client, prepared, on_upload=status.upload)
    status.uploaded(prepared)
    status.line(
        f"Submitted job {job.id} ({job.name}): {job.progress.frames_total} frame(s), "
        f"{job.progress.tasks_total} task(s)"
    )
    return prepared, job


def _report_followed(
    args: argparse.Namespace, result: FollowResult, summary: dict[str, Any], status: _Status
) -> int:
    job = result.job
    if args.json:
        summary["job"] = job.model_dump(mode="json")
        summary["folder"] = str(result.folder)
        summary["frames_written"] = [
            {"frame": f.frame, "files": [str(p) for p in f.files]} for f in result.frames
        ]
        _print_json(summary)
    if job.status is JobStatus.COMPLETED:
        status.line(
            f"Job {job.id} completed: {len(result.frames)} frame(s) written to {result.folder}"
        )
        return 0
    reason = f": {job.message}" if job.message else ""
    print(f"error: job {job.id} {job.status.value}{reason}", file=sys.stderr)
    if result.frames:
        print(f"  {len(result.frames)} finished frame(s) are in {result.folder}", file=sys.stderr)
    return 1


class _Status:
    """Progress and warnings on stderr: one rewritten line on a terminal, plain lines
    (fewer of them) otherwise; silent with --json."""

    def __init__(self, stream: TextIO, *, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.interactive = enabled and stream.isatty()
        self._transient = False
        self._uploaded = False
        self._last_plain = 0.0

    def line(self, text: str) -> None:
        if self.enabled:
            self.end_line()
            print(text, file=self.stream, flush=True)

    def warn(self, text: str) -> None:
        self.end_line()
        print(f"warning: {text}", file=self.stream, flush=True)

    def transient(self, text: str, *, force: bool = False) -> None:
        """A progress line: rewritten in place on a terminal, else printed now and then."""
        if not self.enabled:
            return
        if self.interactive:
            print(f"\r{text}\x1b[K", end="", file=self.stream, flush=True)
            self._transient = True
        elif force or time.monotonic() - self._last_plain >= 5.0:
            self._last_plain = time.monotonic()
            print(text, file=self.stream, flush=True)

    def end_line(self) -> None:
        """Finish a progress line so the next output starts on a fresh line."""
        if self._transient:
            print(file=self.stream, flush=True)
            self._transient = False

    def pack(self, progress: PackProgress) -> None:
        if self.interactive and progress.stage == "trace":
            self.transient(f"packing: {progress.done} dependencies found")
        elif self.interactive and progress.stage == "zip" and progress.total:
            self.transient(f"packing: {100 * progress.done // progress.total}% zipped")

    def packed(self, prepared: Prepared) -> None:
        bundle = prepared.bundle
        self.line(
            f"Packed {len(bundle.files)} file(s) into bundle {bundle.sha256[:12]} "
            f"({_size(bundle.size)}), scene {bundle.scene_path}"
        )

    def upload(self, sent: int, total: int) -> None:
        self._uploaded = True
        percent = 100 * sent // total if total else 100
        self.transient(f"uploading: {percent}% of {_size(total)}", force=sent == total)

    def uploaded(self, prepared: Prepared) -> None:
        if not self._uploaded:
            self.line("The farm already has this bundle; upload skipped")


class _JobProgress:
    """Tiles done/total, frames done and an ETA from the rate since following began."""

    def __init__(self, status: _Status) -> None:
        self.status = status
        self.started = time.monotonic()
        self.baseline: int | None = None
        self.last: tuple[int, int, str] | None = None

    def update(self, job: Job) -> None:
        progress = job.progress
        if self.baseline is None:
            self.baseline = progress.tasks_done
        state = (progress.tasks_done, progress.frames_done, job.status.value)
        if state == self.last:
            return
        changed_frames = self.last is None or self.last[1] != progress.frames_done
        self.last = state
        eta = self._eta(progress.tasks_done, progress.tasks_total)
        text = (
            f"job {job.id} {job.status.value}: tiles {progress.tasks_done}/"
            f"{progress.tasks_total}, frames {progress.frames_done}/{progress.frames_total}"
            f", ETA {eta}"
        )
        if job.message and job.status not in FINISHED_JOB_STATES:
            text += f" ({_clip(job.message, MESSAGE_WIDTH)})"
        self.status.transient(text, force=changed_frames or job.status in FINISHED_JOB_STATES)

    def _eta(self, done: int, total: int) -> str:
        finished = done - (self.baseline or 0)
        elapsed = time.monotonic() - self.started
        if done >= total:
            return "0:00"
        if finished <= 0 or elapsed <= 0:
            return "--"
        return _duration((total - done) * elapsed / finished)

    def frame(self, files: FrameFiles) -> None:
        names = ", ".join(str(path) for path in files.files)
        self.status.line(f"frame {files.frame}: {names}")

    def finish(self) -> None:
        self.status.end_line()


# --- jobs, job, control ---------------------------------------------------------------------


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    with _client(args, settings) as client:
        jobs = client.jobs()
    if args.json:
        _print_json([job.model_dump(mode="json") for job in jobs])
        return 0
    if not jobs:
        print("No jobs yet (`tessera submit SCENE` starts one).")
        return 0
    rows = [
        (
            job.id,
            job.name,
            job.status.value,
            f"{_percent(job.progress.tasks_done, job.progress.tasks_total)}%",
            f"{job.progress.frames_done}/{job.progress.frames_total}",
            str(job.priority),
            _clip(job.message, MESSAGE_WIDTH),
        )
        for job in jobs
    ]
    print(_table(("ID", "NAME", "STATUS", "PROGRESS", "FRAMES", "PRIORITY", "MESSAGE"), rows))
    return 0


def cmd_job(args: argparse.Namespace, settings: Settings) -> int:
    with _client(args, settings) as client:
        job = client.job(args.job_id)
        tasks = client.tasks(args.job_id)
    frames = frame_states(job, tasks)
    counts = {
        status.value: n for status in TaskStatus if (n := sum(t.status is status for t in tasks))
    }
    failures = [
        {
            "task": task.id,
            "frame": task.frame,
            "tile": task.tile_index,
            "status": task.status.value,
            "attempts": task.attempts,
            "message": task.message,
        }
        for task in tasks
        if task.message
    ]
    if args.json:
        _print_json(
            {
                "job": job.model_dump(mode="json"),
                "frames": frames,
                "tasks_by_status": counts,
                "failures": failures,
            }
        )
        return 0
    print(format_job(job, frames, counts, failures))
    return 0


def frame_states(job: Job, tasks: Iterable[Task]) -> list[dict[str, Any]]:
    """Each frame of the job with a status word and its tiles done/total."""
    by_frame: dict[int, list[Task]] = {}
    for task in tasks:
        by_frame.setdefault(task.frame, []).append(task)
    done = set(job.frames_done)
    states = []
    for frame in job.spec.frames.frames():
        frame_tasks = by_frame.get(frame, [])
        tiles = [t for t in frame_tasks if t.kind is TaskKind.RENDER]
        tiles_done = sum(1 for t in tiles if t.status is TaskStatus.COMPLETED)
        status = _frame_status(frame in done, frame_tasks, tiles_done, len(tiles))
        if status == "queued" and job.status is JobStatus.PAUSED:
            status = "paused"
        states.append(
            {
                "frame": frame,
                "status": status,
                "tiles_done": tiles_done,
                "tiles": len(tiles),
            }
        )
    return states


def _frame_status(done: bool, tasks: list[Task], tiles_done: int, tiles: int) -> str:
    statuses = {task.status for task in tasks}
    denoise = [t for t in tasks if t.kind is TaskKind.DENOISE]
    if done:
        return "done"
    if TaskStatus.FAILED in statuses:
        return "failed"
    if statuses and statuses <= {TaskStatus.CANCELED, TaskStatus.COMPLETED}:
        return "canceled" if TaskStatus.CANCELED in statuses else "merging"
    if denoise:
        return "denoising"
    if tiles and tiles_done == tiles:
        return "merging"
    if TaskStatus.ACTIVE in statuses or tiles_done:
        return "rendering"
    if TaskStatus.PAUSED in statuses:
        return "paused"
    return "queued"


def format_job(
    job: Job,
    frames: list[dict[str, Any]],
    counts: dict[str, int],
    failures: list[dict[str, Any]],
) -> str:
    spec = job.spec
    frame_range = f"{spec.frames.start}-{spec.frames.end}" + (
        f"x{spec.frames.step}" if spec.frames.step != 1 else ""
    )
    width, height = spec.effective_size()
    settings = [
        f"frames {frame_range}",
        f"{width}x{height}",
        f"tiles {spec.tiles.columns}x{spec.tiles.rows}",
        f"samples {spec.samples or spec.scene.samples}",
        f"denoise {'on' if spec.wants_denoise else 'off'}",
        f"device {spec.device}",
    ]
    progress = job.progress
    lines = [
        ("Job", f"{job.id} '{job.name}' (owner {job.owner})"),
        ("Status", job.status.value + (f": {job.message}" if job.message else "")),
        ("Scene", f"{spec.scene_path} (scene '{spec.scene.name}', camera {spec.scene.camera})"),
        ("Settings", ", ".join(settings)),
        ("Priority", str(job.priority)),
        (
            "Progress",
            f"tiles {progress.tasks_done}/{progress.tasks_total} "
            f"({_percent(progress.tasks_done, progress.tasks_total)}%), "
            f"frames {progress.frames_done}/{progress.frames_total}",
        ),
        ("Created", job.created_at.isoformat(timespec="seconds")),
        ("Updated", job.updated_at.isoformat(timespec="seconds")),
        ("Tasks", ", ".join(f"{status} {n}" for status, n in counts.items()) or "none"),
    ]
    text = "\n".join(f"{label:<9} {value}" for label, value in lines)
    text += "\nFrames:\n" + "\n".join(f"  {line}" for line in _frame_lines(frames))
    if failures:
        text += "\nFailures:\n" + "\n".join(
            f"  frame {f['frame']} tile {f['tile']} ({f['status']}, {f['attempts']} "
            f"attempt(s)): {f['message']}"
            for f in failures
        )
    return text


def _frame_lines(frames: list[dict[str, Any]]) -> list[str]:
    """Consecutive frames in the same state on one line: '1-20  done'."""
    lines: list[str] = []
    run: list[dict[str, Any]] = []

    def flush() -> None:
        if not run:
            return
        first, last = run[0]["frame"], run[-1]["frame"]
        label = str(first) if first == last else f"{first}-{last}"
        state = run[0]["status"]
        if state == "rendering" and len(run) == 1:
            state += f" ({run[0]['tiles_done']}/{run[0]['tiles']} tiles)"
        lines.append(f"{label:<12} {state}")

    for frame in frames:
        if run and (frame["status"] != run[-1]["status"] or frame["status"] == "rendering"):
            flush()
            run = []
        run.append(frame)
    flush()
    return lines


def cmd_control(args: argparse.Namespace, settings: Settings) -> int:
    with _client(args, settings) as client:
        before = client.job(args.job_id) if args.action == "cancel" else None
        if args.action == "pause":
            job = client.pause(args.job_id)
        elif args.action == "resume":
            job = client.resume(args.job_id)
        else:
            job = client.cancel(args.job_id)
    if args.json:
        _print_json(job.model_dump(mode="json"))
    elif before is not None and before.status in FINISHED_JOB_STATES:
        print(f"Job {job.id} was already {job.status.value}; nothing to cancel.")
    else:
        print(f"Job {job.id} is {job.status.value}" + (f": {job.message}" if job.message else ""))
    return 0


def cmd_priority(args: argparse.Namespace, settings: Settings) -> int:
    with _client(args, settings) as client:
        job = client.set_priority(args.job_id, args.priority)
    if args.json:
        _print_json(job.model_dump(mode="json"))
    else:
        print(f"Job {job.id} now has priority {job.priority}.")
    return 0


# --- nodes --------------------------------------------------------------------------------


def cmd_nodes(args: argparse.Namespace, settings: Settings) -> int:
    if args.lan:
        return _lan_listing(args)
    with _client(args, settings) as client:
        nodes = client.nodes()
    if args.json:
        _print_json([node.model_dump(mode="json") for node in nodes])
        return 0
    if not nodes:
        print("No nodes have joined this farm yet.")
        return 0
    rows = [_node_row(node) for node in nodes]
    print(_table(NODE_COLUMNS, rows))
    for node in nodes:
        if node.suspended:
            print(f"SUSPENDED {node.capabilities.name} ({node.owner}): {node.suspended}")
        elif node.paused and node.status == "paused":
            print(f"{node.capabilities.name} is {node.paused}")
    return 0


# --- credits ------------------------------------------------------------------------------


def cmd_wallet(args: argparse.Namespace, settings: Settings) -> int:
    with _client(args, settings) as client:
        wallet = client.wallet()
    if args.json:
        _print_json(wallet.model_dump(mode="json"))
        return 0
    print(f"Account {wallet.account}: {wallet.balance:g} credits")
    print(f"In escrow for unfinished jobs: {wallet.escrow:g} credits")
    if not wallet.history:
        print("No ledger entries yet.")
        return 0
    rows = [
        (
            entry.at.strftime("%Y-%m-%d %H:%M:%S"),
            entry.kind,
            f"{entry.amount:+g}",
            entry.job_id or "-",
            _clip(entry.memo, MESSAGE_WIDTH),
        )
        for entry in wallet.history
    ]
    print(_table(("WHEN", "KIND", "CREDITS", "JOB", "MEMO"), rows))
    return 0


def cmd_grant(args: argparse.Namespace, settings: Settings) -> int:
    with _client(args, settings) as client:
        wallet = client.grant(args.account, args.amount)
    if args.json:
        _print_json(wallet.model_dump(mode="json"))
    else:
        print(f"Granted {args.amount:g} credits to {wallet.account}; balance {wallet.balance:g}.")
    return 0


def cmd_ledger(args: argparse.Namespace, settings: Settings) -> int:
    with _client(args, settings) as client:
        result = client.ledger_check()
    if args.json:
        _print_json(result.model_dump(mode="json"))
    elif result.ok:
        print("The ledger checks out: every invariant holds.")
    else:
        print(f"The ledger check found {len(result.problems)} problem(s):")
        for problem in result.problems:
            print(f"  - {problem}")
    return 0 if result.ok else 1


def cmd_provider(args: argparse.Namespace, settings: Settings) -> int:
    with _client(args, settings) as client:
        client.reinstate(args.account)
    print(f"Provider '{args.account}' is reinstated: its nodes may lease work again.")
    return 0


def _lan_listing(args: argparse.Namespace) -> int:
    from protocol.discovery import browse

    seen = browse(interface=args.interface, seconds=args.seconds)
    if args.json:
        _print_json(
            [
                {
                    "kind": s.kind,
                    "name": s.name,
                    "addresses": list(s.addresses),
                    "port": s.port,
                    "properties": s.properties,
                }
                for s in seen
            ]
        )
        return 0
    if not seen:
        print(f"Nothing Tessera answered on the LAN within {args.seconds:g} s.")
        return 0
    rows = [
        (
            s.kind,
            s.name,
            s.url if s.kind == "coordinator" else ", ".join(s.addresses),
            ", ".join(f"{k}={v}" for k, v in sorted(s.properties.items()) if k != "fp"),
        )
        for s in seen
    ]
    print(_table(("KIND", "NAME", "WHERE", "DETAILS"), rows))
    return 0


NODE_COLUMNS = (
    "NAME",
    "STATUS",
    "DEVICES",
    "BLENDER",
    "TASK",
    "DONE",
    "FAILED",
    "REJECTED",
    "PRICE",
    "REPUTATION",
    "EARNED",
)


def _node_row(node: NodeInfo) -> tuple[str, ...]:
    """A row of `tessera nodes`; a suspended provider's STATUS reads SUSPENDED."""
    caps = node.capabilities
    devices = ", ".join(caps.devices)
    if caps.gpus:
        devices += " (" + ", ".join(gpu.name for gpu in caps.gpus) + ")"
    return (
        caps.name,
        "SUSPENDED" if node.suspended else node.status,
        devices,
        ", ".join(caps.blender_versions) or "-",
        node.current_task or "-",
        str(node.tasks_completed),
        str(node.tasks_failed),
        str(node.rejected),
        f"{caps.price:g}",
        f"{node.reputation:.2f}",
        f"{node.earned:g}",
    )


# --- formatting ---------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    table = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    )


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _percent(done: int, total: int) -> int:
    return 100 * done // total if total else 0


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2), flush=True)


# --- running the farm commands alone ----------------------------------------------------

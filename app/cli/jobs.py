"""`tessera submit`, `jobs`, `job`, `pause`, `resume`, `cancel` and `priority`: a requester's
jobs on a farm.

Each handler takes `(args, settings)` and returns the exit status: 0 on success, 1 when
a followed job fails or is canceled (a `TesseraError` becomes `error: ...` with status 2
in `app.cli.main`). The coordinator and token come from `app.connection` (--coordinator
and --token, else TESSERA_COORDINATOR and TESSERA_TOKEN, else http://127.0.0.1:8400 and
$TESSERA_HOME/token), read when a command runs, never at import.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.blender_choice import choose_build
from app.cli.options import (
    AUTO,
    Subparsers,
    add_blender_option,
    add_connection_options,
    add_job_options,
    add_json_option,
    connect,
    job_options_of,
    non_negative,
    print_json,
)
from app.cli.options import priority as priority_value
from app.cli.output import MESSAGE_WIDTH, JobProgress, Status, clip, percent, table
from app.cost_text import cost_json, cost_lines
from common.errors import UsageError
from common.settings import Settings
from protocol.client import TesseraClient
from protocol.models import (
    FINISHED_JOB_STATES,
    Job,
    JobOptions,
    JobSpec,
    JobStatus,
    Role,
    Task,
    TaskKind,
    TaskStatus,
)
from protocol.requirements import format_mib

if TYPE_CHECKING:
    from app.follow import FollowResult
    from app.probe_memo import BenchmarkMemo
    from app.submit import Prepared
    from renderers.scene_probe import SceneProbe
    from renderers.worker import RenderWorker


def add_submit(sub: Subparsers) -> None:
    submit_parser = sub.add_parser(
        "submit",
        help="pack a scene and render it on the farm",
        description="Inspect a .blend (a scene that cannot render stops here), pack it with "
        "its textures and libraries, upload it (skipped if the farm already has it) and "
        "submit a job; prints the job id. With --wait, follow the job and download each "
        "frame to DIR/<scene>/frame_####.exr (+ .png) as it finishes.",
    )
    submit_parser.add_argument("scene", type=Path, help="the .blend file")
    add_job_options(submit_parser)
    submit_parser.add_argument(
        "--any-blender",
        action="store_true",
        help="let nodes of any Blender version render it (default: only nodes with a build "
        "of the major.minor version that saved the scene, e.g. 5.0.x)",
    )
    submit_parser.add_argument(
        "--max-price",
        type=non_negative,
        default=0.0,
        metavar="CREDITS",
        help="the most credits per work unit (megapixel x sample) a node may charge "
        "(default 0: free nodes only); the estimate is escrowed from your wallet",
    )
    submit_parser.add_argument(
        "--max-credits",
        type=non_negative,
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
    add_connection_options(submit_parser)
    submit_parser.set_defaults(handler=cmd_submit)


def add_commands(sub: Subparsers) -> None:
    jobs = sub.add_parser(
        "jobs",
        help="list your jobs on the farm",
        description="List your jobs: id, name, status, progress, frames, priority, message.",
    )
    add_json_option(jobs)
    add_connection_options(jobs)
    jobs.set_defaults(handler=cmd_jobs)

    job = sub.add_parser(
        "job",
        help="show one job: frames, tasks and failures",
        description="Show a job's settings and progress, the status of every frame, how "
        "many tasks are in each state, and why tasks failed.",
    )
    job.add_argument("job_id", metavar="ID", help="the job's id (see `tessera jobs`)")
    add_json_option(job)
    add_connection_options(job)
    job.set_defaults(handler=cmd_job)

    for name, verb, text in (
        ("pause", "pause", "stop starting new tiles of a job (running tiles finish)"),
        ("resume", "resume", "let a paused job run again"),
        ("cancel", "cancel", "cancel a job for good (finished frames stay downloadable)"),
    ):
        control = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        control.add_argument("job_id", metavar="ID", help=f"the job to {verb}")
        add_json_option(control)
        add_connection_options(control)
        control.set_defaults(handler=cmd_control, action=name)

    priority = sub.add_parser(
        "priority",
        help="change a job's priority",
        description="Set a job's priority from 0 to 100 (default 50); among your jobs, "
        "higher ones get nodes first.",
    )
    priority.add_argument("job_id", metavar="ID", help="the job to change")
    priority.add_argument("priority", metavar="P", type=priority_value, help="0 to 100")
    add_json_option(priority)
    add_connection_options(priority)
    priority.set_defaults(handler=cmd_priority)

    download = sub.add_parser(
        "download",
        help="fetch a job's finished frames",
        description="Download every finished frame of a job into DIR/<scene>/, skipping "
        "files already there with the coordinator's SHA-256 (run it again to resume).",
    )
    download.add_argument("job_id", metavar="JOB", help="the job (see `tessera jobs`)")
    download.add_argument(
        "--out", type=Path, default=None, help="folder for <scene>/ (default: the current one)"
    )
    add_json_option(download)
    add_connection_options(download)
    download.set_defaults(handler=cmd_download)


# --- submit --------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here: packing pulls in BAT and Blender helpers the other commands never need.
    from app.follow import follow_job

    if args.out is not None and not args.wait:
        raise UsageError("--out says where --wait puts frames; add --wait, or drop --out.")
    if getattr(args, "estimate", False) and args.wait:
        raise UsageError("--estimate submits nothing, so there is nothing to --wait for.")
    status = Status(sys.stderr, enabled=not args.json)
    with connect(args, settings) as client:
        me = client.me()  # an unreachable farm or a bad token fails before any work
        if me.role is Role.PROVIDER:
            raise UsageError(
                f"The token of '{me.account}' is a provider token; submitting needs a "
                "requester token.",
                hint="Ask the farm's admin for a requester account.",
            )
        options = job_options_of(args)
        if getattr(args, "estimate", False):
            return _print_estimate(args, settings, client, status, options)
        prepared, job = prepare_and_submit(args, settings, client, status, options)
        summary: dict[str, Any] = {
            "job": job.model_dump(mode="json"),
            "cost": cost_json(job.cost),
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
            print_json(summary)
        elif not args.json:
            print(job.id, flush=True)
        if not args.wait:
            return 0
        progress = JobProgress(status)
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


def _print_estimate(
    args: argparse.Namespace,
    settings: Settings,
    client: TesseraClient,
    status: Status,
    options: JobOptions,
) -> int:
    """`tessera submit --estimate`: inspect and probe the scene (no packing), then ask
    the farm what the job would cost; 1 when the farm would refuse it."""
    from app.job_spec import describe_job
    from app.probe_memo import BenchmarkMemo
    from renderers.worker import RenderWorker

    status.line(f"Measuring {args.scene.name} in Blender...")
    with RenderWorker(choose_build(args.blender, settings)) as worker:
        memo = BenchmarkMemo(settings.home, worker.build)
        options, measured = settle_tiles(args, worker, client, status, options, memo)
        described = describe_job(
            worker, args.scene, options, measured=measured, benchmark_memo=memo
        )
    estimate = client.estimate_job(described.spec)
    if args.json:
        print_json(
            {
                **estimate.model_dump(mode="json"),
                "accepted": estimate.accepted,
                "scene_cost": described.spec.scene_cost,
            }
        )
    else:
        print(format_estimate(estimate.credits, estimate.balance, estimate.max_credits))
    if estimate.warning:
        print(f"warning: {estimate.warning}", file=sys.stderr)
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


def prepare_and_submit(
    args: argparse.Namespace,
    settings: Settings,
    client: TesseraClient,
    status: Status,
    options: JobOptions,
) -> tuple[Prepared, Job]:
    """Inspect `args.scene`, pack it (in a folder of this run's own), upload it and submit
    the job of `options` (`submit` and `demo` do it so)."""
    from app.submit import bundle_folder

    with bundle_folder(settings.home / "bundles") as bundle_dir:
        prepared = prepare_job(args, settings, status, options, Path(bundle_dir), client)
        job = submit_prepared(client, prepared, status)
    return prepared, job


def prepare_job(
    args: argparse.Namespace,
    settings: Settings,
    status: Status,
    options: JobOptions,
    bundle_dir: Path,
    client: TesseraClient | None = None,
    *,
    probe: bool = True,
) -> Prepared:
    """Inspect, probe and pack `args.scene` into `bundle_dir` in one Blender worker (the
    tile grid settled first for `--tiles auto`), reporting warnings and the bundle on
    `status`. `probe` False skips the probe (`--tiles auto` still measures the scene)."""
    from app.probe_memo import BenchmarkMemo
    from app.submit import prepare_submission
    from renderers.worker import RenderWorker

    with RenderWorker(choose_build(args.blender, settings)) as worker:
        memo = BenchmarkMemo(settings.home, worker.build)
        options, measured = settle_tiles(args, worker, client, status, options, memo)
        prepared = prepare_submission(
            worker,
            args.scene,
            options,
            bundle_dir=bundle_dir,
            on_pack=status.pack,
            measured=measured,
            benchmark_memo=memo,
            probe=probe or measured is not None,
        )
    for warning in prepared.warnings:
        status.warn(warning)
    status.packed(prepared)
    return prepared


def submit_prepared(client: TesseraClient, prepared: Prepared, status: Status) -> Job:
    """Upload the prepared bundle (unless the farm has it) and submit its job."""
    from app.submit import submit

    job = submit(client, prepared, on_upload=status.upload)
    status.uploaded(prepared)
    status.line(
        f"Submitted job {job.id} ({job.name}): {job.progress.frames_total} frame(s), "
        f"{job.progress.tasks_total} task(s)"
    )
    if job.warning:
        status.warn(f"{job.warning} The job waits in the queue until such a node connects.")
    return job


def settle_tiles(
    args: argparse.Namespace,
    worker: RenderWorker,
    client: TesseraClient | None,
    status: Status,
    options: JobOptions,
    benchmark_memo: BenchmarkMemo | None = None,
) -> tuple[JobOptions, SceneProbe | None]:
    """The options with `--tiles auto` settled (for `--nodes`, else the farm's nodes that
    are not offline, asked of `client`; the scene is probed first, for its fixed cost per
    render), saying what the grid costs whenever it splits frames; and the probe, to
    reuse. `benchmark_memo`: the probe's benchmark figure remembered on this machine."""
    from app.job_spec import describe_job, tile_choice
    from renderers.scene_info import inspect_scene

    if args.tiles != AUTO:
        if tuple(args.tiles) == (1, 1):
            return options, None
        _, choice = tile_choice(inspect_scene(worker, args.scene), options)
        status.line(f"Tiles: {choice.describe()}")
        return options, None
    nodes = getattr(args, "nodes", None)
    if not nodes:
        online = [] if client is None else [n for n in client.nodes() if n.status != "offline"]
        nodes = max(1, len(online))
    described = describe_job(worker, args.scene, options, benchmark_memo=benchmark_memo)
    options, choice = tile_choice(
        described.info, options, auto_nodes=nodes, measured=described.probe
    )
    status.line(f"Tiles (auto, for {nodes} node(s)): {choice.describe()}")
    return options, described.probe


def _report_followed(
    args: argparse.Namespace, result: FollowResult, summary: dict[str, Any], status: Status
) -> int:
    job = result.job
    if args.json:
        summary["job"] = job.model_dump(mode="json")
        summary["cost"] = cost_json(job.cost)
        summary["folder"] = str(result.folder)
        summary["frames_written"] = [
            {"frame": f.frame, "files": [str(p) for p in f.files]} for f in result.frames
        ]
        print_json(summary)
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


# --- jobs, job, control ---------------------------------------------------------------------


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    with connect(args, settings) as client:
        jobs = client.jobs()
    if args.json:
        print_json([job.model_dump(mode="json") for job in jobs])
        return 0
    if not jobs:
        print("No jobs yet (`tessera submit SCENE` starts one).")
        return 0
    rows = [
        (
            job.id,
            job.name,
            job.status.value,
            f"{percent(job.progress.tasks_done, job.progress.tasks_total)}%",
            f"{job.progress.frames_done}/{job.progress.frames_total}",
            str(job.priority),
            clip(job.message, MESSAGE_WIDTH),
        )
        for job in jobs
    ]
    print(table(("ID", "NAME", "STATUS", "PROGRESS", "FRAMES", "PRIORITY", "MESSAGE"), rows))
    return 0


def cmd_job(args: argparse.Namespace, settings: Settings) -> int:
    with connect(args, settings) as client:
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
        print_json(
            {
                "job": job.model_dump(mode="json"),
                "cost": cost_json(job.cost),
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
        f"samples {spec.effective_samples}",
        f"denoise {'on' if spec.wants_denoise else 'off'}",
        f"device {spec.device}",
    ]
    needs = requirement_words(spec)
    progress = job.progress
    lines = [
        ("Job", f"{job.id} '{job.name}' (owner {job.owner})"),
        ("Status", job.status.value + (f": {job.message}" if job.message else "")),
        ("Scene", f"{spec.scene_path} (scene '{spec.scene.name}', camera {spec.scene.camera})"),
        ("Settings", ", ".join(settings)),
        ("Priority", str(job.priority)),
        ("Needs", ", ".join(needs) or "any node"),
        (
            "Progress",
            f"tiles {progress.tasks_done}/{progress.tasks_total} "
            f"({percent(progress.tasks_done, progress.tasks_total)}%), "
            f"frames {progress.frames_done}/{progress.frames_total}",
        ),
        ("Created", job.created_at.isoformat(timespec="seconds")),
        ("Updated", job.updated_at.isoformat(timespec="seconds")),
        ("Tasks", ", ".join(f"{status} {n}" for status, n in counts.items()) or "none"),
    ]
    text = "\n".join(f"{label:<9} {value}" for label, value in lines)
    text += "\nCost:\n" + "\n".join(f"  {line}" for line in cost_lines(job))
    text += "\nFrames:\n" + "\n".join(f"  {line}" for line in _frame_lines(frames))
    if failures:
        text += "\nFailures:\n" + "\n".join(
            f"  frame {f['frame']} tile {f['tile']} ({f['status']}, {f['attempts']} "
            f"attempt(s)): {f['message']}"
            for f in failures
        )
    return text


def requirement_words(spec: JobSpec) -> list[str]:
    """A job's requirements in words: 'pool studio', 'VRAM 3.1 GB', ..."""
    need = spec.requirements
    words = [f"pool {need.pool}"] if need.pool else []
    if need.gpu:
        words.append(f"GPU named like '{need.gpu}'")
    if need.min_vram_mib and spec.device not in ("ANY", "CPU"):
        words.append(f"VRAM {format_mib(need.min_vram_mib)}")
    if need.min_ram_mib:
        words.append(f"RAM {format_mib(need.min_ram_mib)}")
    if need.measured_peak_mib:
        words.append(f"(probe measured a peak of {format_mib(need.measured_peak_mib)})")
    return words


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
    with connect(args, settings) as client:
        before = client.job(args.job_id) if args.action == "cancel" else None
        if args.action == "pause":
            job = client.pause(args.job_id)
        elif args.action == "resume":
            job = client.resume(args.job_id)
        else:
            job = client.cancel(args.job_id)
    if args.json:
        print_json(job.model_dump(mode="json"))
    elif before is not None and before.status in FINISHED_JOB_STATES:
        print(f"Job {job.id} was already {job.status.value}; nothing to cancel.")
    else:
        print(f"Job {job.id} is {job.status.value}" + (f": {job.message}" if job.message else ""))
    return 0


def cmd_priority(args: argparse.Namespace, settings: Settings) -> int:
    with connect(args, settings) as client:
        job = client.set_priority(args.job_id, args.priority)
    if args.json:
        print_json(job.model_dump(mode="json"))
    else:
        print(f"Job {job.id} now has priority {job.priority}.")
    return 0


def cmd_download(args: argparse.Namespace, settings: Settings) -> int:
    from app.follow import download_job

    def report(path: Path, fetched: bool) -> None:
        if not args.json:
            print(f"{'downloaded' if fetched else 'up to date'}  {path}", flush=True)

    out = args.out if args.out is not None else Path()
    with connect(args, settings) as client:
        summary = download_job(client, args.job_id, out, report)
    if args.json:
        print_json(
            {
                "job": summary.job.id,
                "status": summary.job.status.value,
                "folder": str(summary.folder),
                "downloaded": [str(p) for p in summary.downloaded],
                "present": [str(p) for p in summary.present],
                "unfinished": list(summary.unfinished),
            }
        )
        return 0
    print(
        f"{len(summary.downloaded)} file(s) downloaded, {len(summary.present)} already there,"
        f" in {summary.folder}"
    )
    if summary.unfinished:
        print(
            f"{len(summary.unfinished)} frame(s) not finished yet (job {summary.job.status.value});"
            " run `tessera download` again later."
        )
    return 0

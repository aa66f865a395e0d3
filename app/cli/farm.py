"""`tessera coordinator`, `node`, `join` and `app`: running a farm's parts on this machine
(the HTTP API, a provider node, a LAN join) and opening the desktop app.

Each handler takes `(args, settings)` and returns the exit status. The node's URL and
token are resolved by `app.connection`, as every other command's. No Qt here: the app's
module is imported only when `tessera app` runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from app.blender_choice import BPY_CACHE
from app.cli.coordinator_db import add_database_options, cmd_migrate
from app.cli.node_limits import (
    add_providing_options,
    add_render_limit_options,
    providing,
    render_limits,
)
from app.cli.node_workers import add_worker_options, worker_options
from app.cli.options import (
    Subparsers,
    add_blender_option,
    byte_size,
    count,
    fraction,
    from_tessera_error,
    non_negative,
    pool_name,
    positive_int,
)
from common.errors import CoordinatorUnreachableError, UsageError
from coordinator.config import CoordinatorConfig
from coordinator.verify.policy import VerificationPolicy

if TYPE_CHECKING:
    # The rest is imported by the handler that needs it: the coordinator and node of a
    # local farm are `tessera` processes, and their start is on `tessera render`'s clock.
    from common.settings import Settings
    from protocol.discovery import Advertisement

_DEFAULT_POLICY = VerificationPolicy()
#: The coordinator's defaults, shown in --help (the data folder is a placeholder).
_DEFAULT_COORDINATOR = CoordinatorConfig(data_dir=Path())


def add_commands(sub: Subparsers) -> None:
    coordinator = sub.add_parser(
        "coordinator",
        help="run the farm's coordinator (HTTP API)",
        description="Run the coordinator: accounts, jobs, scheduling, uploads, frame "
        "assembly. The first start creates an admin token and says where it is.",
    )
    coordinator.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for a LAN)",
    )
    coordinator.add_argument(
        "--port", type=int, default=8400, help="port (default 8400; 0 lets the OS choose)"
    )
    coordinator.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DIR",
        help="data folder (default: $TESSERA_HOME/coordinator)",
    )
    coordinator.add_argument(
        "--lease-seconds",
        type=float,
        default=60.0,
        help="a lease without heartbeats expires after this long",
    )
    coordinator.add_argument(
        "--heartbeat-interval",
        type=float,
        default=5.0,
        help="how often nodes report while rendering",
    )
    coordinator.add_argument("--tls-cert", type=Path, default=None, help="TLS certificate (PEM)")
    coordinator.add_argument("--tls-key", type=Path, default=None, help="TLS private key (PEM)")
    coordinator.add_argument("--farm", default=None, help="farm name (shown to nodes)")
    coordinator.add_argument(
        "--no-verification",
        action="store_true",
        help="accept tiles without duplicate samples (a farm whose providers all trust "
        "each other, e.g. one studio's machines)",
    )
    coordinator.add_argument(
        "--probation",
        type=count,
        default=_DEFAULT_POLICY.probation,
        metavar="N",
        help="sample every tile of a provider until N of its tiles were confirmed "
        f"(default {_DEFAULT_POLICY.probation})",
    )
    coordinator.add_argument(
        "--min-sample-rate",
        type=fraction,
        default=_DEFAULT_POLICY.min_rate,
        metavar="RATE",
        help="the lowest share of a trusted provider's tiles still sampled "
        f"(0..1, default {_DEFAULT_POLICY.min_rate})",
    )
    coordinator.add_argument(
        "--backup-after",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give an idle node a backup copy of a frame's last tile once it has run this "
        "long and twice the job's median tile time; the first result wins (0: never)",
    )
    coordinator.add_argument(
        "--suspend-after",
        type=positive_int,
        default=_DEFAULT_POLICY.suspend_after,
        metavar="N",
        help="suspend a provider after N rejected results "
        f"(default {_DEFAULT_POLICY.suspend_after})",
    )
    _add_request_limit_options(coordinator)
    add_database_options(coordinator)
    _add_lan_options(
        coordinator,
        "advertise this coordinator on the LAN (zeroconf) and let "
        "nodes that know the farm's secret join",
    )
    coordinator.set_defaults(handler=cmd_coordinator)

    node = sub.add_parser(
        "node",
        help="share this machine: render tasks for a coordinator",
        description="Run a provider node: register this machine's hardware, lease tasks, "
        "render them with a warm Blender, upload the results. Ctrl-C finishes or hands back "
        "the current task, then exits.",
    )
    node.add_argument(
        "--coordinator",
        default=None,
        metavar="URL",
        help="coordinator URL (default: $TESSERA_COORDINATOR)",
    )
    node.add_argument("--token", default=None, help="provider token (default: $TESSERA_TOKEN)")
    node.add_argument(
        "--coordinator-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="read the coordinator URL from PATH (as `tessera coordinator` writes it in its "
        "--data folder: coordinator.url), waiting up to 120 s for it to appear",
    )
    node.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="read the provider token from PATH (keeps it out of the process list), "
        "waiting up to 120 s for it to appear",
    )
    node.add_argument("--farm", default=None, help="with --lan: the farm to join")
    _add_lan_options(
        node,
        "find the coordinator on the LAN (zeroconf) and join with the "
        "farm's secret instead of a URL and token",
    )
    node.add_argument("--name", default=None, help="node name (default: the host name)")
    node.add_argument(
        "--device", default=None, help="CPU (default), GPU, OPTIX, CUDA, HIP, METAL or ONEAPI"
    )
    node.add_argument("--threads", type=int, default=None, help="render threads (0 = all)")
    node.add_argument(
        "--price",
        type=float,
        default=0.0,
        metavar="CREDITS",
        help="credits asked per work unit (pixels x samples / 1e6; default 0)",
    )
    node.add_argument(
        "--pool",
        dest="pools",
        action="append",
        type=pool_name,
        default=[],
        metavar="NAME",
        help="also serve this pool's jobs (repeatable); the pool's owner must have added "
        "your account (`tessera pool add NAME ACCOUNT`), else the coordinator refuses it",
    )
    node.add_argument(
        "--cpus",
        default=None,
        metavar="LIST",
        help="pin rendering to these CPUs, e.g. 0-3 (default: all); sets "
        "--threads to their count unless given",
    )
    node.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DIR",
        help="cache and results folder (default: $TESSERA_HOME/node)",
    )
    node.add_argument(
        "--cache-gb", type=float, default=50.0, help="bundle cache size limit in GiB (default 50)"
    )
    node.add_argument(
        "--no-benchmark", action="store_true", help="skip the start-up benchmark render"
    )
    node.add_argument(
        "--benchmark-cache",
        type=Path,
        default=None,
        metavar="FILE",
        help="keep the benchmark score in FILE (default: benchmark.json in --data), so a "
        "node started afresh each time measures it once",
    )
    node.add_argument(
        "--cheat",
        type=_cheat,
        default=None,
        metavar="MODE",
        help="fake renders on purpose, to demonstrate the farm's verification (never for real "
        "work): samples (a quarter of the samples), copy (another tile's pixels), noise, "
        "black, or sometimes (honest but 10%% of tasks faked)",
    )
    add_worker_options(node)
    add_providing_options(node)
    add_render_limit_options(node)
    add_blender_option(node)
    node.set_defaults(handler=cmd_node)

    join = sub.add_parser(
        "join",
        help="join a LAN farm as an artist: get a requester token with its secret",
        description="Find the farm's coordinator on the LAN (zeroconf), prove you know its "
        "secret and get a requester token (account lan-user-NAME), saved to "
        "$TESSERA_HOME/token for submit, jobs and wallet; prints the coordinator's URL.",
    )
    join.add_argument("--farm", required=True, help="the farm to join")
    join.add_argument(
        "--secret", default=None, help="the farm's join secret (or env TESSERA_FARM_SECRET)"
    )
    join.add_argument(
        "--interface",
        default=None,
        metavar="ADDRESS",
        help="bind zeroconf to this address only (e.g. 127.0.0.1)",
    )
    join.add_argument("--name", default=None, help="your name on the farm (default: host name)")
    join.add_argument("--json", action="store_true", help="print JSON instead of text")
    join.set_defaults(handler=cmd_join)


def add_app(sub: Subparsers) -> None:
    gui = sub.add_parser(
        "app",
        help="open the desktop app",
        description="Open the Tessera desktop app (Jobs, Nodes, Wallet, Settings...). With "
        "--screenshot, render one page offscreen to a PNG and exit: from the configured farm, "
        "or from a local farm (a coordinator and 1 node) started for it when none answers.",
    )
    gui.add_argument(
        "scene",
        nargs="?",
        type=Path,
        default=None,
        metavar="SCENE",
        help="a .blend to open on the Submit page",
    )
    gui.add_argument(
        "--coordinator",
        default=None,
        metavar="URL",
        help="the coordinator (default: the app's saved one, else $TESSERA_COORDINATOR)",
    )
    gui.add_argument(
        "--token",
        default=None,
        metavar="T",
        help="your access token (default: the app's saved one, else $TESSERA_TOKEN or "
        "the file $TESSERA_HOME/token)",
    )
    gui.add_argument(
        "--screenshot",
        nargs=2,
        default=None,
        metavar=("PAGE", "FILE.png"),
        help="save PAGE (submit, jobs, nodes, wallet, provide, settings) as a PNG and exit",
    )
    gui.set_defaults(handler=cmd_app)


def _add_request_limit_options(parser: argparse.ArgumentParser) -> None:
    defaults = _DEFAULT_COORDINATOR
    group = parser.add_argument_group("request limits (per client, against floods)")
    group.add_argument(
        "--rate-limit",
        type=non_negative,
        default=defaults.rate_limit,
        metavar="PER_SECOND",
        help="requests a second per token (per address without one) before 429 "
        f"(default {defaults.rate_limit:g}; 0 = no rate limit)",
    )
    group.add_argument(
        "--rate-burst",
        type=positive_int,
        default=defaults.rate_burst,
        metavar="N",
        help=f"requests that may come at once before the rate applies (default "
        f"{defaults.rate_burst})",
    )
    group.add_argument(
        "--max-concurrent",
        type=count,
        default=defaults.max_concurrent,
        metavar="N",
        help="requests worked on at once; past it 503 with Retry-After "
        f"(default {defaults.max_concurrent}; 0 = no limit)",
    )
    group.add_argument(
        "--max-waiting",
        type=count,
        default=defaults.max_waiting,
        metavar="N",
        help="lease long polls and event streams open at once "
        f"(default {defaults.max_waiting}; 0 = no limit)",
    )
    group.add_argument(
        "--max-body-bytes",
        type=byte_size,
        default=defaults.max_json_bytes,
        metavar="SIZE",
        help="largest request body other than bundle and result uploads, e.g. 1M "
        f"(default {defaults.max_json_bytes})",
    )
    parser.add_argument(
        "--min-free-disk",
        type=byte_size,
        default=defaults.min_free_disk,
        metavar="SIZE",
        help="refuse uploads (507, retried later) that would leave less than this free in "
        "the data folder, e.g. 5G (default 1G; 0 = no check)",
    )


def _add_lan_options(parser: argparse.ArgumentParser, lan_help: str) -> None:
    parser.add_argument("--lan", action="store_true", help=lan_help)
    parser.add_argument(
        "--secret", default=None, help="the farm's join secret (or env TESSERA_FARM_SECRET)"
    )
    parser.add_argument(
        "--interface",
        default=None,
        metavar="ADDRESS",
        help="bind zeroconf to this address only (e.g. 127.0.0.1)",
    )


def _farm_secret(args: argparse.Namespace) -> str | None:
    """--secret, else $TESSERA_FARM_SECRET (kept out of Settings: it is a password that
    only `coordinator --lan`, `node --lan` and `join` read)."""
    return args.secret or os.environ.get("TESSERA_FARM_SECRET") or None


def _lan_farm(args: argparse.Namespace) -> tuple[str, str]:
    secret = _farm_secret(args)
    if not args.farm or not secret:
        raise UsageError("--lan needs --farm NAME and --secret S (or TESSERA_FARM_SECRET).")
    return args.farm, secret


def _parse_cheat(text: str) -> str:
    from farm_node.cheats import parse_cheat

    return parse_cheat(text).value


_cheat = from_tessera_error(_parse_cheat)


# --- coordinator ------------------------------------------------------------------------------


def cmd_coordinator(args: argparse.Namespace, settings: Settings) -> int:
    from coordinator.server import serve
    from protocol.discovery import COORDINATOR_TYPE, Advertisement, coordinator_info

    if args.action == "migrate":
        return cmd_migrate(args)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together.")
    farm, secret = _lan_farm(args) if args.lan else (args.farm, None)
    data_dir = args.data or settings.home / "coordinator"
    config = CoordinatorConfig(
        data_dir=data_dir,
        db_url=args.db,
        shared_store=args.store,
        lease_seconds=args.lease_seconds,
        heartbeat_interval=args.heartbeat_interval,
        farm_name=farm,
        lan_secret=secret,
        backup_after_seconds=max(0.0, args.backup_after),
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        max_concurrent=args.max_concurrent,
        max_waiting=args.max_waiting,
        max_json_bytes=args.max_body_bytes,
        min_free_disk=args.min_free_disk,
        verification=VerificationPolicy(
            enabled=not args.no_verification,
            probation=args.probation,
            min_rate=args.min_sample_rate,
            suspend_after=args.suspend_after,
        ),
    )
    advertisements: list[Advertisement] = []

    def ready(url: str, admin_token: str | None) -> None:
        print(f"Tessera coordinator listening on {url}", flush=True)
        print(f"  data: {data_dir}", flush=True)
        if admin_token:
            print(f"  first start: admin token written to {config.admin_token_path}", flush=True)
        if farm and secret:
            info = coordinator_info(url, farm, secret, args.interface, config.version)
            advertisements.append(Advertisement(info, args.interface))
            print(f"  LAN: advertising farm '{farm}' as {COORDINATOR_TYPE}", flush=True)

    try:
        serve(
            config,
            args.host,
            args.port,
            on_ready=ready,
            certfile=args.tls_cert,
            keyfile=args.tls_key,
        )
    finally:
        for advertisement in advertisements:
            advertisement.close()
    return 0


# --- node ------------------------------------------------------------------------------------


def cmd_app(args: argparse.Namespace, settings: Settings) -> int:
    from app.gui.launch import run_app  # Qt is loaded only for this command

    screenshot = tuple(args.screenshot) if args.screenshot is not None else None
    return run_app(
        settings,
        scene=args.scene,
        screenshot=screenshot,
        coordinator=args.coordinator,
        token=args.token,
    )


def cmd_node(args: argparse.Namespace, settings: Settings) -> int:
    import socket

    from app.connection import resolve_connection
    from farm_node.config import NodeConfig
    from farm_node.main import run_node
    from renderers.worker import cpu_pinning_env, parse_cpu_list

    policy, limits = providing(args), render_limits(args)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    name = args.name or socket.gethostname()
    if args.lan:
        url, token = "", None  # found on the LAN below
        if args.coordinator_file or args.token_file:
            raise UsageError("--lan finds the coordinator and joins it: drop --*-file.")
    else:
        connection = resolve_connection(settings, url=args.coordinator, token=args.token)
        url, token = connection.url, connection.token
        # A file named wins; it is read once the node's own set-up is done.
        url = "" if args.coordinator_file else url
        token = None if args.token_file else token
    advertisement: Advertisement | None = None
    if args.lan:
        farm, secret = _lan_farm(args)
        print(f"Looking for farm '{farm}' on the LAN...", flush=True)
        from protocol.client import TesseraClient
        from protocol.discovery import find_coordinator

        found = find_coordinator(farm, secret, interface=args.interface, timeout=30)
        if found is None:
            raise CoordinatorUnreachableError(
                f"No coordinator of farm '{farm}' with that secret answered on the LAN.",
                hint="Start it with `tessera coordinator --lan --farm NAME --secret S` and "
                "check that both use the same network (and --interface).",
            )
        url = found.url
        with TesseraClient(url) as anonymous:
            token = anonymous.join_lan_farm(name, secret).token
        print(f"Joined farm '{farm}' at {url} as {name}", flush=True)
    elif not token and not args.token_file:
        raise UsageError(
            "A node needs a provider token: pass --token or --token-file, set "
            "TESSERA_TOKEN, or join a LAN farm with --lan --farm NAME --secret S."
        )
    cpus = parse_cpu_list(args.cpus) if args.cpus else []
    threads = args.threads if args.threads is not None else (len(cpus) or settings.threads)
    config = NodeConfig(
        coordinator_url=url,
        token=token,
        name=name,
        device=args.device or settings.device,
        threads=threads,
        extra_env=cpu_pinning_env(cpus) if cpus else {},
        price=args.price,
        pools=list(dict.fromkeys(args.pools)),
        data_dir=args.data or settings.home / "node",
        cache_max_bytes=int(args.cache_gb * 2**30),
        blender_executables=[args.blender] if args.blender else list(settings.blender),
        use_bpy=settings.use_bpy and args.blender is None,
        bpy_memo=settings.home / BPY_CACHE,
        coordinator_file=args.coordinator_file,
        token_file=args.token_file,
        benchmark=not args.no_benchmark,
        benchmark_cache=args.benchmark_cache,
        cheat=args.cheat,
        task_timeout=args.task_timeout,
        policy=policy,
        limits=limits,
        machine_state_file=args.machine_state,
        **worker_options(args, settings),
    )
    if args.lan:
        from protocol.discovery import Advertisement, node_info
        from renderers.devices import probe_nvidia

        gpus = probe_nvidia()
        properties = {
            "devices": config.device,
            "threads": config.threads or os.cpu_count(),
            "coordinator": url,
            "price": config.price,
            "vram": max((gpu.memory_total_mib for gpu in gpus), default=None),
        }
        advertisement = Advertisement(node_info(name, args.interface, properties), args.interface)
    try:
        return run_node(config)
    finally:
        if advertisement is not None:
            advertisement.close()


def cmd_join(args: argparse.Namespace, settings: Settings) -> int:
    import socket

    from protocol.client import TesseraClient
    from protocol.discovery import find_coordinator
    from protocol.models import Role

    secret = _farm_secret(args)
    if not secret:
        raise UsageError("Give the farm's join secret with --secret S (or TESSERA_FARM_SECRET).")
    name = args.name or socket.gethostname()
    found = find_coordinator(args.farm, secret, interface=args.interface, timeout=30)
    if found is None:
        raise CoordinatorUnreachableError(
            f"No coordinator of farm '{args.farm}' with that secret answered on the LAN.",
            hint="Check the farm's name and secret, and that its coordinator runs with --lan "
            "on the same network (and --interface).",
        )
    with TesseraClient(found.url) as anonymous:
        joined = anonymous.join_lan_farm(name, secret, role=Role.REQUESTER)
    token_file = settings.home / "token"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.touch(mode=0o600)
    token_file.chmod(0o600)  # a token is a password
    token_file.write_text(joined.token + "\n")
    if args.json:
        print(json.dumps({"url": found.url, "account": joined.account, "token": joined.token}))
    else:
        print(f"Joined farm '{args.farm}' at {found.url} as {joined.account}.")
        print(f"Token saved to {token_file}. Point the other commands at the farm with:")
        print(f"  export TESSERA_COORDINATOR={found.url}")
    return 0

"""`tessera pool create|add|remove|list`: a studio's pools of machines.

A pool is owned by the account that creates it. Its owner (or an admin) adds accounts
to it: a provider account's nodes started with `--pool NAME` then serve the pool's jobs,
and a requester account may submit jobs with `--pool NAME`. The coordinator decides
(coordinator/pools.py); this module only asks and prints.
"""

from __future__ import annotations

import argparse

from app.cli.options import (
    Subparsers,
    add_connection_options,
    add_json_option,
    connect,
    pool_name,
    print_json,
)
from app.cli.output import table
from common.settings import Settings
from protocol.requirements import PoolInfo


def add_commands(sub: Subparsers) -> None:
    pool = sub.add_parser(
        "pool",
        help="create pools and add the accounts whose machines serve them",
        description="A pool keeps a job on chosen machines: `create NAME` makes a pool you "
        "own, `add NAME ACCOUNT` lets a provider account's nodes (started with `tessera node "
        "--pool NAME`) serve it and a requester account submit to it (`--pool NAME`), "
        "`remove NAME ACCOUNT` takes the account out, `list` shows your pools. Only a "
        "pool's owner or an admin adds or removes accounts.",
    )
    actions = pool.add_subparsers(title="actions", metavar="ACTION", required=True)

    create = actions.add_parser("create", help="create a pool that you own")
    create.add_argument("name", metavar="NAME", type=pool_name, help="the pool's name")
    _common(create, cmd_pool_create)

    for action, text in (
        ("add", "add an account to a pool you own"),
        ("remove", "remove an account from a pool you own"),
    ):
        change = actions.add_parser(action, help=text, description=text[0].upper() + text[1:])
        change.add_argument("name", metavar="NAME", type=pool_name, help="the pool")
        change.add_argument("account", metavar="ACCOUNT", help="the account (e.g. a provider)")
        _common(change, cmd_pool_add if action == "add" else cmd_pool_remove)

    listing = actions.add_parser("list", help="list the pools you own or belong to")
    _common(listing, cmd_pool_list)


def _common(parser: argparse.ArgumentParser, handler: object) -> None:
    add_json_option(parser)
    add_connection_options(parser)
    parser.set_defaults(handler=handler)


def cmd_pool_create(args: argparse.Namespace, settings: Settings) -> int:
    with connect(args, settings) as client:
        pool = client.create_pool(args.name)
    _print_pool(args, pool, f"Created pool '{pool.name}', owned by {pool.owner}.")
    return 0


def cmd_pool_add(args: argparse.Namespace, settings: Settings) -> int:
    with connect(args, settings) as client:
        pool = client.add_to_pool(args.name, args.account)
    _print_pool(
        args,
        pool,
        f"Added {args.account} to pool '{pool.name}': its nodes started with --pool"
        f" {pool.name} serve the pool's jobs, and it may submit with --pool {pool.name}.",
    )
    return 0


def cmd_pool_remove(args: argparse.Namespace, settings: Settings) -> int:
    with connect(args, settings) as client:
        pool = client.remove_from_pool(args.name, args.account)
    _print_pool(args, pool, f"Removed {args.account} from pool '{pool.name}'.")
    return 0


def cmd_pool_list(args: argparse.Namespace, settings: Settings) -> int:
    with connect(args, settings) as client:
        pools = client.pools()
    if args.json:
        print_json([pool.model_dump(mode="json") for pool in pools])
        return 0
    if not pools:
        print("You own no pool and belong to none (`tessera pool create NAME` makes one).")
        return 0
    rows = [(p.name, p.owner, ", ".join(p.members) or "-") for p in pools]
    print(table(("POOL", "OWNER", "ACCOUNTS"), rows))
    return 0


def _print_pool(args: argparse.Namespace, pool: PoolInfo, text: str) -> None:
    if args.json:
        print_json(pool.model_dump(mode="json"))
    else:
        print(text)

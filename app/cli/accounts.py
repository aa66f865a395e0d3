"""`tessera nodes`, `wallet`, `grant`, `ledger`, `provider` and `account`: the farm's
machines, its credits and its accounts, as the coordinator reports them (or, for
`nodes --lan`, what zeroconf hears).
"""

from __future__ import annotations

import argparse

from app.cli.options import (
    Subparsers,
    add_connection_options,
    add_json_option,
    connect,
    credit_amount,
    print_json,
)
from app.cli.output import MESSAGE_WIDTH, clip, table
from app.cost_text import rate, work_text
from common.settings import Settings
from protocol.accounts import (
    AccountInfo,
)
from protocol.models import (
    NodeInfo,
    Role,
)


def add_commands(sub: Subparsers) -> None:
    nodes = sub.add_parser(
        "nodes",
        help="list the farm's render nodes",
        description="List the render nodes the coordinator knows: status, devices, "
        "Blender versions, current task, tasks done and failed, its success rate (accepted "
        "/ delivered results) and accepted work (results and their render time), results "
        "rejected by verification, "
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
    add_connection_options(nodes)
    nodes.set_defaults(handler=cmd_nodes)
    _add_credit_commands(sub)


def add_account_commands(sub: Subparsers) -> None:
    """`tessera account create|list|revoke` (admin)."""
    account = sub.add_parser(
        "account",
        help="create, list and revoke accounts (admin)",
        description="Manage the farm's accounts with the admin token: `create NAME --role "
        "requester|provider` prints the new account's token (shown once: the coordinator "
        "keeps only its digest), `list` shows every account with its role, creation and "
        "revocation dates and balance, `revoke NAME` makes the account's token stop working "
        "at once, for good.",
    )
    actions = account.add_subparsers(title="actions", metavar="ACTION", required=True)

    create = actions.add_parser(
        "create",
        help="create an account and print its token (admin)",
        description="Create a requester or provider account and print its token once.",
    )
    create.add_argument("name", metavar="NAME", help="the account's name (A-Z a-z 0-9 _ . @ -)")
    create.add_argument(
        "--role",
        required=True,
        choices=(Role.REQUESTER.value, Role.PROVIDER.value),
        help="requester (submits jobs) or provider (runs nodes)",
    )
    add_json_option(create)
    add_connection_options(create)
    create.set_defaults(handler=cmd_account_create)

    listing = actions.add_parser(
        "list",
        help="list the accounts (admin)",
        description="List every account: name, role, created, revoked, balance.",
    )
    add_json_option(listing)
    add_connection_options(listing)
    listing.set_defaults(handler=cmd_account_list)

    revoke = actions.add_parser(
        "revoke",
        help="revoke an account's token (admin)",
        description="The account's token is refused (401) from now on, on every route; "
        "its jobs, nodes and credits stay on record. The admin account cannot be revoked.",
    )
    revoke.add_argument("name", metavar="NAME", help="the account to revoke")
    add_json_option(revoke)
    add_connection_options(revoke)
    revoke.set_defaults(handler=cmd_account_revoke)


def _add_credit_commands(sub: Subparsers) -> None:
    wallet = sub.add_parser(
        "wallet",
        help="show your credits: balance, escrow and history",
        description="Show your credit balance, the credits held in escrow for your unfinished "
        "jobs, and your latest ledger entries.",
    )
    add_json_option(wallet)
    add_connection_options(wallet)
    wallet.set_defaults(handler=cmd_wallet)

    grant = sub.add_parser(
        "grant",
        help="give credits to an account (admin)",
        description="Issue credits to an account. Needs the admin token; grants are the only "
        "source of credits.",
    )
    grant.add_argument("account", metavar="ACCOUNT", help="the account to credit")
    grant.add_argument("amount", metavar="AMOUNT", type=credit_amount, help="credits to give")
    add_json_option(grant)
    add_connection_options(grant)
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
    add_connection_options(ledger)
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
    add_connection_options(provider)
    provider.set_defaults(handler=cmd_provider)


# --- nodes --------------------------------------------------------------------------------


def cmd_nodes(args: argparse.Namespace, settings: Settings) -> int:
    if args.lan:
        return _lan_listing(args)
    with connect(args, settings) as client:
        nodes = client.nodes()
    if args.json:
        print_json([node.model_dump(mode="json") for node in nodes])
        return 0
    if not nodes:
        print("No nodes have joined this farm yet.")
        return 0
    rows = [_node_row(node) for node in nodes]
    print(table(NODE_COLUMNS, rows))
    for node in nodes:
        if node.suspended:
            print(f"SUSPENDED {node.capabilities.name} ({node.owner}): {node.suspended}")
        elif node.paused and node.status == "paused":
            print(f"{node.capabilities.name} is {node.paused}")
        elif node.paused and node.status in ("warming", "failed"):
            print(f"{node.capabilities.name}: {node.paused}")
    return 0


# --- credits ------------------------------------------------------------------------------


def cmd_wallet(args: argparse.Namespace, settings: Settings) -> int:
    with connect(args, settings) as client:
        wallet = client.wallet()
    if args.json:
        print_json(wallet.model_dump(mode="json"))
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
            clip(entry.memo, MESSAGE_WIDTH),
        )
        for entry in wallet.history
    ]
    print(table(("WHEN", "KIND", "CREDITS", "JOB", "MEMO"), rows))
    return 0


def cmd_grant(args: argparse.Namespace, settings: Settings) -> int:
    with connect(args, settings) as client:
        wallet = client.grant(args.account, args.amount)
    if args.json:
        print_json(wallet.model_dump(mode="json"))
    else:
        print(f"Granted {args.amount:g} credits to {wallet.account}; balance {wallet.balance:g}.")
    return 0


def cmd_ledger(args: argparse.Namespace, settings: Settings) -> int:
    with connect(args, settings) as client:
        result = client.ledger_check()
    if args.json:
        print_json(result.model_dump(mode="json"))
    elif result.ok:
        print("The ledger checks out: every invariant holds.")
    else:
        print(f"The ledger check found {len(result.problems)} problem(s):")
        for problem in result.problems:
            print(f"  - {problem}")
    return 0 if result.ok else 1


def cmd_provider(args: argparse.Namespace, settings: Settings) -> int:
    with connect(args, settings) as client:
        client.reinstate(args.account)
    print(f"Provider '{args.account}' is reinstated: its nodes may lease work again.")
    return 0


# --- accounts -----------------------------------------------------------------------------


def cmd_account_create(args: argparse.Namespace, settings: Settings) -> int:
    with connect(args, settings) as client:
        created = client.create_account(args.name, args.role)
    if args.json:
        print_json(created.model_dump(mode="json"))
        return 0
    print(f"Created {created.role.value} account '{created.account}'. Its token (shown once):")
    print(created.token)
    return 0


def cmd_account_list(args: argparse.Namespace, settings: Settings) -> int:
    with connect(args, settings) as client:
        accounts = client.accounts()
    if args.json:
        print_json([account.model_dump(mode="json") for account in accounts])
        return 0
    print(table(ACCOUNT_COLUMNS, [_account_row(account) for account in accounts]))
    return 0


def cmd_account_revoke(args: argparse.Namespace, settings: Settings) -> int:
    with connect(args, settings) as client:
        revoked = client.revoke_account(args.name)
    if args.json:
        print_json(revoked.model_dump(mode="json"))
    else:
        print(f"Account '{revoked.name}' is revoked: its token no longer works.")
    return 0


ACCOUNT_COLUMNS = ("NAME", "ROLE", "CREATED", "REVOKED", "BALANCE")


def _account_row(account: AccountInfo) -> tuple[str, ...]:
    when = "%Y-%m-%d %H:%M"
    return (
        account.name,
        account.role.value,
        account.created_at.strftime(when),
        account.revoked_at.strftime(when) if account.revoked_at else "-",
        f"{account.balance:g}",
    )


def _lan_listing(args: argparse.Namespace) -> int:
    from protocol.discovery import browse

    seen = browse(interface=args.interface, seconds=args.seconds)
    if args.json:
        print_json(
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
    print(table(("KIND", "NAME", "WHERE", "DETAILS"), rows))
    return 0


NODE_COLUMNS = (
    "NAME",
    "STATUS",
    "DEVICES",
    "BLENDER",
    "TASK",
    "DONE",
    "FAILED",
    "SUCCESS",
    "ACCEPTED WORK",
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
        rate(node.success_rate),
        work_text(node),
        str(node.rejected),
        f"{caps.price:g}",
        f"{node.reputation:.2f}",
        f"{node.earned:g}",
    )

"""``mailwarden senders add|list|remove``: the registered sending servers (SU-1, SU-3).

A registered server (an address or a CIDR network on campus) may relay mail out through
the gateway with envelope senders in its domains. ``add`` refuses an address outside
``[policy] campus_networks`` (SU-3). Servers named in ``[policy] senders`` are listed
with ``source config`` and are changed in the config file, not here. A running gateway
picks up changes within ``[policy] registry_refresh``. ``--json`` prints one JSON object
per sender per line. Exit codes: 0 ok, 1 failure, 2 refused (bad or off-campus address),
3 not registered.

Public names: ``register``.
Security: operator input only; addresses and domains are validated before storage.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from typing import Any

from mailwarden.cli.dbaccess import cli_store
from mailwarden.cli.main import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, add_config_option
from mailwarden.config import Config, load_config
from mailwarden.errors import StoreError
from mailwarden.policy.clients import config_senders
from mailwarden.policy.networks import campus_networks
from mailwarden.store.senders import add_sender, list_senders, parse_network, remove_sender


def register(sub: Any) -> None:
    p = sub.add_parser(
        "senders",
        help="register, list or remove the servers allowed to send mail out (SU-1)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    ssub = p.add_subparsers(dest="senders_command", metavar="ACTION")
    ssub.required = True

    add = ssub.add_parser("add", help="register a sending server (must be on campus, SU-3)")
    add_config_option(add)
    add.add_argument("address", metavar="ADDRESS", help="IP address or CIDR network")
    add.add_argument("--name", required=True, help="what the server is (e.g. chem-list)")
    add.add_argument(
        "--domain",
        action="append",
        required=True,
        metavar="DOMAIN",
        help="an envelope-sender domain it may use (repeat for several)",
    )
    add.add_argument("--by", default="", help="who registers it (default: your login)")
    add.add_argument("--json", action="store_true", help="print the new entry as JSON")
    add.set_defaults(func=_add)

    ls = ssub.add_parser("list", help="list registered senders (database and config)")
    add_config_option(ls)
    ls.add_argument("--json", action="store_true", help="one JSON object per sender per line")
    ls.set_defaults(func=_list)

    rm = ssub.add_parser("remove", help="remove a registered sender from the database")
    add_config_option(rm)
    rm.add_argument("address", metavar="ADDRESS", help="as registered (address or CIDR)")
    rm.set_defaults(func=_remove)


def _who(args: argparse.Namespace) -> str:
    if args.by:
        return str(args.by)
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def _add(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    with cli_store(cfg) as db:
        try:
            s = add_sender(
                db,
                args.address,
                name=args.name,
                domains=args.domain,
                campus=campus_networks(cfg).networks,
                added_by=_who(args),
            )
        except StoreError as exc:
            print(f"mailwarden senders add: refused: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.json:
        print(json.dumps(s.to_json()))
    else:
        print(f"registered {s.network} ({s.name}) for {', '.join(s.domains)}")
    return EXIT_OK


def _all(cfg: Config) -> list[Any]:
    with cli_store(cfg) as db:
        return [*config_senders(cfg), *list_senders(db)]


def _list(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    senders = _all(cfg)
    if args.json:
        for s in senders:
            print(json.dumps(s.to_json()))
        return EXIT_OK
    if not senders:
        print("no registered senders")
        return EXIT_OK
    print(f"{'NETWORK':<24} {'SOURCE':<8} {'NAME':<20} {'ADDED':<17} DOMAINS")
    for s in senders:
        added = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.added_at)) if s.added_at else "-"
        print(f"{s.network!s:<24} {s.source:<8} {s.name:<20} {added:<17} {', '.join(s.domains)}")
    return EXIT_OK


def _remove(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    try:
        net = parse_network(args.address)
    except StoreError as exc:
        print(f"mailwarden senders remove: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with cli_store(cfg) as db:
        removed = remove_sender(db, str(net))
    if not removed:
        if any(s.network == net for s in config_senders(cfg)):
            print(
                f"{net} is registered in the config file ([policy] senders); edit it there",
                file=sys.stderr,
            )
        else:
            print(f"{net} is not registered", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(f"removed {net}")
    return EXIT_OK

"""``mailwarden blocks list|remove``: client addresses blocked by the harvest defence (CP-E2).

``list`` shows the blocks in force (``--all`` includes expired ones), ``--json`` one JSON
object per block per line. ``remove ADDRESS`` lifts a block; a running gateway stops
refusing the address within ``[policy] registry_refresh``. Exit codes: 0 ok, 1 failure,
2 bad address, 3 no such block.

Public names: ``register``.
Security: operator input only; addresses are validated with ``ipaddress``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from mailwarden.cli.dbaccess import cli_store
from mailwarden.cli.main import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, add_config_option
from mailwarden.config import load_config
from mailwarden.errors import StoreError
from mailwarden.store.blocks import canonical_ip, list_blocks, remove_block


def register(sub: Any) -> None:
    p = sub.add_parser(
        "blocks",
        help="list or lift blocks of client addresses (directory-harvest defence, CP-E2)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    bsub = p.add_subparsers(dest="blocks_command", metavar="ACTION")
    bsub.required = True
    ls = bsub.add_parser("list", help="list blocked client addresses")
    add_config_option(ls)
    ls.add_argument("--json", action="store_true", help="one JSON object per block per line")
    ls.add_argument("--all", action="store_true", help="include expired blocks")
    ls.set_defaults(func=_list)
    rm = bsub.add_parser("remove", help="lift the block of a client address")
    add_config_option(rm)
    rm.add_argument("address", metavar="ADDRESS")
    rm.set_defaults(func=_remove)


def _list(args: argparse.Namespace) -> int:
    with cli_store(load_config(args.config)) as db:
        blocks = list_blocks(db, include_expired=args.all)
    if args.json:
        for b in blocks:
            print(json.dumps(b.to_json()))
        return EXIT_OK
    if not blocks:
        print("no blocked addresses")
        return EXIT_OK
    print(f"{'ADDRESS':<40} {'UNTIL':<20} REASON")
    for b in blocks:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b.until))
        print(f"{b.address:<40} {until:<20} {b.reason}")
    return EXIT_OK


def _remove(args: argparse.Namespace) -> int:
    try:
        addr = canonical_ip(args.address)
    except StoreError as exc:
        print(f"mailwarden blocks remove: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with cli_store(load_config(args.config)) as db:
        removed = remove_block(db, addr)
    if not removed:
        print(f"{addr} is not blocked", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(f"lifted the block of {addr}")
    return EXIT_OK

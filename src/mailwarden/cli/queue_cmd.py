"""``mailwarden queue list|show|flush|hold|release|delete``: manage the mail queue.

Like ``postqueue``/``postsuper``, across all spool shards, safe while the gateway runs:
``hold`` stops further delivery of a message (an attempt already in progress finishes),
``release`` makes it due now, ``flush`` makes all deferred mail due now and creates each
shard's ``flush`` trigger file, which a running scheduler answers within a second.
``list --json`` prints one JSON object per message per line (like ``postqueue -j``);
``show --json`` prints one object. Exit codes: 0 ok, 1 failure, 2 usage, 3 unknown queue id.

Public names: ``register``.
Security: operator input only; queue ids are validated before use; message headers shown
by ``show`` are untrusted and printed with control characters escaped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from mailwarden.cli.main import EXIT_FAIL, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, add_config_option
from mailwarden.config import load_config
from mailwarden.core.events import JsonLinesSink, set_sink
from mailwarden.queue import manage

_MARKS = {"active": "*", "hold": "!", "deferred": " ", "corrupt": "#"}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "queue",
        help="list, inspect, hold, release, delete or flush queued mail",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    qsub = p.add_subparsers(dest="queue_command", metavar="ACTION")
    qsub.required = True

    ls = qsub.add_parser("list", help="list queued messages (* active, ! on hold, # corrupt)")
    add_config_option(ls)
    ls.add_argument("--json", action="store_true", help="one JSON object per message per line")
    ls.set_defaults(func=_list)

    sh = qsub.add_parser("show", help="show one message: envelope, status, headers")
    add_config_option(sh)
    sh.add_argument("queue_id", metavar="ID")
    sh.add_argument("--json", action="store_true", help="print one JSON object")
    sh.set_defaults(func=_show)

    fl = qsub.add_parser("flush", help="retry all deferred mail now")
    add_config_option(fl)
    fl.set_defaults(func=_flush)

    for name, helptext, func in (
        ("hold", "put messages on hold (no delivery until released)", _hold),
        ("release", "release held messages (retried now)", _release),
    ):
        cmd = qsub.add_parser(name, help=helptext)
        add_config_option(cmd)
        cmd.add_argument("queue_ids", metavar="ID", nargs="+")
        cmd.set_defaults(func=func)

    rm = qsub.add_parser("delete", help="delete messages (no DSN is sent)")
    add_config_option(rm)
    rm.add_argument("queue_ids", metavar="ID", nargs="*")
    rm.add_argument("--all", action="store_true", help="delete every queued message")
    rm.set_defaults(func=_delete)


def _root(args: argparse.Namespace, *, log: bool = False) -> Path:
    cfg = load_config(args.config)
    if log:  # operator actions that change the queue are logged as events
        set_sink(JsonLinesSink(str(cfg.events_path)))
    return cfg.spool_path


def _esc(text: str) -> str:
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def _ts(ts: float) -> str:
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(ts))


def _list(args: argparse.Namespace) -> int:
    entries = manage.list_queue(_root(args))
    if args.json:
        for e in entries:
            print(json.dumps(e.to_json(), ensure_ascii=False))
        return EXIT_OK
    if not entries:
        print("Mail queue is empty")
        return EXIT_OK
    print(f"{'-Queue ID-':<22} {'--Size--':>8} {'----Arrival Time----':<20} -Sender/Recipient-")
    for e in entries:
        qid = e.queue_id + _MARKS.get(e.state, "?")
        sender = "<>" if not e.sender else _esc(e.sender)
        if e.corrupt:
            sender = f"(corrupt: {_esc(e.corrupt)})"
        print(f"{qid:<22} {e.size:>8} {_ts(e.arrival):<20} {sender}")
        for rcpt in e.pending:
            if rcpt in e.errors:
                print(f"{'':<53}({_esc(e.errors[rcpt])[:200]})")
            print(f"{'':<53}{_esc(rcpt)}")
        print()
    total = sum(e.size for e in entries)
    print(f"-- {(total + 1023) // 1024} Kbytes in {len(entries)} Requests.")
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    try:
        info = manage.show(_root(args), args.queue_id)
    except manage.UnknownQueueId as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=2))
        return EXIT_OK
    for key in ("queue_id", "shard", "state", "size", "sender", "message_id", "attempts"):
        print(f"{key:<12} {_esc(str(info.get(key, '')))}")
    print(f"{'arrival':<12} {_ts(info['arrival'])}")
    if info.get("next_retry"):
        print(f"{'next retry':<12} {_ts(info['next_retry'])}")
    if info.get("corrupt"):
        print(f"{'corrupt':<12} {_esc(info['corrupt'])}")
        return EXIT_OK
    for rcpt in info["recipients"]:
        if rcpt in info.get("results", {}):
            res = info["results"][rcpt]
            status = f"{res['status']}: {res['reply']}"
        elif rcpt in info["errors"]:
            status = f"pending, last error: {info['errors'][rcpt]}"
        else:
            status = "pending"
        print(f"{'recipient':<12} {_esc(rcpt)}  [{_esc(status)}]")
    print()
    print(_esc(info.get("headers", "")).rstrip("\r\n").replace("\r\n", "\n"))
    return EXIT_OK


def _flush(args: argparse.Namespace) -> int:
    count = manage.flush(_root(args, log=True))
    print(f"flush: {count} deferred message(s) will be retried now")
    return EXIT_OK


def _apply(args: argparse.Namespace, verb: str, func: Any) -> int:
    root = _root(args, log=True)
    missing = failed = 0
    for qid in args.queue_ids:
        try:
            done = func(root, [qid])
        except manage.UnknownQueueId as exc:
            print(f"mailwarden: {exc}", file=sys.stderr)
            missing += 1
            continue
        if done:
            print(f"{qid}: {verb}")
        else:
            print(f"{qid}: not {verb} (not in a state that allows it)", file=sys.stderr)
            failed += 1
    if missing:
        return EXIT_NOT_FOUND
    return EXIT_FAIL if failed else EXIT_OK


def _hold(args: argparse.Namespace) -> int:
    return _apply(args, "placed on hold", manage.hold)


def _release(args: argparse.Namespace) -> int:
    return _apply(args, "released", manage.release)


def _delete(args: argparse.Namespace) -> int:
    if args.all and args.queue_ids:
        print("mailwarden: give queue ids or --all, not both", file=sys.stderr)
        return EXIT_USAGE
    if args.all:
        done = manage.delete_all(_root(args, log=True))
        print(f"delete: {len(done)} message(s) deleted")
        return EXIT_OK
    if not args.queue_ids:
        print("mailwarden: queue delete needs queue ids or --all", file=sys.stderr)
        return EXIT_USAGE
    return _apply(args, "deleted", manage.delete)

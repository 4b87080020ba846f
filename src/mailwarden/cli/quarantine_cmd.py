"""``mailwarden quarantine list|show|release|delete``: review messages a verdict held.

Held messages are never delivered. ``release`` queues the original message (as received,
with the gateway's ``Received:`` header, without scan headers) to its recipients and skips
the scan that held it; it is logged as the event ``quarantine.released`` with the name given
by ``--by`` (default: the Unix user running the command). Messages held as a virus are
release-protected: ``release`` refuses them (exit 1) unless ``--force`` is given, which is
for administrators only. ``show`` never renders active content: it prints the header
fields, the text/plain parts (cut) and a list of the other parts with their sizes and types.
``list --json`` prints one JSON object per message per line; ``show --json`` one object.
Exit codes: 0 ok, 1 refused or failed, 2 usage, 3 unknown queue id.

Public names: ``register``.
Security: operator input only; queue ids are validated before use; everything shown from a
message is escaped (no terminal control sequences, no HTML rendering).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import time
from typing import Any

from mailwarden.cli.main import EXIT_FAIL, EXIT_NOT_FOUND, EXIT_OK, add_config_option
from mailwarden.config import Config, load_config
from mailwarden.core.events import JsonLinesSink, set_sink
from mailwarden.quarantine.index import Entry
from mailwarden.quarantine.render import escape, summarize
from mailwarden.quarantine.store import (
    Quarantine,
    QuarantineError,
    ReleaseProtected,
    UnknownQuarantineId,
)
from mailwarden.queue.spool import Spool

RELEASE_SHARD = "w0"  # released mail enters worker 0's spool shard


def register(sub: Any) -> None:
    p = sub.add_parser(
        "quarantine",
        help="list, show, release or delete quarantined messages",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    qsub = p.add_subparsers(dest="quarantine_command", metavar="ACTION")
    qsub.required = True

    ls = qsub.add_parser("list", help="list quarantined messages, newest first")
    add_config_option(ls)
    ls.add_argument("--json", action="store_true", help="one JSON object per message per line")
    ls.add_argument(
        "--all", action="store_true", help="include released messages (kept until expiry)"
    )
    ls.set_defaults(func=_list)

    sh = qsub.add_parser("show", help="verdict, headers, text parts and attachment list")
    add_config_option(sh)
    sh.add_argument("queue_id", metavar="ID")
    sh.add_argument("--json", action="store_true", help="print one JSON object")
    sh.set_defaults(func=_show)

    rl = qsub.add_parser("release", help="deliver a held message to its recipients")
    add_config_option(rl)
    rl.add_argument("queue_id", metavar="ID")
    rl.add_argument("--by", metavar="NAME", default=None, help="who releases (default: you)")
    rl.add_argument(
        "--force",
        action="store_true",
        help="release a message held as a virus (administrators only)",
    )
    rl.set_defaults(func=_release)

    rm = qsub.add_parser("delete", help="delete a quarantined message for good")
    add_config_option(rm)
    rm.add_argument("queue_id", metavar="ID")
    rm.add_argument("--by", metavar="NAME", default=None, help="who deletes (default: you)")
    rm.set_defaults(func=_delete)


def _open(args: argparse.Namespace, *, log: bool = False) -> tuple[Config, Quarantine]:
    cfg = load_config(args.config)
    if log:  # operator actions are events (unbuffered: this process exits right after)
        set_sink(JsonLinesSink(str(cfg.events_path), buffered=False))
    return cfg, Quarantine(cfg.quarantine_path, cfg.quarantine)


def _who(args: argparse.Namespace) -> str:
    if args.by:
        return str(args.by)
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _ts(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _list(args: argparse.Namespace) -> int:
    _, q = _open(args)
    entries = q.entries(status=None if args.all else "held")
    if args.json:
        for e in entries:
            print(json.dumps(e.to_json(), ensure_ascii=False))
        return EXIT_OK
    if not entries:
        print("Quarantine is empty")
        return EXIT_OK
    print(f"{'-Queue ID-':<22} {'kind':<5} {'dir':<8} {'score':>6} {'--Received--':<19} reason")
    for e in entries:
        mark = "" if e.status == "held" else f" [{e.status} by {e.released_by}]"
        print(
            f"{e.queue_id:<22} {e.kind:<5} {e.direction:<8} {e.score:>6.2f} "
            f"{_ts(e.received_at):<19} {escape(e.reason)[:120]}{mark}"
        )
        sender = escape(e.sender) or "<>"
        print(f"{'':<22} from {sender} to {escape(', '.join(e.recipients))[:200]}")
    print(f"-- {len(entries)} message(s)")
    return EXIT_OK


def _entry_lines(e: Entry) -> list[str]:
    lines = [
        f"{'queue_id':<12} {e.queue_id}",
        f"{'status':<12} {e.status}"
        + (f" by {escape(e.released_by or '?')} at {_ts(e.released_at)}" if e.released_at else ""),
        f"{'kind':<12} {e.kind}" + ("  (release-protected: --force)" if e.kind == "virus" else ""),
        f"{'direction':<12} {e.direction}",
        f"{'sender':<12} {escape(e.sender) or '<>'}",
        *(f"{'recipient':<12} {escape(r)}" for r in e.recipients),
        f"{'client':<12} {e.client_ip}",
        f"{'message_id':<12} {escape(e.message_id)}",
        f"{'size':<12} {e.size}",
        f"{'received':<12} {_ts(e.received_at)}",
        f"{'expires':<12} {_ts(e.expires_at)}",
        f"{'verdict':<12} {e.action}, score {e.score:.2f}, control {e.control or '-'}",
        f"{'reason':<12} {escape(e.reason)}",
    ]
    for name, score, detail in e.symbols:
        lines.append(f"{'symbol':<12} {name} {score:.2f} {escape(detail)}".rstrip())
    return lines


def _show(args: argparse.Namespace) -> int:
    cfg, q = _open(args)
    try:
        entry = q.entry(args.queue_id)
    except UnknownQuarantineId as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    view = None
    if entry.status == "held":
        try:
            view = summarize(q.read(entry.queue_id).data, cfg.quarantine.show_text_limit)
        except QuarantineError as exc:
            print(f"mailwarden: {exc}", file=sys.stderr)
            return EXIT_FAIL
    if args.json:
        out = entry.to_json()
        out["message"] = view.to_json() if view else None
        print(json.dumps(out, ensure_ascii=False, indent=2))
        return EXIT_OK
    print("\n".join(_entry_lines(entry)))
    if view is None:
        return EXIT_OK
    print("\n-- headers")
    for name, value in view.headers:
        print(f"{name}: {value}")
    for path, text, cut in view.text_parts:
        print(f"\n-- text part {path} (text/plain{', truncated' if cut else ''})")
        print(text.rstrip("\n"))
    print("\n-- attachments and other parts (not shown)")
    if not view.attachments:
        print("(none)")
    for a in view.attachments:
        name = a.filename if a.filename is not None else "(no name)"
        print(f"{a.path:<8} {a.size:>10} bytes  {a.content_type:<32} {name}", end="")
        print(f"  [looks like {a.sniffed}]")
    if view.defects:
        print(f"\n-- MIME defects: {', '.join(view.defects)}")
    return EXIT_OK


def _release(args: argparse.Namespace) -> int:
    cfg, q = _open(args, log=True)
    spool = Spool(cfg.spool_path, shard=RELEASE_SHARD)
    try:
        entry = asyncio.run(q.release(args.queue_id, spool, by=_who(args), force=args.force))
    except UnknownQuarantineId as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except ReleaseProtected as exc:
        print(f"mailwarden: refused: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except QuarantineError as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        spool.close()
    print(
        f"{entry.queue_id}: released by {entry.released_by} to "
        f"{len(entry.recipients)} recipient(s); queued for delivery"
    )
    return EXIT_OK


def _delete(args: argparse.Namespace) -> int:
    _, q = _open(args, log=True)
    try:
        q.delete(args.queue_id, by=_who(args))
    except UnknownQuarantineId as exc:
        print(f"mailwarden: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(f"{args.queue_id}: deleted")
    return EXIT_OK

"""``mailwarden status``: is mail being scanned, and how full are the queue and quarantine.

Prints the configured scanners and says plainly when virus scanning is limited to the
built-in signatures (no clamd configured). With clamd configured it asks ``VERSION`` and
shows the signature database version, date and age, with an alert when it is older than
``signature_alert_age`` and a FAIL CLOSED line past ``max_signature_age`` (SU-5: every
message is then tempfailed). rspamd is pinged. A PostgreSQL ``[database]`` is asked for
``SELECT 1``, bounded like every CLI command (``cli.dbaccess``): while it does not answer
it is shown UNAVAILABLE with the driver's first line (a running gateway then tempfails
what needs it). Then the queue (per state) and the quarantine (held per kind).
``--json`` prints one object.

Exit codes: 0 scanning works and the database answers, 1 a configured scanner is down, its
signatures are too old or the database is unavailable (mail is being refused with ``451``),
2 usage or configuration error.

Public names: ``register``, ``collect``.
Security: operator command; connects only to the configured clamd and rspamd addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from typing import Any

from mailwarden.cli.dbaccess import probe
from mailwarden.cli.main import EXIT_FAIL, EXIT_OK, add_config_option
from mailwarden.config import Config, load_config
from mailwarden.quarantine.store import Quarantine
from mailwarden.queue import manage
from mailwarden.scan.clamav import ClamdError, ClamdScanner
from mailwarden.scan.factory import scanner_labels, scanning_notice
from mailwarden.scan.rspamd import RspamdScanner
from mailwarden.store.db import store_label


def register(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="scanners, signature age, queue and quarantine counts",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    add_config_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_status)


async def _clamav(cfg: Config) -> dict[str, Any]:
    settings = cfg.scan.clamav
    out: dict[str, Any] = {"socket": settings.socket}
    scanner = ClamdScanner(settings)
    try:
        status = await scanner.signature_status(refresh=True)
    except ClamdError as exc:
        out |= {"ok": False, "error": str(exc)}
        return out
    age = status.age
    out |= {
        "engine": status.engine,
        "db_version": status.db_version,
        "db_time": status.db_time,
        "age_hours": None if age is None else round(age / 3600, 2),
        "stale": age is None or age > settings.signature_alert_age,
        "fail_closed": age is None or age > settings.max_signature_age,
        "alert_hours": round(settings.signature_alert_age / 3600, 2),
        "max_hours": round(settings.max_signature_age / 3600, 2),
    }
    out["ok"] = not out["fail_closed"]
    return out


async def _rspamd(cfg: Config) -> dict[str, Any]:
    scanner = RspamdScanner(cfg.scan.rspamd)
    try:
        ok = await scanner.ping()
    finally:
        await scanner.aclose()
    return {"url": cfg.scan.rspamd.url, "ok": ok}


def collect(cfg: Config) -> dict[str, Any]:
    """Everything ``mailwarden status`` reports, as data."""
    scan: dict[str, Any] = {
        "scanners": scanner_labels(cfg.scan),
        "limited": scanning_notice(cfg.scan),
    }
    if cfg.scan.clamav.socket:
        scan["clamav"] = asyncio.run(_clamav(cfg))
    if cfg.scan.rspamd.url:
        scan["rspamd"] = asyncio.run(_rspamd(cfg))
    states: Counter[str] = Counter()
    if cfg.spool_path.exists():
        states.update(e.state for e in manage.list_queue(cfg.spool_path))
    held: dict[str, int] = {}
    if cfg.quarantine_path.exists():
        q = Quarantine(cfg.quarantine_path, cfg.quarantine)
        held = q.index.counts()
        q.close()
    error = probe(cfg)
    database: dict[str, Any] = {
        "url": store_label(cfg),
        "ok": error is None,
    }
    if error is not None:
        database["error"] = error
    return {
        "hostname": cfg.gateway.hostname,
        "scan": scan,
        "database": database,
        "queue": {"total": sum(states.values()), **dict(states)},
        "quarantine": {"held": sum(held.values()), **held},
    }


def _lines(info: dict[str, Any]) -> list[str]:
    scan = info["scan"]
    lines = [f"mailwarden status ({info['hostname']})"]
    lines.append(f"  scanners   {', '.join(scan['scanners']) or '(none: all mail is tempfailed)'}")
    if scan["limited"]:
        lines.append(f"  WARNING    {scan['limited']}")
    clam = scan.get("clamav")
    if clam is not None:
        if "error" in clam:
            lines.append(f"  clamav     DOWN: {clam['error']} (mail is refused with 451)")
        else:
            age = clam["age_hours"]
            age_text = "unknown age" if age is None else f"{age:.1f} h old"
            lines.append(
                f"  clamav     {clam['engine']}, signatures version {clam['db_version']}, "
                f"{age_text}"
            )
            if clam["fail_closed"]:
                lines.append(
                    f"  ALERT      signatures older than {clam['max_hours']:g} h: FAIL CLOSED, "
                    "all mail is refused with 451 until they are updated (SU-5)"
                )
            elif clam["stale"]:
                lines.append(
                    f"  ALERT      signatures older than {clam['alert_hours']:g} h: update them "
                    f"(mail is refused past {clam['max_hours']:g} h, SU-5)"
                )
    rsp = scan.get("rspamd")
    if rsp is not None:
        state = "ok" if rsp["ok"] else "DOWN (mail is refused with 451)"
        lines.append(f"  rspamd     {rsp['url']}: {state}")
    db = info["database"]
    if db["ok"]:
        lines.append(f"  database   {db['url']}: ok")
    else:
        lines.append(
            f"  database   {db['url']}: UNAVAILABLE: {db['error']} (registered servers, AUTH "
            "and database lookups are answered with 4xx)"
        )
    queue = info["queue"]
    parts = ", ".join(f"{k} {v}" for k, v in sorted(queue.items()) if k != "total")
    lines.append(f"  queue      {queue['total']} message(s)" + (f" ({parts})" if parts else ""))
    quar = info["quarantine"]
    parts = ", ".join(f"{k} {v}" for k, v in sorted(quar.items()) if k != "held")
    lines.append(f"  quarantine {quar['held']} held" + (f" ({parts})" if parts else ""))
    return lines


def _status(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    info = collect(cfg)
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=2))
    else:
        print("\n".join(_lines(info)))
    scan = info["scan"]
    failing = any(not scan[k]["ok"] for k in ("clamav", "rspamd") if k in scan)
    failing = failing or not info["database"]["ok"]
    return EXIT_FAIL if failing else EXIT_OK

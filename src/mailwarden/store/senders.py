"""Registered sending servers (SU-1): add, list, remove, and load them for the policy cache.

A registered sender is a network (one address is a /32 or /128) with a name, the domains
it may use as envelope senders, who added it and when. ``add_sender`` refuses a network
that does not lie inside the campus networks (SU-3) with a message saying so.

Public names: ``RegisteredSender``, ``parse_network``, ``add_sender``, ``list_senders``,
``remove_sender``.
Security: operator input (CLI); networks are parsed strictly with ``ipaddress`` and domains
validated; the stored form is canonical so lookups cannot be fooled by spelling. Names
longer than the column (``MAX_NAME``) are refused here, the same on SQLite (which would
store them) and PostgreSQL (which would fail); ``added_by`` is cut to fit.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from mailwarden.errors import StoreError
from mailwarden.store.db import Store, bump_serial
from mailwarden.store.schema import SENDERS_SERIAL, senders

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_DOMAINS = 1000  # domains per registered sender
MAX_NAME = 200  # characters of name and added_by (the columns' length)
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9-]{1,63}$")


@dataclass(frozen=True, slots=True)
class RegisteredSender:
    """One registered sending server (or network of them)."""

    network: IPNetwork
    name: str
    domains: tuple[str, ...]  # envelope-sender domains it may use
    added_by: str = ""
    added_at: float = 0.0
    source: str = "database"  # "database" or "config"

    def to_json(self) -> dict[str, Any]:
        return {
            "network": str(self.network),
            "name": self.name,
            "domains": list(self.domains),
            "added_by": self.added_by,
            "added_at": self.added_at,
            "source": self.source,
        }


def parse_network(text: str) -> IPNetwork:
    """``"192.0.2.7"``, ``"192.0.2.0/24"`` or ``"2001:db8::/48"`` -> canonical network.

    Host bits set in a CIDR are an error (``192.0.2.7/24`` is ambiguous)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise StoreError(f"not an IP address or CIDR network: {text!r} ({exc})") from exc


def _domains(values: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    for value in values:
        d = value.strip().lower().rstrip(".")
        if not _DOMAIN.match(d):
            raise StoreError(f"not a domain name: {value!r}")
        if d not in out:
            out.append(d)
    if len(out) > MAX_DOMAINS:
        raise StoreError(f"too many domains (at most {MAX_DOMAINS})")
    return tuple(out)


def outside_campus(network: IPNetwork, campus: Sequence[IPNetwork]) -> bool:
    """True when ``network`` is not wholly inside one of the campus networks (SU-3)."""
    return not any(
        c.version == network.version and network.subnet_of(c)  # type: ignore[arg-type]
        for c in campus
    )


def add_sender(
    store: Store,
    network: str,
    *,
    name: str,
    domains: Sequence[str],
    campus: Sequence[IPNetwork],
    added_by: str = "",
) -> RegisteredSender:
    """Register a sending server; raise ``StoreError`` if it is off campus (SU-3),
    malformed, or already registered."""
    net = parse_network(network)
    doms = _domains(domains)
    if not doms:
        raise StoreError("a registered sender needs at least one domain (--domain)")
    if outside_campus(net, campus):
        raise StoreError(
            f"{net} is not inside the campus networks "
            f"({', '.join(str(c) for c in campus) or 'none configured'}): a registered "
            "sender must be on a campus network (SU-3); fix the address or "
            "[policy] campus_networks"
        )
    name = name.strip()
    if len(name) > MAX_NAME or not name.isprintable():
        raise StoreError(f"the name must be printable and at most {MAX_NAME} characters")
    added_by = "".join(ch for ch in added_by if ch.isprintable())[:MAX_NAME]
    now = time.time()
    row = RegisteredSender(net, name, doms, added_by, now)
    try:
        with store.engine.begin() as conn:
            conn.execute(
                senders.insert().values(
                    network=str(net),
                    name=row.name,
                    domains=list(doms),
                    added_by=added_by,
                    added_at=now,
                )
            )
            bump_serial(conn, SENDERS_SERIAL)
    except IntegrityError as exc:
        raise StoreError(f"{net} is already registered (remove it first)") from exc
    return row


def list_senders(store: Store) -> list[RegisteredSender]:
    """Every registered sender in the database, IPv4 then IPv6, in address order."""
    with store.engine.connect() as conn:
        rows = conn.execute(select(senders)).mappings().all()
    out = [
        RegisteredSender(
            ipaddress.ip_network(r["network"]),
            r["name"],
            tuple(r["domains"] or ()),
            r["added_by"],
            float(r["added_at"]),
        )
        for r in rows
    ]
    # Numeric order (IPv4 first), not the text collation of whichever database it is.
    return sorted(out, key=lambda s: (s.network.version, s.network))


def remove_sender(store: Store, network: str) -> bool:
    """Remove the sender registered as exactly ``network``; False if there was none."""
    net = parse_network(network)
    with store.engine.begin() as conn:
        n = conn.execute(delete(senders).where(senders.c.network == str(net))).rowcount
        if n:
            bump_serial(conn, SENDERS_SERIAL)
    return bool(n)

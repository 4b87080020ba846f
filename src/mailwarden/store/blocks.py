"""Blocked client addresses (CP-E2): the harvest defence adds them, operators list and
remove them (``mailwarden blocks``). A block is active while ``until`` is in the future.

Public names: ``Block``, ``add_block``, ``list_blocks``, ``remove_block``,
``active_blocks``, ``purge_expired``.
``add_block`` is one ``INSERT ... ON CONFLICT DO UPDATE`` (SQLite and PostgreSQL): two
gateway workers blocking the same address at once both succeed, and the later ``until``
wins whatever the order.

Security: client addresses come from SMTP peers (via the harvest defence) or operators;
they are canonicalised with ``ipaddress`` before storage and lookup, reasons are cut to
``MAX_REASON`` characters.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from mailwarden.errors import StoreError
from mailwarden.store.db import Store, bump_serial
from mailwarden.store.schema import BLOCKS_SERIAL, blocks

MAX_REASON = 500  # characters of reason kept


@dataclass(frozen=True, slots=True)
class Block:
    address: str
    reason: str
    until: float
    created: float

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "reason": self.reason,
            "until": self.until,
            "created": self.created,
        }


def canonical_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError as exc:
        raise StoreError(f"not an IP address: {text!r}") from exc


def add_block(store: Store, address: str, reason: str, until: float) -> Block:
    """Block ``address`` until ``until`` (epoch seconds); an existing block is extended."""
    addr = canonical_ip(address)
    now = time.time()
    reason = reason[:MAX_REASON]
    dialect = postgresql if store.engine.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(blocks).values(address=addr, reason=reason, until=until, created=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=[blocks.c.address],
        set_={
            "reason": stmt.excluded.reason,
            "until": case(
                (stmt.excluded.until > blocks.c.until, stmt.excluded.until),
                else_=blocks.c.until,
            ),
            "created": stmt.excluded.created,
        },
    )
    with store.engine.begin() as conn:
        conn.execute(stmt)
        bump_serial(conn, BLOCKS_SERIAL)
    return Block(addr, reason, until, now)


def list_blocks(store: Store, *, include_expired: bool = False) -> list[Block]:
    now = time.time()
    q = select(blocks)
    if not include_expired:
        q = q.where(blocks.c.until > now)
    with store.engine.connect() as conn:
        rows = conn.execute(q).mappings().all()
    out = [Block(r["address"], r["reason"], float(r["until"]), float(r["created"])) for r in rows]
    return sorted(out, key=_ip_order)  # numeric order, not the server's text collation


def _ip_order(b: Block) -> tuple[int, int]:
    ip = ipaddress.ip_address(b.address)
    return ip.version, int(ip)


def active_blocks(store: Store) -> dict[str, float]:
    """Address -> until, for every block still in force (the policy's cache)."""
    return {b.address: b.until for b in list_blocks(store)}


def remove_block(store: Store, address: str) -> bool:
    addr = canonical_ip(address)
    with store.engine.begin() as conn:
        n = conn.execute(delete(blocks).where(blocks.c.address == addr)).rowcount
        bump_serial(conn, BLOCKS_SERIAL)
    return bool(n)


def purge_expired(store: Store) -> int:
    with store.engine.begin() as conn:
        n = conn.execute(delete(blocks).where(blocks.c.until <= time.time())).rowcount
        if n:
            bump_serial(conn, BLOCKS_SERIAL)
    return int(n or 0)

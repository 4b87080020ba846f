"""Blocked client addresses (CP-E2): the harvest defence adds them, operators list and
remove them (``mailwarden blocks``). A block is active while ``until`` is in the future.

Public names: ``Block``, ``add_block``, ``list_blocks``, ``remove_block``,
``active_blocks``, ``purge_expired``.
Security: addresses are canonicalised with ``ipaddress`` before storage and lookup.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select

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
    with store.engine.begin() as conn:
        old = conn.execute(select(blocks.c.until).where(blocks.c.address == addr)).scalar()
        if old is None:
            conn.execute(
                blocks.insert().values(address=addr, reason=reason, until=until, created=now)
            )
        else:
            conn.execute(
                blocks.update()
                .where(blocks.c.address == addr)
                .values(reason=reason, until=max(until, float(old)), created=now)
            )
        bump_serial(conn, BLOCKS_SERIAL)
    return Block(addr, reason, until, now)


def list_blocks(store: Store, *, include_expired: bool = False) -> list[Block]:
    now = time.time()
    q = select(blocks).order_by(blocks.c.address)
    if not include_expired:
        q = q.where(blocks.c.until > now)
    with store.engine.connect() as conn:
        rows = conn.execute(q).mappings().all()
    return [Block(r["address"], r["reason"], float(r["until"]), float(r["created"])) for r in rows]


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

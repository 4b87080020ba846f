"""Directory-harvest defence (CP-E2): tarpit, disconnect, and blocks across sessions.

Per session, counted by the SMTP edge in ``session.invalid_recipients``: past
``harvest_soft_limit`` invalid recipients each further refusal is delayed (a growing
tarpit: ``tarpit_delay`` times the number past the limit, at most ``tarpit_max``, awaited
with ``asyncio.sleep`` so the loop never blocks); at ``harvest_hard_limit`` the answer is
``421 4.7.0`` and the connection is closed. Per client address across sessions, unknown
recipients are counted in the ``CounterStore`` over ``harvest_window``; at
``harvest_threshold`` the address is blocked for ``block_duration`` (``BlockList``: in
memory for the connect check, written to the database's ``blocks`` table in the
background so operators see it in ``mailwarden blocks list`` and other nodes pick it up).
A recipient listed in ``honeypots`` blocks its client at once. Registered servers and
authenticated users are never blocked (they still get the per-session limits).

Public names: ``BlockList``, ``HarvestGuard``, ``HARVEST_KEY``.
Security: handles untrusted recipients; never reveals which addresses exist beyond the
``550 5.1.1`` the SMTP standard requires; blocks by socket peer address only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mailwarden.core.controls import Control
from mailwarden.core.events import emit
from mailwarden.core.types import Action, Decision, Session
from mailwarden.policy.clients import Client, ClientKind
from mailwarden.policy.counters import CounterStore

if TYPE_CHECKING:
    from mailwarden.policy.settings import PolicySettings

HARVEST_KEY = "harvest:"  # counter key prefix, followed by the client address

UNKNOWN_USER = Decision(
    Action.REJECT, "Recipient address rejected: user unknown", code=550, enhanced="5.1.1"
)
TOO_MANY_INVALID = Decision(
    Action.DISCONNECT,
    "Too many invalid recipients, closing connection",
    Control.CP_E2,
    code=421,
    enhanced="4.7.0",
)


class BlockList:
    """Blocked client addresses -> until (epoch seconds). ``on_block`` persists a new block."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._pending: dict[str, float] = {}  # added here, not yet confirmed by the database
        self.on_block: Callable[[str, str, float], None] | None = None

    def blocked_until(self, ip: str) -> float | None:
        until = self._until.get(ip)
        if until is None:
            return None
        if until <= time.time():
            del self._until[ip]
            return None
        return until

    def add(self, ip: str, reason: str, until: float) -> None:
        self._until[ip] = max(until, self._until.get(ip, 0.0))
        if self.on_block is not None:
            self._pending[ip] = until
            self.on_block(ip, reason, until)

    def persisted(self, ip: str) -> None:
        """The database now holds the block of ``ip``."""
        self._pending.pop(ip, None)

    def replace(self, blocks: dict[str, float]) -> None:
        """Take the database's view (a removal there lifts the block here), keeping blocks
        added here that the database has not confirmed yet."""
        merged = dict(blocks)
        for ip, until in self._pending.items():
            merged[ip] = max(until, merged.get(ip, 0.0))
        self._until = merged

    def __len__(self) -> int:
        return len(self._until)


class HarvestGuard:
    """Turns an unknown recipient into the right refusal and keeps the counts."""

    def __init__(self, settings: PolicySettings, counters: CounterStore, blocks: BlockList):
        self.s = settings
        self.counters = counters
        self.blocks = blocks
        self.honeypots = frozenset(settings.honeypots)
        block_code = int(settings.block_reply)
        self.blocked = Decision(
            Action.DISCONNECT if block_code == 421 else Action.REJECT,
            "Client address blocked: too many invalid recipients, try again later",
            Control.CP_E2,
            code=block_code,
            enhanced="4.7.0" if block_code == 421 else "5.7.1",
        )

    def check_connect(self, ip: str) -> Decision | None:
        return self.blocked if self.blocks.blocked_until(ip) is not None else None

    def is_honeypot(self, address: str) -> bool:
        return bool(self.honeypots) and address.lower() in self.honeypots

    async def invalid(self, session: Session, client: Client, address: str) -> Decision:
        """The client named a recipient that does not exist (or a honeypot)."""
        n = session.invalid_recipients + 1  # this one included (the edge counts it after)
        s = self.s
        blockable = client.kind in (ClientKind.OFF_CAMPUS, ClientKind.CAMPUS)
        if blockable and self.is_honeypot(address):
            self._block(session, client.ip, "honeypot address", address)
            return self.blocked_now()
        if blockable:
            key = HARVEST_KEY + client.ip
            total = await self.counters.incr(key, s.harvest_window)
            if total >= s.harvest_threshold:
                await self.counters.delete(key)
                self._block(session, client.ip, f"{total} invalid recipients", address)
                return self.blocked_now()
        if n >= s.harvest_hard_limit:
            emit(
                "policy.harvest_disconnect",
                session=session.session_id,
                client=client.ip,
                invalid=n,
                control=Control.CP_E2,
            )
            return TOO_MANY_INVALID
        if n > s.harvest_soft_limit:
            delay = min(s.tarpit_delay * (n - s.harvest_soft_limit), s.tarpit_max)
            emit(
                "policy.tarpit",
                session=session.session_id,
                client=client.ip,
                invalid=n,
                delay=round(delay, 3),
                control=Control.CP_E2,
            )
            if delay > 0:
                await asyncio.sleep(delay)
        return UNKNOWN_USER

    def blocked_now(self) -> Decision:
        """The refusal for the RCPT that triggered a block: 421 and close."""
        return Decision(
            Action.DISCONNECT, self.blocked.reason, Control.CP_E2, code=421, enhanced="4.7.0"
        )

    def _block(self, session: Session, ip: str, reason: str, address: str) -> None:
        until = time.time() + self.s.block_duration
        self.blocks.add(ip, reason, until)
        emit(
            "policy.block",
            session=session.session_id,
            client=ip,
            reason=reason,
            recipient=address,
            until=until,
            control=Control.CP_E2,
        )

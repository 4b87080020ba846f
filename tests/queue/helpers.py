"""Test helpers for the queue stage: snapshots, messages and a scripted router.

``ScriptedRouter`` is a test double of ``delivery.router.Router`` for faults that a real
peer cannot produce on demand ("defer 3 times then succeed"); it counts concurrent calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mailwarden.core.types import (
    DeliveryStatus,
    Direction,
    EnvelopeSnapshot,
    RecipientResult,
    new_queue_id,
)
from mailwarden.delivery.base import DeliveryItem


def make_snapshot(
    recipients: Sequence[str] = ("alice@example.edu",),
    *,
    mail_from: str = "sender@example.org",
    received_at: float | None = None,
    is_bounce: bool = False,
    queue_id: str | None = None,
) -> EnvelopeSnapshot:
    qid = queue_id or new_queue_id()
    return EnvelopeSnapshot(
        queue_id=qid,
        mail_from=mail_from,
        recipients=tuple(recipients),
        received_at=time.time() if received_at is None else received_at,
        client_ip="192.0.2.10",
        client_helo="client.example.org",
        direction=Direction.INBOUND,
        message_id=f"<{qid}@example.org>",
        size=100,
        session_id="s1",
        is_bounce=is_bounce,
    )


def make_message(subject: str = "hello", body: str = "Hello there.\r\n") -> bytes:
    return (
        f"From: Sender <sender@example.org>\r\nTo: alice@example.edu\r\n"
        f"Subject: {subject}\r\nMessage-ID: <m1@example.org>\r\n\r\n{body}"
    ).encode()


Script = Callable[[str, int], DeliveryStatus]  # (recipient, attempt number) -> status


def result_for(
    rcpt: str, status: DeliveryStatus, host: str = "mx.test[127.0.0.1]"
) -> RecipientResult:
    code, enh, text = {
        DeliveryStatus.DELIVERED: (250, "2.0.0", "ok"),
        DeliveryStatus.DEFERRED: (451, "4.4.1", "try again later"),
        DeliveryStatus.BOUNCED: (550, "5.1.1", "no such user"),
    }[status]
    return RecipientResult(rcpt, status, code, enh, text, remote_host=host)


@dataclass
class ScriptedRouter:
    """Delivers by script; records every call and the peak concurrency per destination."""

    script: Script = lambda rcpt, attempt: DeliveryStatus.DELIVERED
    delay: float = 0.0
    calls: list[DeliveryItem] = field(default_factory=list)
    results: list[RecipientResult] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    peak_total: int = 0
    gate: asyncio.Event | None = None  # when set, deliveries wait for it

    def destination(self, recipient: str) -> str:
        return "dest:" + recipient.rpartition("@")[2].lower()

    async def deliver(self, item: DeliveryItem) -> list[RecipientResult]:
        self.calls.append(item)
        dest = item.destination
        self.active[dest] = self.active.get(dest, 0) + 1
        self.peak[dest] = max(self.peak.get(dest, 0), self.active[dest])
        self.peak_total = max(self.peak_total, sum(self.active.values()))
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            out = []
            for rcpt in item.recipients:
                n = self.attempts[rcpt] = self.attempts.get(rcpt, 0) + 1
                out.append(result_for(rcpt, self.script(rcpt, n)))
            self.results.extend(out)
            return out
        finally:
            self.active[dest] -= 1

    def delivered(self) -> list[str]:
        """Recipients delivered, one entry per delivery (duplicates show up twice)."""
        return [r.recipient for r in self.results if r.status is DeliveryStatus.DELIVERED]

"""The delivery interface: one item in, one result per recipient out.

Public names: ``DeliveryItem``, ``Transport``.
Security: ``DeliveryItem`` carries untrusted envelope addresses; every transport must refuse
CR, LF and NUL in them (SMTP command injection) before talking to a server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mailwarden.core.types import EnvelopeSnapshot, RecipientResult


@dataclass(frozen=True, slots=True)
class DeliveryItem:
    """One delivery attempt: a message and the recipients that share one destination."""

    queue_id: str
    mail_from: str  # "" for the null sender
    recipients: tuple[str, ...]
    destination: str  # the key ``Router.destination`` returned for these recipients
    message: bytes  # wire format: CRLF line ends, not dot-stuffed
    snapshot: EnvelopeSnapshot


class Transport(Protocol):
    """A way to hand a message to the next hop. One method."""

    async def deliver(self, item: DeliveryItem) -> list[RecipientResult]:
        """Return exactly one result per recipient of ``item``; never raise for a
        remote or network failure (that is a DEFERRED or BOUNCED result)."""
        ...

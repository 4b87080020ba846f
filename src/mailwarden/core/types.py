"""Session, envelope and decision types shared by all stages.

``Session`` lives for one SMTP connection, ``Envelope`` for one mail transaction; the queue
stores an ``EnvelopeSnapshot`` (frozen, JSON-serialisable). Policy answers with a
``Decision`` (data, not exceptions); one function in ``smtp.reply`` maps it to the wire.

Public names: ``Direction``, ``Action``, ``Decision``, ``TLSInfo``, ``Session``, ``Envelope``,
``EnvelopeSnapshot``, ``Symbol``, ``DeliveryStatus``, ``RecipientResult``, ``new_queue_id``,
``new_session_id``.
Security: holds untrusted client data (addresses, HELO names) verbatim; consumers must
escape it before logging or rendering (``core.events`` does).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from mailwarden.core.controls import Control


class Direction(StrEnum):
    """Which way a message flows through the gateway."""

    INBOUND = "inbound"  # from anywhere to a hosted (campus) domain
    OUTBOUND = "outbound"  # from a campus sender to the outside world


class Action(StrEnum):
    """What a policy check decided."""

    ACCEPT = "accept"
    REJECT = "reject"  # permanent: 5xx
    TEMPFAIL = "tempfail"  # transient: 4xx
    DISCONNECT = "disconnect"  # 421 and close
    CONTINUE = "continue"  # no opinion; ask the next rule


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy verdict as data: the action, a human reason and the control it enforces.

    ``code``/``enhanced`` override the default reply chosen by ``smtp.reply.reply_for``.
    """

    action: Action
    reason: str = ""
    control: Control | None = None
    code: int | None = None
    enhanced: str | None = None

    @staticmethod
    def accept(reason: str = "OK") -> Decision:
        return Decision(Action.ACCEPT, reason)

    @staticmethod
    def cont() -> Decision:
        return Decision(Action.CONTINUE)


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """What was negotiated on a TLS connection (for Received headers and delivery logs)."""

    version: str
    cipher: str
    bits: int | None = None

    def describe(self) -> str:
        bits = f" ({self.bits}/{self.bits} bits)" if self.bits else ""
        return f"version={self.version} cipher={self.cipher}{bits}"


_QID_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"  # no vowels: ids never spell words


def new_queue_id() -> str:
    """A unique, time-ordered queue id (like Postfix long queue ids), safe as a file name."""
    n = time.time_ns() // 1000
    out = []
    while n:
        n, r = divmod(n, len(_QID_ALPHABET))
        out.append(_QID_ALPHABET[r])
    return "".join(reversed(out)) + secrets.token_hex(3).upper()


def new_session_id() -> str:
    """A short random identifier that ties a connection's events together."""
    return secrets.token_hex(6)


@dataclass(slots=True)
class Session:
    """State of one SMTP connection (untrusted peer)."""

    peer_ip: str
    peer_port: int
    local_ip: str
    local_port: int
    listener: str  # name of the listener: "smtp", "submission", "smtps", ...
    session_id: str = field(default_factory=new_session_id)
    started: float = field(default_factory=time.time)
    helo: str | None = None
    esmtp: bool = False
    tls: TLSInfo | None = None
    auth_user: str | None = None
    reverse_name: str | None = None
    invalid_recipients: int = 0
    auth_failures: int = 0  # failed AUTH commands in this session (smtp.auth)
    transactions: int = 0


@dataclass(slots=True)
class Envelope:
    """One mail transaction in progress (MAIL FROM .. end of DATA)."""

    mail_from: str  # "" is the null reverse-path <>
    rcpt_to: list[str] = field(default_factory=list)
    mail_params: dict[str, str] = field(default_factory=dict)
    smtputf8: bool = False
    body: str = "7BIT"  # 7BIT or 8BITMIME
    declared_size: int | None = None
    direction: Direction = Direction.INBOUND
    results: list[Any] = field(default_factory=list)  # scanner symbols, policy notes


@dataclass(frozen=True, slots=True)
class EnvelopeSnapshot:
    """The frozen envelope the queue stores next to the message bytes."""

    queue_id: str
    mail_from: str
    recipients: tuple[str, ...]
    received_at: float
    client_ip: str
    client_helo: str
    direction: Direction
    message_id: str
    size: int
    smtputf8: bool = False
    body: str = "7BIT"
    auth_user: str | None = None
    session_id: str = ""
    # Set on a DSN we generated ourselves: never bounce a bounce.
    is_bounce: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["recipients"] = list(self.recipients)
        data["direction"] = self.direction.value
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> EnvelopeSnapshot:
        return EnvelopeSnapshot(
            queue_id=str(data["queue_id"]),
            mail_from=str(data["mail_from"]),
            recipients=tuple(str(r) for r in data["recipients"]),
            received_at=float(data["received_at"]),
            client_ip=str(data["client_ip"]),
            client_helo=str(data["client_helo"]),
            direction=Direction(data["direction"]),
            message_id=str(data["message_id"]),
            size=int(data["size"]),
            smtputf8=bool(data.get("smtputf8", False)),
            body=str(data.get("body", "7BIT")),
            auth_user=data.get("auth_user"),
            session_id=str(data.get("session_id", "")),
            is_bounce=bool(data.get("is_bounce", False)),
        )


@dataclass(frozen=True, slots=True)
class Symbol:
    """One finding of a content scanner (rspamd style): a name, a score, a detail.

    Scanners add symbols and never raise; a scanner that fails adds ``<NAME>_FAIL``.
    ``detail`` may quote untrusted content (a virus name, a file name): escape on output,
    and never put a detected sensitive value in it.
    """

    name: str
    score: float = 0.0
    detail: str = ""


class DeliveryStatus(StrEnum):
    """Outcome of one delivery attempt for one recipient."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"  # transient failure: retry later
    BOUNCED = "bounced"  # permanent failure: DSN to the sender


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What the next hop said about one recipient, with the facts the log needs."""

    recipient: str
    status: DeliveryStatus
    code: int  # SMTP reply code (or a synthetic 4xx/5xx for local errors)
    enhanced: str  # enhanced status code, e.g. "2.0.0"
    text: str  # reply text from the remote host or a local explanation
    remote_host: str = ""  # "mx.example.org[192.0.2.1]:25", "maildir", ...
    tls: TLSInfo | None = None

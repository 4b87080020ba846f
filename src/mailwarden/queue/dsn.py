"""Delivery status notifications (RFC 3464) for failed, expired and delayed mail.

``build_dsn(cfg, original, headers, recipients, action, now)`` returns the envelope and the
bytes of a ``multipart/report; report-type=delivery-status`` message (a human-readable text
part, a ``message/delivery-status`` part, the original headers as ``text/rfc822-headers``),
addressed to the envelope sender of ``original`` from the null sender ``<>``, or ``None``
when no DSN may be sent: never to the null sender, never about a DSN (RFC 3461 sect. 6.2,
RFC 5321 sect. 6.1: no bounce loops).

Public names: ``DsnRecipient``, ``build_dsn``, ``extract_headers``, ``MAX_RETURNED_HEADERS``.
Security: the original headers and remote reply texts are untrusted; control characters
are replaced before they become header fields, the original headers are returned only as an
opaque text part, truncated to ``MAX_RETURNED_HEADERS``.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import charset as email_charset
from email.generator import BytesGenerator
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import format_datetime, formataddr, make_msgid
from typing import Literal

from mailwarden.config import Config
from mailwarden.core.types import Direction, EnvelopeSnapshot, new_queue_id

MAX_RETURNED_HEADERS = 64 * 1024  # bytes of the original header block quoted in a DSN
MAX_DIAGNOSTIC = 900  # characters of a remote reply kept in Diagnostic-Code
DsnAction = Literal["failed", "delayed"]

_POLICY = compat32.clone(linesep="\r\n")  # wire format: CRLF line ends
_CTRL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    """One recipient reported in a DSN."""

    recipient: str
    status: str  # enhanced status code, e.g. "5.1.1"
    code: int  # SMTP reply code of the diagnostic (0: none)
    text: str  # diagnostic text (remote reply or local explanation)
    remote_host: str = ""  # "mx.example.org[192.0.2.1]:25", "maildir", ""


def _clean(value: str, limit: int = MAX_DIAGNOSTIC) -> str:
    return _CTRL.sub(" ", value).strip()[:limit]


def extract_headers(message: bytes) -> bytes:
    """The header block of a message (up to the first empty line), size-limited."""
    head = message[:MAX_RETURNED_HEADERS]
    for sep in (b"\r\n\r\n", b"\n\n"):
        idx = head.find(sep)
        if idx >= 0:
            return head[: idx + len(sep) // 2]
    return head


def _remote_mta(remote_host: str) -> str | None:
    host = remote_host.split("[", 1)[0].strip()
    if not host or "." not in host:
        return None
    return _clean(host, 255)


def _typed_address(addr: str) -> str:
    """``rfc822; addr``, or RFC 6533 ``utf-8; `` with non-ASCII as ``\\x{HEX}``."""
    addr = _clean(addr, 320)
    if addr.isascii():
        return f"rfc822; {addr}"
    return "utf-8; " + "".join(
        c if c.isascii() and c != "\\" else f"\\x{{{ord(c):X}}}" for c in addr
    )


def _rfc5322_date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def _human_text(
    cfg: Config,
    original: EnvelopeSnapshot,
    recipients: Sequence[DsnRecipient],
    action: DsnAction,
    retry_until: float | None,
) -> str:
    host = cfg.gateway.hostname
    lines = [f"This is the mail system at host {host}.", ""]
    if action == "failed":
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. The details are below.",
        ]
    else:
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered yet to the recipients below.",
        ]
        if retry_until is not None:
            lines.append(f"Delivery will be retried until {_rfc5322_date(retry_until)}.")
    lines += [
        "",
        f"Message-ID: {_clean(original.message_id, 300)}",
        f"Queue ID: {original.queue_id}",
        "",
    ]
    for r in recipients:
        detail = f"{r.code} {r.status} {_clean(r.text)}" if r.code else _clean(r.text)
        where = f" (host {_clean(r.remote_host, 255)})" if r.remote_host else ""
        lines.append(f"<{_clean(r.recipient, 320)}>{where}: {detail}")
    return "\r\n".join(lines) + "\r\n"


def _status_part(
    cfg: Config,
    original: EnvelopeSnapshot,
    recipients: Sequence[DsnRecipient],
    action: DsnAction,
    retry_until: float | None,
) -> MIMEBase:
    part = MIMEBase("message", "delivery-status")
    del part["MIME-Version"]
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {cfg.gateway.hostname}"
    per_message["X-Mailwarden-Queue-ID"] = original.queue_id
    if original.mail_from:
        per_message["X-Mailwarden-Sender"] = _typed_address(original.mail_from)
    per_message["Arrival-Date"] = _rfc5322_date(original.received_at)
    blocks = [per_message]
    for r in recipients:
        block = Message()
        block["Final-Recipient"] = _typed_address(r.recipient)
        block["Action"] = action
        block["Status"] = r.status
        mta = _remote_mta(r.remote_host)
        if mta:
            block["Remote-MTA"] = f"dns; {mta}"
        if r.code:
            block["Diagnostic-Code"] = f"smtp; {r.code} {r.status} {_clean(r.text)}"
        elif r.text:
            block["Diagnostic-Code"] = f"X-mailwarden; {_clean(r.text)}"
        if action == "delayed" and retry_until is not None:
            block["Will-Retry-Until"] = _rfc5322_date(retry_until)
        blocks.append(block)
    part.set_payload(list[Message | str](blocks))
    return part


def _headers_part(headers: bytes) -> MIMEBase:
    text = headers.decode("utf-8", "replace").replace("\r\n", "\n")
    if text.isascii():
        part = MIMEText(text, "rfc822-headers", "us-ascii")
    else:
        utf8 = email_charset.Charset("utf-8")
        utf8.body_encoding = email_charset.QP
        part = MIMEText(text, "rfc822-headers", utf8)  # type: ignore[arg-type]
    del part["MIME-Version"]
    return part


def build_dsn(
    cfg: Config,
    original: EnvelopeSnapshot,
    headers: bytes,
    recipients: Sequence[DsnRecipient],
    action: DsnAction,
    now: float | None = None,
    *,
    retry_until: float | None = None,
) -> tuple[EnvelopeSnapshot, bytes] | None:
    """A DSN about ``recipients`` of ``original``, or None if none may be sent."""
    if not original.mail_from or original.is_bounce or not recipients:
        return None
    now = time.time() if now is None else now
    host = cfg.gateway.hostname
    msg = MIMEMultipart("report", report_type="delivery-status")
    msg["From"] = formataddr(("Mail Delivery System", cfg.bounce_address))
    msg["To"] = f"<{_clean(original.mail_from, 320)}>"
    msg["Subject"] = (
        "Undelivered Mail Returned to Sender"
        if action == "failed"
        else "Delayed Mail (still being retried)"
    )
    msg["Date"] = _rfc5322_date(now)
    msg["Message-ID"] = make_msgid(idstring=original.queue_id, domain=host)
    msg["Auto-Submitted"] = "auto-replied"  # RFC 3834: never answered automatically
    msg.preamble = "This is a MIME-encapsulated message."
    human = _human_text(cfg, original, recipients, action, retry_until)
    text = MIMEText(human, "plain", "us-ascii" if human.isascii() else "utf-8")
    text["Content-Description"] = "Notification"
    del text["MIME-Version"]
    msg.attach(text)
    status = _status_part(cfg, original, recipients, action, retry_until)
    status["Content-Description"] = "Delivery report"
    msg.attach(status)
    orig = _headers_part(headers)
    orig["Content-Description"] = "Undelivered Message Headers"
    msg.attach(orig)
    buf = io.BytesIO()
    BytesGenerator(buf, policy=_POLICY).flatten(msg)
    data = buf.getvalue()
    sender_domain = original.mail_from.rpartition("@")[2]
    snapshot = EnvelopeSnapshot(
        queue_id=new_queue_id(),
        mail_from="",
        recipients=(original.mail_from,),
        received_at=now,
        client_ip="127.0.0.1",
        client_helo=host,
        direction=Direction.INBOUND if cfg.is_hosted(sender_domain) else Direction.OUTBOUND,
        message_id=str(msg["Message-ID"]),
        size=len(data),
        smtputf8=not original.mail_from.isascii(),
        body="8BITMIME" if not data.isascii() else "7BIT",
        session_id=original.session_id,
        is_bounce=True,
    )
    return snapshot, data

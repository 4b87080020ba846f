"""Helpers for the end-to-end tests: test messages, swaks, event matching, DSN parsing.

Security: builds test data only; swaks is pointed at 127.0.0.1 ports.
"""

from __future__ import annotations

import email
import email.policy
import itertools
import shutil
import subprocess
import uuid
from email.message import Message
from pathlib import Path
from typing import Any

from tests.support.maildir import body_of, header_value

SWAKS = shutil.which("swaks") or "/usr/bin/swaks"
_seq = itertools.count(1)


def new_message_id(tag: str = "e2e") -> str:
    return f"<{tag}-{next(_seq)}-{uuid.uuid4().hex[:12]}@client.test>"


# A body that exercises SMTP transparency: a leading dot, a lone dot with text, long-ish
# lines, trailing spaces, tabs and 8-bit-free punctuation.
SAMPLE_BODY = (
    b"Hello,\r\n"
    b".this line starts with a dot (dot-stuffing)\r\n"
    b"..two dots\r\n"
    b"\r\n"
    b"trailing spaces   \r\n"
    b"\ttab-indented line\r\n" + b"x" * 900 + b"\r\n"
    b"From the start of a line (mbox-style From)\r\n"
    b"end.\r\n"
)


def make_message(
    sender: str,
    recipients: list[str],
    *,
    message_id: str | None = None,
    subject: str = "e2e test",
    body: bytes = SAMPLE_BODY,
    extra_headers: dict[str, str] | None = None,
) -> tuple[str, bytes]:
    """(Message-ID, raw CRLF message)."""
    mid = message_id or new_message_id()
    headers = {
        "From": sender or "MAILER-DAEMON@client.test",
        "To": ", ".join(recipients),
        "Subject": subject,
        "Date": email.utils.formatdate(localtime=False),
        "Message-ID": mid,
        "MIME-Version": "1.0",
        "Content-Type": "text/plain; charset=us-ascii",
    } | dict(extra_headers or {})
    head = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
    return mid, head + b"\r\n" + body


def lf(data: bytes) -> bytes:
    """Normalise line ends to LF (Maildir stores LF)."""
    return data.replace(b"\r\n", b"\n")


def same_body(stored: bytes, sent: bytes) -> bool:
    """The body of a stored message equals the sent one, modulo CRLF/LF."""
    return lf(body_of(stored)).rstrip(b"\n") == lf(body_of(sent)).rstrip(b"\n")


def received_headers(raw: bytes) -> list[str]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [" ".join(str(v).split()) for v in msg.get_all("Received") or []]


def swaks(
    port: int, *args: str, data: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run swaks against 127.0.0.1:port; ``data`` (a raw message) is fed on stdin."""
    cmd = [SWAKS, "--server", f"127.0.0.1:{port}", "--helo", "swaks.client.test", *args]
    if data is not None:
        cmd += ["--data", "-"]
    return subprocess.run(
        cmd,
        input=data.decode() if data is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def is_deferred(ev: dict[str, Any]) -> bool:
    """An event that says a delivery attempt was deferred (``queue.deferred``, or a
    ``delivery.result`` whose status is deferred)."""
    name = str(ev.get("event", ""))
    return name == "queue.deferred" or (
        name == "delivery.result" and str(ev.get("status", "")).lower() == "deferred"
    )


def is_delivered(ev: dict[str, Any]) -> bool:
    return ev.get("event") == "delivery.result" and str(ev.get("status", "")).lower() in (
        "delivered",
        "sent",
    )


def dsn_parts(raw: bytes) -> tuple[Message, list[Message]]:
    """The DSN message and the header blocks of its message/delivery-status part
    (first block: per-message fields; then one per recipient), per RFC 3464."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    assert msg.get_param("report-type") == "delivery-status"
    status = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    assert len(status) == 1, "exactly one message/delivery-status part"
    payload = status[0].get_payload()
    if isinstance(payload, list):  # parsed as a list of header blocks
        blocks = payload
    else:
        blocks = [
            email.message_from_string(b, policy=email.policy.compat32)
            for b in str(payload).replace("\r\n", "\n").split("\n\n")
            if b.strip()
        ]
    return msg, blocks


def read_dsn(folder: Path) -> list[bytes]:
    from tests.support.maildir import maildir_messages

    return [m for m in maildir_messages(folder) if b"multipart/report" in m]


def mid_of(raw: bytes) -> str | None:
    return header_value(raw, "Message-ID")

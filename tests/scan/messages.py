"""Test messages for the scanning tests, built with the stdlib (wire format, CRLF).

``eicar()`` / ``gtube()`` assemble the test strings at run time (so no file in the repository
carries them), ``plain(body)``, ``with_attachment(data, filename, ctype)``, ``zip_of(files)``,
``ham()``, ``scan_input(raw, **envelope)``, ``ParseSpy(monkeypatch)``.
"""

from __future__ import annotations

import io
import zipfile
from email import policy
from email.message import EmailMessage

import pytest

from mailwarden.core.types import Direction
from mailwarden.scan import ScanInput, builtin

CLIENT_IP = "192.0.2.10"
HELO = "mail.example.org"
SENDER = "alice@example.org"
RCPT = "bob@example.edu"


def eicar() -> bytes:
    return b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def gtube() -> bytes:
    return b"XJS*C4JDBQADN1.NSBN3*2IDNEN*" + b"GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def marker() -> bytes:
    """The project's own test signature (contrib/clamav/sigs/daily.ndb)."""
    return b"MAILWARDEN-TEST-" + b"MALWARE-MARKER-5f0c2a"


def _base(subject: str, sender: str = SENDER, to: str = RCPT) -> EmailMessage:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = f"Alice Example <{sender}>"
    msg["To"] = f"Bob Example <{to}>"
    msg["Subject"] = subject
    msg["Date"] = "Mon, 23 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = f"<{abs(hash(subject))}.test@{HELO}>"
    return msg


def plain(body: str | bytes, subject: str = "A plain message") -> bytes:
    text = body.decode("ascii") if isinstance(body, bytes) else body
    msg = _base(subject)
    msg.set_content(text)
    return msg.as_bytes()


def with_attachment(
    data: bytes,
    filename: str,
    ctype: str = "application/octet-stream",
    subject: str = "Document attached",
    text: str = "Please see the attachment.\n",
) -> bytes:
    msg = _base(subject)
    msg.set_content(text)
    maintype, _, subtype = ctype.partition("/")
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def ham() -> bytes:
    return plain(
        "Hi Bob,\n\nthe minutes of Tuesday's faculty meeting are below. We agreed to move\n"
        "the seminar to room 204 and to review the lab schedule next week.\n\n"
        "Best regards,\nAlice\n",
        subject="Minutes of the faculty meeting",
    )


def scan_input(raw: bytes, direction: Direction = Direction.INBOUND, **kw: object) -> ScanInput:
    facts: dict[str, object] = {
        "queue_id": "TESTQID1",
        "client_ip": CLIENT_IP,
        "helo": HELO,
        "sender": SENDER,
        "recipients": (RCPT,),
        "direction": direction,
    }
    facts.update(kw)
    return ScanInput(raw=raw, **facts)  # type: ignore[arg-type]


class ParseSpy:
    """Counts the built-in scanner's calls of the full MIME parser (``builtin.parse``),
    which it still makes: tells whether a fast path took a message."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = builtin.parse

        def spy(raw: bytes) -> object:
            self.calls += 1
            return real(raw)

        monkeypatch.setattr(builtin, "parse", spy)

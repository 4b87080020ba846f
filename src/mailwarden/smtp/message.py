"""The message at the end of DATA: framing checks, dot-unstuffing, and the bytes we queue.

``data_problem(raw)`` checks the raw DATA octets (as received, dot-stuffed) for bare CR or
LF, NUL and over-long lines and returns a refusal reply or ``None``; ``unstuff(raw)``
removes the transparency dots (RFC 5321 4.5.2). All checks are C-speed bytes operations.

Public names: ``data_problem``, ``unstuff``.
Security: handles untrusted message bytes; the bare CR/LF refusal is the SMTP smuggling
defence (CVE-2023-51764 class): only ``CRLF.CRLF`` ends DATA and a message that carries any
other line ending is refused whole, so no second message can hide inside it.
"""

from __future__ import annotations

from mailwarden.smtp.limits import MAX_TEXT_LINE

SMUGGLING = (554, "5.6.0", "Message refused: bare CR or LF in message (SMTP smuggling defence)")
NUL_IN_DATA = (554, "5.6.0", "Message refused: NUL character in message")
LINE_TOO_LONG = (
    554,
    "5.6.0",
    f"Message refused: line longer than {MAX_TEXT_LINE - 2} characters (RFC 5321 4.5.3.1.6)",
)


def _has_long_line(raw: bytes) -> bool:
    """True if a CRLF line of ``raw`` is longer than ``MAX_TEXT_LINE`` with its CRLF.

    From a line start ``p``, a line that fits has its LF at most ``MAX_TEXT_LINE - 1``
    bytes on; the next start examined is after the *last* LF of that window (every line
    before it fits), so one C-speed ``rfind`` covers up to a kilobyte of short lines
    (splitting into line objects cost 40-80 us per 10 KB message)."""
    p, end = 0, len(raw)
    while p + MAX_TEXT_LINE <= end:
        q = raw.rfind(b"\n", p, p + MAX_TEXT_LINE)
        if q < 0:
            return True
        p = q + 1
    return False


def data_problem(raw: bytes) -> tuple[int, str, str] | None:
    """A refusal reply for framing violations in ``raw`` (CRLF-terminated lines), or None."""
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:
        return SMUGGLING
    if b"\x00" in raw:
        return NUL_IN_DATA
    if len(raw) > MAX_TEXT_LINE and _has_long_line(raw):
        return LINE_TOO_LONG
    return None


def unstuff(raw: bytes) -> bytes:
    """Remove the leading transparency dot of every line (``raw`` starts with CRLF, which is
    dropped: it stands for the end of the DATA command line)."""
    return raw.replace(b"\r\n.", b"\r\n")[2:]

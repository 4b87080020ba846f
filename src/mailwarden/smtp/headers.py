"""Header-section handling at the end of DATA: find it, count hops, read/add Message-ID,
build the ``Received:`` trace header (RFC 5321 4.4, RFC 3848 protocol names).

``header_end(msg, max_size)`` finds where the header section ends (robust to folded lines,
a missing header/body separator and hostile sizes); ``count_received`` and
``find_message_id`` read it; ``received_header`` and ``rfc5322_date`` build our trace data;
``add_headers`` assembles the message handed to the queue.

Public names: ``HeaderTooLarge``, ``header_end``, ``count_received``, ``find_message_id``,
``received_header``, ``rfc5322_date``, ``add_headers``.
Security: parses untrusted message bytes with anchored, linear regexes bounded by
``max_size``; client-supplied values put into our headers (HELO name) are reduced to a safe
character set so they cannot add header lines or comments.
"""

from __future__ import annotations

import re
import time

from mailwarden.core.types import TLSInfo


class HeaderTooLarge(ValueError):
    """The header section is larger than ``limits.max_header_size``."""


# A header section: field lines ("name:" value) each followed by any folded continuation
# lines. Field names are printable ASCII except ":" (RFC 5322 2.2); WSP before ":" is the
# obsolete syntax, still accepted. CR/LF framing was validated before this runs.
_FIELD = rb"[\x21-\x39\x3b-\x7e]+[ \t]*:[^\r\n]*\r\n"
_FOLD = rb"[ \t][^\r\n]*\r\n"
_SECTION = re.compile(rb"(?:" + _FIELD + rb"(?:" + _FOLD + rb")*)*")
_FIELD_LINE = re.compile(_FIELD)
_FOLD_LINE = re.compile(_FOLD)
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
_MESSAGE_ID = re.compile(
    rb"^message-id[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.IGNORECASE | re.MULTILINE
)
_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
MAX_MESSAGE_ID = 998  # characters of a Message-ID value kept for the envelope

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_date_cache: tuple[int, str] = (-1, "")


def header_end(msg: bytes, max_size: int) -> int:
    """Offset where the header section ends: at the empty separator line if there is one,
    else where the first non-header line starts (or the end of the message).

    Raises ``HeaderTooLarge`` if the section is longer than ``max_size`` octets.
    """
    limit = max_size + 1
    m = _SECTION.match(msg, 0, limit)
    end = m.end() if m else 0
    if end < len(msg) and msg[end : end + 2] != b"\r\n":
        nl = msg.find(b"\r\n", end)
        line_end = len(msg) if nl < 0 else nl + 2
        # A header line cut by the size limit: the section continues past ``max_size``.
        if line_end > limit and (
            _FIELD_LINE.match(msg, end) or (end > 0 and _FOLD_LINE.match(msg, end))
        ):
            raise HeaderTooLarge(f"header section exceeds {max_size} octets")
    if end > max_size:
        raise HeaderTooLarge(f"header section exceeds {max_size} octets")
    return end


def count_received(header: bytes) -> int:
    """How many ``Received:`` fields the header section holds (hop count)."""
    return len(_RECEIVED.findall(header))


def find_message_id(header: bytes) -> str | None:
    """The unfolded value of the first non-empty ``Message-ID:`` field, if any."""
    m = _MESSAGE_ID.search(header)
    if m is None:
        return None
    value = m.group(1).replace(b"\r\n", b"").strip().decode("utf-8", "replace")
    return value[:MAX_MESSAGE_ID] or None


def rfc5322_date(ts: float | None = None) -> str:
    """An RFC 5322 date in UTC (``Mon, 23 Nov 2026 10:00:00 +0000``), cached per second."""
    global _date_cache
    sec = int(time.time() if ts is None else ts)
    if _date_cache[0] == sec:
        return _date_cache[1]
    t = time.gmtime(sec)
    text = (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )
    _date_cache = (sec, text)
    return text


def received_header(
    *,
    helo: str,
    client_ip: str,
    reverse_name: str | None,
    hostname: str,
    protocol: str,
    queue_id: str,
    tls: TLSInfo | None,
    recipients: list[str],
    ts: float | None = None,
) -> bytes:
    """Our ``Received:`` field (folded, CRLF-terminated) for the top of the message."""
    helo_safe = _HELO_UNSAFE.sub("?", helo)[:255] or "unknown"
    ip = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    rdns = _HELO_UNSAFE.sub("?", reverse_name) if reverse_name else "unknown"
    lines = [
        f"Received: from {helo_safe} ({rdns} [{ip}])",
        f"\tby {hostname} (mailwarden) with {protocol} id {queue_id}",
    ]
    if tls is not None:
        lines.append(f"\t({tls.describe()})")
    date = rfc5322_date(ts)
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def add_headers(msg: bytes, end: int, received: bytes, message_id: bytes | None) -> bytes:
    """``received`` on top, ``message_id`` (a whole field) at the end of the header section.

    ``end`` is ``header_end(msg)``. When the message has a body but no separator line, one is
    added after the new field so the body is not taken for header text.
    """
    if message_id is None:
        return received + msg
    if end == len(msg) or msg[end : end + 2] == b"\r\n":
        return b"".join((received, msg[:end], message_id, msg[end:]))
    return b"".join((received, msg[:end], message_id, b"\r\n", msg[end:]))

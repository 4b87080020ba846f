"""A safe view of a quarantined message for ``mailwarden quarantine show``.

``summarize(data, text_limit)`` returns ``MessageView``: the header fields (names and
unfolded values, control characters escaped, each value cut), the ``text/plain`` parts
(decoded to text, control characters escaped, cut to ``text_limit`` characters) and every
other part as an attachment line (path, declared type, name, decoded size, and the first
bytes' real type). Nothing else is ever rendered: HTML, images, calendars and scripts are
listed, not shown.

Public names: ``MessageView``, ``PartInfo``, ``summarize``, ``escape``.
Security: the message is hostile. Parsing is the bounded walker of ``scan.mime`` (limits on
parts and depth); output is plain text with every non-printable character escaped, so a
header or body cannot move the terminal's cursor, change colours or hide lines.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from mailwarden.scan.mime import parse

MAX_HEADER_FIELDS = 200  # header fields listed
MAX_HEADER_VALUE = 998  # characters of one header value shown
MAX_HEADER_BYTES = 256 * 1024  # header bytes parsed for the list of fields
MAX_NAME = 200  # characters of an attachment name shown
_UNFOLD = re.compile(r"\r?\n[ \t]*")

_MAGIC = (
    (b"MZ", "Windows/DOS executable"),
    (b"\x7fELF", "ELF executable"),
    (b"%PDF", "PDF document"),
    (b"PK\x03\x04", "ZIP archive (or OOXML document)"),
    (b"\xd0\xcf\x11\xe0", "OLE2 document (legacy Office)"),
    (b"Rar!", "RAR archive"),
    (b"\x1f\x8b", "gzip data"),
    (b"7z\xbc\xaf", "7-Zip archive"),
    (b"#!", "script"),
    (b"\x89PNG", "PNG image"),
    (b"\xff\xd8\xff", "JPEG image"),
    (b"GIF8", "GIF image"),
)


def escape(text: str, keep_newlines: bool = False) -> str:
    """``text`` with every non-printable character shown as an escape (``\\x1b``)."""
    out = []
    for c in text:
        if c.isprintable() or (keep_newlines and c in "\n\t"):
            out.append(c)
        else:
            out.append(repr(c)[1:-1] if c != "\r" else "")
    return "".join(out)


def _sniff(payload: bytes) -> str:
    for magic, name in _MAGIC:
        if payload.startswith(magic):
            return name
    return "data" if payload else "empty"


@dataclass(frozen=True, slots=True)
class PartInfo:
    path: str
    content_type: str
    filename: str | None
    size: int
    sniffed: str


@dataclass
class MessageView:
    headers: list[tuple[str, str]] = field(default_factory=list)
    text_parts: list[tuple[str, str, bool]] = field(default_factory=list)  # path, text, cut
    attachments: list[PartInfo] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "headers": [{"name": n, "value": v} for n, v in self.headers],
            "text_parts": [{"path": p, "text": t, "truncated": c} for p, t, c in self.text_parts],
            "attachments": [asdict(a) for a in self.attachments],
            "defects": list(self.defects),
        }


def _headers(data: bytes) -> list[tuple[str, str]]:
    end = data.find(b"\r\n\r\n")
    head = data[: end + 2 if 0 <= end < MAX_HEADER_BYTES else MAX_HEADER_BYTES]
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(head, headersonly=True)
    out = []
    for name, value in list(msg.items())[:MAX_HEADER_FIELDS]:
        text = _UNFOLD.sub(" ", str(value))
        out.append((escape(str(name))[:80], escape(text)[:MAX_HEADER_VALUE]))
    return out


def summarize(data: bytes, text_limit: int = 8192) -> MessageView:
    """The safe view of ``data`` (see the module docstring)."""
    view = MessageView(headers=_headers(data))
    tree = parse(data)
    for part in tree.parts():
        if part.content_type == "text/plain" and not part.filename:
            text = part.payload.decode("utf-8", "replace")
            cut = len(text) > text_limit
            view.text_parts.append((part.path, escape(text[:text_limit], True), cut))
            continue
        name = escape(part.filename)[:MAX_NAME] if part.filename else None
        view.attachments.append(
            PartInfo(
                part.path,
                escape(part.content_type)[:100],
                name,
                len(part.payload),
                _sniff(part.payload),
            )
        )
    view.defects = list(tree.defects)
    return view

"""Walk a message's MIME tree: decoded leaf parts one at a time, plus structural defects.

``parse(raw)`` parses with the stdlib ``email`` package (``compat32`` policy: no structured
header objects, which keeps a large message cheap) and returns a ``MimeTree``;
``MimeTree.parts()`` yields ``Part(path, filename, content_type, payload)`` lazily -- only
one decoded payload is alive at a time -- and ``MimeTree.defects`` lists what makes the
message malformed: the parser's defects (missing boundaries, bad base64, headers that are
not headers ...), ambiguous duplicated MIME headers, NUL bytes or over-long lines in the
header, and nesting or part counts past the limits. A message the parser cannot handle at
all is one defect, never an exception.

Public names: ``Part``, ``MimeTree``, ``parse``, ``MAX_PARTS``, ``MAX_DEPTH``.
Security: ``raw`` is hostile. Limits bound the number of parts and the nesting walked;
memory stays proportional to the message (the parser holds it once, plus one decoded part).
"""

from __future__ import annotations

import email.parser
import email.policy
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message

MAX_PARTS = 500  # leaf parts examined per message; more is a defect
MAX_DEPTH = 20  # multipart / message/rfc822 nesting; deeper is a defect
MAX_HEADER_LINE = 998  # RFC 5322 hard line limit (without CRLF)
_SINGLETON_HEADERS = ("content-type", "content-transfer-encoding", "mime-version")


@dataclass(frozen=True, slots=True)
class Part:
    """One decoded leaf part."""

    path: str  # "1", "2.1", ... (like IMAP part numbers)
    filename: str | None  # as the sender declared it (hostile), None if none
    content_type: str  # declared, lower case
    payload: bytes  # transfer-decoded content


@dataclass
class MimeTree:
    """A parsed message: lazy part iteration plus the defects found."""

    message: Message | None
    defects: list[str] = field(default_factory=list)

    def parts(self) -> Iterator[Part]:
        if self.message is None:
            return
        count = 0
        stack: list[tuple[Message, str, int]] = [(self.message, "", 0)]
        while stack:
            msg, path, depth = stack.pop()
            self._collect(msg, path)
            if msg.is_multipart():
                if depth >= MAX_DEPTH:
                    self._defect(f"MimeNestingTooDeep(>{MAX_DEPTH})")
                    continue
                children = msg.get_payload()
                if not isinstance(children, list):
                    continue
                for i, child in reversed(list(enumerate(children, 1))):
                    if isinstance(child, Message):
                        stack.append((child, f"{path}.{i}" if path else str(i), depth + 1))
                continue
            count += 1
            if count > MAX_PARTS:
                self._defect(f"TooManyParts(>{MAX_PARTS})")
                return
            yield Part(path or "1", _filename(msg), msg.get_content_type(), _decoded(msg))

    def _collect(self, msg: Message, path: str) -> None:
        for d in getattr(msg, "defects", []):
            self._defect(f"{type(d).__name__}@{path or 0}")
        for name in _SINGLETON_HEADERS:
            if len(msg.get_all(name) or []) > 1:
                self._defect(f"Duplicate-{name}@{path or 0}")

    def _defect(self, text: str) -> None:
        if text not in self.defects and len(self.defects) < 50:
            self.defects.append(text)


def parse(raw: bytes) -> MimeTree:
    """Parse ``raw`` (never raises); see ``MimeTree``."""
    tree = MimeTree(None)
    _header_checks(raw, tree)
    try:
        tree.message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)
    except (RecursionError, ValueError, TypeError, LookupError, AssertionError) as exc:
        tree.defects.append(f"Unparseable({type(exc).__name__})")
    return tree


def _header_checks(raw: bytes, tree: MimeTree) -> None:
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    head = raw[: end if end >= 0 else min(len(raw), 1 << 16)]
    if b"\0" in head:
        tree.defects.append("NulInHeader")
    if any(len(line) > MAX_HEADER_LINE for line in head.split(b"\n")):
        tree.defects.append("HeaderLineTooLong")


def _filename(msg: Message) -> str | None:
    try:
        name = msg.get_filename()
    except (ValueError, LookupError, TypeError):
        return None
    if name is None:
        return None
    return str(name)


def _decoded(msg: Message) -> bytes:
    try:
        payload = msg.get_payload(decode=True)
    except (ValueError, LookupError, TypeError, AssertionError):
        payload = None
    if isinstance(payload, bytes):
        return payload
    raw = msg.get_payload()
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape")
    return b""

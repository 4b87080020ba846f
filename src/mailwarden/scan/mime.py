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

import binascii
import email.parser
import email.policy
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message

MAX_PARTS = 500  # leaf parts examined per message; more is a defect
MAX_DEPTH = 20  # multipart / message/rfc822 nesting; deeper is a defect
MAX_HEADER_LINE = 998  # RFC 5322 hard line limit (without CRLF)
_SINGLETON_HEADERS = ("content-type", "content-transfer-encoding", "mime-version")
FAST_HEAD_MAX = 64 * 1024  # a header section longer than this always takes the full parse
# A header section the stdlib parser reads without a defect: field lines (name, colon) and
# their continuations, CRLF line ends only, then the empty line.
_HEADER_SECTION = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)+\r\n")
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+):([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)\r\n")
_IDENTITY_CTE = frozenset({"", "7bit", "8bit", "binary"})


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


def single_text_part(raw: bytes) -> Part | None:
    """The one part of a single-text-part message without attachments, else None."""
    end = raw.find(b"\r\n\r\n", 0, FAST_HEAD_MAX)
    if end < 0:
        return None
    head = raw[: end + 4]
    if b"\0" in head or _HEADER_SECTION.fullmatch(head) is None:
        return None
    if any(len(line) > MAX_HEADER_LINE for line in head.split(b"\r\n")):
        return None
    ctype = cte = None
    mime_version = 0
    for m in _FIELD.finditer(head):
        name = m.group(1).lower()
        if not name.startswith((b"content-", b"mime-")):
            continue
        # The value as the parser keeps it (compat32): leading blanks of the first line
        # dropped, the CRLF of every fold kept. 8-bit bytes become a Header object there,
        # whose text differs: the full parse decides.
        raw_value = m.group(2).lstrip(b" \t")
        if not raw_value.isascii():
            return None
        value = raw_value.decode("ascii")
        if name == b"content-type":
            if ctype is not None:
                return None
            ctype = value
        elif name == b"content-transfer-encoding":
            if cte is not None:
                return None
            cte = value
        elif name == b"mime-version":
            mime_version += 1
        elif name == b"content-disposition":
            return None  # attachment or inline with a file name: the parser decides
    if mime_version > 1:
        return None
    content_type = "text/plain"  # the parser's default
    if ctype is not None:
        if "name" in ctype.lower():  # name= (or name*=) gives the part a file name
            return None
        content_type = ctype.split(";", 1)[0].strip().lower()
        if not content_type.startswith("text/") or content_type.count("/") != 1:
            return None
    body = raw[end + 4 :]
    encoding = (cte or "").lower()  # as the parser compares it: a folded value is unknown
    if encoding == "quoted-printable":
        payload = binascii.a2b_qp(body)  # what the parser's decode=True does
    elif encoding in _IDENTITY_CTE:
        payload = body
    else:
        return None  # base64, uuencode, unknown, folded, trailing blanks: the full parse
    return Part("1", None, content_type, payload)


def _header_checks(raw: bytes, tree: MimeTree) -> None:
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    head = raw[: end if end >= 0 else min(len(raw), 1 << 16)]
    if b"\0" in head:
        tree.defects.append("NulInHeader")
    # Lines end in LF or CRLF here: the CR of a CRLF is no part of the 998 octets.
    if any(len(line.removesuffix(b"\r")) > MAX_HEADER_LINE for line in head.split(b"\n")):
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

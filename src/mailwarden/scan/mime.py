"""Walk a message's MIME tree: decoded leaf parts one at a time, plus structural defects.

``parse(raw)`` parses with the stdlib ``email`` package (``compat32`` policy: no structured
header objects, which keeps a large message cheap) and returns a ``MimeTree``;
``MimeTree.parts()`` yields ``Part(path, filename, content_type, payload)`` lazily -- only
one decoded payload is alive at a time -- and ``MimeTree.defects`` lists what makes the
message malformed: the parser's defects (missing boundaries, bad base64, headers that are
not headers ...), ambiguous duplicated MIME headers, NUL bytes or over-long lines in the
header, and nesting or part counts past the limits. A message the parser cannot handle at
all is one defect, never an exception.

Two fast paths skip the parser (its line-by-line Python is most of the cost of a scan) for
the common, well-formed shapes, and answer None for anything else -- the caller then
parses. Where they answer, the answer is exactly the full path's (the property tests in
``tests/scan/test_props_*.py`` compare them on generated and mutated messages):
``single_text_part(raw)`` -- the one part of a message that is one text part;
``simple_multipart(raw)`` -- a ``SimpleTree`` (``parts()``, ``defects`` always empty) for a
multipart message with CRLF line ends, plain ASCII MIME headers (token or quoted parameter
values, no RFC 2231, no encoded words), one Content-Type, -Transfer-Encoding and
MIME-Version per header at most, delimiter lines that are unambiguous (every line that
starts with a boundary is a delimiter line after a CRLF; a close delimiter; no empty part),
nesting of multiparts up to ``FAST_NESTING`` levels, no message/* part, and leaves in 7bit,
8bit, binary, quoted-printable or strictly well-formed base64.

Public names: ``Part``, ``MimeTree``, ``SimpleTree``, ``parse``, ``single_text_part``,
``simple_multipart``, ``MAX_PARTS``, ``MAX_DEPTH``, ``FAST_NESTING``.
Security: ``raw`` is hostile. Limits bound the number of parts and the nesting walked;
memory stays proportional to the message (the parser holds it once, plus one decoded part;
the fast paths hold offsets into ``raw`` and decode one part at a time). The fast paths use
only bounded regular expressions (no nested ambiguous repetition) and byte searches, and
give up rather than guess.
"""

from __future__ import annotations

import binascii
import email.parser
import email.policy
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from typing import NamedTuple

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
FAST_NESTING = 4  # multipart levels simple_multipart follows (the parser's limit is MAX_DEPTH)
# The fields simple_multipart reads, in a header section that matched _HEADER_SECTION (a
# field starts at a line start, "^" after its LF; continuation lines start with a blank).
_MIME_FIELD = re.compile(
    rb"^(content-type|content-transfer-encoding|content-disposition|mime-version)"
    rb":([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)\r\n",
    re.IGNORECASE | re.MULTILINE,
)
# The MIME header values simple_multipart reads: a strict subset of RFC 2045 on which the
# stdlib's parameter splitting and its (repeated) unquoting are the identity -- folding white
# space, type/subtype (or a disposition token), then ";" attribute "=" value, the value a
# token or a quoted string without quotes, backslashes, semicolons or angle brackets inside;
# no "*" in attribute names (RFC 2231). No two white-space runs are adjacent, so matching is
# linear.
_FWS = rb"(?:[ \t]|\r\n[ \t])*"
_TOKEN = rb"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+"
_ATTRIBUTE = rb"[A-Za-z0-9!#$&+.^_`{|}~-]+"
_VALUE = rb"[A-Za-z0-9!#$%&'*+.^_`{|}~=/?:@-]+|\"[\x20\x21\x23-\x3a\x3d\x3f-\x5b\x5d-\x7e]*\""
_PARAM = rb";" + _FWS + rb"(" + _ATTRIBUTE + rb")" + _FWS + rb"=" + _FWS + rb"(" + _VALUE + rb")"
_PARAM += _FWS
_PARAMS = re.compile(_PARAM)
_CONTENT_TYPE = re.compile(
    _FWS + rb"(" + _TOKEN + rb"/" + _TOKEN + rb")" + _FWS + rb"((?:" + _PARAM + rb")*)"
)
_DISPOSITION = re.compile(_FWS + rb"(" + _TOKEN + rb")" + _FWS + rb"((?:" + _PARAM + rb")*)")
_BLANKS = re.compile(rb"[ \t]*")
# Base64 that the parser decodes with no defect, once its line breaks are dropped: these,
# then at most two "=", a multiple of 4 characters in all.
_BASE64_AND_BREAKS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/\r\n"


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


class _NotSimple(Exception):
    """simple_multipart gives up: the full parse decides."""


class _Head(NamedTuple):
    """One header section as the parser's Message reports it."""

    end: int  # offset just past its empty line
    content_type: str  # get_content_type()
    params: dict[str, str]  # Content-Type parameters: names lower case, values unquoted
    encoding: str | None  # Content-Transfer-Encoding, lower case, as the parser compares it
    disposition: bytes | None  # the raw Content-Disposition value


class _Leaf(NamedTuple):
    path: str
    filename: str | None
    content_type: str
    start: int  # the encoded payload is raw[start:stop]
    stop: int
    encoding: str  # "", "quoted-printable" or "base64"


@dataclass
class SimpleTree:
    """What ``simple_multipart`` accepted: the leaf parts, decoded one at a time from the
    message's bytes. ``defects`` is always empty: the full parse finds none there."""

    raw: bytes = field(repr=False)
    leaves: list[_Leaf]
    defects: list[str] = field(default_factory=list)

    def parts(self) -> Iterator[Part]:
        for leaf in self.leaves:
            body = self.raw[leaf.start : leaf.stop]
            if leaf.encoding == "quoted-printable":
                payload = binascii.a2b_qp(body)  # what the parser's decode=True does
            elif leaf.encoding == "base64":  # the parser's decode, on checked base64
                payload = binascii.a2b_base64(b"".join(body.splitlines()), strict_mode=True)
            else:
                payload = body
            yield Part(leaf.path, leaf.filename, leaf.content_type, payload)


def simple_multipart(raw: bytes) -> SimpleTree | None:
    """The parts of a simple, well-formed multipart message (see the module docstring),
    exactly as ``parse(raw)`` would give them, with no defect; None for anything else."""
    end = raw.find(b"\r\n\r\n", 0, FAST_HEAD_MAX)
    if end < 0 or raw.find(b"\0", 0, end) >= 0:
        return None  # no header within reach, or a NUL in it (a defect)
    if any(len(line) > MAX_HEADER_LINE for line in raw[:end].split(b"\r\n")):
        return None  # a defect
    leaves: list[_Leaf] = []
    try:
        head = _simple_head(raw, 0, end + 4, "text/plain")
        if not head.content_type.startswith("multipart/"):
            return None
        _simple_multipart(raw, head, len(raw), "", 0, leaves)
    except _NotSimple:
        return None
    return SimpleTree(raw, leaves)


def _simple_multipart(
    raw: bytes, head: _Head, end: int, path: str, depth: int, leaves: list[_Leaf]
) -> None:
    """The leaves of the multipart whose header is ``head`` and whose body ends at ``end``."""
    if depth >= FAST_NESTING:
        raise _NotSimple  # deeper than the fast path goes
    if head.encoding not in (None, "7bit", "8bit", "binary"):
        raise _NotSimple  # a defect (InvalidMultipartContentTransferEncoding)
    boundary = head.params.get("boundary", "").rstrip()  # as get_boundary() returns it
    if not boundary:
        raise _NotSimple  # a defect (or a "--" separator)
    # Parts of a multipart/digest without a Content-Type are message/rfc822: refused below.
    default = "message/rfc822" if head.content_type == "multipart/digest" else "text/plain"
    spans = _part_spans(raw, head.end, end, b"--" + boundary.encode("ascii"))
    for n, (start, stop) in enumerate(spans, 1):
        here = f"{path}.{n}" if path else str(n)
        child = _simple_head(raw, start, stop, default)
        maintype = child.content_type.partition("/")[0]
        if maintype == "multipart":
            _simple_multipart(raw, child, stop, here, depth + 1, leaves)
        elif maintype == "message":
            raise _NotSimple  # a message inside: the parser's
        else:
            leaves.append(_simple_leaf(raw, child, stop, here))
            if len(leaves) > MAX_PARTS:
                raise _NotSimple  # a defect


def _part_spans(raw: bytes, start: int, end: int, separator: bytes) -> list[tuple[int, int]]:
    """The (start, stop) of each body part in raw[start:end], a multipart body whose
    delimiter lines begin with ``separator``; stop is where the next delimiter line begins.

    The parser splits lines at CR, LF or CRLF and takes any line that is the separator,
    optionally "--", blanks and the line end, for a delimiter (outer ones too). This accepts
    only bodies where that is unambiguous: every line that starts with the separator is a
    delimiter line preceded by CRLF and ended by CRLF (the close delimiter: or the end of
    the message), the first is not the close one, a close one comes, and no part is empty
    (the parser skips repeated delimiter lines). The preamble (before the first) and the
    epilogue (after the close) are not parts."""
    spans: list[tuple[int, int]] = []
    part = -1  # where the current part starts; -1 in the preamble
    at = raw.find(separator, start, end)
    while at >= 0:
        if at > start:
            before = raw[at - 1]
            if before != 0x0A and before != 0x0D:
                at = raw.find(separator, at + 1, end)  # not at a line start: content
                continue
            if at - 2 < start or raw[at - 2 : at] != b"\r\n":
                raise _NotSimple  # a line start after a bare CR or LF
        after = at + len(separator)
        close = raw.startswith(b"--", after, end)
        if close:
            after += 2
        blanks = _BLANKS.match(raw, after, end)
        after = blanks.end() if blanks else after
        if raw.startswith(b"\r\n", after, end):
            after += 2
        elif not (close and after == end == len(raw)):
            raise _NotSimple  # a line that starts like a delimiter, or no line end
        if part >= 0:
            if part >= at:
                raise _NotSimple  # an empty part: the parser skips repeated delimiters
            spans.append((part, at))
            if len(spans) > MAX_PARTS:
                raise _NotSimple  # each part holds a leaf: too many leaves (a defect)
        elif close:
            raise _NotSimple  # the close delimiter first: no start boundary (a defect)
        if close:
            return spans
        part = after
        at = raw.find(separator, after, end)
    raise _NotSimple  # no delimiter, or no close delimiter (a defect)


def _simple_head(raw: bytes, start: int, end: int, default_type: str) -> _Head:
    """The header section at raw[start:], which ends before ``end``."""
    if raw.startswith(b"\r\n", start, end):
        return _Head(start + 2, default_type, {}, None, None)  # no header fields at all
    stop = raw.find(b"\r\n\r\n", start, end)
    if stop < 0 or _HEADER_SECTION.fullmatch(raw, start, stop + 4) is None:
        raise _NotSimple  # no empty line, or lines the parser reads with a defect
    values: dict[bytes, bytes] = {}
    for m in _MIME_FIELD.finditer(raw, start, stop + 4):
        name = m.group(1).lower()
        if name in values:
            raise _NotSimple  # a duplicate (a defect; or which Content-Disposition counts)
        values[name] = m.group(2).lstrip(b" \t")  # the value as the parser keeps it
    content_type = default_type
    params: dict[str, str] = {}
    ctype = values.get(b"content-type")
    if ctype is not None:
        content_type, params = _parameters(_CONTENT_TYPE, ctype)
    encoding = values.get(b"content-transfer-encoding")
    if encoding is not None and not encoding.isascii():
        raise _NotSimple  # a Header object in the parser, compared as its text
    return _Head(
        stop + 4,
        content_type,
        params,
        None if encoding is None else encoding.decode("ascii").lower(),
        values.get(b"content-disposition"),
    )


def _parameters(pattern: re.Pattern[bytes], value: bytes) -> tuple[str, dict[str, str]]:
    """The lower-case type (or disposition) and the parameters of a MIME header value."""
    m = pattern.fullmatch(value)
    if m is None:
        raise _NotSimple
    params: dict[str, str] = {}
    for name, text in _PARAMS.findall(m[2]):
        key = name.lower().decode("ascii")
        if key in params:
            raise _NotSimple  # the parser takes the first; keep it unambiguous
        params[key] = (text[1:-1] if text[:1] == b'"' else text).decode("ascii")
    return m[1].lower().decode("ascii"), params


def _simple_leaf(raw: bytes, head: _Head, stop: int, path: str) -> _Leaf:
    """A leaf part: its payload is everything after the header up to the CRLF that
    belongs to the next delimiter line (none if the part has no body)."""
    start = head.end
    stop = max(start, stop - 2)
    encoding = head.encoding or ""
    if encoding in _IDENTITY_CTE:
        encoding = ""
    elif encoding == "base64":
        body = raw[start:stop]
        pad = body.find(b"=")
        if (
            body.translate(None, _BASE64_AND_BREAKS) not in (b"", b"=", b"==")
            or (pad >= 0 and body[pad:].strip(b"=\r\n"))
            or (len(body) - body.count(b"\r") - body.count(b"\n")) % 4
        ):
            raise _NotSimple  # the parser repairs it as best it can
    elif encoding != "quoted-printable":
        raise _NotSimple  # uuencode, unknown, folded, blanks: the full parse
    return _Leaf(path, _simple_filename(head), head.content_type, start, stop, encoding)


def _simple_filename(head: _Head) -> str | None:
    """``Message.get_filename()``: Content-Disposition's filename, else Content-Type's name."""
    name = None
    if head.disposition is not None:
        kind, params = _parameters(_DISPOSITION, head.disposition)
        if kind == "filename":
            raise _NotSimple  # a bare "filename" is a parameter to the parser: an empty name
        name = params.get("filename")
    if name is None:
        name = head.params.get("name")
    if name is None:
        return None
    if "=?" in name:
        raise _NotSimple  # an encoded word: returned undecoded by the parser; not simple
    return name.strip()


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

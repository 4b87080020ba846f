"""Property tests of the delivery client's reply parser (``delivery.smtp_conn._ReplyProtocol``):
the bytes of an untrusted SMTP/LMTP server, fed straight into ``data_received``.

- well-formed reply streams (multi-line replies, CRLF or bare LF, code-only lines) parse to
  exactly the replies that were rendered, however the stream is cut into reads;
- for any stream (replies mixed with garbage, overlong lines, code changes inside a
  multi-line reply, too many continuation lines, a missing final newline) the parsed
  replies, the error and the unparsed rest do not depend on the cuts; nothing is raised
  out of ``data_received``; after an error nothing more is parsed and the transport has
  been aborted;
- a line that does not start with three digits and a space, dash or end is an error;
- unread replies stay bounded by ``MAX_QUEUED_REPLIES``.

``AbortRecorder`` is a test double of the transport: it only counts ``abort()`` calls.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from hypothesis import example, given, settings
from hypothesis import strategies as st
from tests.support.properties import cut_points, examples, split_at

from mailwarden.delivery.smtp_conn import (
    MAX_QUEUED_REPLIES,
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    Reply,
    _ReplyProtocol,
)

CODES = st.integers(min_value=200, max_value=599)
# Reply text: anything but line ends (the parser splits on LF and strips CR/LF at the end).
TEXT = st.text(st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=30)
EOL = st.sampled_from([b"\r\n", b"\n"])


class AbortRecorder:
    """Test double of the transport: counts ``abort()``."""

    def __init__(self) -> None:
        self.aborts = 0

    def abort(self) -> None:
        self.aborts += 1

    def is_closing(self) -> bool:
        return self.aborts > 0


def new_parser() -> tuple[_ReplyProtocol, AbortRecorder]:
    p = _ReplyProtocol()
    transport = AbortRecorder()
    p.connection_made(cast(asyncio.Transport, transport))
    return p, transport


def feed(chunks: list[bytes]) -> tuple[_ReplyProtocol, AbortRecorder]:
    p, transport = new_parser()
    for chunk in chunks:
        before = list(p.replies) if p.error is not None else None
        p.data_received(chunk)
        if before is not None:  # nothing is parsed after an error
            assert list(p.replies) == before
        if p.error is None:
            assert len(p.replies) <= MAX_QUEUED_REPLIES
    return p, transport


def state(p: _ReplyProtocol) -> tuple[Any, ...]:
    return list(p.replies), None if p.error is None else str(p.error), p.pending_bytes()


@st.composite
def replies(draw: st.DrawFn) -> tuple[Reply, bytes]:
    """A reply and its wire form."""
    code = draw(CODES)
    texts = draw(st.lists(TEXT, min_size=1, max_size=5))
    wire = b""
    for i, text in enumerate(texts):
        last = i == len(texts) - 1
        sep = " " if not last else draw(st.sampled_from([" ", "" if not text else " "]))
        line = f"{code}{'-' if not last else sep}{text}"
        wire += line.encode() + draw(EOL)
    return Reply(code, tuple(texts)), wire


def _ascii_code(line: bytes) -> bool:
    return line[:3].isdigit() and line[:3].isascii() and line[3:4] in (b"", b" ", b"-", b"\r")


bad_lines = st.one_of(
    st.binary(max_size=12),
    st.text(max_size=8).map(str.encode),
    st.tuples(CODES, st.sampled_from(["x", "\t", "_", ":"]), TEXT).map(
        lambda t: f"{t[0]}{t[1]}{t[2]}".encode()
    ),
    # Digits that are not ASCII: str.isdigit() is true for them, int() may raise or accept.
    st.tuples(st.text(st.characters(categories=["Nd", "No"]), min_size=3, max_size=3), TEXT).map(
        lambda t: f"{t[0]} {t[1]}".encode()
    ),
).filter(lambda b: b"\n" not in b and not _ascii_code(b))

# Pieces of a hostile stream, each a whole line with its end unless noted.
pieces = st.one_of(
    replies().map(lambda r: r[1]),
    st.tuples(bad_lines, EOL).map(b"".join),
    st.builds(  # code changes inside a multi-line reply
        lambda a, b, eol: b"%d-x%s%d y%s" % (a, eol, b, eol), CODES, CODES, EOL
    ),
    st.integers(MAX_REPLY_LINE - 8, MAX_REPLY_LINE + 8).map(  # around the line limit
        lambda n: b"250 " + b"x" * (n - 6) + b"\r\n"
    ),
    st.integers(MAX_REPLY_LINES - 1, MAX_REPLY_LINES + 1).map(  # around the line count limit
        lambda n: b"250-a\r\n" * (n - 1) + b"250 z\r\n"
    ),
    st.integers(MAX_REPLY_LINE - 2, MAX_REPLY_LINE + 2).map(  # a long line still open
        lambda n: b"250 " + b"x" * (n - 4)
    ),
    st.binary(max_size=8),  # a fragment: the next line starts mid-line, or the stream ends
)


@settings(max_examples=examples(150))
@given(rs=st.lists(replies(), max_size=12), cuts=cut_points())
def test_well_formed_replies_parse_exactly(rs: list[tuple[Reply, bytes]], cuts: list[int]) -> None:
    wire = b"".join(w for _, w in rs)
    p, transport = feed(split_at(wire, cuts))
    assert p.error is None and transport.aborts == 0
    assert list(p.replies) == [r for r, _ in rs]
    assert p.pending_bytes() == 0


@settings(max_examples=examples(300))
@given(stream=st.lists(pieces, max_size=10).map(b"".join), cuts=cut_points())
@example(stream=b"250-a\r\n251 b\r\n", cuts=[7])
@example(stream=b"250 " + b"x" * (MAX_REPLY_LINE - 4), cuts=[MAX_REPLY_LINE - 1])
def test_parse_does_not_depend_on_the_cuts(stream: bytes, cuts: list[int]) -> None:
    whole, whole_transport = feed([stream])
    split, split_transport = feed(split_at(stream, cuts))
    bytewise, _ = feed([stream[i : i + 1] for i in range(len(stream))])
    assert state(split) == state(whole) == state(bytewise)
    if whole.error is not None:
        assert whole_transport.aborts == split_transport.aborts == 1
        assert whole.pending_bytes() == 0
    else:
        assert whole_transport.aborts == 0
        assert whole.pending_bytes() <= MAX_REPLY_LINE


# Non-ASCII digits (fixed in 87de98d): "²50" made int() raise ValueError out of
# data_received, "٢٥٠" (Arabic-Indic) was read as 250.
@settings(max_examples=examples(100))
@given(line=bad_lines, eol=EOL, before=st.lists(replies(), max_size=2))
@example(line="\u00b250 ok".encode(), eol=b"\r\n", before=[])
@example(line="\u0662\u0665\u0660 ok".encode(), eol=b"\r\n", before=[])
@example(line=b"", eol=b"\n", before=[])
def test_malformed_line_is_an_error(
    line: bytes, eol: bytes, before: list[tuple[Reply, bytes]]
) -> None:
    good = b"".join(w for _, w in before)
    p, transport = feed([good + line + eol + b"250 after\r\n"])
    assert p.error is not None and "malformed reply line" in str(p.error)
    assert list(p.replies) == [r for r, _ in before]
    assert transport.aborts == 1


@settings(max_examples=examples(30))
@given(
    n=st.integers(MAX_QUEUED_REPLIES - 3, MAX_QUEUED_REPLIES + 3),
    per_read=st.integers(1, 4096),
)
def test_unread_replies_stay_bounded(n: int, per_read: int) -> None:
    wire = b"250 ok\r\n" * n
    size = per_read * 8
    p, transport = feed([wire[i : i + size] for i in range(0, len(wire), size)])
    if n <= MAX_QUEUED_REPLIES:
        assert p.error is None and len(p.replies) == n
    else:
        assert p.error is not None and "more replies than commands" in str(p.error)
        assert transport.aborts == 1
    # One read can queue at most its own replies past the bound before the check runs.
    assert len(p.replies) <= MAX_QUEUED_REPLIES + per_read

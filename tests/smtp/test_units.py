"""Unit tables for the pure parts of the SMTP edge: addresses, headers, replies, eager runs."""

from __future__ import annotations

import asyncio

import pytest

from mailwarden.core.controls import Control
from mailwarden.core.types import Action, Decision
from mailwarden.errors import AddressError
from mailwarden.smtp.address import NonAsciiAddress, domain_of, parse_params, parse_path
from mailwarden.smtp.aio import Pending, run_eager
from mailwarden.smtp.headers import (
    HeaderTooLarge,
    count_received,
    find_message_id,
    header_end,
    rfc5322_date,
)
from mailwarden.smtp.message import data_problem, unstuff
from mailwarden.smtp.reply import format_reply, reply_for


@pytest.mark.parametrize(
    ("text", "kwargs", "stored", "rest"),
    [
        ("<user@Example.EDU>", {}, "user@example.edu", ""),
        ("<User.Name+tag@sub.example.edu> SIZE=10", {}, "User.Name+tag@sub.example.edu", "SIZE=10"),
        ('<"john doe"@example.edu>', {}, '"john doe"@example.edu', ""),
        ('<"a\\"b>c"@example.edu>', {}, '"a\\"b>c"@example.edu', ""),
        ("<@relay1.example,@relay2.example:u@example.edu>", {}, "u@example.edu", ""),
        ("<u@[192.0.2.1]>", {}, "u@[192.0.2.1]", ""),
        ("<u@[IPv6:2001:db8::1]>", {}, "u@[ipv6:2001:db8::1]", ""),
        ("<>", {"null_ok": True}, "", ""),
        ("<Postmaster>", {"postmaster_ok": True}, "postmaster", ""),
        ("<jörg@Bücher.example>", {"smtputf8": True}, "jörg@bücher.example", ""),
    ],
)
def test_parse_path_accepts(text: str, kwargs: dict[str, bool], stored: str, rest: str) -> None:
    addr, params = parse_path(text, **kwargs)
    assert addr.text == stored
    assert params == rest


@pytest.mark.parametrize(
    ("text", "kwargs"),
    [
        ("u@example.edu", {}),  # no brackets
        ("<u@example.edu", {}),
        ("<>", {}),  # null path only for MAIL
        ("<postmaster>", {}),  # bare postmaster only for RCPT
        ("<u>", {}),
        ("<u@>", {}),
        ("<@example.edu>", {}),
        ("<u@exa mple.edu>", {}),
        ("<u@example.edu>x", {}),
        ("<u\r\n@example.edu>", {}),
        ("<u\x00@example.edu>", {}),
        ("<u@-example.edu>", {}),
        ("<u@[300.1.1.1]>", {}),
        ("<a..b@example.edu>", {}),
        ("<" + "l" * 65 + "@example.edu>", {}),
        ("<u@" + "d" * 64 + ".example>", {}),
        ("<u\u0085@example.edu>", {"smtputf8": True}),  # C1 control
        ("<u\u2028x@example.edu>", {"smtputf8": True}),  # line separator
        ("<u@b\u00fccher\u2029.example>", {"smtputf8": True}),  # paragraph separator
    ],
)
def test_parse_path_refuses(text: str, kwargs: dict[str, bool]) -> None:
    with pytest.raises(AddressError):
        parse_path(text, **kwargs)


def test_non_ascii_needs_smtputf8() -> None:
    with pytest.raises(NonAsciiAddress):
        parse_path("<jörg@example.edu>")
    with pytest.raises(NonAsciiAddress):
        parse_path("<u@bücher.example>")


def test_parse_params() -> None:
    assert parse_params("SIZE=10 body=8BITMIME  SMTPUTF8") == {
        "SIZE": "10",
        "BODY": "8BITMIME",
        "SMTPUTF8": "",
    }
    for bad in ("SIZE=1 SIZE=2", "=x", "SI ZE=", "A=b=c"):
        with pytest.raises(ValueError):
            parse_params(bad)
    assert domain_of('"a@b"@example.edu') == "example.edu"
    assert domain_of("postmaster") == ""


def test_header_end_variants() -> None:
    assert header_end(b"A: 1\r\nB: 2\r\n\r\nbody\r\n", 1024) == 12
    folded = b"Subject: a\r\n b\r\n\tc\r\nX: y\r\n\r\nbody\r\n"
    assert header_end(folded, 1024) == folded.index(b"\r\n\r\n") + 2
    assert header_end(b"no header here\r\n", 1024) == 0
    assert header_end(b"A: 1\r\nnot a header\r\n", 1024) == 6
    assert header_end(b"A: 1\r\n", 1024) == 6  # header only
    assert header_end(b" leading fold\r\nA: 1\r\n", 1024) == 0
    with pytest.raises(HeaderTooLarge):
        header_end(b"A: " + b"x" * 2000 + b"\r\n\r\n", 1024)
    with pytest.raises(HeaderTooLarge):
        header_end(b"".join(b"H%d: v\r\n" % i for i in range(1000)) + b"\r\n", 1024)
    huge = b"".join(b"H%d: %s\r\n" % (i, b"v" * 900) for i in range(2000))
    with pytest.raises(HeaderTooLarge):
        header_end(huge, 1_048_576)


def test_received_and_message_id() -> None:
    hdr = b"Received: a\r\nreceived : b\r\nX-Received: c\r\nSubject: received: no\r\n"
    assert count_received(hdr) == 2
    assert find_message_id(b"Message-Id:\r\n <x@y>\r\n") == "<x@y>"
    assert find_message_id(b"Subject: x\r\n") is None
    assert find_message_id(b"Message-ID:   \r\n") is None
    assert rfc5322_date(0) == "Thu, 01 Jan 1970 00:00:00 +0000"


def test_data_checks_and_unstuff() -> None:
    assert data_problem(b"\r\nA: b\r\n\r\nok\r\n") is None
    assert data_problem(b"\r\nA: b\n") is not None
    assert data_problem(b"\r\nA: b\r\r\n") is not None
    assert data_problem(b"\r\nA\x00\r\n") is not None
    assert data_problem(b"\r\n" + b"x" * 998 + b"\r\n") is None
    assert data_problem(b"\r\n" + b"x" * 999 + b"\r\n") is not None
    assert unstuff(b"\r\n..a\r\nb\r\n...\r\n") == b".a\r\nb\r\n..\r\n"


def test_long_line_check_matches_a_plain_split() -> None:
    """The window search finds exactly the lines a split would, wherever they are."""
    import random

    rnd = random.Random(5321)
    sizes = [0, 1, 5, 500, 997, 998, 999, 1000, 1500, 2500]
    for _ in range(5000):
        lines = [b"z" * rnd.choice(sizes) for _ in range(rnd.randrange(1, 7))]
        raw = b"\r\n" + b"\r\n".join(lines) + b"\r\n"
        too_long = max(map(len, lines)) > 998
        assert (data_problem(raw) is not None) == too_long, [len(x) for x in lines]


def test_reply_for() -> None:
    relay = Decision(Action.REJECT, "Relay access denied", Control.SU_6, 554, "5.7.1")
    assert reply_for(relay) == (554, "5.7.1", "Relay access denied (SU-6)")
    assert reply_for(Decision(Action.TEMPFAIL)) == (
        451,
        "4.3.0",
        "Temporary failure, try again later",
    )
    assert reply_for(Decision(Action.DISCONNECT))[0] == 421
    # A code of the wrong class cannot turn a refusal into a success.
    assert reply_for(Decision(Action.REJECT, "no", code=250, enhanced="2.0.0"))[:2] == (
        550,
        "5.7.1",
    )
    assert reply_for(Decision(Action.REJECT, "bad\r\n250 ok"))[2] == "bad??250 ok"
    assert format_reply(250, "", ["a", "b"]) == b"250-a\r\n250 b\r\n"


def test_run_eager() -> None:
    async def quick() -> int:
        return 1

    assert run_eager(quick()) == 1

    async def slow() -> int:
        await asyncio.sleep(0)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_result, 41)
        return await fut + 1

    async def main() -> int:
        pending = run_eager(slow())
        assert isinstance(pending, Pending)
        return await pending

    assert asyncio.run(main()) == 42

    async def failing() -> int:
        await asyncio.sleep(0)
        raise KeyError("x")

    async def main2() -> None:
        pending = run_eager(failing())
        assert isinstance(pending, Pending)
        with pytest.raises(KeyError):
            await pending

    asyncio.run(main2())

"""The clamd session pool (IDSESSION, ``[scan.clamav] session_idle``) against real clamd.

Connections are counted through ``Relay``, a loopback relay in front of the test clamd.
Proven here: consecutive and concurrent scans share few sessions and every message gets its
own verdict; a session clamd ended while idle, or one found dead when reused, is replaced
(retried once, only when no byte of a reply came); a reply numbered for another request,
unnumbered, doubled or cut off fails closed and its session is not reused (a fake clamd
says those, real clamd cannot be made to); a scan cut short mid-upload aborts its
connection; ``session_idle = 0`` is one connection per scan.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest

from mailwarden.core.types import Symbol
from mailwarden.scan import clamav
from mailwarden.scan.clamav import IDLE_NOTICE, ClamdClient, ClamdScanner
from mailwarden.scan.settings import ClamavSettings
from tests.scan.messages import eicar, ham, marker, plain, scan_input, with_attachment
from tests.support.clamd import (
    Clamd,
    FakeSessionClamd,
    Relay,
    StallingListener,
    numbered_ok,
)

EICAR = "Mailwarden.Test.EICAR-NDB.UNOFFICIAL"
MARKER = "Mailwarden.Test.Marker-NDB.UNOFFICIAL"
LOGICAL = "Mailwarden.Test.Logical-LDB.UNOFFICIAL"

Case = tuple[bytes, list[str]]  # a message and the details of the symbols it must get


def eicar_mail(i: int) -> Case:
    return plain(eicar(), subject=f"eicar {i}"), [EICAR]


def marker_mail(i: int) -> Case:
    raw = with_attachment(b"data %d " % i + marker() + b" end", "a.bin", subject=f"m {i}")
    return raw, [MARKER]


def logical_mail(i: int) -> Case:
    a, b = b"MAILWARDEN-LOGICAL-" + b"PART-A", b"MAILWARDEN-LOGICAL-" + b"PART-B"
    raw = with_attachment(a + b"\n%d\n" % i + b, "two.txt", "text/plain", subject=f"l {i}")
    return raw, [LOGICAL]


def clean_mail(i: int) -> Case:
    return plain(f"Hello {i}, see you at the seminar.\n", subject=f"clean {i}"), []


def big_marker_mail(i: int) -> Case:  # over chunk_size: a chunked upload on the session
    raw = with_attachment(os.urandom(200_000) + marker(), "big.bin", subject=f"bm {i}")
    return raw, [MARKER]


def big_clean_mail(i: int) -> Case:
    return with_attachment(os.urandom(200_000), "noise.bin", subject=f"bc {i}"), []


KINDS: list[Callable[[int], Case]] = [
    eicar_mail,
    clean_mail,
    marker_mail,
    big_clean_mail,
    logical_mail,
    big_marker_mail,
]


def details(symbols: list[Symbol]) -> list[str]:
    return [s.detail for s in symbols]


def names(symbols: list[Symbol]) -> list[str]:
    return [s.name for s in symbols]


@asynccontextmanager
async def open_scanner(address: str, **kw: object) -> AsyncIterator[ClamdScanner]:
    s = ClamdScanner(ClamavSettings(socket=address, **kw))  # type: ignore[arg-type]
    try:
        yield s
    finally:
        await s.aclose()


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.fixture
def relay(clamd: Clamd) -> Iterator[Relay]:
    r = Relay(clamd.address).start()
    yield r
    r.stop()


# --- reuse and attribution against real clamd ---------------------------------------------


@pytest.mark.asyncio
async def test_consecutive_scans_share_one_session(relay: Relay) -> None:
    async with open_scanner(relay.address) as s:
        for i in range(12):  # virus, clean, virus, ... on the same session
            raw, want = KINDS[i % len(KINDS)](i)
            assert details(await s.scan(scan_input(raw))) == want, i
        assert s.client.connections_opened == 1
        assert s.client.idle_sessions == 1
    assert relay.sessions() == 1
    assert relay.instreams() == 0


@pytest.mark.asyncio
async def test_concurrent_scans_each_get_their_own_verdict(relay: Relay) -> None:
    rng = random.Random(4)
    async with open_scanner(relay.address, max_concurrent=4) as s:
        for batch in range(3):
            cases = [KINDS[rng.randrange(len(KINDS))](batch * 100 + i) for i in range(20)]
            got = await asyncio.gather(*(s.scan(scan_input(raw)) for raw, _ in cases))
            for i, ((_, want), symbols) in enumerate(zip(cases, got, strict=True)):
                assert details(symbols) == want, (batch, i)
        assert 1 <= s.client.connections_opened <= 4  # 60 scans on at most 4 sessions
        assert s.client.idle_sessions <= 4
    assert relay.sessions() == s.client.connections_opened


@pytest.mark.asyncio
async def test_session_idle_zero_is_one_connection_per_scan(relay: Relay) -> None:
    async with open_scanner(relay.address, session_idle=0) as s:
        for i in range(4):
            raw, want = KINDS[i](i)
            assert details(await s.scan(scan_input(raw))) == want
        assert s.client.idle_sessions == 0
        assert s.client.connections_opened == 4
    assert relay.instreams() == 4
    assert relay.sessions() == 0


@pytest.mark.asyncio
async def test_session_idle_longer_than_session_idle_is_ended(relay: Relay) -> None:
    async with open_scanner(relay.address, session_idle=0.3) as s:
        assert await s.scan(scan_input(ham())) == []
        await asyncio.sleep(0.6)
        assert details(await s.scan(scan_input(plain(eicar())))) == [EICAR]
        assert s.client.connections_opened == 2
        await eventually(lambda: relay.live() == 1)  # the old one was ended, not left open


@pytest.mark.asyncio
async def test_session_replaced_after_max_requests(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clamav, "SESSION_MAX_REQUESTS", 3)
    async with open_scanner(relay.address) as s:
        for i in range(7):
            raw, want = KINDS[i % len(KINDS)](i)
            assert details(await s.scan(scan_input(raw))) == want
        assert s.client.connections_opened == 3


@pytest.mark.asyncio
async def test_aclose_ends_the_pooled_sessions(relay: Relay) -> None:
    s = ClamdScanner(ClamavSettings(socket=relay.address))
    await asyncio.gather(*(s.scan(scan_input(clean_mail(i)[0])) for i in range(6)))
    assert s.client.idle_sessions >= 1
    await s.aclose()
    assert s.client.idle_sessions == 0
    await eventually(lambda: relay.live() == 0)


# --- sessions that die ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_session_clamd_ended_while_idle_is_replaced(
    clamd_factory: Callable[..., Clamd],
) -> None:
    c = clamd_factory(read_timeout=1)  # clamd ends a session idle for ReadTimeout seconds
    async with open_scanner(c.address) as s:
        assert await s.scan(scan_input(ham())) == []
        assert s.client.idle_sessions == 1
        await eventually(lambda: s.client.idle_sessions == 0)  # COMMAND READ TIMED OUT, EOF
        assert details(await s.scan(scan_input(plain(eicar())))) == [EICAR]  # not a false OK
        assert await s.scan(scan_input(ham())) == []
        assert s.client.connections_opened == 2


@pytest.mark.asyncio
async def test_session_cut_while_idle_is_replaced(relay: Relay) -> None:
    async with open_scanner(relay.address) as s:
        assert await s.scan(scan_input(ham())) == []
        relay.cut()  # the network (or clamd) closes it; the pool sees the EOF while idle
        await eventually(lambda: s.client.idle_sessions == 0)
        assert details(await s.scan(scan_input(plain(eicar())))) == [EICAR]
        assert s.client.connections_opened == 2


@pytest.mark.asyncio
async def test_session_found_dead_when_reused_is_retried_on_a_new_one(relay: Relay) -> None:
    async with open_scanner(relay.address) as s:
        assert await s.scan(scan_input(ham())) == []
        relay.drop_requests = True  # the next request on it is met with a close, no reply
        assert details(await s.scan(scan_input(plain(eicar())))) == [EICAR]
        assert s.client.connections_opened == 2  # the dead one, then one new session
        relay.drop_requests = False
        assert details(await s.scan(scan_input(marker_mail(1)[0]))) == [MARKER]
        assert s.client.connections_opened == 2  # the new one is pooled
    assert relay.sessions() == 2


@pytest.mark.asyncio
async def test_retry_is_once_and_only_for_a_reused_session(relay: Relay) -> None:
    async with open_scanner(relay.address) as s:
        assert await s.scan(scan_input(ham())) == []
        accepted = relay.accepted
        relay.drop_requests = relay.refuse = True  # the pooled one dies, new ones are closed
        symbols = await s.scan(scan_input(ham()))
        assert names(symbols) == ["CLAMAV_FAIL"]
        assert "without a reply" in symbols[0].detail or "failed" in symbols[0].detail
        assert relay.accepted == accepted + 1  # one retry, no more
        assert names(await s.scan(scan_input(ham()))) == ["CLAMAV_FAIL"]  # new: no retry
        assert relay.accepted == accepted + 2
        relay.drop_requests = relay.refuse = False
        assert await s.scan(scan_input(ham())) == []


@pytest.mark.asyncio
async def test_stream_over_limit_on_a_session_fails_with_reason_then_recovers(
    clamd_factory: Callable[..., Clamd],
) -> None:
    c = clamd_factory(stream_max="1M")
    async with open_scanner(c.address) as s:
        assert await s.scan(scan_input(ham())) == []  # a session in the pool first
        big = with_attachment(os.urandom(2 << 20), "big.bin")
        symbols = await s.scan(scan_input(big))
        assert names(symbols) == ["CLAMAV_FAIL"]
        detail = symbols[0].detail
        # As in test_clamav: the early reply, or (when clamd's close overtakes the upload)
        # the broken pipe; never a verdict. A broken pipe before any reply byte on the
        # reused session is retried once on a new one, which fails the same way.
        assert "size limit" in detail or "connection failed" in detail, detail
        assert s.client.idle_sessions == 0
        opened = s.client.connections_opened
        assert opened in (1, 2)
        assert details(await s.scan(scan_input(plain(eicar())))) == [EICAR]
        assert s.client.connections_opened == opened + 1  # the failed one was not reused


@pytest.mark.asyncio
@pytest.mark.parametrize("session_idle", [0.0, 10.0], ids=["per-scan", "session"])
async def test_scan_cut_short_mid_upload_aborts_its_connection(session_idle: float) -> None:
    stall = StallingListener().start()  # never reads: the upload blocks on flow control
    client = ClamdClient(stall.address, session_idle=session_idle)
    data = os.urandom(16 << 20)
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await client.instream(data)
        assert client.idle_sessions == 0
        stall.release()
        await eventually(lambda: len(stall.endings) == 1)
    finally:
        await client.aclose()
        stall.stop()
    assert stall.endings[0] in ("eof", "reset")  # closed by us, not left hanging
    assert stall.received[0] < len(data)  # the upload was cut, no terminator sent


# --- replies that must not be believed (a fake clamd says them) ----------------------------

FAULTS: dict[str, tuple[bytes | None, str]] = {
    # data marker -> (reply to a request carrying it, what the CLAMAV_FAIL detail says)
    "WRONG-ID": (b"%(prev)d: stream: OK\0", "not numbered"),
    "NEXT-ID": (b"%(next)d: stream: OK\0", "not numbered"),
    "NO-ID": (b"stream: OK\0", "not numbered"),
    "BAD-ID": (b"x: stream: OK\0", "not numbered"),
    "TWO-REPLIES": (b"%(req)d: stream: OK\0%(next)d: stream: OK\0", "more than one reply"),
    "CUT-OFF": (b"%(req)d: stream: ", "unexpected reply"),
    "ERROR": (b"%(req)d: Can't allocate memory ERROR\0", "Can't allocate memory ERROR"),
    "LONG": (b"%(req)d: stream: " + b"A" * 5000, "too long"),
}


def fake_answer(conn: int, request: int, data: bytes) -> bytes | None:
    for key, (reply, _) in FAULTS.items():
        if key.encode() in data and reply is not None:
            return reply % {b"req": request, b"prev": request - 1, b"next": request + 1}
    if b"NOTICE" in data and request > 1:
        return IDLE_NOTICE  # clamd's idle close, racing our request on a reused session
    if b"SILENT-CLOSE" in data and request > 1:
        return None
    if b"VIRUS" in data:
        return b"%d: stream: Fake.Virus FOUND\0" % request
    return numbered_ok(conn, request, data)


@pytest.fixture
def fake() -> Iterator[FakeSessionClamd]:
    f = FakeSessionClamd(fake_answer).start()
    yield f
    f.stop()


def sessions_used(fake: FakeSessionClamd) -> int:
    return len({conn for conn, _, _ in fake.requests})


@pytest.mark.asyncio
@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_unbelievable_reply_fails_and_session_is_not_reused(
    fake: FakeSessionClamd, fault: str
) -> None:
    async with open_scanner(fake.address) as s:
        assert await s.scan(scan_input(plain("first"))) == []
        symbols = await s.scan(scan_input(plain(f"second {fault}")))
        assert names(symbols) == ["CLAMAV_FAIL"]
        assert FAULTS[fault][1] in symbols[0].detail, symbols[0].detail
        assert s.client.idle_sessions == 0
        assert await s.scan(scan_input(plain("third"))) == []
    assert s.client.connections_opened == 2  # failures are not retried
    assert [(r, d.count(b"second")) for _, r, d in fake.requests] == [(1, 0), (2, 1), (1, 0)]
    assert sessions_used(fake) == 2


@pytest.mark.asyncio
async def test_wrong_id_on_a_first_request_is_fail(fake: FakeSessionClamd) -> None:
    async with open_scanner(fake.address) as s:
        symbols = await s.scan(scan_input(plain("NEXT-ID VIRUS")))
        assert names(symbols) == ["CLAMAV_FAIL"]
        assert "not numbered 1" in symbols[0].detail


@pytest.mark.asyncio
async def test_fake_numbered_replies_reuse_the_session(fake: FakeSessionClamd) -> None:
    async with open_scanner(fake.address) as s:
        for i in range(4):
            body = f"msg {i} VIRUS" if i % 2 else f"msg {i}"
            symbols = await s.scan(scan_input(plain(body)))
            assert names(symbols) == (["CLAMAV_VIRUS"] if i % 2 else [])
    assert sessions_used(fake) == 1
    assert [r for _, r, _ in fake.requests] == [1, 2, 3, 4]


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["NOTICE", "SILENT-CLOSE"])
async def test_reused_session_closed_without_reply_is_retried(
    fake: FakeSessionClamd, how: str
) -> None:
    async with open_scanner(fake.address) as s:
        assert await s.scan(scan_input(plain("first"))) == []
        assert names(await s.scan(scan_input(plain(f"{how} VIRUS")))) == ["CLAMAV_VIRUS"]
        assert s.client.connections_opened == 2
    sent = [(r, d) for _, r, d in fake.requests if how.encode() in d]
    assert [r for r, _ in sent] == [2, 1]  # on the reused session, then on a new one
    assert sent[0][1] == sent[1][1]  # the same message again

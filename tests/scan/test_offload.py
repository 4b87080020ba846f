"""Large messages are scanned in a process pool: the SMTP edge keeps serving other sessions,
and a pool worker that dies or overruns its time fails closed (451, nothing queued).

The event-loop test runs a real ``SmtpServer`` (tests/smtp/harness.py) with the real
built-in scanner behind the content hook, wrapped only to tell the test when the scan of
the 30 MB message has begun and ended. A second session must get its greeting and replies
after that scan began and before it ended, and before the first session's final reply:
ordering, not wall-clock time.

The crash and timeout tests kill real pool worker processes (SIGKILL; the timeout path
kills them itself) and check the verdict, the reply and that nothing was queued.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mailwarden.core.types import Direction, EnvelopeSnapshot, Symbol
from mailwarden.scan import BuiltinScanner, ScanInput, ScanSettings, VerdictEngine
from mailwarden.scan.builtin import OFFLOAD_MIN
from mailwarden.scan.settings import BuiltinSettings
from mailwarden.smtp.content import ContentFilter, Outcome
from tests.scan.messages import RCPT, SENDER, eicar
from tests.smtp.harness import RawClient, Running, make_config

BIG = 30 * 1024 * 1024
RECEIVED = b"Received: from client.test by mailwarden.test with ESMTP id QIDBIG0001\r\n"
WAIT = 120.0  # seconds before a test that waits for a condition gives up (not a measurement)


def big_message(size: int = BIG, extra: bytes = b"") -> bytes:
    """A multipart message of about ``size`` bytes: a base64 attachment of random data."""
    enc = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    return (
        b"From: a@example.org\r\nTo: b@example.edu\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="BOUND"\r\n\r\n--BOUND\r\n'
        b"Content-Type: text/plain\r\n\r\nSee attached.\r\n" + extra + b"--BOUND\r\n"
        b'Content-Type: application/octet-stream; name="d.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + enc + b"--BOUND--\r\n"
    )


class Announcing:
    """The real built-in scanner, plus events set when a scan begins and when it ends."""

    name = "BUILTIN"

    def __init__(self, inner: BuiltinScanner) -> None:
        self.inner = inner
        self.timeout = inner.timeout
        self.started = threading.Event()
        self.finished = threading.Event()

    async def scan(self, msg: ScanInput) -> list[Symbol]:
        self.started.set()
        try:
            return await self.inner.scan(msg)
        finally:
            self.finished.set()

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_other_sessions_are_served_while_30mb_is_scanned(tmp_path: Path) -> None:
    server = Running(make_config(tmp_path, max_message_size=64 * 1024 * 1024))
    scanner = Announcing(BuiltinScanner())
    flt = ContentFilter(VerdictEngine([scanner], ScanSettings()), None, "mx.test.example")
    server.server.content_filter = flt
    try:
        a = RawClient(server.port)
        assert a.cmd("EHLO a.example").startswith("250")
        assert a.cmd(f"MAIL FROM:<{SENDER}>").startswith("250")
        assert a.cmd(f"RCPT TO:<{RCPT}>").startswith("250")
        assert a.cmd("DATA").startswith("354")
        a.send(big_message() + b".\r\n")
        assert scanner.started.wait(WAIT), "the scan of the big message never began"

        b = RawClient(server.port)  # greeted by the constructor
        assert b.greeting.startswith("220")
        assert b.cmd("EHLO b.example").startswith("250")
        assert b.cmd("NOOP").startswith("250")
        # B was served while A's scan was still running (a scan on the event loop would
        # have held B's greeting until it finished), and A's final reply has not come yet.
        assert not scanner.finished.is_set()
        a.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            a.sock.recv(1)
        a.sock.setblocking(True)
        a.sock.settimeout(WAIT)
        assert a.reply().startswith("250 2.0.0"), "the big message was not accepted"
        assert b.cmd("QUIT").startswith("221")
        assert len(server.sink.items) == 1 and server.sink.items[0][1].endswith(b"--BOUND--\r\n")
    finally:
        server.call(flt.close())
        server.stop()


def _snap() -> EnvelopeSnapshot:
    return EnvelopeSnapshot(
        queue_id="QIDBIG0001",
        mail_from=SENDER,
        recipients=(RCPT,),
        received_at=time.time(),
        client_ip="192.0.2.10",
        client_helo="client.test",
        direction=Direction.INBOUND,
        message_id="<big@x>",
        size=0,
    )


class ListSink:
    def __init__(self) -> None:
        self.queued: list[bytes] = []

    async def enqueue(self, snapshot: EnvelopeSnapshot, data: bytes) -> None:
        self.queued.append(data)


async def _process(flt: ContentFilter, msg: bytes) -> tuple[Outcome, ListSink]:
    data = RECEIVED + msg
    end = data.find(b"\r\n\r\n") + 2
    sink = ListSink()
    return await flt.process(sink, _snap(), data, len(RECEIVED), end), sink


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.asyncio
async def test_killed_pool_worker_fails_closed_then_a_new_pool_scans() -> None:
    scanner = BuiltinScanner(pool_workers=1)
    flt = ContentFilter(VerdictEngine([scanner], ScanSettings()), None, "mx.test.example")
    msg = big_message(2 * OFFLOAD_MIN, extra=b"--BOUND\r\nContent-Type: text/plain\r\n\r\n")
    try:
        outcome, sink = await _process(flt, msg)
        assert outcome.code == 250 and len(sink.queued) == 1
        [pid] = scanner.pool.pids()
        os.kill(pid, signal.SIGKILL)  # as the OOM killer would

        outcome, sink = await _process(flt, msg)
        assert (outcome.code, outcome.enhanced) == (451, "4.7.1"), outcome
        assert outcome.verdict is not None and outcome.verdict.symbol_names == ["BUILTIN_FAIL"]
        assert "worker process died" in outcome.verdict.symbols[0].detail
        assert sink.queued == []  # never delivered unscanned

        outcome, sink = await _process(flt, msg)  # a fresh pool takes over
        assert outcome.code == 250 and len(sink.queued) == 1
        assert scanner.pool.pids() != [pid]
    finally:
        await flt.close()


@pytest.mark.asyncio
async def test_pool_scan_past_its_timeout_kills_the_worker_and_fails_closed() -> None:
    scanner = BuiltinScanner(BuiltinSettings(timeout=0.001), pool_workers=1)
    flt = ContentFilter(VerdictEngine([scanner], ScanSettings()), None, "mx.test.example")
    try:
        outcome, sink = await _process(flt, big_message(BIG, extra=eicar() + b"\r\n"))
        assert (outcome.code, outcome.enhanced) == (451, "4.7.1"), outcome
        assert outcome.verdict is not None and outcome.verdict.symbol_names == ["BUILTIN_FAIL"]
        assert "no answer within" in outcome.verdict.symbols[0].detail
        assert sink.queued == []
        assert scanner.pool.pids() == []  # the pool that ran it is gone ...
        killed = scanner.pool.killed
        assert killed
        deadline = time.monotonic() + WAIT
        while not all(_gone(p) for p in killed) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert all(_gone(p) for p in killed), "a killed scan worker is still running"
        scanner.timeout = 60.0  # ... and the next scan gets a new one
        engine = VerdictEngine([scanner], ScanSettings())
        flt2 = ContentFilter(engine, None, "mx.test.example")
        outcome, sink = await _process(flt2, big_message(2 * OFFLOAD_MIN))
        assert outcome.code == 250 and len(sink.queued) == 1
    finally:
        await flt.close()

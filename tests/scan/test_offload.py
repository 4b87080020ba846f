"""Large messages are scanned in a process pool: the SMTP edge keeps serving other sessions,
a pool that breaks under a scan costs the scans that did not break it nothing (each is
retried once, alone), and a scan that breaks a pool again or overruns its time fails closed
(451, nothing queued).

The event-loop test runs a real ``SmtpServer`` (tests/smtp/harness.py) with the real
built-in scanner behind the content hook, wrapped only to tell the test when the scan of
the 30 MB message has begun and ended. A second session must get its greeting and replies
after that scan began and before it ended, and before the first session's final reply:
ordering, not wall-clock time.

The crash and timeout tests kill real pool worker processes: from outside (SIGKILL, as the
OOM killer would, while the scans are in the pool), from inside (``tests.scan.faults``: a
scan function that kills its own worker, one that hangs, one that waits for the test to
release it so it is surely still in the pool when a pool-mate breaks it), or by the
timeout path itself. They check the verdicts, the replies, what was queued and the
``scan.pool_restart`` events. No mock of the pool: real ``spawn`` processes throughout.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from mailwarden.core import events as ev
from mailwarden.core.types import Direction, EnvelopeSnapshot, Symbol
from mailwarden.scan import BuiltinScanner, ScanInput, ScanSettings, VerdictEngine, builtin
from mailwarden.scan.builtin import EICAR, OFFLOAD_MIN, scan_message
from mailwarden.scan.offload import PoolError, ScanPool
from mailwarden.scan.settings import BuiltinSettings
from mailwarden.smtp.content import ContentFilter, Outcome
from tests.scan import faults
from tests.scan.messages import RCPT, SENDER, eicar, gtube
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
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):  # reaped, maybe between the two calls
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _restarts(events: ev.MemorySink) -> list[tuple[str, str, int]]:
    return [
        (e.fields["pool"], e.fields["reason"], e.fields["in_flight"])
        for e in events.events
        if e.name == "scan.pool_restart"
    ]


async def _until(cond: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.005)


@pytest.mark.asyncio
async def test_killed_idle_worker_costs_the_next_message_nothing(events: ev.MemorySink) -> None:
    scanner = BuiltinScanner(pool_workers=1)
    flt = ContentFilter(VerdictEngine([scanner], ScanSettings()), None, "mx.test.example")
    msg = big_message(2 * OFFLOAD_MIN, extra=b"--BOUND\r\nContent-Type: text/plain\r\n\r\n")
    try:
        outcome, sink = await _process(flt, msg)
        assert outcome.code == 250 and len(sink.queued) == 1
        [pid] = scanner.pool.pids()
        os.kill(pid, signal.SIGKILL)  # as the OOM killer would, between two messages

        # The next message meets the broken pool: it was not the cause, so it is retried.
        outcome, sink = await _process(flt, msg)
        assert outcome.code == 250 and len(sink.queued) == 1, outcome
        assert [r[:2] for r in _restarts(events)] == [("scan", "worker_died")]
        assert scanner.pool.retry_pids() == []  # the retry pool is gone once idle

        outcome, sink = await _process(flt, msg)  # a fresh pool takes over
        assert outcome.code == 250 and len(sink.queued) == 1
        assert scanner.pool.pids() not in ([], [pid])
        assert len(_restarts(events)) == 1
    finally:
        await flt.close()


@pytest.mark.asyncio
async def test_worker_killed_under_two_large_messages_both_get_their_verdicts(
    events: ev.MemorySink,
) -> None:
    scanner = BuiltinScanner(pool_workers=2)
    flt = ContentFilter(VerdictEngine([scanner], ScanSettings()), None, "mx.test.example")
    clean = big_message(BIG)
    spam = big_message(BIG, extra=gtube() + b"\r\n")
    try:
        a = asyncio.create_task(_process(flt, clean))
        b = asyncio.create_task(_process(flt, spam))
        await _until(lambda: scanner.pool.in_flight == 2, "both scans in the pool")
        os.kill(scanner.pool.pids()[0], signal.SIGKILL)  # mid-scan: the pool breaks under both

        (out_a, sink_a), (out_b, sink_b) = await asyncio.gather(a, b)
        assert out_a.code == 250 and len(sink_a.queued) == 1, out_a
        assert (out_b.code, out_b.enhanced) == (554, "5.7.1"), out_b
        assert out_b.verdict is not None and out_b.verdict.symbol_names == ["GTUBE"]
        assert sink_b.queued == []
        assert _restarts(events) == [("scan", "worker_died", 2)]  # one restart, not two
    finally:
        await flt.close()


@pytest.mark.asyncio
async def test_large_message_whose_retry_dies_too_fails_closed_then_a_new_pool_scans(
    events: ev.MemorySink,
) -> None:
    scanner = BuiltinScanner(pool_workers=1)
    flt = ContentFilter(VerdictEngine([scanner], ScanSettings()), None, "mx.test.example")
    msg = big_message(BIG)
    try:
        task = asyncio.create_task(_process(flt, msg))
        await _until(lambda: scanner.pool.in_flight == 1, "the scan in the pool")
        os.kill(scanner.pool.pids()[0], signal.SIGKILL)
        await _until(scanner.pool.retry_pids, "the retry pool's worker")
        os.kill(scanner.pool.retry_pids()[0], signal.SIGKILL)

        outcome, sink = await task
        assert (outcome.code, outcome.enhanced) == (451, "4.7.1"), outcome
        assert outcome.verdict is not None and outcome.verdict.symbol_names == ["BUILTIN_FAIL"]
        assert "worker process died" in outcome.verdict.symbols[0].detail
        assert sink.queued == []  # never delivered unscanned
        assert _restarts(events) == [("scan", "worker_died", 1), ("retry", "worker_died", 1)]

        outcome, sink = await _process(flt, big_message(2 * OFFLOAD_MIN))
        assert outcome.code == 250 and len(sink.queued) == 1
    finally:
        await flt.close()


@pytest.mark.asyncio
async def test_pool_mates_of_a_scan_that_kills_its_worker_get_their_real_verdicts(
    tmp_path: Path, events: ev.MemorySink
) -> None:
    pool = ScanPool(workers=2)
    gate = str(tmp_path / "gate")
    clean = big_message(2 * OFFLOAD_MIN)
    virus = big_message(2 * OFFLOAD_MIN, extra=eicar() + b"\r\n")
    try:
        # Submitted in this order: the first innocent and the culprit take the two workers,
        # the second innocent waits in the pool's queue.
        running = asyncio.create_task(pool.run(faults.scan_when_released, gate, virus, ()))
        culprit = asyncio.create_task(pool.run(faults.kill_own_worker, clean, ()))
        queued = asyncio.create_task(pool.run(faults.scan_when_released, gate, clean, ()))
        await _until(lambda: _restarts(events), "the pool to break")
        assert _restarts(events) == [("scan", "worker_died", 3)]
        Path(gate).touch()

        results = await asyncio.gather(running, culprit, queued, return_exceptions=True)
        assert results[0] == scan_message(virus, ())
        assert [s.name for s in results[0]] == ["BUILTIN_VIRUS"]  # type: ignore[union-attr]
        assert results[2] == scan_message(clean, ()) == []
        assert isinstance(results[1], PoolError), results[1]  # it broke its retry pool too
        assert _restarts(events) == [("scan", "worker_died", 3), ("retry", "worker_died", 1)]

        assert pool.retry_pids() == []
        assert await pool.run(scan_message, virus, ()) == results[0]  # the pool works again
    finally:
        await pool.aclose()


@pytest.mark.asyncio
async def test_scan_that_kills_its_worker_twice_fails_closed_and_the_pool_scans_again(
    events: ev.MemorySink,
) -> None:
    pool = ScanPool(workers=1)
    msg = big_message(2 * OFFLOAD_MIN, extra=eicar() + b"\r\n")
    try:
        with pytest.raises(PoolError, match="also on its retry"):
            await pool.run(faults.kill_own_worker, msg, ())
        assert _restarts(events) == [("scan", "worker_died", 1), ("retry", "worker_died", 1)]
        assert pool.pids() == [] and pool.retry_pids() == []

        assert await pool.run(scan_message, msg, ()) == scan_message(msg, ())
        assert len(pool.pids()) == 1
        assert len(_restarts(events)) == 2
    finally:
        await pool.aclose()


@pytest.mark.asyncio
async def test_cancelled_scan_is_killed_and_its_pool_mates_are_retried(
    tmp_path: Path, events: ev.MemorySink
) -> None:
    pool = ScanPool(workers=2)
    started, gate = tmp_path / "started", str(tmp_path / "gate")
    msg = big_message(2 * OFFLOAD_MIN, extra=eicar() + b"\r\n")
    try:
        hung = asyncio.create_task(pool.run(faults.hang_until_killed, str(started), msg, ()))
        mate = asyncio.create_task(pool.run(faults.scan_when_released, gate, msg, ()))
        # Both workers are taken; the executor's call queue holds three of these, the
        # fourth is still pending in the pool when the hung scan's pool is killed.
        queued = [asyncio.create_task(pool.run(scan_message, msg, ())) for _ in range(4)]
        await _until(started.exists, "the hung scan to start")
        assert pool.in_flight == 6
        hung.cancel()  # what the verdict engine's timeout does
        with pytest.raises(asyncio.CancelledError):
            await hung
        killed = pool.killed
        assert len(killed) == 2  # the whole pool: a runaway scan does not go on
        await _until(lambda: all(_gone(p) for p in killed), "the killed workers to exit")
        assert _restarts(events) == [("scan", "timeout", 6)]

        Path(gate).touch()
        expected = scan_message(msg, ())
        assert await mate == expected  # retried, not failed
        assert await asyncio.gather(*queued) == [expected] * 4
        assert len(_restarts(events)) == 1
    finally:
        await pool.aclose()


@pytest.mark.asyncio
async def test_calls_still_queued_when_the_pool_closes_fail_closed(tmp_path: Path) -> None:
    pool = ScanPool(workers=1)
    gate = str(tmp_path / "gate")
    msg = big_message(2 * OFFLOAD_MIN)
    # One call in the worker, at most two in the executor's call queue: the fourth is
    # still pending when the pool shuts down, and is cancelled by the shutdown.
    calls = [asyncio.create_task(pool.run(faults.scan_when_released, gate, msg, ()))]
    await _until(pool.pids, "the worker")
    calls += [asyncio.create_task(pool.run(scan_message, msg, ())) for _ in range(3)]
    await _until(lambda: pool.in_flight == 4, "all four calls in the pool")
    closing = asyncio.create_task(pool.aclose())
    await _until(lambda: calls[3].done(), "the pending call to end")
    Path(gate).touch()
    await closing
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[0] == []
    assert isinstance(results[3], PoolError) and "shut down" in str(results[3])
    assert all(r == [] or isinstance(r, PoolError) for r in results[1:3]), results


@pytest.mark.asyncio
async def test_pool_scan_past_its_timeout_kills_the_worker_and_fails_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The worker runs a scan that never ends (fault injector in place of scan_memfd).
    monkeypatch.setattr(builtin, "scan_memfd", faults.hang)
    scanner = BuiltinScanner(BuiltinSettings(timeout=2.0), pool_workers=1)
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
        monkeypatch.undo()
        engine = VerdictEngine([scanner], ScanSettings())
        flt2 = ContentFilter(engine, None, "mx.test.example")
        outcome, sink = await _process(flt2, big_message(2 * OFFLOAD_MIN))
        assert outcome.code == 250 and len(sink.queued) == 1
    finally:
        await flt.close()


T = TypeVar("T")


class _Recording(ScanPool):
    """The real pool, remembering which function each call ran in the worker."""

    def __init__(self) -> None:
        super().__init__(1)
        self.ran: list[str] = []

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        self.ran.append(fn.__name__)
        return await super().run(fn, *args)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.asyncio
async def test_large_message_reaches_the_worker_through_a_memfd_and_no_fd_is_left() -> None:
    scanner = BuiltinScanner(pool_workers=1)
    scanner.pool = pool = _Recording()
    virus = big_message(2 * OFFLOAD_MIN, extra=b"--BOUND\r\nContent-Type: text/plain\r\n\r\n")
    virus = virus.replace(b"See attached.", b"See attached. " + EICAR)
    try:
        before = _open_fds()
        found = await scanner.scan(ScanInput(raw=virus))
        assert [s.name for s in found] == ["BUILTIN_VIRUS"], found
        assert pool.ran == ["scan_memfd"]  # no pickled copy of the message
        clean = await scanner.scan(ScanInput(raw=big_message(2 * OFFLOAD_MIN)))
        assert clean == [] and pool.ran == ["scan_memfd", "scan_memfd"]
        leaked = {fd for fd in _open_fds() - before if "memfd" in _target(fd)}
        assert leaked == set()
    finally:
        await scanner.aclose()


@pytest.mark.asyncio
async def test_memfd_the_worker_cannot_open_falls_back_to_the_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fault injector: the /proc path names a process that does not exist (as when /proc
    is not readable there); the message is then sent pickled and still gets its verdict."""
    monkeypatch.setattr(builtin.os, "getpid", lambda: 2**22 + 1)  # above pid_max's default
    scanner = BuiltinScanner(pool_workers=1)
    scanner.pool = pool = _Recording()
    virus = big_message(2 * OFFLOAD_MIN).replace(b"See attached.", EICAR)
    try:
        found = await scanner.scan(ScanInput(raw=virus))
        assert [s.name for s in found] == ["BUILTIN_VIRUS"], found
        assert pool.ran == ["scan_memfd", "scan_message"]
    finally:
        await scanner.aclose()


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


@pytest.mark.asyncio
async def test_timeout_while_the_memfd_is_written_fails_closed_and_closes_it() -> None:
    scanner = BuiltinScanner(BuiltinSettings(timeout=0.001), pool_workers=1)
    flt = ContentFilter(VerdictEngine([scanner], ScanSettings()), None, "mx.test.example")
    before = _open_fds()
    try:
        outcome, sink = await _process(flt, big_message(BIG))
        assert (outcome.code, outcome.enhanced) == (451, "4.7.1"), outcome
        assert sink.queued == []
        await _until(
            lambda: not {fd for fd in _open_fds() - before if "memfd" in _target(fd)},
            "the memfd to be closed",
        )
    finally:
        await flt.close()

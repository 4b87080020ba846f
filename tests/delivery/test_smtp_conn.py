"""Hostile and odd servers against ``SMTPConnection`` (delivery/smtp_conn.py), the SMTP/LMTP
client wire layer under ``delivery.smtp_client``, ``delivery.lmtp`` and the recipient checks.

``FaultInjector`` is a fault injector, not an MTA: a scripted asyncio server on 127.0.0.1 (or
on a Unix socket in ``tmp_path``) whose per-test script misbehaves on purpose in ways real
Postfix, Dovecot or smtp-sink cannot be made to: replies cut into one-byte TCP writes,
pipelined replies in one write, malformed or overlong reply lines, endless floods, a close in
the middle of a transaction, silence, plaintext behind a STARTTLS 220, a reader that stalls
under an 8 MB message. One-byte writes go in lockstep with ``Probe``, a subclass of the
client's reply protocol patched in for the test that counts what the client received, so each
byte is known to have reached ``data_received`` on its own.

Every test runs on the standard asyncio loop and on uvloop (what the gateway runs on). No test
asserts a duration: timeouts are small only so that silence fails fast, and every test has an
overall deadline so that a hang fails instead of blocking the suite.

Security: binds and connects to 127.0.0.1 and to a Unix socket under ``tmp_path`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.postfix import make_self_signed

from mailwarden.delivery import smtp_conn
from mailwarden.delivery.smtp_conn import (
    MAX_QUEUED_REPLIES,
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    ProtocolError,
    Reply,
    SMTPConnection,
    StaleConnection,
)

pytestmark = pytest.mark.timeout(120)

LOOPBACK = "127.0.0.1"
IO = 5.0  # seconds a script or a client waits for the other side before the test fails
DEADLINE = 60.0  # seconds for one test's event loop
SILENT = 0.3  # command/data timeout against a server that never answers
MAX_DATA = 32 * 1024 * 1024  # a script never buffers more than this from one DATA
FLOOD_CHUNKS = 512  # an endless flood gives up after this many writes (then the test fails)
READ_MAX = 256 * 1024  # the most one data_received gets (asyncio and uvloop read 256 KiB)
CLOSED = {"connection closed by server", "write failed: connection lost"}

SENDER = "s@src.test"
RCPTS = ["a@dept.test", "b@dept.test", "c@dept.test"]
MESSAGE = (
    b"From: s@src.test\r\nTo: a@dept.test\r\nSubject: dots\r\n\r\n"
    b".a line that starts with a dot\r\n..two dots\r\n.\r\nthe end\r\n"
)


# Event loops ---------------------------------------------------------------------------
@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[None]]], None]:
    """``run(main)`` runs the coroutine function ``main`` on a fresh loop, bounded."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop

    def runner(main: Callable[[], Awaitable[None]]) -> None:
        async def bounded() -> None:
            async with asyncio.timeout(DEADLINE):
                await main()

        with asyncio.Runner(loop_factory=factory) as r:
            r.run(bounded())

    return runner


# The client's side, observed ------------------------------------------------------------
class Probe:
    """What the client's reply protocol saw: sizes of the chunks passed to data_received,
    bytes received, pause_writing/resume_writing calls."""

    def __init__(self) -> None:
        self.chunks: list[int] = []
        self.received = 0
        self.pauses = 0
        self.resumes = 0
        self._changed = asyncio.Event()

    def note(self) -> None:
        self._changed.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds (re-checked on every client event), at most IO."""
        async with asyncio.timeout(IO):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Probe:
    p = Probe()

    class ProbedProtocol(smtp_conn._ReplyProtocol):
        def data_received(self, data: bytes) -> None:
            p.chunks.append(len(data))
            p.received += len(data)
            super().data_received(data)
            p.note()

        def pause_writing(self) -> None:
            p.pauses += 1
            super().pause_writing()
            p.note()

        def resume_writing(self) -> None:
            p.resumes += 1
            super().resume_writing()
            p.note()

    monkeypatch.setattr(smtp_conn, "_ReplyProtocol", ProbedProtocol)
    return p


# The fault injector ---------------------------------------------------------------------
def ehlo_reply(*extensions: str, name: str = "fault.test") -> bytes:
    lines = [name, *extensions]
    last = len(lines) - 1
    return b"".join(
        f"250{' ' if i == last else '-'}{line}\r\n".encode() for i, line in enumerate(lines)
    )


def _data_ended(data: bytes | bytearray) -> bool:
    return data == b".\r\n" or data.endswith(b"\r\n.\r\n")


def unstuff(data: bytes) -> bytes:
    """The message a DATA stream carries (RFC 5321 4.5.2, the receiver's side)."""
    assert _data_ended(data), data[-20:]
    body = data[: -len(b".\r\n")]
    return b"\r\n".join(x[1:] if x.startswith(b".") else x for x in body.split(b"\r\n"))


class Peer:
    """The server side of one connection, as a script drives it."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, probe: Probe | None
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.probe = probe
        self.commands: list[str] = []  # every line read, CRLF stripped
        self.notes: dict[str, Any] = {}
        self.sent = 0
        self.flooded = 0  # writes of flood()
        self.cut = False  # the client reset the connection under the script
        self.finished = asyncio.Event()
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        self.sent += len(data)
        await self.writer.drain()

    async def send_bytewise(self, data: bytes) -> None:
        """One write per byte, each handed to the client's data_received before the next."""
        probe = self.probe
        assert probe is not None, "send_bytewise needs the probe fixture"
        for byte in data:
            await self.send(bytes([byte]))
            await probe.until(self._all_received)

    def _all_received(self) -> bool:
        assert self.probe is not None
        return self.probe.received >= self.sent

    async def line(self) -> str:
        raw = await asyncio.wait_for(self.reader.readline(), IO)
        if not raw:
            raise EOFError("the client closed the connection")
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        self.commands.append(text)
        return text

    async def expect(self, prefix: str) -> str:
        text = await self.line()
        assert text.upper().startswith(prefix.upper()), f"expected {prefix!r}, got {text!r}"
        return text

    async def hello(
        self,
        *extensions: str,
        greeting: bytes = b"220 fault.test ESMTP\r\n",
        verb: str = "EHLO",
    ) -> None:
        await self.send(greeting)
        await self.expect(verb)
        await self.send(ehlo_reply(*extensions))

    async def message(self, *, slow_reads: int = 0) -> bytes:
        """The DATA stream up to its terminating dot line. The first ``slow_reads`` reads
        take 4 KiB each with a pause between (a receiver that is slow at first)."""
        data = bytearray()
        async with asyncio.timeout(IO * 4):
            for i in range(slow_reads + MAX_DATA):
                if _data_ended(data):
                    return bytes(data)
                chunk = await self.reader.read(4096 if i < slow_reads else 1 << 20)
                if not chunk:
                    raise EOFError("the client closed the connection during DATA")
                data += chunk
                assert len(data) <= MAX_DATA
                if i < slow_reads:
                    await asyncio.sleep(0.002)  # pacing only, never asserted
        raise AssertionError("no end of DATA")

    async def until_closed(self) -> bytes:
        """Answer nothing; return what the client sent until it closed the connection."""
        data = bytearray()
        async with asyncio.timeout(IO):
            with contextlib.suppress(ConnectionError):
                while chunk := await self.reader.read(65536):
                    data += chunk
                    assert len(data) <= MAX_DATA
        return bytes(data)

    async def flood(self, head: bytes, chunk: bytes) -> None:
        """Send ``head`` then ``chunk`` over and over until the client cuts the connection
        (``cut`` is then True) or FLOOD_CHUNKS writes went out (``cut`` stays False)."""
        try:
            await self.send(head)
            for _ in range(FLOOD_CHUNKS):
                await self.send(chunk)
                self.flooded += 1
                await asyncio.sleep(0)  # let the client run even if nothing blocks
        except ConnectionError:
            self.cut = True


Script = Callable[[Peer], Awaitable[None]]


class FaultInjector:
    """A scripted SMTP/LMTP server: each accepted connection runs ``script(peer)``, then is
    closed. Script failures (assertions, its own timeouts) are re-raised by ``check()``; a
    connection reset by the client ends a script quietly with ``peer.cut`` set."""

    def __init__(self, script: Script, probe: Probe | None = None) -> None:
        self.script = script
        self.probe = probe
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False

    async def start(self, *, unix_path: Path | None = None, rcvbuf: int = 0) -> None:
        if unix_path is not None:
            self._server = await asyncio.start_unix_server(self._session, path=str(unix_path))
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:  # inherited by the accepted connections
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((LOOPBACK, 0))
        sock.listen(8)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._session, sock=sock)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(reader, writer, self.probe)
        self.peers.append(peer)
        try:
            await self.script(peer)
        except ConnectionError:
            peer.cut = True
        except Exception as exc:
            if not self._stopping:
                self.errors.append(exc)
        finally:
            peer.finished.set()
            writer.close()

    async def finished(self) -> Peer:
        """The first connection's peer, once its script has ended."""
        async with asyncio.timeout(IO):
            while not self.peers:
                await asyncio.sleep(0.01)
            await self.peers[0].finished.wait()
        return self.peers[0]

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for peer in self.peers:
            peer.writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=IO)
        for task in self._tasks:
            task.cancel()

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]


@contextlib.asynccontextmanager
async def fault_injector(
    script: Script, probe: Probe | None = None, **start: Any
) -> AsyncIterator[FaultInjector]:
    inj = FaultInjector(script, probe)
    await inj.start(**start)
    try:
        yield inj
    finally:
        await inj.stop()
    inj.check()


async def connect(
    inj: FaultInjector, *, timeout: float = IO, data_timeout: float = IO
) -> tuple[SMTPConnection, Reply]:
    return await SMTPConnection.open_tcp(
        LOOPBACK,
        inj.port,
        f"fault.test[{LOOPBACK}]:{inj.port}",
        connect_timeout=IO,
        command_timeout=timeout,
        data_timeout=data_timeout,
    )


async def until(condition: Callable[[], bool]) -> None:
    """Poll a client-side condition, at most IO seconds."""
    async with asyncio.timeout(IO):
        while not condition():
            await asyncio.sleep(0.01)


async def standard_exchange(peer: Peer, *, pipelined: bool) -> bytes:
    """MAIL, one RCPT, DATA answered with 250/250/354; returns the DATA stream."""
    if pipelined:
        for prefix in ("MAIL FROM:", "RCPT TO:", "DATA"):
            await peer.expect(prefix)
        await peer.send(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
    else:
        for prefix, reply in (("MAIL FROM:", b"250 2.1.0 ok\r\n"), ("RCPT TO:", b"250 ok\r\n")):
            await peer.expect(prefix)
            await peer.send(reply)
        await peer.expect("DATA")
        await peer.send(b"354 go ahead\r\n")
    return await peer.message()


# Split and batched replies --------------------------------------------------------------
def test_multiline_ehlo_in_one_byte_writes_is_parsed_into_extensions(
    run: Any, probe: Probe
) -> None:
    greeting = b"220 fault.test ESMTP ready\r\n"
    ehlo = ehlo_reply("PIPELINING", "SIZE 10485760", "8BITMIME", "auth PLAIN LOGIN", "STARTTLS")

    async def script(peer: Peer) -> None:
        await peer.send_bytewise(greeting)
        await peer.expect("EHLO client.test")
        await peer.send_bytewise(ehlo)
        await peer.expect("QUIT")
        await peer.send(b"221 bye\r\n")

    async def main() -> None:
        async with fault_injector(script, probe) as inj:
            conn, hi = await connect(inj)
            reply = await conn.hello("client.test")
            assert (hi.code, hi.lines) == (220, ("fault.test ESMTP ready",))
            assert reply.code == 250 and len(reply.lines) == 6
            assert reply.lines[0] == "fault.test" and conn.esmtp
            assert conn.extensions == {
                "PIPELINING": "",
                "SIZE": "10485760",
                "8BITMIME": "",
                "AUTH": "PLAIN LOGIN",
                "STARTTLS": "",
            }
            assert conn.size_limit == 10485760 and conn.has("starttls")
            await conn.quit()
            await inj.finished()
        # Every byte of the greeting and of the EHLO reply reached data_received on its own.
        n = len(greeting) + len(ehlo)
        assert probe.chunks[:n] == [1] * n

    run(main)


@pytest.mark.parametrize("split", ["one-byte writes", "one write"])
def test_pipelined_transaction_maps_every_reply(run: Any, probe: Probe, split: str) -> None:
    replies = (
        b"250 2.1.0 sender ok\r\n"
        b"250 2.1.5 a ok\r\n"
        b"550 5.1.1 <b@dept.test> unknown user\r\n"
        b"251 2.1.5 c will be forwarded\r\n"
        b"354 End data with <CR><LF>.<CR><LF>\r\n"
    )
    final = b"250 2.0.0 Ok: queued as 4ABC\r\n"

    async def send(peer: Peer, data: bytes) -> None:
        if split == "one write":
            await peer.send(data)
        else:
            await peer.send_bytewise(data)

    async def script(peer: Peer) -> None:
        await peer.hello("PIPELINING", "SIZE 1000000")
        # Nothing is answered before the whole pipelined group has arrived.
        group = [await peer.line() for _ in range(5)]
        assert group == [
            f"MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)}",
            *[f"RCPT TO:<{r}>" for r in RCPTS],
            "DATA",
        ]
        await send(peer, replies)
        peer.notes["data"] = await peer.message()
        await send(peer, final)
        await peer.expect("QUIT")
        await peer.send(b"221 bye\r\n")

    async def main() -> None:
        async with fault_injector(script, probe) as inj:
            conn, _ = await connect(inj)
            await conn.hello("client.test")
            tx = await conn.transaction(SENDER, RCPTS, MESSAGE, [f"SIZE={len(MESSAGE)}"])
            assert tx.mail is not None and (tx.mail.code, tx.mail.text) == (250, "sender ok")
            assert [(r.code, r.enhanced) for r in tx.rcpt] == [
                (250, "2.1.5"),
                (550, "5.1.1"),
                (251, "2.1.5"),
            ]
            assert tx.rcpt[1].text == "<b@dept.test> unknown user"
            assert tx.data is not None and tx.data.code == 354
            assert [(r.code, r.text) for r in tx.final] == [(250, "Ok: queued as 4ABC")]
            assert tx.clean and conn.uses == 1 and not conn.broken
            assert not conn.protocol.replies
            await conn.quit()
            peer = await inj.finished()
        assert unstuff(peer.notes["data"]) == MESSAGE
        if split == "one write":
            assert len(replies) in probe.chunks  # all five replies came in one data_received
        else:
            assert probe.chunks.count(1) >= len(replies) + len(final)

    run(main)


# Hostile replies --------------------------------------------------------------------------
HOSTILE = {
    "not a reply": (b"hello there\r\n", "malformed reply line 'hello there'"),
    "bad separator": (b"250*ok\r\n", "malformed reply line '250*ok'"),
    "too short": (b"25\r\n", "malformed reply line '25'"),
    # str.isdigit() is true for these and int() rejects the first and reads 250 in the second
    "superscript digits": (
        "\u00b2\u2075\u2070 ok\r\n".encode(),
        "malformed reply line " + repr("\u00b2\u2075\u2070 ok"),
    ),
    "Arabic-Indic digits": (
        "\u0662\u0665\u0660 ok\r\n".encode(),
        "malformed reply line " + repr("\u0662\u0665\u0660 ok"),
    ),
    "line over MAX_REPLY_LINE": (b"250 " + b"x" * MAX_REPLY_LINE + b"\r\n", "reply line too long"),
    "code changes inside a multi-line reply": (
        b"250-first\r\n251 second\r\n",
        "reply code changed inside a multi-line reply",
    ),
    "garbage inside a multi-line reply": (
        b"250-first\r\nsecond\r\n",
        "malformed reply line 'second'",
    ),
    "more than MAX_REPLY_LINES lines": (
        b"250-line\r\n" * MAX_REPLY_LINES + b"250 last\r\n",
        "too many reply lines",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_reply_is_a_protocol_error(run: Any, case: str) -> None:
    payload, message = HOSTILE[case]

    async def script(peer: Peer) -> None:
        await peer.hello()
        await peer.expect("NOOP")
        await peer.send(payload)
        peer.notes["after"] = await peer.until_closed()

    async def main() -> None:
        async with fault_injector(script) as inj:
            conn, _ = await connect(inj)
            await conn.hello("client.test")
            with pytest.raises(ProtocolError) as err:
                await conn.command("NOOP")
            assert type(err.value) is ProtocolError and str(err.value) == message
            assert conn.broken and conn.closing
            assert conn.protocol.pending_bytes() == 0 and not conn.protocol.replies
            # The client dropped the connection by itself, without sending anything more.
            peer = await inj.finished()
            assert peer.notes.get("after", b"") == b""
            with pytest.raises(ProtocolError):
                await conn.command("RSET")

    run(main)


def test_reply_limits_are_inclusive(run: Any) -> None:
    longest = b"250 " + b"y" * (MAX_REPLY_LINE - 6) + b"\r\n"  # MAX_REPLY_LINE bytes with CRLF
    most = b"250-line\r\n" * (MAX_REPLY_LINES - 1) + b"250 last\r\n"
    assert len(longest) == MAX_REPLY_LINE

    async def script(peer: Peer) -> None:
        await peer.hello()
        await peer.expect("NOOP")
        await peer.send(longest[:1000])
        await peer.send(longest[1000:])
        await peer.expect("NOOP")
        await peer.send(most)
        await peer.expect("QUIT")
        await peer.send(b"221 bye\r\n")

    async def main() -> None:
        async with fault_injector(script) as inj:
            conn, _ = await connect(inj)
            await conn.hello("client.test")
            first = await conn.command("NOOP")
            assert first.code == 250 and first.lines == ("y" * (MAX_REPLY_LINE - 6),)
            second = await conn.command("NOOP")
            assert second.code == 250 and len(second.lines) == MAX_REPLY_LINES
            assert second.lines[-1] == "last" and not conn.broken
            await conn.quit()
            await inj.finished()

    run(main)


def test_garbage_behind_a_complete_reply_fails_the_next_command(run: Any) -> None:
    async def script(peer: Peer) -> None:
        await peer.hello()
        await peer.expect("NOOP")
        await peer.send(b"250 2.0.0 ok\r\nnonsense\r\n")
        await peer.until_closed()

    async def main() -> None:
        async with fault_injector(script) as inj:
            conn, _ = await connect(inj)
            await conn.hello("client.test")
            reply = await conn.command("NOOP")  # the reply itself was well-formed
            assert reply.code == 250
            with pytest.raises(ProtocolError) as err:
                await conn.command("RSET")
            assert str(err.value) == "malformed reply line 'nonsense'"
            assert conn.broken and conn.closing
            await inj.finished()

    run(main)


def test_endless_line_without_newline_is_cut(run: Any) -> None:
    async def script(peer: Peer) -> None:
        await peer.hello()
        await peer.expect("NOOP")
        await peer.flood(b"250 ", b"x" * 65536)

    async def main() -> None:
        async with fault_injector(script) as inj:
            conn, _ = await connect(inj)
            await conn.hello("client.test")
            with pytest.raises(ProtocolError) as err:
                await conn.command("NOOP")
            assert str(err.value) == "reply line too long"
            assert conn.broken and conn.closing and conn.protocol.pending_bytes() == 0
            peer = await inj.finished()
            assert peer.cut, f"the client read {peer.flooded} x 64 KiB without giving up"

    run(main)


def test_flood_of_unsolicited_replies_is_cut(run: Any) -> None:
    junk = b"250 2.0.0 unsolicited\r\n"

    async def script(peer: Peer) -> None:
        await peer.hello()
        await peer.expect("NOOP")
        await peer.send(b"250 2.0.0 ok\r\n")
        await peer.flood(b"", junk * 512)

    async def main() -> None:
        async with fault_injector(script) as inj:
            conn, _ = await connect(inj)
            await conn.hello("client.test")
            reply = await conn.command("NOOP")
            assert (reply.code, reply.text) == (250, "ok")
            peer = await inj.finished()  # the client does not read: the flood piles up
            assert peer.cut, f"the client took {peer.flooded * 512} unsolicited replies"
            queued = len(conn.protocol.replies)
            assert MAX_QUEUED_REPLIES < queued <= MAX_QUEUED_REPLIES + READ_MAX // len(junk)
            assert conn.closing
            with pytest.raises(ProtocolError) as err:
                await conn.command("NOOP")
            assert str(err.value) == "the server sent more replies than commands"
            assert conn.broken

    run(main)


# Connections that end mid-transaction ----------------------------------------------------
@pytest.mark.parametrize("reused", [False, True])
@pytest.mark.parametrize("when", ["after the MAIL reply", "after 354", "before the final reply"])
def test_server_closes_mid_transaction(run: Any, when: str, reused: bool) -> None:
    async def script(peer: Peer) -> None:
        await peer.hello("SIZE 1000000")  # no PIPELINING: one command at a time
        await peer.expect("MAIL FROM:")
        await peer.send(b"250 2.1.0 ok\r\n")
        if when == "after the MAIL reply":
            return
        await peer.expect("RCPT TO:")
        await peer.send(b"250 2.1.5 ok\r\n")
        await peer.expect("DATA")
        await peer.send(b"354 go ahead\r\n")
        if when == "after 354":
            return
        await peer.message()

    async def main() -> None:
        async with fault_injector(script) as inj:
            conn, _ = await connect(inj)
            await conn.hello("client.test")
            conn.reused = reused
            with pytest.raises(ProtocolError) as err:
                await conn.transaction(SENDER, RCPTS[:1], MESSAGE, [])
            # MAIL was answered: not a stale connection to retry on a fresh one.
            assert type(err.value) is ProtocolError and str(err.value) in CLOSED
            assert conn.broken and conn.closing and conn.uses == 0

    run(main)


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize("reused", [False, True])
def test_close_before_the_mail_reply(run: Any, pipelining: bool, reused: bool) -> None:
    async def script(peer: Peer) -> None:
        await peer.hello(*(["PIPELINING"] if pipelining else []))
        await peer.expect("MAIL FROM:")  # then close without a word

    async def main() -> None:
        async with fault_injector(script) as inj:
            conn, _ = await connect(inj)
            await conn.hello("client.test")
            conn.reused = reused
            with pytest.raises(ProtocolError) as err:
                await conn.transaction(SENDER, RCPTS, MESSAGE, [])
            assert type(err.value) is (StaleConnection if reused else ProtocolError)
            assert str(err.value) in CLOSED and conn.broken

    run(main)


def test_reused_connection_dropped_while_idle_is_stale(run: Any) -> None:
    async def script(peer: Peer) -> None:
        await peer.hello()
        await peer.send(b"421 4.4.2 fault.test Error: timeout exceeded\r\n")

    async def main() -> None:
        async with fault_injector(script) as inj:
            conn, _ = await connect(inj)
            await conn.hello("client.test")
            await inj.finished()
            await until(lambda: conn.closing)
            conn.reused = True
            with pytest.raises(StaleConnection):
                await conn.transaction(SENDER, RCPTS, MESSAGE, [])
            assert conn.broken

    run(main)


@pytest.mark.parametrize("pipelining", [False, True])
def test_421_to_mail_on_a_reused_connection_is_stale(run: Any, pipelining: bool) -> None:
    async def script(peer: Peer) -> None:
        await peer.hello(*(["PIPELINING"] if pipelining else []))
        await peer.expect("MAIL FROM:")
        await peer.send(b"421 4.3.2 fault.test shutting down\r\n")

    async def main() -> None:
        async with fault_injector(script) as inj:
            conn, _ = await connect(inj)
            await conn.hello("client.test")
            conn.reused = True
            with pytest.raises(StaleConnection) as err:
                await conn.transaction(SENDER, RCPTS, MESSAGE, [])
            assert str(err.value) == "421 4.3.2 fault.test shutting down"
            assert conn.broken

    run(main)


def test_421_to_mail_on_a_fresh_connection_is_a_reply(run: Any) -> None:
    async def script(peer: Peer) -> None:
        await peer.hello()
        await peer.expect("MAIL FROM:")
        await peer.send(b"421 4.3.2 fault.test shutting down\r\n")

    async def main() -> None:
        async with fault_injector(script) as inj:
            conn, _ = await connect(inj)
            await conn.hello("client.test")
            tx = await conn.transaction(SENDER, RCPTS, MESSAGE, [])
            assert tx.mail is not None and tx.mail.code == 421 and tx.rcpt == []
            assert not tx.clean and conn.broken  # the RSET found the connection gone

    run(main)


# Silence -----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["greeting", "command", "pipelined group", "final reply"])
def test_silent_server_times_out(run: Any, where: str) -> None:
    async def script(peer: Peer) -> None:
        if where == "command":
            await peer.send(b"220 fault.test ESMTP\r\n")
            await peer.expect("NOOP")
        elif where == "pipelined group":
            await peer.hello("PIPELINING")
            for prefix in ("MAIL FROM:", "RCPT TO:", "DATA"):
                await peer.expect(prefix)
            await peer.send(b"250 2.1.0 ok\r\n")  # and nothing for RCPT and DATA
        elif where == "final reply":
            await peer.hello()
            await standard_exchange(peer, pipelined=False)
        peer.notes["after"] = await peer.until_closed()

    async def main() -> None:
        async with fault_injector(script) as inj:
            if where == "greeting":
                with pytest.raises(TimeoutError):
                    await connect(inj, timeout=SILENT)
            else:
                conn, _ = await connect(inj, timeout=SILENT, data_timeout=SILENT)
                with pytest.raises(TimeoutError):
                    if where == "command":
                        await conn.command("NOOP")
                    else:
                        await conn.hello("client.test")
                        await conn.transaction(SENDER, RCPTS[:1], MESSAGE, [])
                assert conn.broken
                await conn.quit(timeout=SILENT)  # no QUIT on a broken connection
                assert conn.closing
            peer = await inj.finished()  # ends when the client has closed the connection
            assert peer.notes["after"] == b""

    run(main)


# LMTP ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pipelining", [True, False])
def test_lmtp_one_final_reply_per_accepted_recipient(
    run: Any, probe: Probe, tmp_path: Path, pipelining: bool
) -> None:
    path = tmp_path / "lmtp.sock"
    answers = [b"250 2.1.0 ok\r\n", b"250 2.1.5 ok\r\n", b"550 5.1.1 <b@dept.test> unknown\r\n"]
    answers += [b"250 2.1.5 ok\r\n", b"354 go ahead\r\n"]
    finals = b"250 2.0.0 <a@dept.test> saved\r\n452 4.2.2 <c@dept.test> mailbox full\r\n"

    async def script(peer: Peer) -> None:
        extensions = ["PIPELINING", "ENHANCEDSTATUSCODES"] if pipelining else ["8BITMIME"]
        await peer.hello(*extensions, greeting=b"220 fault.test LMTP\r\n", verb="LHLO")
        commands = ["MAIL FROM:", *[f"RCPT TO:<{r}>" for r in RCPTS], "DATA"]
        if pipelining:
            for prefix in commands:
                await peer.expect(prefix)
            await peer.send(b"".join(answers))
        else:
            for prefix, answer in zip(commands, answers, strict=True):
                await peer.expect(prefix)
                await peer.send(answer)
        peer.notes["data"] = await peer.message()
        if pipelining:
            await peer.send(finals)  # both finals in one write
        else:
            await peer.send_bytewise(finals)  # the second completes long after the first
        await peer.expect("QUIT")
        await peer.send(b"221 bye\r\n")

    async def main() -> None:
        async with fault_injector(script, probe, unix_path=path) as inj:
            conn, hi = await SMTPConnection.open_unix(
                str(path), connect_timeout=IO, command_timeout=IO, data_timeout=IO
            )
            assert conn.lmtp and conn.label == f"unix:{path}" and hi.code == 220
            await conn.hello("gw.test")
            assert conn.has("PIPELINING") == pipelining
            tx = await conn.transaction(SENDER, RCPTS, MESSAGE, [])
            assert [r.code for r in tx.rcpt] == [250, 550, 250]
            assert [(r.code, r.enhanced, r.text) for r in tx.final] == [
                (250, "2.0.0", "<a@dept.test> saved"),
                (452, "4.2.2", "<c@dept.test> mailbox full"),
            ]
            assert tx.clean and not conn.broken and not conn.protocol.replies
            await conn.quit()
            peer = await inj.finished()
        assert peer.commands[0] == "LHLO gw.test" and peer.commands[-1] == "QUIT"
        assert unstuff(peer.notes["data"]) == MESSAGE

    run(main)


# STARTTLS -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    # openssl comes with scripts/install-deps.sh
    yield make_self_signed(tmp_path_factory.mktemp("tls"), "mx.fault.test")


def _contexts(certificate: tuple[Path, Path]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = certificate
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))  # verifies the chain and the name
    return server, client


def test_starttls_upgrade_then_commands_over_tls(run: Any, certificate: tuple[Path, Path]) -> None:
    server_ctx, client_ctx = _contexts(certificate)

    async def script(peer: Peer) -> None:
        await peer.hello("PIPELINING", "STARTTLS", "X-PLAINTEXT-ONLY")
        await peer.expect("STARTTLS")
        await peer.send(b"220 2.0.0 Ready to start TLS\r\n")
        await peer.writer.start_tls(server_ctx)
        sslobj = peer.writer.get_extra_info("ssl_object")
        peer.notes["version"] = sslobj.version()
        await peer.expect("EHLO client.test")
        await peer.send(ehlo_reply("PIPELINING", "AUTH PLAIN"))
        peer.notes["data"] = await standard_exchange(peer, pipelined=True)
        await peer.send(b"250 2.0.0 queued over TLS\r\n")
        await peer.expect("QUIT")
        await peer.send(b"221 bye\r\n")

    async def main() -> None:
        async with fault_injector(script) as inj:
            conn, _ = await connect(inj)
            await conn.hello("client.test")
            assert conn.has("STARTTLS") and conn.has("X-PLAINTEXT-ONLY")
            reply = await conn.starttls(client_ctx, "mx.fault.test")
            assert reply.code == 220
            assert conn.tls is not None and conn.tls.version.startswith("TLSv1.")
            assert conn.tls.cipher and conn.tls.bits
            assert conn.extensions == {} and not conn.esmtp  # RFC 3207: forget plaintext EHLO
            await conn.hello("client.test")
            assert conn.extensions == {"PIPELINING": "", "AUTH": "PLAIN"}
            tx = await conn.transaction(SENDER, RCPTS[:1], MESSAGE, [])
            assert [(r.code, r.text) for r in tx.final] == [(250, "queued over TLS")]
            assert tx.clean and not conn.broken
            await conn.quit()
            peer = await inj.finished()
        assert peer.notes["version"] == conn.tls.version
        assert unstuff(peer.notes["data"]) == MESSAGE
        assert peer.commands[-1] == "QUIT"

    run(main)


def test_starttls_certificate_for_another_name_fails(
    run: Any, certificate: tuple[Path, Path]
) -> None:
    server_ctx, client_ctx = _contexts(certificate)

    async def script(peer: Peer) -> None:
        await peer.hello("STARTTLS")
        await peer.expect("STARTTLS")
        await peer.send(b"220 2.0.0 Ready to start TLS\r\n")
        with contextlib.suppress(ssl.SSLError, ConnectionError, EOFError):
            await peer.writer.start_tls(server_ctx)

    async def main() -> None:
        async with fault_injector(script) as inj:
            conn, _ = await connect(inj)
            await conn.hello("client.test")
            with pytest.raises(ssl.SSLCertVerificationError):
                await conn.starttls(client_ctx, "other.test")
            assert conn.broken and conn.closing and conn.tls is None
            await inj.finished()

    run(main)


def test_starttls_partial_line_behind_the_220_is_an_injection(run: Any) -> None:
    # tests/delivery/test_tls_fallback.py injects a complete reply line (through the router);
    # here the plaintext behind the 220 is a fragment, still in the line buffer.
    async def script(peer: Peer) -> None:
        await peer.hello("STARTTLS")
        await peer.expect("STARTTLS")
        await peer.send(b"220 2.0.0 Ready to start TLS\r\n250 inj")
        peer.notes["after"] = await peer.until_closed()

    async def main() -> None:
        async with fault_injector(script) as inj:
            conn, _ = await connect(inj)
            await conn.hello("client.test")
            with pytest.raises(ProtocolError, match="injection"):
                await conn.starttls(ssl.create_default_context(), "mx.fault.test")
            assert conn.broken and conn.tls is None
            conn.abort()
            peer = await inj.finished()
        assert peer.notes["after"] == b""  # no TLS handshake was even begun

    run(main)


# Backpressure -------------------------------------------------------------------------------
def big_message(size: int) -> bytes:
    """About ``size`` bytes of CRLF lines, many of them starting with dots (the first too);
    every line is numbered, so a lost, doubled or reordered piece changes the content."""
    lines: list[bytes] = []
    total = i = 0
    while total < size:
        kind = i % 5
        if kind == 0:
            line = b"."
        elif kind == 1:
            line = b".%07d starts with a dot" % i
        elif kind == 2:
            line = b"..%07d starts with two dots" % i
        elif kind == 3:
            line = b"%07d " % i + b"x" * 990
        else:
            line = b"%07d an ordinary line" % i
        lines.append(line)
        total += len(line) + 2
        i += 1
    return b"\r\n".join(lines) + b"\r\n"


def test_large_message_to_a_slow_reader_arrives_intact(run: Any, probe: Probe) -> None:
    message = big_message(8 * 1024 * 1024)
    assert message.startswith(b".\r\n")

    async def script(peer: Peer) -> None:
        await peer.hello("PIPELINING", "SIZE 20000000")
        for prefix in ("MAIL FROM:", "RCPT TO:", "DATA"):
            await peer.expect(prefix)
        await peer.send(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
        # Read nothing until the client's transport buffer is full, then slowly for a while.
        await probe.until(lambda: probe.pauses > 0)
        body = unstuff(await peer.message(slow_reads=64))
        peer.notes["size"] = len(body)
        peer.notes["sha256"] = hashlib.sha256(body).hexdigest()
        await peer.send(b"250 2.0.0 queued\r\n")
        await peer.expect("QUIT")
        await peer.send(b"221 bye\r\n")

    async def main() -> None:
        async with fault_injector(script, probe, rcvbuf=64 * 1024) as inj:
            conn, _ = await connect(inj, data_timeout=30.0)
            await conn.hello("client.test")
            tx = await conn.transaction(SENDER, RCPTS[:1], message, [f"SIZE={len(message)}"])
            assert [(r.code, r.text) for r in tx.final] == [(250, "queued")]
            assert tx.clean and conn.uses == 1
            assert probe.pauses >= 1 and probe.resumes >= 1
            await conn.quit()
            peer = await inj.finished()
        assert peer.notes["size"] == len(message)
        assert peer.notes["sha256"] == hashlib.sha256(message).hexdigest()

    run(main)


# Closing --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "state", ["healthy", "server closed", "server silent", "aborted", "after a protocol error"]
)
def test_quit_never_raises(run: Any, state: str) -> None:
    async def script(peer: Peer) -> None:
        await peer.hello()
        if state == "server closed":
            return
        if state == "healthy":
            await peer.expect("QUIT")
            await peer.send(b"221 2.0.0 bye\r\n")
        if state == "after a protocol error":
            await peer.expect("NOOP")
            await peer.send(b"bogus\r\n")
        peer.notes["after"] = await peer.until_closed()

    async def main() -> None:
        async with fault_injector(script) as inj:
            conn, _ = await connect(inj)
            await conn.hello("client.test")
            if state == "server closed":
                await inj.finished()
                await until(lambda: conn.closing)
            elif state == "aborted":
                conn.abort()
                assert conn.closing and conn.broken
            elif state == "after a protocol error":
                with pytest.raises(ProtocolError):
                    await conn.command("NOOP")
            await conn.quit(timeout=SILENT)
            assert conn.closing and conn.broken
            peer = await inj.finished()
            with pytest.raises(ProtocolError):
                await conn.command("NOOP")
            await conn.quit(timeout=SILENT)  # twice is fine too
        after = peer.notes.get("after")
        if state == "healthy":
            assert peer.commands[-1] == "QUIT" and after == b""
        elif state == "server silent":
            assert after == b"QUIT\r\n"  # asked politely, then closed without the answer
        elif state != "server closed":
            assert after == b""  # a broken connection is closed without a QUIT

    run(main)


def test_line_breaks_in_commands_are_refused_before_sending(run: Any) -> None:
    async def script(peer: Peer) -> None:
        await peer.hello("PIPELINING")
        peer.notes["after"] = await peer.until_closed()

    async def main() -> None:
        async with fault_injector(script) as inj:
            conn, _ = await connect(inj)
            await conn.hello("client.test")
            with pytest.raises(ValueError):
                await conn.transaction(SENDER, ["a@dept.test>\r\nRCPT TO:<x@evil.test"], b"", [])
            with pytest.raises(ValueError):
                await conn.command("NOOP\x00")
            conn.abort()
            peer = await inj.finished()
        assert peer.notes["after"] == b""

    run(main)

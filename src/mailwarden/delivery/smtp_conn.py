"""A small asyncio SMTP/LMTP client connection: replies, EHLO/LHLO, STARTTLS, pipelined
transactions and dot-stuffed DATA.

It is the wire layer under ``delivery.smtp_client`` and ``delivery.lmtp``; the policy (which
TLS level, which host, how replies map to results) lives there.

Public names: ``Reply``, ``SMTPConnection``, ``ProtocolError``, ``StaleConnection``,
``Transaction``,
``dot_stuff``, ``normalise_line_ends``.
Security: the server is untrusted: reply lines and the number of lines are bounded
(``MAX_REPLY_LINE``, ``MAX_REPLY_LINES``), every read has a timeout, and addresses reaching
``SMTPConnection`` must already have passed ``delivery.address.unsafe_address`` (this module
refuses CR/LF/NUL in any command it writes as a second line of defence). After STARTTLS the
EHLO answer given in plaintext is discarded (RFC 3207).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import cast

from mailwarden.core.types import TLSInfo

MAX_REPLY_LINE = 4096  # bytes in one reply line; RFC 5321 says 512, servers exceed it
MAX_REPLY_LINES = 200  # lines in one multi-line reply
MAX_QUEUED_REPLIES = 2048  # replies received but not yet read: more than we ever pipeline
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")
_FORBIDDEN_IN_COMMAND = re.compile(r"[\r\n\x00]")


class ProtocolError(Exception):
    """The server sent something that is not an SMTP reply, or closed the connection."""


class StaleConnection(ProtocolError):
    """A reused connection died before the server answered MAIL: retry on a fresh one."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One (possibly multi-line) SMTP reply."""

    code: int
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str:
        """The RFC 2034 enhanced status code of the first line, or a default by class."""
        if self.lines:
            m = _ENHANCED.match(self.lines[0])
            if m and m.group(1)[0] == str(self.code)[0]:
                return m.group(1)
        return f"{self.code // 100}.0.0"

    @property
    def text(self) -> str:
        """The reply text (lines joined by a space, enhanced code stripped)."""
        out = []
        for line in self.lines:
            m = _ENHANCED.match(line)
            out.append(line[m.end() :] if m else line)
        return " ".join(x for x in out if x)

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


def normalise_line_ends(message: bytes) -> bytes:
    """Turn any bare CR or LF into CRLF (the queue stores CRLF; this is a safety net
    against SMTP smuggling should a bare line end ever slip through)."""
    crlf = message.count(b"\r\n")
    if message.count(b"\r") == crlf and message.count(b"\n") == crlf:
        return message
    return re.sub(rb"\r\n|\r|\n", b"\r\n", message)


def dot_stuff(message: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency plus the terminating ``CRLF.CRLF``."""
    message = normalise_line_ends(message)
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def _command(line: str) -> bytes:
    if _FORBIDDEN_IN_COMMAND.search(line):
        raise ValueError("refusing to send a command containing CR, LF or NUL")
    return line.encode("utf-8") + b"\r\n"


@dataclass(slots=True)
class Transaction:
    """The replies of one MAIL/RCPT/DATA exchange."""

    mail: Reply | None = None
    rcpt: list[Reply] = field(default_factory=list)
    data: Reply | None = None  # reply to the DATA command (354 expected)
    final: list[Reply] = field(default_factory=list)  # after the dot: 1 (SMTP) or n (LMTP)
    clean: bool = False  # the session is ready for a new transaction


class _ReplyProtocol(asyncio.Protocol):
    """Parses the server's bytes into complete replies as they arrive.

    Replies queue up in ``replies``; the first malformed line, an overlong line, too much
    unread data or the end of the connection is kept in ``error`` and wakes the waiter.
    Nothing is read after an error.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.replies: deque[Reply] = deque()
        self.error: ProtocolError | None = None
        self.lost = False
        self._buffer = bytearray()
        self._lines: list[str] = []  # lines of the multi-line reply being read
        self._code = 0
        self._need = 0
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._paused = False

    # asyncio callbacks -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        buf = self._buffer
        buf += data
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            if nl + 1 - start > MAX_REPLY_LINE:
                self._fail("reply line too long")
                return
            if not self._line(bytes(buf[start : nl + 1])):
                return
            start = nl + 1
        if start:
            del buf[:start]
        if len(buf) > MAX_REPLY_LINE:
            self._fail("reply line too long")
            return
        if len(self.replies) > MAX_QUEUED_REPLIES:
            self._fail("the server sent more replies than commands")
            return
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.error is None:
            self.error = ProtocolError("connection closed by server")
        self._wake(force=True)
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)

    # Parsing ---------------------------------------------------------------------------
    def _line(self, raw: bytes) -> bool:
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        # bytes.isdigit() is ASCII only; str.isdigit() also accepts U+00B2 (which int()
        # rejects: ValueError in data_received) and U+0662 (which int() reads as 2).
        if len(line) < 3 or not raw[:3].isdigit() or line[3:4] not in ("", " ", "-"):
            self._fail(f"malformed reply line {line[:80]!r}")
            return False
        code = int(line[:3])
        lines = self._lines
        if lines and code != self._code:
            self._fail("reply code changed inside a multi-line reply")
            return False
        self._code = code
        lines.append(line[4:])
        if len(lines) > MAX_REPLY_LINES:
            self._fail("too many reply lines")
            return False
        if line[3:4] != "-":
            self.replies.append(Reply(code, tuple(lines)))
            self._lines = []
        return True

    def _fail(self, why: str) -> None:
        self.error = ProtocolError(why)
        self._buffer.clear()
        if self.transport is not None:
            self.transport.abort()
        self._wake(force=True)

    # Waiting ---------------------------------------------------------------------------
    def _wake(self, force: bool = False) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (force or len(self.replies) >= self._need):
            waiter.set_result(None)

    async def wait_replies(self, n: int, timeout: float) -> None:
        """Return once ``n`` replies are queued, or the connection failed (the caller then
        finds fewer); raise TimeoutError after ``timeout`` seconds. One timer per call."""
        if len(self.replies) >= n or self.error is not None:
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._need, self._waiter = n, waiter
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def writable(self, timeout: float) -> None:
        """Wait until the transport takes more data (only when its buffer is full)."""
        if not self._paused or self.lost:
            return
        loop = asyncio.get_running_loop()
        self._writable = loop.create_future()
        timer = loop.call_later(timeout, _expire, self._writable)
        try:
            await self._writable
        finally:
            timer.cancel()
            self._writable = None

    def pending_bytes(self) -> int:
        return len(self._buffer)


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class SMTPConnection:
    """One client connection to an SMTP or LMTP server."""

    def __init__(
        self,
        transport: asyncio.Transport,
        protocol: _ReplyProtocol,
        label: str,
        *,
        lmtp: bool = False,
        command_timeout: float = 300.0,
        data_timeout: float = 600.0,
    ) -> None:
        self.transport = transport
        self.protocol = protocol
        self.label = label  # "mx1.example.org[192.0.2.1]:25" or "unix:/path"
        self.lmtp = lmtp
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.tls: TLSInfo | None = None
        self.uses = 0
        self.created = time.monotonic()
        self.last_used = self.created
        self.broken = False
        self.reused = False  # set by the pool when an idle connection is handed out again

    # Opening ---------------------------------------------------------------------------
    @classmethod
    async def open_tcp(
        cls,
        ip: str,
        port: int,
        label: str,
        *,
        connect_timeout: float,
        command_timeout: float,
        data_timeout: float,
        lmtp: bool = False,
    ) -> tuple[SMTPConnection, Reply]:
        """Connect and read the greeting. Raises OSError/TimeoutError/ProtocolError."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(connect_timeout):
            transport, protocol = await loop.create_connection(_ReplyProtocol, ip, port)
        conn = cls(
            transport,
            protocol,
            label,
            lmtp=lmtp,
            command_timeout=command_timeout,
            data_timeout=data_timeout,
        )
        return conn, await conn._greeting()

    @classmethod
    async def open_unix(
        cls,
        path: str,
        *,
        connect_timeout: float,
        command_timeout: float,
        data_timeout: float,
        lmtp: bool = True,
    ) -> tuple[SMTPConnection, Reply]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(connect_timeout):
            transport, protocol = await loop.create_unix_connection(_ReplyProtocol, path)
        conn = cls(
            transport,
            protocol,
            f"unix:{path}",
            lmtp=lmtp,
            command_timeout=command_timeout,
            data_timeout=data_timeout,
        )
        return conn, await conn._greeting()

    async def _greeting(self) -> Reply:
        """Read the server's greeting; a connection that fails here is aborted."""
        try:
            return await self.read_reply()
        except BaseException:
            self.abort()
            raise

    @property
    def closing(self) -> bool:
        """True once the connection is closed or closing (it cannot carry another command)."""
        return self.protocol.lost or self.transport.is_closing()

    # Replies ---------------------------------------------------------------------------
    async def _wait(self, n: int, timeout: float | None = None) -> None:
        """Wait for ``n`` queued replies (fewer if the connection failed first)."""
        try:
            await self.protocol.wait_replies(n, timeout or self.command_timeout)
        except TimeoutError:
            self.broken = True
            raise

    def _next(self) -> Reply:
        """The next queued reply; ProtocolError if the connection failed before it."""
        protocol = self.protocol
        if protocol.replies:
            return protocol.replies.popleft()
        self.broken = True
        raise protocol.error or ProtocolError("connection closed by server")

    async def read_reply(self, timeout: float | None = None) -> Reply:
        """Read one complete reply (all continuation lines)."""
        await self._wait(1, timeout)
        return self._next()

    def _write(self, data: bytes) -> None:
        if self.closing:
            self.broken = True
            # The reason the connection failed (a flood, a bad line behind a good reply) if the
            # protocol recorded one, as _next would report it.
            raise self.protocol.error or ProtocolError("write failed: the connection is closed")
        self.transport.write(data)

    async def command(self, line: str) -> Reply:
        """Send one command and read its reply."""
        self._write(_command(line))
        await self._drain(self.command_timeout)
        return await self.read_reply()

    async def _drain(self, timeout: float) -> None:
        """Wait while the transport's buffer is full (returns at once otherwise)."""
        try:
            await self.protocol.writable(timeout)
        except TimeoutError:
            self.broken = True
            raise
        if self.protocol.lost and not self.protocol.replies:
            self.broken = True
            raise ProtocolError("write failed: connection lost")

    # Session setup ---------------------------------------------------------------------
    async def hello(self, name: str) -> Reply:
        """EHLO (or LHLO for LMTP), falling back to HELO when EHLO is refused (SMTP only)."""
        verb = "LHLO" if self.lmtp else "EHLO"
        reply = await self.command(f"{verb} {name}")
        self.extensions = {}
        if reply.code == 250:
            self.esmtp = True
            for line in reply.lines[1:]:
                keyword, _, param = line.strip().partition(" ")
                if keyword:
                    self.extensions[keyword.upper()] = param.strip()
            return reply
        if self.lmtp or not 500 <= reply.code < 600:
            return reply
        self.esmtp = False
        return await self.command(f"HELO {name}")

    def has(self, extension: str) -> bool:
        return extension.upper() in self.extensions

    @property
    def size_limit(self) -> int:
        """The server's SIZE limit in bytes, 0 when it announces none."""
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() else 0

    async def starttls(self, context: ssl.SSLContext, server_hostname: str | None) -> Reply:
        """Send STARTTLS; on 220 upgrade the stream. Raises ssl.SSLError/OSError on failure.

        Returns the STARTTLS reply (non-220 means the upgrade did not happen).
        """
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            return reply
        # Anything the server sent after its 220 was sent in plaintext: a MITM injection.
        if self.protocol.replies or self.protocol.pending_bytes():
            self.broken = True
            raise ProtocolError("server sent data after its STARTTLS reply (injection)")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.command_timeout):
                transport = await loop.start_tls(
                    self.transport, self.protocol, context, server_hostname=server_hostname
                )
        except BaseException:
            self.broken = True
            self.transport.abort()
            raise
        if transport is None:  # the loop had nothing to upgrade: the peer went away
            self.broken = True
            raise ProtocolError("connection closed during the TLS handshake")
        self.transport = transport
        self.protocol.transport = transport
        self.extensions = {}
        self.esmtp = False
        sslobj = self.transport.get_extra_info("ssl_object")
        if isinstance(sslobj, ssl.SSLObject):
            cipher = sslobj.cipher()
            self.tls = TLSInfo(
                version=sslobj.version() or "",
                cipher=cipher[0] if cipher else "",
                bits=cipher[2] if cipher else None,
            )
        return reply

    # Transactions ----------------------------------------------------------------------
    async def transaction(
        self,
        mail_from: str,
        recipients: list[str],
        message: bytes,
        mail_params: list[str],
    ) -> Transaction:
        """Run MAIL, RCPT..., DATA, message. Pipelined when the server offers PIPELINING.

        The caller turns the replies into results; ``Transaction.clean`` says whether the
        connection may be used again.
        """
        tx = Transaction()
        mail_cmd = " ".join([f"MAIL FROM:<{mail_from}>", *mail_params])
        rcpt_cmds = [f"RCPT TO:<{r}>" for r in recipients]
        pipelining = self.has("PIPELINING")
        lines = [mail_cmd, *rcpt_cmds, "DATA"] if pipelining else [mail_cmd]
        try:
            self._write(b"".join([_command(c) for c in lines]))
            await self._drain(self.command_timeout)
            # One wait (one timer) for the whole pipelined group; it ends early if the
            # connection fails, and the replies read so far still count.
            await self._wait(len(lines))
            tx.mail = self._next()
        except (ProtocolError, OSError) as exc:
            if self.reused:
                raise StaleConnection(str(exc)) from exc
            raise
        if tx.mail.code == 421 and self.reused:
            self.broken = True
            raise StaleConnection(str(tx.mail))
        if pipelining:
            for _ in rcpt_cmds:
                tx.rcpt.append(self._next())
            tx.data = self._next()
        else:
            if tx.mail.code != 250:
                await self._reset(tx)
                return tx
            for cmd in rcpt_cmds:
                tx.rcpt.append(await self.command(cmd))
            if not any(r.code in (250, 251) for r in tx.rcpt):
                await self._reset(tx)
                return tx
            tx.data = await self.command("DATA")
        accepted = [i for i, r in enumerate(tx.rcpt) if r.code in (250, 251)]
        if tx.data.code != 354:
            await self._reset(tx)
            return tx
        if tx.mail.code != 250 or not accepted:
            # RFC 2920 3.1: DATA was accepted although nothing else was: send an empty body.
            self._write(b".\r\n")
            await self._drain(self.command_timeout)
            await self.read_reply(self.data_timeout)
            tx.clean = True
            return tx
        self._write(dot_stuff(message))
        await self._drain(self.data_timeout)
        finals = len(accepted) if self.lmtp else 1
        await self._wait(finals, self.data_timeout)
        for _ in range(finals):
            tx.final.append(self._next())
        tx.clean = True
        self.uses += 1
        return tx

    async def _reset(self, tx: Transaction) -> None:
        try:
            reply = await self.command("RSET")
        except (ProtocolError, OSError, TimeoutError):
            self.broken = True
            return
        tx.clean = reply.code == 250

    # Closing ---------------------------------------------------------------------------
    async def quit(self, timeout: float = 5.0) -> None:
        """Polite QUIT then close; never raises."""
        try:
            if not self.broken and not self.closing:
                self._write(b"QUIT\r\n")
                await self.protocol.wait_replies(len(self.protocol.replies) + 1, timeout)
        except Exception:  # noqa: S110
            pass
        self.abort()

    def abort(self) -> None:
        """Close the socket at once."""
        self.broken = True
        with contextlib.suppress(Exception):
            self.transport.abort()

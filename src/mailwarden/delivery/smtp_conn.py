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
from dataclasses import dataclass, field

from mailwarden.core.types import TLSInfo

MAX_REPLY_LINE = 4096  # bytes in one reply line; RFC 5321 says 512, servers exceed it
MAX_REPLY_LINES = 200  # lines in one multi-line reply
STREAM_LIMIT = 65536  # asyncio StreamReader buffer limit
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


class SMTPConnection:
    """One client connection to an SMTP or LMTP server."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        label: str,
        *,
        lmtp: bool = False,
        command_timeout: float = 300.0,
        data_timeout: float = 600.0,
    ) -> None:
        self.reader = reader
        self.writer = writer
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
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_connection(ip, port, limit=STREAM_LIMIT)
        conn = cls(
            reader,
            writer,
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
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_unix_connection(path, limit=STREAM_LIMIT)
        conn = cls(
            reader,
            writer,
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

    # Replies ---------------------------------------------------------------------------
    async def read_reply(self, timeout: float | None = None) -> Reply:
        """Read one complete reply (all continuation lines)."""
        lines: list[str] = []
        code = 0
        async with asyncio.timeout(timeout or self.command_timeout):
            while True:
                try:
                    raw = await self.reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    self.broken = True
                    raise ProtocolError("connection closed by server") from exc
                except asyncio.LimitOverrunError as exc:
                    self.broken = True
                    raise ProtocolError("reply line too long") from exc
                if len(raw) > MAX_REPLY_LINE:
                    self.broken = True
                    raise ProtocolError("reply line too long")
                line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
                if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
                    self.broken = True
                    raise ProtocolError(f"malformed reply line {line[:80]!r}")
                this = int(line[:3])
                if lines and this != code:
                    self.broken = True
                    raise ProtocolError("reply code changed inside a multi-line reply")
                code = this
                lines.append(line[4:])
                if len(lines) > MAX_REPLY_LINES:
                    self.broken = True
                    raise ProtocolError("too many reply lines")
                if line[3:4] != "-":
                    return Reply(code, tuple(lines))

    async def command(self, line: str) -> Reply:
        """Send one command and read its reply."""
        self.writer.write(_command(line))
        await self._drain(self.command_timeout)
        return await self.read_reply()

    async def _drain(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            self.broken = True
            raise ProtocolError(f"write failed: {exc}") from exc

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
        if self.reader._buffer:  # type: ignore[attr-defined]
            self.broken = True
            raise ProtocolError("server sent data after its STARTTLS reply (injection)")
        try:
            async with asyncio.timeout(self.command_timeout):
                await self.writer.start_tls(context, server_hostname=server_hostname)
        except BaseException:
            self.broken = True
            raise
        self.extensions = {}
        self.esmtp = False
        sslobj = self.writer.get_extra_info("ssl_object")
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
            self.writer.write(b"".join(_command(c) for c in lines))
            await self._drain(self.command_timeout)
            tx.mail = await self.read_reply()
        except (ProtocolError, OSError) as exc:
            if self.reused:
                raise StaleConnection(str(exc)) from exc
            raise
        if tx.mail.code == 421 and self.reused:
            self.broken = True
            raise StaleConnection(str(tx.mail))
        if pipelining:
            for _ in rcpt_cmds:
                tx.rcpt.append(await self.read_reply())
            tx.data = await self.read_reply()
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
            self.writer.write(b".\r\n")
            await self._drain(self.command_timeout)
            await self.read_reply(self.data_timeout)
            tx.clean = True
            return tx
        self.writer.write(dot_stuff(message))
        await self._drain(self.data_timeout)
        for _ in accepted if self.lmtp else [0]:
            tx.final.append(await self.read_reply(self.data_timeout))
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
            if not self.broken and not self.writer.is_closing():
                self.writer.write(b"QUIT\r\n")
                async with asyncio.timeout(timeout):
                    await self.writer.drain()
                    await self.reader.read(512)
        except Exception:  # noqa: S110
            pass
        self.abort()

    def abort(self) -> None:
        """Close the socket at once."""
        self.broken = True
        with contextlib.suppress(Exception):
            self.writer.close()

"""ClamAV over clamd's INSTREAM protocol (Unix socket or TCP), with signature-age checks.

``ClamdScanner(settings)`` is a ``Scanner`` named ``CLAMAV``. A scan sends ``zINSTREAM\\0``,
the message in chunks with 4-byte big-endian lengths (one write for a message up to
``chunk_size``), a zero-length terminator, and parses the reply:

- ``stream: OK`` -> no symbol;
- ``stream: NAME FOUND`` -> ``CLAMAV_VIRUS`` (detail NAME), or ``CLAMAV_HEURISTIC`` for
  names with a heuristic prefix (``Heuristics.``), which are scored, not forced;
- ``... ERROR``, ``INSTREAM size limit exceeded``, anything else, no answer -> ``CLAMAV_FAIL``.

Connections (``session_idle``): scans go over a pool of clamd ``IDSESSION`` connections,
reused LIFO, one request in flight on each, at most ``max_concurrent`` of them (the
scanner's cap on concurrent scans). Inside a session clamd numbers its replies by request
(``2: stream: OK``); a reply is only taken when its number is the one of the request just
sent on that session. A session is closed, never reused, after anything but a clean
``stream: OK`` / ``... FOUND`` reply to a complete upload: a wrong or missing number, an
error reply, a reply before the upload ended, bytes nobody asked for, EOF, a timeout or a
cancellation (which aborts the connection mid-upload). clamd ends a session itself on an
error and after ``ReadTimeout`` seconds without a command (120 s by default, 180 s in
Debian's clamd.conf; checked with clamd 1.4.6: ``IdleTimeout`` is about its threads, not
sessions), saying ``COMMAND READ TIMED OUT`` and closing; so an idle session is used again
only within ``session_idle`` seconds (default 10). A reused session that turns out to be
closed before any byte of a reply came back (or with only that notice) is given up and the
scan is sent once more on a new session (a broken pipe that hid clamd's early reply counts:
an oversized message is then sent again and refused again); any other failure is a failure,
and a scan on a new session is never retried. Sessions are ended
(``zEND``) after ``SESSION_MAX_REQUESTS`` scans and by ``aclose()``. ``session_idle = 0``
opens one connection per scan instead (plain INSTREAM; clamd closes after the reply).
``VERSION`` and ``PING`` always use a connection of their own.

The reply is collected while the upload runs: clamd answers early and closes (``INSTREAM
size limit exceeded``), and a reader that only started after the upload would see the broken
pipe instead of the reason.

Signature freshness (SU-5): ``VERSION`` (``ClamAV 1.4.6/27450/Mon Nov 23 10:00:00 2026``)
is asked at most every ``version_check_interval``; a database older than
``signature_alert_age`` emits ``scan.signatures_stale``; older than ``max_signature_age`` (or
of unknown age) makes every scan ``CLAMAV_FAIL`` (fail closed). ``signature_status()`` gives
the facts for ``mailwarden status``.

Public names: ``ClamdScanner``, ``ClamdClient``, ``SignatureStatus``, ``parse_version``,
``parse_reply``, ``ClamdError``, ``SESSION_MAX_REQUESTS``, ``IDLE_NOTICE``.
Security: sends hostile message bytes to clamd and parses clamd's reply strictly (bounded
length, ASCII, request number checked); a reply is never attributed to another message's
request. Only connects to the configured socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from dataclasses import dataclass
from typing import cast

from mailwarden.core.controls import Control
from mailwarden.core.events import emit
from mailwarden.core.types import Symbol
from mailwarden.scan.base import ScanInput, clean_detail, fail_symbol
from mailwarden.scan.settings import ClamavSettings

NAME = "CLAMAV"
MAX_REPLY = 4096  # bytes of a clamd reply we read; a longer one is garbage
SESSION_MAX_REQUESTS = 10_000  # scans on one session before it is ended and replaced
IDLE_NOTICE = b"COMMAND READ TIMED OUT\n"  # clamd's words when it ends an idle session
_VERSION_RE_PARTS = 3  # "ClamAV x.y.z/db-version/db-date"
_CTIME_FORMAT = "%a %b %d %H:%M:%S %Y"


class ClamdError(Exception):
    """clamd could not be reached or answered something unusable."""


@dataclass(frozen=True, slots=True)
class SignatureStatus:
    """What ``VERSION`` said, and how old the signature database is."""

    engine: str  # "ClamAV 1.4.6"
    db_version: int | None
    db_time: float | None  # epoch seconds; None when clamd did not say
    checked_at: float

    @property
    def age(self) -> float | None:
        return None if self.db_time is None else max(0.0, self.checked_at - self.db_time)

    def describe(self) -> str:
        if self.db_time is None:
            return f"{self.engine}, signature database date unknown"
        hours = (self.age or 0.0) / 3600
        return f"{self.engine}, signatures version {self.db_version}, {hours:.1f} h old"


def parse_version(reply: str, now: float | None = None) -> SignatureStatus:
    """Parse clamd's ``VERSION`` answer; raise ``ClamdError`` if it is not one."""
    text = reply.strip().rstrip("\0").strip()
    if not text.startswith("ClamAV ") or len(text) > 200:
        raise ClamdError(f"unexpected VERSION reply {clean_detail(text, 80)!r}")
    parts = text.split("/")
    checked = time.time() if now is None else now
    if len(parts) < _VERSION_RE_PARTS:
        return SignatureStatus(parts[0], None, None, checked)
    try:
        db_version = int(parts[1])
        # clamd prints the database time with ctime(), i.e. in clamd's local time zone.
        db_time = time.mktime(time.strptime(parts[2].strip(), _CTIME_FORMAT))
    except ValueError as exc:
        raise ClamdError(f"unparseable VERSION reply {clean_detail(text, 80)!r}") from exc
    return SignatureStatus(parts[0], db_version, db_time, checked)


def parse_reply(
    reply: bytes, heuristic_prefixes: tuple[str, ...] = ("Heuristics.",)
) -> list[Symbol]:
    """Symbols for one INSTREAM reply (``stream: OK`` / ``NAME FOUND`` / ``... ERROR``)."""
    try:
        text = reply.rstrip(b"\0").decode("ascii").strip()
    except UnicodeDecodeError:
        return [fail_symbol(NAME, "reply is not ASCII")]
    if text == "stream: OK":
        return []
    if text.startswith("stream: ") and text.endswith(" FOUND"):
        virus = text[len("stream: ") : -len(" FOUND")].strip()
        if not virus or any(c.isspace() for c in virus):
            return [fail_symbol(NAME, f"malformed detection {clean_detail(text, 80)!r}")]
        if virus.startswith(heuristic_prefixes):
            return [Symbol(f"{NAME}_HEURISTIC", 6.0, clean_detail(virus))]
        return [Symbol(f"{NAME}_VIRUS", 0.0, clean_detail(virus))]
    if text.endswith("ERROR"):
        return [fail_symbol(NAME, f"clamd: {clean_detail(text, 120)}")]
    return [fail_symbol(NAME, f"unexpected reply {clean_detail(text, 80)!r}")]


class ClamdClient:
    """Talks to one clamd: ``command(b"PING")``, ``instream(data)``, ``aclose()``.

    ``session_idle > 0`` pools IDSESSION connections for ``instream`` (at most
    ``max_sessions`` idle ones kept; the caller caps concurrent scans); ``0`` opens one
    connection per scan.
    """

    def __init__(
        self,
        address: str,
        connect_timeout: float = 5.0,
        chunk_size: int = 65536,
        *,
        session_idle: float = 0.0,
        max_sessions: int = 8,
    ) -> None:
        if not address:
            raise ValueError("clamd address is empty")
        self.address = address
        self.connect_timeout = connect_timeout
        self.chunk_size = chunk_size
        self.session_idle = session_idle
        self.max_sessions = max_sessions
        self._idle: list[_Conn] = []  # LIFO: the most recently used session is on top
        self._closing = False
        self.connections_opened = 0  # INSTREAM connections, for tests and benchmarks

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.address.startswith("/"):
                    return await asyncio.open_unix_connection(self.address)
                host, _, port = self.address.rpartition(":")
                return await asyncio.open_connection(host.strip("[]"), int(port))
        except TimeoutError as exc:
            raise ClamdError(f"connect to {self.address} timed out") from exc
        except (OSError, ValueError) as exc:
            raise ClamdError(f"cannot connect to {self.address}: {exc}") from exc

    async def command(self, cmd: bytes) -> bytes:
        """Send one ``z``-command (``PING``, ``VERSION``) and return the reply."""
        reader, writer = await self._open()
        try:
            writer.write(b"z" + cmd + b"\0")
            await writer.drain()
            return await _read_reply(reader)
        except OSError as exc:
            raise ClamdError(f"clamd connection failed: {exc}") from exc
        finally:
            await _close(writer)

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.address.startswith("/"):
                    _, conn = await loop.create_unix_connection(_Conn, self.address)
                else:
                    host, _, port = self.address.rpartition(":")
                    _, conn = await loop.create_connection(_Conn, host.strip("[]"), int(port))
        except TimeoutError as exc:
            raise ClamdError(f"connect to {self.address} timed out") from exc
        except (OSError, ValueError) as exc:
            raise ClamdError(f"cannot connect to {self.address}: {exc}") from exc
        self.connections_opened += 1
        return conn

    async def instream(self, data: bytes) -> bytes:
        """Stream ``data`` with INSTREAM and return clamd's reply (without a session number).

        Raises ``ClamdError`` when there is no reply that belongs to this request.
        """
        if self.session_idle <= 0:
            return await self._exchange(await self._connect(), data, session=False)
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, data, session=True)
            except ClamdError:
                if not conn.stale:
                    raise  # clamd said something (or we gave up): not an idle close
        return await self._exchange(await self._connect(), data, session=True)

    async def _exchange(self, conn: _Conn, data: bytes, *, session: bool) -> bytes:
        """One INSTREAM on ``conn``; ``conn`` goes back to the pool only if all was clean."""
        reuse = False
        try:
            start = b""
            if session:
                start = b"zIDSESSION\0" if conn.requests == 0 else b""
                conn.requests += 1
            complete = await conn.send(start, data, self.chunk_size)
            reply = await conn.waiter()
            if not session:
                return reply
            number = str(conn.requests).encode("ascii")
            head, sep, text = reply.partition(b": ")
            if not sep or head != number:
                raise ClamdError(
                    f"reply not numbered {conn.requests} on its clamd session: "
                    f"{clean_detail(reply.decode('ascii', 'replace'), 80)!r}"
                )
            reuse = complete and _clean_verdict(text)
            return text
        finally:
            if reuse:
                self._release(conn)
            else:
                # A session after anything unusual, a scan cut short: aborted. After a plain
                # INSTREAM's reply clamd closes anyway: closed.
                conn.drop(graceful=not session and conn.reply is not None and conn.reply.done())

    def _take_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self.session_idle:
                conn.end()
                continue
            return conn
        return None

    def _release(self, conn: _Conn) -> None:
        if conn.closed or conn.transport is None or conn.transport.is_closing():
            conn.drop(graceful=False)
            return
        if self._closing or conn.requests >= SESSION_MAX_REQUESTS:
            conn.end()
            return
        conn.idle()
        self._idle.append(conn)
        while len(self._idle) > self.max_sessions:
            self._idle.pop(0).end()

    async def aclose(self) -> None:
        """End every idle session; sessions still in use are ended when their scan is done."""
        self._closing = True
        while self._idle:
            self._idle.pop().end()
        await asyncio.sleep(0)  # let the transports' close callbacks run

    @property
    def idle_sessions(self) -> int:
        """Pooled sessions not known to be closed (for tests)."""
        return sum(1 for c in self._idle if not c.closed)


_END_OF_STREAM = struct.pack(">I", 0)


def _clean_verdict(text: bytes) -> bool:
    """A reply after which clamd keeps the session open: ``stream: OK`` or ``... FOUND``."""
    return text == b"stream: OK" or (text.startswith(b"stream: ") and text.endswith(b" FOUND"))


class _Conn(asyncio.Protocol):
    """One connection to clamd; collects the NUL-terminated reply of the request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reply: asyncio.Future[bytes] | None = None
        self.buf = b""
        self.closed = False  # lost, or closed by us: never used again
        self.stale = False  # closed before any byte of a reply to the request in flight
        self.requests = 0  # INSTREAMs sent on this session; clamd numbers replies so
        self.idle_since = 0.0
        self._resume: asyncio.Future[None] | None = None

    # --- protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        reply = self.reply
        if reply is None or reply.done():
            self.abort()  # bytes nobody asked for (clamd ending an idle session, garbage)
            return
        self.buf += data
        end = self.buf.find(b"\0")
        if end >= 0 and end + 1 < len(self.buf):
            # More than one reply to one request: clamd read something else than we sent.
            reply.set_exception(ClamdError("clamd sent more than one reply to one request"))
            self.abort()
        elif end >= 0:
            reply.set_result(self.buf[:end])
        elif len(self.buf) > MAX_REPLY:
            reply.set_exception(ClamdError("reply too long"))
            self.abort()
        if reply.done():
            self._wake_writer()

    def eof_received(self) -> bool:
        self.closed = True
        self._finish(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish(exc)
        self._wake_writer()

    def pause_writing(self) -> None:
        if self._resume is None or self._resume.done():
            self._resume = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_writer()

    # --- use
    def _finish(self, exc: Exception | None) -> None:
        reply = self.reply
        if reply is None or reply.done():
            return
        if self.buf and self.buf != IDLE_NOTICE:
            reply.set_result(self.buf)  # clamd closed after an unterminated reply: take it
            return
        # Nothing came back for this request (or only clamd's idle notice, sent before it
        # read the request): on a reused session that was an idle close, worth one retry.
        self.stale = True
        if self.buf:
            reply.set_exception(ClamdError("clamd ended the session (COMMAND READ TIMED OUT)"))
        elif exc is not None:
            reply.set_exception(ClamdError(f"clamd connection failed: {exc}"))
        else:
            reply.set_exception(ClamdError("connection closed without a reply"))

    def _wake_writer(self) -> None:
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)

    async def send(self, start: bytes, data: bytes, chunk_size: int) -> bool:
        """Write ``start``, the INSTREAM of ``data``; False if cut short by a reply or EOF."""
        self.buf = b""
        self.stale = False
        self.reply = asyncio.get_running_loop().create_future()
        if self.closed or self.transport is None or self.transport.is_closing():
            self._finish(None)  # closed while idle, seen only now
            return False
        try:
            return await self._upload(self.transport, self.reply, start, data, chunk_size)
        except (OSError, RuntimeError) as exc:  # a write on a transport that just closed
            self._finish(exc)
            self.abort()
            return False

    async def _upload(
        self,
        transport: asyncio.Transport,
        reply: asyncio.Future[bytes],
        start: bytes,
        data: bytes,
        chunk_size: int,
    ) -> bool:
        size = len(data)
        if size <= chunk_size:
            transport.write(
                b"".join((start, b"zINSTREAM\0", struct.pack(">I", size), data, _END_OF_STREAM))
                if size
                else start + b"zINSTREAM\0" + _END_OF_STREAM
            )
            return True
        transport.write(start + b"zINSTREAM\0")
        view = memoryview(data)
        for begin in range(0, size, chunk_size):
            if self._resume is not None and not self._resume.done():
                await self._resume  # the transport's buffer is full
            if reply.done() or self.closed or transport.is_closing():
                return False  # clamd answered (or closed) early; its reply says why
            chunk = view[begin : begin + chunk_size]
            transport.write(struct.pack(">I", len(chunk)))
            transport.write(chunk)
        transport.write(_END_OF_STREAM)
        return True

    async def waiter(self) -> bytes:
        assert self.reply is not None
        return await self.reply

    def idle(self) -> None:
        self.reply = None
        self.buf = b""
        self.idle_since = time.monotonic()

    def drop(self, *, graceful: bool) -> None:
        """Close for good; a reply still awaited is cancelled, a failed one marked seen."""
        reply = self.reply
        if reply is not None:
            if not reply.done():
                reply.cancel()
            elif not reply.cancelled():
                reply.exception()  # retrieved: no "never retrieved" log when nobody awaited it
        if graceful:
            self.close()
        else:
            self.abort()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def end(self) -> None:
        """End a healthy idle session politely (``zEND``), then close."""
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"zEND\0")
        self.close()


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    buf = b""
    while b"\0" not in buf and len(buf) <= MAX_REPLY:
        chunk = await reader.read(MAX_REPLY + 1 - len(buf))
        if not chunk:
            break
        buf += chunk
    if len(buf) > MAX_REPLY:
        raise ClamdError("reply too long")
    if not buf:
        raise ClamdError("connection closed without a reply")
    return buf.split(b"\0", 1)[0]


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await writer.wait_closed()


class ClamdScanner:
    """The ``CLAMAV`` scanner: INSTREAM per message, fail closed on stale signatures."""

    name = NAME

    def __init__(self, settings: ClamavSettings) -> None:
        self.settings = settings
        self.timeout = settings.timeout
        self.client = ClamdClient(
            settings.socket,
            settings.connect_timeout,
            settings.chunk_size,
            session_idle=settings.session_idle,
            max_sessions=settings.max_concurrent,
        )
        self._limit = asyncio.Semaphore(settings.max_concurrent)
        self._status: SignatureStatus | None = None
        self._status_error: str = ""
        self._status_lock = asyncio.Lock()
        self._prefixes = tuple(settings.heuristic_prefixes)

    async def signature_status(self, *, refresh: bool = False) -> SignatureStatus:
        """The cached ``VERSION`` facts, asked again when older than the check interval.

        Raises ``ClamdError`` when clamd cannot be asked.
        """
        async with self._status_lock:
            now = time.time()
            cached = self._status
            if (
                not refresh
                and cached is not None
                and now - cached.checked_at < self.settings.version_check_interval
            ):
                return cached
            status = parse_version(
                (await self.client.command(b"VERSION")).decode("ascii", "replace")
            )
            self._status = status
            self._check_age(status)
            return status

    def _check_age(self, status: SignatureStatus) -> None:
        age = status.age
        stale = age is None or age > self.settings.signature_alert_age
        if stale:
            emit(
                "scan.signatures_stale",
                engine=status.engine,
                db_version=status.db_version,
                age_hours=None if age is None else round(age / 3600, 2),
                alert_hours=round(self.settings.signature_alert_age / 3600, 2),
                max_hours=round(self.settings.max_signature_age / 3600, 2),
                fail_closed=self._too_old(status),
                control=Control.SU_5.value,
            )

    def _too_old(self, status: SignatureStatus) -> bool:
        age = status.age
        return age is None or age > self.settings.max_signature_age

    async def scan(self, msg: ScanInput) -> list[Symbol]:
        try:
            status = await self.signature_status()
        except ClamdError as exc:
            return [fail_symbol(NAME, str(exc))]
        if self._too_old(status):
            return [fail_symbol(NAME, f"signatures too old: {status.describe()}")]
        async with self._limit:
            try:
                reply = await self.client.instream(msg.raw)
            except ClamdError as exc:
                return [fail_symbol(NAME, str(exc))]
        return parse_reply(reply, self._prefixes)

    async def ping(self) -> bool:
        try:
            return (await self.client.command(b"PING")) == b"PONG"
        except ClamdError:
            return False

    async def aclose(self) -> None:
        """End the pooled clamd sessions (the gateway calls it when a worker stops)."""
        await self.client.aclose()

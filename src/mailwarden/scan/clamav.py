"""ClamAV over clamd's INSTREAM protocol (Unix socket or TCP), with signature-age checks.

``ClamdScanner(settings)`` is a ``Scanner`` named ``CLAMAV``. Each scan opens its own
connection (a Unix-socket connect costs ~0.05 ms, less than keeping IDSESSION state
right: clamd closes the connection after an INSTREAM outside a session, and inside one a
failed scan or its idle timeout closes it; concurrency is capped by ``max_concurrent``),
sends ``zINSTREAM\\0``, the message in chunks with 4-byte big-endian lengths (one write for
a message up to ``chunk_size``), a zero-length terminator, and parses the reply:

- ``stream: OK`` -> no symbol;
- ``stream: NAME FOUND`` -> ``CLAMAV_VIRUS`` (detail NAME), or ``CLAMAV_HEURISTIC`` for
  names with a heuristic prefix (``Heuristics.``), which are scored, not forced;
- ``... ERROR``, ``INSTREAM size limit exceeded``, anything else, no answer -> ``CLAMAV_FAIL``.

Signature freshness (SU-5): ``VERSION`` (``ClamAV 1.4.6/27450/Mon Nov 23 10:00:00 2026``)
is asked at most every ``version_check_interval``; a database older than
``signature_alert_age`` emits ``scan.signatures_stale``; older than ``max_signature_age`` (or
of unknown age) makes every scan ``CLAMAV_FAIL`` (fail closed). ``signature_status()`` gives
the facts for ``mailwarden status``.

Public names: ``ClamdScanner``, ``ClamdClient``, ``SignatureStatus``, ``parse_version``,
``parse_reply``, ``ClamdError``.
Security: sends hostile message bytes to clamd and parses clamd's reply strictly (bounded
length, ASCII); only connects to the configured socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from dataclasses import dataclass

from mailwarden.core.controls import Control
from mailwarden.core.events import emit
from mailwarden.core.types import Symbol
from mailwarden.scan.base import ScanInput, clean_detail, fail_symbol
from mailwarden.scan.settings import ClamavSettings

NAME = "CLAMAV"
MAX_REPLY = 4096  # bytes of a clamd reply we read; a longer one is garbage
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
    """Talks to one clamd: ``command(b"PING")``, ``instream(data)``."""

    def __init__(self, address: str, connect_timeout: float = 5.0, chunk_size: int = 65536) -> None:
        if not address:
            raise ValueError("clamd address is empty")
        self.address = address
        self.connect_timeout = connect_timeout
        self.chunk_size = chunk_size

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

    async def instream(self, data: bytes) -> bytes:
        """Stream ``data`` with INSTREAM and return clamd's reply.

        One ``asyncio.Protocol`` per scan, no streams: a message up to ``chunk_size`` goes
        out in a single write (command, chunk, terminator). The reply is collected while
        the upload runs: clamd answers early and closes (``INSTREAM size limit
        exceeded``), and a reader that only started after the upload would see the broken
        pipe instead of the reason.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.address.startswith("/"):
                    transport, proto = await loop.create_unix_connection(
                        _InstreamProtocol, self.address
                    )
                else:
                    host, _, port = self.address.rpartition(":")
                    transport, proto = await loop.create_connection(
                        _InstreamProtocol, host.strip("[]"), int(port)
                    )
        except TimeoutError as exc:
            raise ClamdError(f"connect to {self.address} timed out") from exc
        except (OSError, ValueError) as exc:
            raise ClamdError(f"cannot connect to {self.address}: {exc}") from exc
        try:
            size = len(data)
            if size <= self.chunk_size:
                transport.write(
                    b"".join((b"zINSTREAM\0", struct.pack(">I", size), data, _END_OF_STREAM))
                    if size
                    else b"zINSTREAM\0" + _END_OF_STREAM
                )
            else:
                transport.write(b"zINSTREAM\0")
                view = memoryview(data)
                for start in range(0, size, self.chunk_size):
                    await proto.writable()
                    if proto.reply.done():
                        break  # clamd answered (or closed) early; its reply says why
                    chunk = view[start : start + self.chunk_size]
                    transport.write(struct.pack(">I", len(chunk)))
                    transport.write(chunk)
                else:
                    transport.write(_END_OF_STREAM)
            return await proto.reply
        finally:
            if proto.reply.done():
                transport.close()
            else:
                transport.abort()  # cancelled or failed mid-upload


_END_OF_STREAM = struct.pack(">I", 0)


class _InstreamProtocol(asyncio.Protocol):
    """Collects one NUL-terminated clamd reply; ``reply`` resolves with it (or fails)."""

    def __init__(self) -> None:
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.buf = b""
        self._resume: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        if self.reply.done():
            return
        self.buf += data
        if b"\0" in self.buf:
            self.reply.set_result(self.buf.split(b"\0", 1)[0])
        elif len(self.buf) > MAX_REPLY:
            self.reply.set_exception(ClamdError("reply too long"))
        if self.reply.done():
            self.resume_writing()

    def eof_received(self) -> bool:
        self._finish(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc)
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)

    def _finish(self, exc: Exception | None) -> None:
        if self.reply.done():
            return
        if self.buf:  # clamd closed after an unterminated reply: take what it said
            self.reply.set_result(self.buf)
        elif exc is not None:
            self.reply.set_exception(ClamdError(f"clamd connection failed: {exc}"))
        else:
            self.reply.set_exception(ClamdError("connection closed without a reply"))

    def pause_writing(self) -> None:
        if self._resume is None or self._resume.done():
            self._resume = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)

    async def writable(self) -> None:
        """Wait while the transport's buffer is full (a reply or a close also wakes us)."""
        if self._resume is not None and not self.reply.done():
            await self._resume


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
        self.client = ClamdClient(settings.socket, settings.connect_timeout, settings.chunk_size)
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

"""A small HTTP/1.1 client for one scanning daemon (rspamd), on ``asyncio.Protocol``.

``HttpClient(url, max_connections)`` sends requests to the one origin of ``url``:
``await client.request("POST", "/checkv2", headers, body, max_reply)`` returns a
``Response(status, headers, body)`` or raises ``HttpError``. It does only what talking to a
scanning daemon needs, and does it cheaply (one ``write`` of head and body for a normal
message, one parse of the reply, no streams): measured at about half the CPU of aiohttp and
a third of httpx per request against rspamd (``bench/scan_bench.py``, docs/benchmarks.md).

- Connections are kept alive and reused (LIFO, at most ``max_connections`` open, idle ones
  dropped after ``IDLE_TIMEOUT``) when the server allows it: an HTTP/1.1 reply framed by
  ``Content-Length`` without ``Connection: close`` (or an HTTP/1.0 one with
  ``Connection: keep-alive``). rspamd 3.4 answers ``Connection: close`` on its normal
  worker and on a ``self_scan`` proxy worker alike, even to ``Connection: keep-alive``
  (checked 2026-12-06), so against it every request opens a connection.
- A request on a reused connection that the server closed while it was idle (no byte of a
  reply came back) is sent once more on a new connection; any other failure is an error.
- Replies: ``Content-Length`` framing, or read to EOF when there is neither length nor
  transfer coding. A ``Transfer-Encoding`` (chunked) reply is refused with ``HttpError``
  (the daemons we talk to never send one; the scanner then fails closed).
- Bodies over ``WRITE_CHUNK`` are written in pieces under the transport's flow control, so a
  30 MB message is not copied into the socket buffer at once.
- No timeouts of its own: the caller bounds a request with ``asyncio.timeout``; a request
  that is cancelled or fails closes its connection (never returned to the pool).

Public names: ``HttpClient``, ``Response``, ``HttpError``.
Security: the body (a hostile message) is sent as opaque bytes; header names and values
come from the caller, which must strip CR/LF (``scan.rspamd`` does), and this module refuses
any that still contain them. Replies are hostile too: the head is capped at ``MAX_HEAD``,
the body at the caller's ``max_reply``, the status line and framing parsed strictly.
Connects only to the host and port of the configured URL; never a proxy.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024  # bytes of a reply's status line and header section
WRITE_CHUNK = 256 * 1024  # bodies larger than this are written in pieces of this size
IDLE_TIMEOUT = 15.0  # seconds an idle kept-alive connection may be reused


class HttpError(Exception):
    """The request failed: connection refused or closed, or an unusable reply."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated field keeps its last value
    body: bytes


class _Conn(asyncio.Protocol):
    """One connection; reads one reply at a time into a buffer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.limit = 0  # max body bytes of the reply being read
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False
        self.eof = False
        self.reusable = False
        self.stale = False  # closed by the server before any byte of the reply
        self.idle_since = 0.0
        self._head: tuple[int, dict[str, str], int, int | None, bool] | None = None
        self._writable: asyncio.Future[None] | None = None

    # --- protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self._close()  # bytes nobody asked for: never reuse this connection
            return
        self.buf += data
        self._advance()

    def eof_received(self) -> bool:
        self.eof = True
        self._advance()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.eof = True
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self.waiter is not None and not self.waiter.done():
            self._advance()
            if not self.waiter.done():
                self.stale = not self.buf
                reason = f": {exc}" if exc else ""
                self.waiter.set_exception(HttpError(f"connection closed before the reply{reason}"))

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # --- use
    async def send(self, head: bytes, body: bytes, limit: int) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.buf.clear()
        self._head = None
        self.limit = limit
        self.reusable = False
        self.waiter = asyncio.get_running_loop().create_future()
        if len(body) <= WRITE_CHUNK:
            self.transport.write(head + body)
            return self.waiter
        self.transport.write(head)
        view = memoryview(body)
        for start in range(0, len(view), WRITE_CHUNK):
            if self._writable is not None:
                await self._writable
            if self.closed or self.waiter.done():
                break  # the server answered (or went away) early: its reply says why
            self.transport.write(view[start : start + WRITE_CHUNK])
        return self.waiter

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, reason: str) -> None:
        assert self.waiter is not None
        if not self.waiter.done():
            self.waiter.set_exception(HttpError(reason))
        self._close()

    def _advance(self) -> None:
        """Parse what has arrived; complete the waiter when the reply is whole."""
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self._head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self._fail("reply header too large")
                return
            try:
                self._head = _parse_head(bytes(self.buf[:end]), end + 4)
            except HttpError as exc:
                self._fail(str(exc))
                return
        status, headers, start, length, keep = self._head
        have = len(self.buf) - start
        if (length is not None and length > self.limit) or have > self.limit:
            self._fail("reply too large")
            return
        if length is None:
            if not self.eof:
                return
            body = bytes(self.buf[start:])
        else:
            if have < length:
                if self.eof:
                    self._fail("connection closed in the middle of the reply")
                return
            if have > length:
                self._fail("bytes after the end of the reply")
                return
            body = bytes(self.buf[start:])
            self.reusable = keep and not self.eof
        self.buf.clear()
        waiter.set_result(Response(status, headers, body))


def _parse_head(head: bytes, start: int) -> tuple[int, dict[str, str], int, int | None, bool]:
    """(status, headers, body start, content length or None, keep-alive) of a reply head."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes every byte
        raise HttpError("undecodable reply header") from exc
    lines = text.split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if version not in ("HTTP/1.1", "HTTP/1.0") or not (code.isdigit() and len(code) == 3):
        raise HttpError("not an HTTP/1.x reply")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError("malformed reply header line")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise HttpError(f"unsupported transfer-encoding {headers['transfer-encoding'][:40]!r}")
    length: int | None = None
    if "content-length" in headers:
        raw = headers["content-length"]
        if not raw.isdigit() or len(raw) > 18:
            raise HttpError("bad content-length")
        length = int(raw)
    status = int(code)
    if status in (204, 304) or 100 <= status < 200:
        length = 0
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    # HTTP/1.1 keeps alive unless told otherwise; HTTP/1.0 only when told to.
    keep = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens
    return status, headers, start, length, keep and length is not None


class HttpClient:
    """Requests to one origin over a small pool of kept-alive connections."""

    def __init__(self, url: str, max_connections: int = 16) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        default_port = self.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host if default_port else f"{host}:{self.port}"
        self.base_path = parts.path.rstrip("/")
        self._ssl = ssl.create_default_context() if self.tls else None
        self._limit = asyncio.Semaphore(max_connections)
        self._idle: list[_Conn] = []
        self.connections_opened = 0  # for tests and benchmarks

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                _Conn,
                self.host,
                self.port,
                ssl=self._ssl,
                server_hostname=self.host if self.tls else None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise HttpError(f"cannot connect to {self.authority}: {exc}") from exc
        self.connections_opened += 1
        return conn

    def _take_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            transport = conn.transport
            if (
                conn.closed
                or conn.eof
                or transport is None
                or transport.is_closing()
                or now - conn.idle_since > IDLE_TIMEOUT
            ):
                conn._close()
                continue
            return conn
        return None

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
        max_reply: int = 1 << 20,
    ) -> Response:
        """Send one request and return the whole reply (``HttpError`` on failure)."""
        head = self._head(method, path, headers or [], len(body))
        async with self._limit:
            conn = self._take_idle()
            if conn is not None:
                try:
                    return await self._exchange(conn, head, body, max_reply)
                except HttpError:
                    if not conn.stale:
                        raise  # the server did answer something: not a stale connection
            return await self._exchange(await self._connect(), head, body, max_reply)

    async def _exchange(self, conn: _Conn, head: bytes, body: bytes, limit: int) -> Response:
        ok = False
        try:
            waiter = await conn.send(head, body, limit)
            response = await waiter
            ok = True
            return response
        finally:
            if ok and conn.reusable and not conn.closed:
                conn.waiter = None
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            else:
                conn._close()

    def _head(self, method: str, path: str, headers: list[tuple[bytes, bytes]], size: int) -> bytes:
        lines = [
            f"{method} {self.base_path}{path} HTTP/1.1\r\nHost: {self.authority}\r\n".encode(
                "ascii"
            )
        ]
        for name, value in headers:
            if any(c in name for c in b"\r\n:") or b"\r" in value or b"\n" in value:
                raise HttpError("CR, LF or colon in a request header")
            lines.append(name + b": " + value + b"\r\n")
        if method != "GET" or size:
            lines.append(b"Content-Length: %d\r\n" % size)
        lines.append(b"\r\n")
        return b"".join(lines)

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop()._close()
        await asyncio.sleep(0)  # let the transports' close callbacks run

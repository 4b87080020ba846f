"""The floor: the least a Python (asyncio + uvloop) gateway can do for the filtered bench.

A measuring instrument for ``bench/filtered_bench.py --only floor``, not a product: it does
per message only the network exchanges that the filtered pipeline cannot do without, the
way mailwarden does them, and nothing else. Its CPU per message is a lower bound for any
gateway written in Python on this machine at the rate the daemons allow:

- the inbound SMTP session from smtp-source (banner, EHLO, MAIL, RCPT, DATA, the body up to
  ``<CRLF>.<CRLF>``, QUIT), canned replies, no parsing beyond finding line ends;
- clamd ``zINSTREAM`` on a new connection per message (clamd closes it after the reply),
  the body in one chunk; a ``FOUND`` reply refuses the message (554);
- rspamd ``POST /checkv2`` on a new connection per message (rspamd 3.x's normal worker
  answers ``Connection: close``); a reply with ``"action":"reject"`` refuses (554);
  both scans run concurrently;
- the relay to smtp-sink on kept connections (a pool), pipelined: ``MAIL``, ``RCPT`` and
  ``DATA`` in one write, the dot-stuffed body in the next, the three replies and the final
  one read back; then ``250`` to the client.

Left out on purpose (mailwarden does them, so its own cost must be above this floor): the
durable queue (no write, no fsync), the event log, policy, header parsing, the built-in
scanners, rspamd's result parsing into symbols, retries, timeouts, TLS, every check of the
client's input. Never use this to carry mail.

    python bench/floor_gateway.py --port P --clamd 127.0.0.1:C --rspamd http://127.0.0.1:R/
                                  --relay 127.0.0.1:S

Security: loopback only, bench use only; the client's bytes are forwarded verbatim to the
daemons and the sink and are never interpreted beyond line ends.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys
from typing import cast
from urllib.parse import urlsplit

import uvloop

REPLY_BANNER = b"220 floor.bench.test ESMTP\r\n"
REPLY_EHLO = b"250-floor.bench.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
REPLY_OK = b"250 2.0.0 Ok\r\n"
REPLY_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
REPLY_QUEUED = b"250 2.0.0 Ok: queued\r\n"
REPLY_REFUSED = b"554 5.7.1 Refused\r\n"
REPLY_TEMP = b"451 4.3.0 Scan or relay failed\r\n"
REPLY_BYE = b"221 2.0.0 Bye\r\n"


class Reader(asyncio.Protocol):
    """A client connection whose whole reply is read until the peer closes (or until
    ``until`` is seen in it)."""

    def __init__(self, until: bytes | None = None) -> None:
        self.buf = bytearray()
        self.until = until
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.until is not None and self.until in self.buf and not self.done.done():
            self.done.set_result(bytes(self.buf))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(bytes(self.buf))


class Relay(asyncio.Protocol):
    """One kept connection to the sink; ``send`` relays one message (pipelined)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.want = 0
        self.waiter: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def _finals(self) -> int:
        """Complete replies in the buffer (a final line has a space after the code)."""
        return sum(1 for line in self.buf.split(b"\r\n")[:-1] if line[3:4] == b" ")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is not None and not waiter.done() and self._finals() >= self.want:
            out, self.buf = bytes(self.buf), bytearray()
            waiter.set_result(out)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("sink closed"))

    async def replies(self, n: int) -> bytes:
        """The next ``n`` replies (all their lines)."""
        self.want = n
        self.waiter = asyncio.get_running_loop().create_future()
        self.data_received(b"")
        return await self.waiter

    async def send(self, body: bytes) -> bool:
        assert self.transport is not None
        self.transport.write(
            b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<rcpt@example.test>\r\nDATA\r\n"
        )
        if b"354" not in await self.replies(3):
            return False
        self.transport.write(body)  # already dot-stuffed, ends with CRLF.CRLF
        return (await self.replies(1)).startswith(b"250")


class Floor:
    def __init__(self, clamd: tuple[str, int], rspamd: tuple[str, int], relay: tuple[str, int]):
        self.clamd = clamd
        self.rspamd = rspamd
        self.relay = relay
        self.idle: list[Relay] = []

    async def _relay(self, body: bytes) -> bool:
        loop = asyncio.get_running_loop()
        conn = self.idle.pop() if self.idle else None
        if conn is None:
            _, conn = await loop.create_connection(Relay, *self.relay)
            await conn.replies(1)  # banner
            assert conn.transport is not None
            conn.transport.write(b"EHLO floor.bench.test\r\n")
            await conn.replies(1)
        ok = await conn.send(body)
        if ok:
            self.idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        return ok

    async def _clamd(self, data: bytes) -> bool:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_connection(lambda: Reader(b"\0"), *self.clamd)
        transport.write(b"zINSTREAM\0" + struct.pack(">I", len(data)) + data + b"\0\0\0\0")
        reply = await proto.done
        transport.close()
        return reply.endswith(b"OK\0")

    async def _rspamd(self, data: bytes) -> bool:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_connection(Reader, *self.rspamd)
        head = (
            b"POST /checkv2 HTTP/1.1\r\nHost: rspamd\r\nContent-Length: %d\r\n"
            b"IP: 127.0.0.1\r\nHelo: client.example.org\r\nFrom: sender@example.org\r\n"
            b"Rcpt: rcpt@example.test\r\n\r\n" % len(data)
        )
        transport.write(head + data)
        reply = await proto.done
        transport.close()
        return reply.startswith(b"HTTP/1.1 200") and b'"action":"reject"' not in reply

    async def message(self, data: bytes, body: bytes) -> bytes:
        try:
            clean, ham = await asyncio.gather(self._clamd(data), self._rspamd(data))
            if not (clean and ham):
                return REPLY_REFUSED
            return REPLY_QUEUED if await self._relay(body) else REPLY_TEMP
        except OSError as exc:
            print(f"floor: {exc!r}", file=sys.stderr)
            return REPLY_TEMP


class Session(asyncio.Protocol):
    """One inbound SMTP session with canned replies."""

    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.buf = bytearray()
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport.write(REPLY_BANNER)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    return
                body = bytes(self.buf[: end + 5])
                del self.buf[: end + 5]
                self.in_data = False
                data_ = body[:-3].replace(b"\r\n..", b"\r\n.")  # un-stuffed, for the scanners
                self.transport.pause_reading()
                task = asyncio.get_running_loop().create_task(self.floor.message(data_, body))
                task.add_done_callback(self._replied)
                return
            eol = self.buf.find(b"\r\n")
            if eol < 0:
                return
            line = bytes(self.buf[:eol]).upper()
            del self.buf[: eol + 2]
            if line.startswith((b"EHLO", b"HELO")):
                self.transport.write(REPLY_EHLO)
            elif line == b"DATA":
                self.in_data = True
                self.transport.write(REPLY_DATA)
            elif line == b"QUIT":
                self.transport.write(REPLY_BYE)
                self.transport.close()
                return
            else:
                self.transport.write(REPLY_OK)

    def _replied(self, task: asyncio.Task[bytes]) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(task.result())
        self.transport.resume_reading()
        if self.buf:
            self.data_received(b"")


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main(args: argparse.Namespace) -> None:
    url = urlsplit(args.rspamd)
    floor = Floor(
        _hostport(args.clamd),
        (url.hostname or "127.0.0.1", url.port or 11333),
        _hostport(args.relay),
    )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Session(floor), "127.0.0.1", args.port, backlog=1024)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with server:
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clamd", required=True, help="HOST:PORT of clamd")
    parser.add_argument("--rspamd", required=True, help="rspamd's normal worker URL")
    parser.add_argument("--relay", required=True, help="HOST:PORT of the sink")
    uvloop.run(main(parser.parse_args()))

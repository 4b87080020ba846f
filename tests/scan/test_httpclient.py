"""The small HTTP/1.1 client of the rspamd scanner, against loopback servers of the test's own.

Keep-alive reuse when the server allows it, a new connection per request when it closes,
a stale idle connection retried once, and hostile replies (garbage, oversized, chunked,
early close) as errors -- which the rspamd scanner turns into ``RSPAMD_FAIL``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from mailwarden.scan import Action, RspamdScanner, VerdictEngine
from mailwarden.scan.httpclient import HttpClient, HttpError
from mailwarden.scan.settings import RspamdSettings
from tests.scan.messages import ham, scan_input

OK_JSON = b'{"action": "no action", "score": 0.5, "symbols": {}}'
Reply = Callable[[bytes], bytes]  # request body -> raw reply bytes


def reply_with(status: int, body: bytes, *, close: bool = False) -> bytes:
    conn = b"Connection: close\r\n" if close else b""
    return (b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n" % (status, len(body), conn)) + body


class Server:
    """A loopback HTTP server: reads whole requests, answers with ``reply(body)``."""

    def __init__(self, reply: Reply, *, keep_alive: bool = True, drop_second: bool = False) -> None:
        self.reply = reply
        self.keep_alive = keep_alive
        self.drop_second = drop_second  # first connection: close on its 2nd request, unanswered
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.writers.append(writer)
        try:
            for seen in range(1, 1000):
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                if self.drop_second and number == 1 and seen == 2:
                    break  # as if the idle timeout struck just as the request arrived
                self.requests.append((head, body))
                writer.write(self.reply(body))
                await writer.drain()
                if not self.keep_alive:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(
    reply: Reply, *, keep_alive: bool = True, drop_second: bool = False
) -> AsyncIterator[tuple[Server, str]]:
    srv = Server(reply, keep_alive=keep_alive, drop_second=drop_second)
    server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield srv, f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for w in srv.writers:
            w.close()


@pytest.mark.asyncio
async def test_kept_alive_connection_is_reused() -> None:
    async with serving(lambda body: reply_with(200, body[::-1])) as (srv, url):
        client = HttpClient(url, max_connections=4)
        for i in range(5):
            resp = await client.request("POST", "/echo", [(b"X-N", b"%d" % i)], b"abc%d" % i)
            assert (resp.status, resp.body) == (200, b"%dcba" % i)
        await client.aclose()
    assert srv.connections == 1 == client.connections_opened
    head = srv.requests[0][0]
    assert head.startswith(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nX-N: 0\r\n" in head and b"\r\nContent-Length: 4\r\n" in head


@pytest.mark.asyncio
async def test_server_that_closes_gets_a_new_connection_each_time() -> None:
    async with serving(lambda body: reply_with(200, OK_JSON, close=True), keep_alive=False) as (
        srv,
        url,
    ):
        client = HttpClient(url)
        for _ in range(3):
            assert (await client.request("POST", "/checkv2", [], b"x")).body == OK_JSON
        await client.aclose()
    assert srv.connections == 3 == client.connections_opened


@pytest.mark.asyncio
async def test_idle_connection_closed_by_the_server_is_retried_once() -> None:
    async with serving(lambda body: reply_with(200, b"ok"), drop_second=True) as (srv, url):
        client = HttpClient(url)
        assert (await client.request("POST", "/a", [], b"1")).body == b"ok"
        assert (await client.request("POST", "/a", [], b"2")).body == b"ok"
        assert (await client.request("POST", "/a", [], b"3")).body == b"ok"
        await client.aclose()
    assert [body for _, body in srv.requests] == [b"1", b"2", b"3"]
    assert srv.connections == 2 == client.connections_opened  # 2 and 3 on the new one


@pytest.mark.asyncio
async def test_large_body_is_streamed_whole() -> None:
    big = bytes(range(256)) * (3 * 4096 + 7)  # ~3 MB, several write chunks
    async with serving(lambda body: reply_with(200, b"%d" % len(body))) as (srv, url):
        client = HttpClient(url)
        resp = await client.request("POST", "/checkv2", [], big)
        await client.aclose()
    assert resp.body == b"%d" % len(big) and srv.requests[0][1] == big


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"SMTP/1.0 200 nope\r\n\r\n", "not an HTTP/1.x reply"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", "chunked"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort", "closed in the middle"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", "after the end"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "too large"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000, "header too large"),
        (b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", "malformed"),
        (b"", "closed before the reply"),
    ],
)
async def test_hostile_replies_are_errors(reply: bytes, error: str) -> None:
    async with serving(lambda body: reply, keep_alive=False) as (_, url):
        client = HttpClient(url)
        with pytest.raises(HttpError, match=error):
            await client.request("POST", "/checkv2", [], b"x", max_reply=1 << 20)
        await client.aclose()


@pytest.mark.asyncio
async def test_reply_read_to_eof_without_length() -> None:
    async with serving(lambda body: b"HTTP/1.0 200 OK\r\n\r\npong", keep_alive=False) as (_, url):
        client = HttpClient(url)
        resp = await client.request("GET", "/ping")
        await client.aclose()
    assert (resp.status, resp.body) == (200, b"pong")


@pytest.mark.asyncio
async def test_header_injection_refused() -> None:
    client = HttpClient("http://127.0.0.1:9")
    with pytest.raises(HttpError, match="CR, LF"):
        await client.request("POST", "/x", [(b"Helo", b"evil\r\nPass: all")], b"")


@pytest.mark.asyncio
async def test_connection_refused_is_rspamd_fail() -> None:
    s = RspamdScanner(RspamdSettings(url="http://127.0.0.1:9"))  # discard port: refused
    verdict = await VerdictEngine([s]).judge(scan_input(ham()))
    await s.aclose()
    assert verdict.symbol_names == ["RSPAMD_FAIL"] and verdict.action is Action.TEMPFAIL
    assert "cannot connect" in verdict.symbols[0].detail

"""STARTTLS edge cases against a scripted asyncio test peer (not a real MTA: it exists to
misbehave on purpose): a handshake that fails after 220, and plaintext injected behind the
STARTTLS reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from tests.delivery.conftest import make_cfg, make_item

from mailwarden.core.types import DeliveryStatus
from mailwarden.delivery.router import Router


class ScriptedPeer:
    """Test peer: offers STARTTLS; on STARTTLS it answers 220 then ``tls_mode``:
    ``"garbage"`` (sends non-TLS bytes: the handshake fails) or ``"inject"`` (appends a
    plaintext ``250`` line to the 220, then closes). Plaintext sessions accept mail."""

    def __init__(self, tls_mode: str) -> None:
        self.tls_mode = tls_mode
        self.connections = 0
        self.starttls_seen = 0
        self.messages: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> ScriptedPeer:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _session(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        w.write(b"220 peer.test ESMTP\r\n")
        try:
            while line := await r.readline():
                cmd = line.decode().strip().upper()
                if cmd.startswith("EHLO"):
                    w.write(b"250-peer.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
                elif cmd == "STARTTLS":
                    self.starttls_seen += 1
                    if self.tls_mode == "inject":
                        w.write(b"220 go ahead\r\n250 injected\r\n")
                    else:
                        w.write(b"220 go ahead\r\n")
                        await w.drain()
                        await r.read(1)  # the ClientHello begins
                        w.write(b"this is not TLS at all\r\n" * 4)
                    await w.drain()
                    break
                elif cmd == "DATA":
                    w.write(b"354 go\r\n")
                    await w.drain()
                    data = await r.readuntil(b"\r\n.\r\n")
                    self.messages.append(data)
                    w.write(b"250 2.0.0 queued\r\n")
                elif cmd.startswith(("MAIL", "RCPT", "RSET", "NOOP")):
                    w.write(b"250 2.0.0 ok\r\n")
                elif cmd == "QUIT":
                    w.write(b"221 bye\r\n")
                    await w.drain()
                    break
                else:
                    w.write(b"502 5.5.2 what\r\n")
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()


@pytest_asyncio.fixture
async def peer_factory() -> AsyncIterator[object]:
    made: list[ScriptedPeer] = []

    async def make(mode: str) -> ScriptedPeer:
        peer = await ScriptedPeer(mode).start()
        made.append(peer)
        return peer

    yield make
    for p in made:
        await p.stop()


def _router(tmp_path: Path, port: int, policy: str) -> Router:
    return Router(
        make_cfg(tmp_path, transports={"dept.test": f"smtp:127.0.0.1:{port}"}, tls_policy=policy)
    )


@pytest.mark.asyncio
async def test_may_handshake_failure_retries_in_plaintext(tmp_path: Path, peer_factory) -> None:
    peer = await peer_factory("garbage")
    router = _router(tmp_path, peer.port, "may")
    [r] = await router.deliver(make_item(router, ["x@dept.test"]))
    await router.close()
    assert r.status == DeliveryStatus.DELIVERED and r.tls is None
    assert peer.starttls_seen == 1 and peer.connections == 2
    assert len(peer.messages) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", ["encrypt", "verify"])
async def test_required_tls_handshake_failure_defers(
    tmp_path: Path, peer_factory, policy: str
) -> None:
    peer = await peer_factory("garbage")
    router = _router(tmp_path, peer.port, policy)
    [r] = await router.deliver(make_item(router, ["x@dept.test"]))
    await router.close()
    assert r.status == DeliveryStatus.DEFERRED and r.enhanced == "4.7.5"
    assert peer.connections == 1 and peer.messages == []


@pytest.mark.asyncio
async def test_plaintext_injected_after_starttls_reply_is_refused(
    tmp_path: Path, peer_factory
) -> None:
    peer = await peer_factory("inject")
    router = _router(tmp_path, peer.port, "encrypt")
    [r] = await router.deliver(make_item(router, ["x@dept.test"]))
    await router.close()
    assert r.status == DeliveryStatus.DEFERRED
    assert "injection" in r.text
    assert peer.messages == []


@pytest.mark.asyncio
async def test_none_never_starts_tls(tmp_path: Path, peer_factory) -> None:
    peer = await peer_factory("garbage")
    router = _router(tmp_path, peer.port, "none")
    [r] = await router.deliver(make_item(router, ["x@dept.test"]))
    await router.close()
    assert r.status == DeliveryStatus.DELIVERED and peer.starttls_seen == 0

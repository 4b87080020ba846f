"""Fixtures for the delivery tests: a loopback DNS server, smtp-sink peers, a counting TCP
proxy, and builders for configs and delivery items.

- ``dns_server``: a started ``tests.support.dnsserver.DNSServer`` (empty; add zones).
- ``sink_factory(*args)``: a real Postfix ``smtp-sink`` on 127.0.0.1 (extra smtp-sink
  options such as ``-f RCPT``), stopped in teardown; ``sink.messages()`` reads its dumps.
- ``CountingProxy``: an asyncio TCP relay in front of a peer that counts the connections
  it accepted and can cut them all (a dead cached connection).
- ``make_cfg(tmp_path, ...)`` and ``make_item(router, recipients, ...)``.

Security: every server binds 127.0.0.1 only; configs always name the test DNS server, so the
system resolver is never used.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from tests.support.dnsserver import DNSServer
from tests.support.ports import LOOPBACK, free_port, wait_port
from tests.support.procs import stop_group
from tests.support.tmpdirs import daemon_workdir, owned_dir, remove_workdir

from mailwarden.config import Config, DeliveryConfig, DNSConfig, GatewayConfig
from mailwarden.core.types import Direction, EnvelopeSnapshot
from mailwarden.delivery.base import DeliveryItem
from mailwarden.delivery.router import Router

SMTP_SINK = "/usr/sbin/smtp-sink"
UNREACHABLE_DNS = "127.0.0.1:9"  # discard port: nothing answers, never the system resolver

MESSAGE = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: Bob <bob@example.edu>\r\n"
    b"Subject: delivery test\r\n"
    b"Message-ID: <test-1@sender.test>\r\n"
    b"\r\n"
    b"Hello.\r\n"
    b".a line that starts with a dot\r\n"
    b"Bye.\r\n"
)


def make_cfg(
    state: Path,
    *,
    transports: dict[str, str] | None = None,
    nameserver: str = UNREACHABLE_DNS,
    **delivery: Any,
) -> Config:
    """A config with state under ``state``, the given transports and the test DNS server."""
    table = {"example.edu": "maildir"}
    table.update(transports or {})
    return Config(
        gateway=GatewayConfig(
            state_dir=str(state), hostname="gw.example.edu", hosted_domains=["example.edu"]
        ),
        delivery=DeliveryConfig(transports=table, **delivery),
        dns=DNSConfig(nameservers=[nameserver], timeout=2.0),
    )


def make_item(
    router: Router,
    recipients: list[str],
    *,
    sender: str = "alice@sender.test",
    message: bytes = MESSAGE,
    smtputf8: bool = False,
    destination: str | None = None,
    queue_id: str = "TESTQ1",
) -> DeliveryItem:
    snapshot = EnvelopeSnapshot(
        queue_id=queue_id,
        mail_from=sender,
        recipients=tuple(recipients),
        received_at=time.time(),
        client_ip="127.0.0.1",
        client_helo="client.test",
        direction=Direction.INBOUND,
        message_id="<test-1@sender.test>",
        size=len(message),
        smtputf8=smtputf8,
    )
    return DeliveryItem(
        queue_id=queue_id,
        mail_from=sender,
        recipients=tuple(recipients),
        destination=destination or router.destination(recipients[0]),
        message=message,
        snapshot=snapshot,
    )


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    server = DNSServer().start()
    yield server
    server.stop()


class SmtpSink:
    """One ``smtp-sink`` process on ``127.0.0.1:port`` dumping messages into ``dump_dir``."""

    def __init__(
        self, workdir: Path, args: list[str], host: str = LOOPBACK, port: int | None = None
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.dump_dir = owned_dir(workdir / "dump", "nobody", 0o755)
        cmd = [SMTP_SINK, "-u", "nobody", "-d", f"{self.dump_dir}/%M.", *args,
               f"{host}:{self.port}", "100"]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_port(self.port, host, 20.0, self.proc)

    @property
    def transport(self) -> str:
        return f"smtp:{self.host}:{self.port}"

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dump_dir.iterdir()) if p.is_file()]

    def stop(self) -> None:
        stop_group(self.proc)


@pytest.fixture
def sink_factory(tmp_path: Path) -> Iterator[Any]:
    if not Path(SMTP_SINK).exists() or shutil.which("runuser") is None:
        pytest.skip("smtp-sink (Debian package postfix) is not installed")
    made: list[SmtpSink] = []
    links: list[Path] = []

    def make(*args: str, host: str = LOOPBACK, port: int | None = None) -> SmtpSink:
        link = tmp_path / f"sink{len(made) + 1}"
        links.append(link)
        sink = SmtpSink(daemon_workdir(link, "mw-sink-"), list(args), host, port)
        made.append(sink)
        return sink

    yield make
    for s in made:
        s.stop()
    for link in links:
        remove_workdir(link)


class CountingProxy:
    """Relays TCP connections from ``127.0.0.1:port`` to an upstream and counts them."""

    def __init__(self, upstream_port: int, host: str = LOOPBACK) -> None:
        self.upstream_port = upstream_port
        self.host = host
        self.port = 0
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> CountingProxy:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.upstream_port)
        self._writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def cut_all(self) -> None:
        """Close every relayed connection (both sides), as a server timeout would."""
        for w in self._writers:
            w.close()
        self._writers.clear()

    async def stop(self) -> None:
        self.cut_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest_asyncio.fixture
async def proxy_factory() -> AsyncIterator[Any]:
    made: list[CountingProxy] = []

    async def make(upstream_port: int) -> CountingProxy:
        proxy = await CountingProxy(upstream_port).start()
        made.append(proxy)
        return proxy

    yield make
    for p in made:
        await p.stop()

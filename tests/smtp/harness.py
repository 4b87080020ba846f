"""Test harness for the SMTP edge: a real ``SmtpServer`` on 127.0.0.1 (port 0) running in its
own event-loop thread, a ``RecordingSink`` test double of the spool, and a tiny blocking
raw-socket SMTP client for the protocol tests that smtplib cannot express.

Security: binds and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailwarden.config import Config, ListenerConfig, default_config
from mailwarden.core.events import Event, MemorySink, get_sink, set_sink
from mailwarden.core.types import EnvelopeSnapshot
from mailwarden.policy.engine import Policy
from mailwarden.smtp.server import SmtpServer
from mailwarden.smtp.tls import ensure_certificate

LOOPBACK = "127.0.0.1"
IO_TIMEOUT = 10.0  # seconds a test client waits for a reply before failing


def new_loop() -> asyncio.AbstractEventLoop:
    """The loop the gateway runs on: uvloop when installed (MAILWARDEN_TEST_LOOP=asyncio
    forces the standard loop, to test both)."""
    if os.environ.get("MAILWARDEN_TEST_LOOP") != "asyncio":
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()


class RecordingSink:
    """Test double of the spool: keeps every (snapshot, data); can be told to fail."""

    def __init__(self) -> None:
        self.items: list[tuple[EnvelopeSnapshot, bytes]] = []
        self.fail = False
        self.gate: asyncio.Event | None = None  # when set, enqueue waits for it

    async def enqueue(self, snapshot: EnvelopeSnapshot, data: bytes) -> None:
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)  # like the real spool: suspends, so the task path is used
        if self.fail:
            raise OSError("disk full (test)")
        self.items.append((snapshot, data))


def make_config(tmp_path: Path, **limits: Any) -> Config:
    return default_config(
        gateway={"hostname": "mx.test.example", "state_dir": str(tmp_path / "var")},
        limits=limits,
    )


class Running:
    """A server started in a background loop thread."""

    def __init__(
        self,
        cfg: Config,
        tls: str = "none",
        sink: RecordingSink | None = None,
        policy: Policy | None = None,
        *,
        submission: bool = False,
        auth: Any = None,
    ) -> None:
        self.cfg = cfg
        self.sink = sink or RecordingSink()
        self.events = MemorySink()
        self._old_sink = get_sink()
        set_sink(self.events)
        self.ssl_context: ssl.SSLContext | None = None
        if tls != "none":
            from mailwarden.smtp.tls import server_context

            self.ssl_context = server_context(cfg)
        listener = ListenerConfig(
            name="test",
            address=LOOPBACK,
            port=2525,
            tls=tls,  # type: ignore[arg-type]
            submission=submission,
        )
        self.loop = new_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = SmtpServer(
            cfg,
            listener,
            ssl_context=self.ssl_context,
            sink=self.sink,
            policy=policy or Policy(cfg),
            auth=auth,
        )
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((LOOPBACK, 0))
        sock.listen(128)
        sock.setblocking(False)
        self.call(self.server.start(sock))
        self.port: int = self.server.sockets[0].getsockname()[1]

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(IO_TIMEOUT * 3)

    def in_loop(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return self.call(run())

    def stop(self) -> None:
        try:
            self.call(self.server.shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()
            set_sink(self._old_sink)

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events.events if e.name == name]


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_config(tmp_path: Path, **limits: Any) -> Config:
    cfg = make_config(tmp_path, **limits)
    ensure_certificate(cfg.cert_path, cfg.key_path, cfg.gateway.hostname)
    return cfg


class RawClient:
    """A blocking line-level SMTP client over a plain (or wrapped) socket."""

    def __init__(self, port: int, source: str = LOOPBACK, greet: bool = True) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            (LOOPBACK, port), timeout=IO_TIMEOUT, source_address=(source, 0)
        )
        self.rest = b""
        if greet:
            self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.rest:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by server; pending {self.rest!r}")
            self.rest += chunk
        line, _, self.rest = self.rest.partition(b"\r\n")
        return line

    def reply(self) -> str:
        """One whole (possibly multi-line) reply as text, lines joined with newlines."""
        lines = []
        while True:
            line = self._line().decode("utf-8", "replace")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    def cmd(self, line: str | bytes) -> str:
        self.send(line.encode() + b"\r\n" if isinstance(line, str) else line)
        return self.reply()

    def closed(self) -> bool:
        """True once the server closed the connection (reads EOF, discarding data)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def starttls(self) -> None:
        self.sock = client_context().wrap_socket(self.sock, server_hostname="mx.test.example")

    def close(self) -> None:
        self.sock.close()

"""The SMTP listener: accepts connections, enforces connection limits, sweeps timeouts,
and shuts every session down with ``421``.

``SmtpServer(cfg, listener, ssl_context=..., sink=..., policy=...)`` serves one
``[[listener]]`` (plain, STARTTLS or implicit TLS); each connection is a
``smtp.protocol.SmtpProtocol``. Accepted messages go to ``sink.enqueue(snapshot, data)``
(the spool), which returns only once the message is durable; ``250`` is sent after that.
Idle and DATA timeouts are enforced by one periodic sweep over all sessions.

Public names: ``MessageSink``, ``SmtpServer``.
Security: faces untrusted peers: limits connections in total and per client address
(``421 4.7.0``), and times out idle sessions (``421 4.4.2``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, Protocol

from mailwarden.config import Config, ListenerConfig
from mailwarden.core.types import EnvelopeSnapshot
from mailwarden.policy.engine import Policy
from mailwarden.smtp.limits import (
    MAX_SWEEP_INTERVAL,
    MIN_SWEEP_INTERVAL,
    TLS_HANDSHAKE_TIMEOUT,
)
from mailwarden.smtp.protocol import SmtpProtocol

if TYPE_CHECKING:
    from mailwarden.auth.service import AuthService
    from mailwarden.smtp.content import ContentFilter

LISTEN_BACKLOG = 1024  # pending connections the kernel queues for a listener we bind
SHUTDOWN_POLL = 0.02  # seconds between checks that every session has closed


class MessageSink(Protocol):
    """Where accepted messages go: the spool (or a test double)."""

    async def enqueue(self, snapshot: EnvelopeSnapshot, data: bytes) -> None:
        """Store ``data`` (wire format, CRLF, not dot-stuffed) with its envelope; return
        only once both are durable. Raise if they could not be stored."""
        ...


class SmtpServer:
    """One SMTP listener and its sessions."""

    def __init__(
        self,
        cfg: Config,
        listener: ListenerConfig,
        *,
        ssl_context: ssl.SSLContext | None,
        sink: MessageSink,
        policy: Policy,
        content_filter: ContentFilter | None = None,
        auth: AuthService | None = None,
    ) -> None:
        if listener.tls != "none" and ssl_context is None:
            raise ValueError(f"listener {listener.name!r} uses TLS but no SSL context given")
        self.cfg = cfg
        self.listener = listener
        self.ssl_context = ssl_context
        self.sink = sink
        self.policy = policy
        self.content_filter = content_filter  # issue 4: the verdict engine before 250
        # SMTP AUTH (smtp.auth): only on submission listeners, only inside TLS (SU-8).
        self.auth = auth if listener.submission else None
        self.hostname = cfg.gateway.hostname
        self.greeting = f"220 {self.hostname} ESMTP mailwarden\r\n".encode()
        self.sessions: set[SmtpProtocol] = set()
        self._per_client: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        self._ehlo = {tls: self._build_ehlo(tls) for tls in (False, True)}

    def _build_ehlo(self, tls_active: bool) -> bytes:
        lines = [
            self.hostname,
            "PIPELINING",
            f"SIZE {self.cfg.limits.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
        ]
        if self.listener.tls == "starttls" and not tls_active and self.ssl_context is not None:
            lines.append("STARTTLS")
        if tls_active and self.auth is not None:  # SU-8: never offered before TLS
            lines.append("AUTH " + " ".join(self.auth.mechanisms))
        lines.append("HELP")
        last = len(lines) - 1
        return "".join(
            f"250{' ' if i == last else '-'}{line}\r\n" for i, line in enumerate(lines)
        ).encode()

    def ehlo_reply(self, *, tls_active: bool) -> bytes:
        return self._ehlo[tls_active]

    # -- lifecycle -------------------------------------------------------------------
    async def start(self, sock: socket.socket | None = None) -> None:
        """Start accepting on ``sock`` (pre-bound, listening) or bind the listener address."""
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {}
        if self.listener.tls == "implicit":
            kwargs = {"ssl": self.ssl_context, "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT}
        if sock is not None:
            self._server = await loop.create_server(self._factory, sock=sock, **kwargs)
        else:
            self._server = await loop.create_server(
                self._factory,
                host=self.listener.address,
                port=self.listener.port,
                reuse_address=True,
                backlog=LISTEN_BACKLOG,
                **kwargs,
            )
        self._sweeper = loop.create_task(self._sweep())

    def _factory(self) -> SmtpProtocol:
        return SmtpProtocol(self)

    @property
    def sockets(self) -> list[Any]:
        """The bound listening sockets (``getsockname()`` gives the real port)."""
        return list(self._server.sockets) if self._server is not None else []

    async def shutdown(self) -> None:
        """Stop accepting, send ``421 4.3.2`` to every session, close them all.

        A session waiting for the queue gets its answer first (so no accepted message goes
        unacknowledged); after ``limits.shutdown_grace`` seconds the rest are aborted.
        """
        self._closing = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for proto in list(self.sessions):
            proto.shutdown()
        deadline = time.monotonic() + self.cfg.limits.shutdown_grace
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(SHUTDOWN_POLL)
        for proto in list(self.sessions):
            proto.abort()
        self.sessions.clear()
        self._per_client.clear()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), SHUTDOWN_POLL * 50)

    # -- sessions --------------------------------------------------------------------
    def register(self, proto: SmtpProtocol) -> str | None:
        """Admit a new session; return the refusal text if a connection limit is hit."""
        limits = self.cfg.limits
        if self._closing:
            return "Service shutting down"
        if len(self.sessions) >= limits.max_connections:
            return f"{self.hostname} Error: too many connections"
        ip = proto.session.peer_ip
        count = self._per_client.get(ip, 0)
        if count >= limits.max_connections_per_client:
            return f"{self.hostname} Error: too many connections from {ip}"
        self._per_client[ip] = count + 1
        self.sessions.add(proto)
        return None

    def unregister(self, proto: SmtpProtocol) -> bool:
        """Forget a session; False if it was never admitted (or already forgotten)."""
        if proto not in self.sessions:
            return False
        self.sessions.discard(proto)
        ip = proto.session.peer_ip
        left = self._per_client.get(ip, 1) - 1
        if left > 0:
            self._per_client[ip] = left
        else:
            self._per_client.pop(ip, None)
        return True

    async def _sweep(self) -> None:
        limits = self.cfg.limits
        shortest = min(limits.idle_timeout, limits.data_timeout)
        interval = max(MIN_SWEEP_INTERVAL, min(MAX_SWEEP_INTERVAL, shortest / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for proto in list(self.sessions):
                if proto.busy:
                    continue  # waiting on us, not on the client
                limit = limits.data_timeout if proto.in_data else limits.idle_timeout
                if now - proto.last_activity > limit:
                    proto.timed_out()

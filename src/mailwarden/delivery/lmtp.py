"""LMTP delivery (RFC 2033) to a mailbox server such as Dovecot: ``lmtp:HOST:PORT`` or
``lmtp:unix:/path``.

``LMTPTransport(spec, cfg).deliver(item)`` sends LHLO, MAIL, RCPT for each recipient (pipelined
when offered), DATA, and reads one reply per accepted recipient after the final dot, so a
full mailbox defers one recipient while the others are delivered. Idle connections are cached
like SMTP ones (``[delivery] connection_reuse``).

Public names: ``LMTPTransport``.
Security: talks only to the configured endpoint (no DNS: a host name must be an IP address
or resolvable by the same resolver as MX lookups); no TLS (LMTP is a local protocol, run it
on loopback or a Unix socket); envelope addresses are checked by ``delivery.address``.
"""

from __future__ import annotations

from mailwarden.config import Config, TransportSpec
from mailwarden.core.events import emit
from mailwarden.core.types import RecipientResult
from mailwarden.delivery.address import results_for, split_envelope
from mailwarden.delivery.base import DeliveryItem
from mailwarden.delivery.mx import MXResolver, RouteError
from mailwarden.delivery.pool import ConnectionPool, PoolKey
from mailwarden.delivery.smtp_client import NETWORK_ERRORS, transaction_results
from mailwarden.delivery.smtp_conn import SMTPConnection, StaleConnection
from mailwarden.errors import DeliveryError


class LMTPTransport:
    """Delivers to one LMTP server."""

    def __init__(self, spec: TransportSpec, cfg: Config, resolver: MXResolver | None = None):
        if spec.kind != "lmtp":
            raise DeliveryError(f"not an LMTP transport: {spec}")
        self.spec = spec
        self.cfg = cfg
        self.dcfg = cfg.delivery
        self.resolver = resolver or MXResolver(cfg.dns)
        self.pool = ConnectionPool(
            enabled=self.dcfg.connection_reuse,
            max_reuse=self.dcfg.max_reuse,
            idle=self.dcfg.idle_reuse,
        )

    async def close(self) -> None:
        await self.pool.close()

    async def _open(self, item: DeliveryItem) -> tuple[SMTPConnection | None, str, str]:
        """(connection or None, label, error text)."""
        d = self.dcfg
        if self.spec.path:
            label = f"unix:{self.spec.path}"
            try:
                conn, greeting = await SMTPConnection.open_unix(
                    self.spec.path,
                    connect_timeout=d.connect_timeout,
                    command_timeout=d.command_timeout,
                    data_timeout=d.data_timeout,
                )
            except NETWORK_ERRORS as exc:
                return None, label, f"connect to {label}: {exc}"
        else:
            targets = await self.resolver.host(self.spec.host)
            if isinstance(targets, RouteError):
                return None, str(self.spec), targets.text
            target = targets[0]
            label = target.label(self.spec.port)
            try:
                conn, greeting = await SMTPConnection.open_tcp(
                    target.ip,
                    self.spec.port,
                    label,
                    lmtp=True,
                    connect_timeout=d.connect_timeout,
                    command_timeout=d.command_timeout,
                    data_timeout=d.data_timeout,
                )
            except NETWORK_ERRORS as exc:
                return None, label, f"connect to {label}: {str(exc) or type(exc).__name__}"
        emit("delivery.connect", queue_id=item.queue_id, destination=item.destination,
             remote=label, reply=str(greeting))  # fmt: skip
        try:
            if greeting.code != 220:
                await conn.quit()
                return None, label, f"host {label} refused to talk to us: {greeting}"
            reply = await conn.hello(self.cfg.gateway.hostname)
        except NETWORK_ERRORS as exc:
            conn.abort()
            return None, label, f"lost connection with {label}: {exc}"
        if reply.code != 250:
            await conn.quit()
            return None, label, f"host {label} said: {reply} (in reply to LHLO)"
        return conn, label, ""

    async def deliver(self, item: DeliveryItem) -> list[RecipientResult]:
        rcpts, done = split_envelope(item)
        if not rcpts:
            return done
        key: PoolKey = ("lmtp", self.spec.path or self.spec.host, self.spec.port, "none", "",
                        self.cfg.gateway.hostname)  # fmt: skip
        conn = self.pool.take(key)
        retried = False
        while True:
            if conn is None:
                conn, label, error = await self._open(item)
                if conn is None:
                    return done + results_for(rcpts, 451, "4.4.1", error, label)
            try:
                tx = await conn.transaction(item.mail_from, rcpts, item.message, [])
            except StaleConnection:
                self.pool.discard(conn)
                conn = None
                if retried:
                    return done + results_for(rcpts, 451, "4.4.2", "lost LMTP connection")
                retried = True
                continue
            except NETWORK_ERRORS as exc:
                self.pool.discard(conn)
                text = f"lost connection with {conn.label}: {str(exc) or type(exc).__name__}"
                return done + results_for(rcpts, 451, "4.4.2", text, conn.label)
            if not tx.clean:
                conn.broken = True
            self.pool.put(key, conn)
            return done + transaction_results(tx, rcpts, conn)

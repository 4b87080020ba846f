"""SMTP delivery: ``smtp:HOST:PORT`` transports, the smarthost and MX delivery, with
opportunistic or mandatory STARTTLS, connection reuse and PIPELINING.

``SMTPTransport(cfg).deliver(item)`` resolves the next hop (``delivery.mx``), tries each
address in order until one answers (connection failures, 4xx greetings and 4xx replies move
on to the next address; 5xx replies are final), and returns one ``RecipientResult`` per
recipient. ``transaction_results`` maps the replies of one transaction to results (also used
by ``delivery.lmtp``); ``tls_context`` builds the client TLS contexts.

TLS policy (per next hop, ``[delivery] tls_policy``/``tls_policies``): ``none`` never
STARTTLS; ``may`` STARTTLS when offered, no certificate check, plaintext when not offered or
refused, and - like Postfix's RETRY_AS_PLAINTEXT - a failed handshake is retried at once on
a new plaintext connection to the same address; ``encrypt`` requires TLS (no certificate
check), deferring 4.7.4 when not offered and 4.7.5 when the handshake fails; ``verify``
requires TLS with a certificate chain valid for the MX (or transport) host name.

Public names: ``SMTPTransport``, ``transaction_results``, ``tls_context``.
Security: envelope addresses with control characters are refused (5.1.7/5.1.3) before any
connection is made; replies of the untrusted server are bounded by ``delivery.smtp_conn``;
connections are cached per (address, port, TLS policy, verified name), never across
policies; data sent after a STARTTLS reply is treated as an attack.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from mailwarden.config import Config
from mailwarden.core.events import emit
from mailwarden.core.types import DeliveryStatus, RecipientResult
from mailwarden.delivery.address import (
    domain_of,
    needs_smtputf8,
    result,
    results_for,
    split_envelope,
)
from mailwarden.delivery.base import DeliveryItem
from mailwarden.delivery.mx import MXResolver, RouteError, Target
from mailwarden.delivery.pool import ConnectionPool, PoolKey
from mailwarden.delivery.smtp_conn import (
    ProtocolError,
    Reply,
    SMTPConnection,
    StaleConnection,
    Transaction,
)
from mailwarden.errors import DeliveryError

NETWORK_ERRORS = (OSError, TimeoutError, ProtocolError, ssl.SSLError, EOFError)


def tls_context(verify: bool, cafile: str | None = None) -> ssl.SSLContext:
    """A client context: certificate and host name checked (``verify``) or not."""
    if verify:
        return ssl.create_default_context(cafile=cafile)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def transaction_results(
    tx: Transaction, recipients: Sequence[str], conn: SMTPConnection
) -> list[RecipientResult]:
    """One result per recipient from the replies of ``tx`` (SMTP or LMTP)."""
    label, tls = conn.label, conn.tls
    out: list[RecipientResult] = []

    def make(rcpt: str, reply: Reply, context: str) -> RecipientResult:
        text = f"{reply.text} (in reply to {context})"
        return result(rcpt, reply.code, reply.enhanced, text, label, tls)

    if tx.mail is None or tx.mail.code != 250:
        reply = tx.mail or Reply(451, ("4.4.2 no reply to MAIL FROM",))
        return [make(r, reply, "MAIL FROM command") for r in recipients]
    finals = iter(tx.final)
    for i, rcpt in enumerate(recipients):
        rr = tx.rcpt[i] if i < len(tx.rcpt) else None
        if rr is None:
            out.append(make(rcpt, Reply(451, ("4.4.2 no reply to RCPT TO",)), "RCPT TO command"))
        elif rr.code not in (250, 251):
            out.append(make(rcpt, rr, "RCPT TO command"))
        elif tx.data is None or tx.data.code != 354:
            reply = tx.data or Reply(451, ("4.4.2 no reply to DATA",))
            out.append(make(rcpt, reply, "DATA command"))
        else:
            final = next(finals, None)
            if final is None:
                final = Reply(451, ("4.4.2 no reply after end of data",))
            out.append(make(rcpt, final, "end of DATA command"))
            if not conn.lmtp:
                finals = iter(tx.final)  # SMTP: the single reply applies to every recipient
    return out


class _SessionFailure(Exception):
    """Setting up a session failed; ``results`` tells the recipients why."""

    def __init__(self, code: int, enhanced: str, text: str, retry_plain: bool = False) -> None:
        super().__init__(text)
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.retry_plain = retry_plain


class SMTPTransport:
    """Delivers over SMTP to a fixed host, the smarthost, or the MX hosts of a domain."""

    def __init__(
        self,
        cfg: Config,
        resolver: MXResolver | None = None,
        *,
        cafile: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.dcfg = cfg.delivery
        self.resolver = resolver or MXResolver(cfg.dns)
        self.pool = ConnectionPool(
            enabled=self.dcfg.connection_reuse,
            max_reuse=self.dcfg.max_reuse,
            idle=self.dcfg.idle_reuse,
        )
        self._plain_ctx = tls_context(False)
        self._verify_ctx = tls_context(True, cafile)

    async def close(self) -> None:
        await self.pool.close()

    # Routing ---------------------------------------------------------------------------
    async def _targets(self, destination: str) -> tuple[list[Target] | RouteError, int, str]:
        """(targets, port, next-hop name) for a destination key."""
        kind, _, arg = destination.partition(":")
        if kind == "mx":
            return await self.resolver.route(arg), self.dcfg.port, arg
        if kind in ("smtp", "smarthost"):
            host, _, port = arg.rpartition(":")
            host = host.strip("[]")
            if not host or not port.isdigit():
                raise DeliveryError(f"bad SMTP destination {destination!r}")
            return await self.resolver.host(host), int(port), host.lower()
        raise DeliveryError(f"SMTPTransport cannot deliver to {destination!r}")

    def policy_for(self, nexthop: str, recipients: Sequence[str]) -> str:
        """The TLS policy: by next-hop name, then by the recipients' (single) domain."""
        policies = self.dcfg.tls_policies
        if nexthop in policies:
            return policies[nexthop]
        domains = {domain_of(r) for r in recipients}
        if len(domains) == 1:
            (domain,) = domains
            if domain in policies:
                return policies[domain]
        return self.dcfg.tls_policy

    # Delivery --------------------------------------------------------------------------
    async def deliver(self, item: DeliveryItem) -> list[RecipientResult]:
        pending, done = split_envelope(item)
        if not pending:
            return done
        targets, port, nexthop = await self._targets(item.destination)
        if isinstance(targets, RouteError):
            return done + results_for(pending, targets.code, targets.enhanced, targets.text)
        policy = self.policy_for(nexthop, pending)
        deferred: list[RecipientResult] = []
        for target in targets:
            attempt = await self._attempt(item, target, port, policy, pending)
            deferred = [r for r in attempt if r.status == DeliveryStatus.DEFERRED]
            done.extend(r for r in attempt if r.status != DeliveryStatus.DEFERRED)
            pending = [r.recipient for r in deferred]
            if not pending:
                break
        return done + deferred

    async def _attempt(
        self, item: DeliveryItem, target: Target, port: int, policy: str, rcpts: list[str]
    ) -> list[RecipientResult]:
        """One address: a cached or new session, one transaction (retried once if stale)."""
        label = target.label(port)
        key: PoolKey = ("smtp", target.ip, port, policy, target.name, self.cfg.gateway.hostname)
        conn = self.pool.take(key)
        retried = False
        plain = False
        while True:
            if conn is None:
                try:
                    conn = await self._session(item, target, port, policy, plain)
                except _SessionFailure as fail:
                    if fail.retry_plain and not plain:
                        plain = True
                        continue
                    return results_for(rcpts, fail.code, fail.enhanced, fail.text, label)
            try:
                results = await self._send(conn, item, rcpts)
            except StaleConnection:
                self.pool.discard(conn)
                conn = None
                if retried:
                    return results_for(rcpts, 451, "4.4.2", f"lost connection with {label}")
                retried = True
                continue
            except NETWORK_ERRORS as exc:
                self.pool.discard(conn)
                return results_for(
                    rcpts, 451, "4.4.2", f"lost connection with {label}: {_describe(exc)}", label
                )
            self.pool.put(key, conn)
            return results

    async def _session(
        self, item: DeliveryItem, target: Target, port: int, policy: str, plain: bool
    ) -> SMTPConnection:
        """Connect, greet, EHLO and STARTTLS per policy. Raises _SessionFailure."""
        label = target.label(port)
        try:
            conn, greeting = await SMTPConnection.open_tcp(
                target.ip,
                port,
                label,
                connect_timeout=self.dcfg.connect_timeout,
                command_timeout=self.dcfg.command_timeout,
                data_timeout=self.dcfg.data_timeout,
            )
        except NETWORK_ERRORS as exc:
            raise _SessionFailure(451, "4.4.1", f"connect to {label}: {_describe(exc)}") from exc
        emit("delivery.connect", queue_id=item.queue_id, destination=item.destination,
             remote=label, reply=str(greeting))  # fmt: skip
        try:
            if greeting.code != 220:
                # Like Postfix's smtp_skip_5xx_greeting: try the next host, else defer.
                raise _SessionFailure(
                    451, "4.3.0", f"host {label} refused to talk to us: {greeting}"
                )
            await self._hello(conn, label)
            if policy != "none" and not plain:
                await self._starttls(conn, item, target, label, policy)
        except _SessionFailure:
            await conn.quit()
            raise
        except NETWORK_ERRORS as exc:
            conn.abort()
            raise _SessionFailure(
                451, "4.4.2", f"lost connection with {label} during setup: {_describe(exc)}"
            ) from exc
        return conn

    async def _hello(self, conn: SMTPConnection, label: str) -> None:
        reply = await conn.hello(self.cfg.gateway.hostname)
        if reply.code != 250:
            code = reply.code if 500 <= reply.code < 600 else 451
            enhanced = reply.enhanced if code == reply.code else "4.0.0"
            raise _SessionFailure(code, enhanced, f"host {label} said: {reply} (in reply to EHLO)")

    async def _starttls(
        self, conn: SMTPConnection, item: DeliveryItem, target: Target, label: str, policy: str
    ) -> None:
        required = policy in ("encrypt", "verify")
        if not conn.has("STARTTLS"):
            if required:
                raise _SessionFailure(
                    451, "4.7.4", f"TLS is required, but was not offered by host {label}"
                )
            return
        verify = policy == "verify"
        ctx = self._verify_ctx if verify else self._plain_ctx
        try:
            reply = await conn.starttls(ctx, _sni(target.name))
        except (ssl.SSLError, ssl.CertificateError, OSError, TimeoutError, ProtocolError) as exc:
            emit("delivery.tls", queue_id=item.queue_id, remote=label, policy=policy,
                 error=_describe(exc))  # fmt: skip
            raise _SessionFailure(
                451,
                "4.7.5",
                f"cannot start TLS with {label}: handshake failed: {_describe(exc)}",
                retry_plain=not required,
            ) from exc
        if reply.code != 220:
            if required:
                raise _SessionFailure(
                    451, "4.7.4", f"TLS is required, but host {label} refused STARTTLS: {reply}"
                )
            return
        tls = conn.tls
        emit("delivery.tls", queue_id=item.queue_id, remote=label, policy=policy,
             version=tls.version if tls else "", cipher=tls.cipher if tls else "",
             verified=verify)  # fmt: skip
        await self._hello(conn, label)

    async def _send(
        self, conn: SMTPConnection, item: DeliveryItem, rcpts: list[str]
    ) -> list[RecipientResult]:
        """Checks against the server's extensions, then one transaction."""
        label, tls = conn.label, conn.tls
        utf8 = needs_smtputf8(item)
        if utf8 and not conn.has("SMTPUTF8"):
            return results_for(
                rcpts, 554, "5.6.7",
                f"the message needs SMTPUTF8 but host {label} does not support it", label, tls,
            )  # fmt: skip
        size = len(item.message)
        limit = conn.size_limit
        if limit and size > limit:
            return results_for(
                rcpts, 552, "5.3.4",
                f"message size {size} exceeds the limit of {limit} of host {label}", label, tls,
            )  # fmt: skip
        params: list[str] = []
        if conn.has("SIZE"):
            params.append(f"SIZE={size}")
        if item.snapshot.body.upper() == "8BITMIME" and conn.has("8BITMIME"):
            params.append("BODY=8BITMIME")
        if utf8:
            params.append("SMTPUTF8")
        tx = await conn.transaction(item.mail_from, rcpts, item.message, params)
        if not tx.clean:
            conn.broken = True
        return transaction_results(tx, rcpts, conn)


def _sni(name: str) -> str | None:
    """Server name for SNI and the certificate check (an IP literal is checked as such)."""
    return name or None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError):
        return "Connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return text[:300]

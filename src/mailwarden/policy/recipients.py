"""Recipient validation: is this address in a hosted domain a real mailbox? (no backscatter)

A ``RecipientDirectory`` answers ``await lookup(address) -> Lookup`` (``KNOWN``, ``UNKNOWN``
or ``TEMPFAIL``); ``peek(address)`` answers from memory without waiting, or None when only
``lookup`` can tell. Backends: ``AcceptAll`` (the embedded demo), ``StaticDirectory``
(``[policy] recipients``), ``DatabaseDirectory`` (addresses of enabled users in the
``users`` table, cached and reloaded when the table changes) and ``CalloutDirectory`` (an
SMTP ``RCPT`` probe to the domain's downstream transport, see below). LDAP lookups belong
to the AUTH module's LDAP code and are not wired here yet.

``CalloutDirectory`` caches positive and negative answers (``callout_positive_ttl`` /
``callout_negative_ttl``), probes an address at most once per TTL, coalesces concurrent
lookups of one address into one probe, and caps probing globally (``callout_max_concurrent``
in flight, ``callout_max_per_minute`` new probes): past the cap a lookup is a TEMPFAIL, so
a harvester cannot use the gateway to amplify probes against campus servers.

``RecipientValidator`` picks the directory per hosted domain. ``abuse@`` and
``postmaster@`` of every hosted domain are always known (CP-R4, RFC 2142).

Public names: ``Lookup``, ``RecipientDirectory``, ``AcceptAll``, ``StaticDirectory``,
``DatabaseDirectory``, ``CalloutDirectory``, ``RecipientValidator``, ``ROLE_ACCOUNTS``.
Security: addresses come from untrusted clients but have passed ``smtp.address``; a probe
sends them only to the configured downstream server, never to an MX found by lookup.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Iterable
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from mailwarden.config import TransportSpec
from mailwarden.core.events import emit
from mailwarden.delivery.smtp_conn import SMTPConnection
from mailwarden.errors import ConfigError
from mailwarden.policy.counters import in_task

if TYPE_CHECKING:
    from mailwarden.config import Config

ROLE_ACCOUNTS = frozenset({"abuse", "postmaster"})  # CP-R4, RFC 2142
MAX_CALLOUT_CACHE = 100_000  # cached callout answers (LRU)
CALLOUT_HELO_FALLBACK = "mailwarden.invalid"


class Lookup(StrEnum):
    KNOWN = "known"
    UNKNOWN = "unknown"
    TEMPFAIL = "tempfail"


class RecipientDirectory(Protocol):
    async def lookup(self, address: str) -> Lookup: ...

    def peek(self, address: str) -> Lookup | None: ...


class AcceptAll:
    """Every address of the domain exists (the embedded demo's Maildir)."""

    async def lookup(self, address: str) -> Lookup:
        return Lookup.KNOWN

    def peek(self, address: str) -> Lookup | None:
        return Lookup.KNOWN


class StaticDirectory:
    """A fixed set of addresses (lower-cased)."""

    def __init__(self, addresses: Iterable[str]) -> None:
        self.addresses = frozenset(a.lower() for a in addresses)

    async def lookup(self, address: str) -> Lookup:
        return self.peek(address)

    def peek(self, address: str) -> Lookup:
        return Lookup.KNOWN if address.lower() in self.addresses else Lookup.UNKNOWN


class DatabaseDirectory:
    """Addresses of enabled users in the database; ``replace`` swaps in a fresh set.
    Until the first load every lookup is a TEMPFAIL (never an accept)."""

    def __init__(self) -> None:
        self.addresses: frozenset[str] | None = None

    def replace(self, addresses: Iterable[str]) -> None:
        self.addresses = frozenset(a.lower() for a in addresses)

    async def lookup(self, address: str) -> Lookup:
        return self.peek(address)

    def peek(self, address: str) -> Lookup:
        if self.addresses is None:
            return Lookup.TEMPFAIL
        return Lookup.KNOWN if address.lower() in self.addresses else Lookup.UNKNOWN


class CalloutDirectory:
    """Verification callout: ``MAIL FROM:<>`` + ``RCPT TO`` at the downstream server."""

    def __init__(
        self,
        transport: TransportSpec,
        *,
        helo: str,
        sender: str = "",
        positive_ttl: float = 86400.0,
        negative_ttl: float = 3600.0,
        timeout: float = 10.0,
        max_concurrent: int = 10,
        max_per_minute: int = 120,
    ) -> None:
        if transport.kind not in ("smtp", "lmtp") or transport.path:
            raise ConfigError(
                f"a callout needs an smtp:HOST:PORT or lmtp:HOST:PORT transport, not {transport}"
            )
        self.transport = transport
        self.helo = helo or CALLOUT_HELO_FALLBACK
        self.sender = sender
        self.positive_ttl = positive_ttl
        self.negative_ttl = negative_ttl
        self.timeout = timeout
        self.max_per_minute = max_per_minute
        self._sem = asyncio.Semaphore(max_concurrent)
        self._cache: OrderedDict[str, tuple[Lookup, float]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Lookup]] = {}
        self._budget_window = 0.0
        self._budget_used = 0
        self.probes = 0  # probes sent (for tests and metrics)

    def peek(self, address: str) -> Lookup | None:
        key = address.lower()
        hit = self._cache.get(key)
        if hit is None:
            return None
        result, expires = hit
        if expires <= time.monotonic():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return result

    async def lookup(self, address: str) -> Lookup:
        key = address.lower()
        cached = self.peek(key)
        if cached is not None:
            return cached
        pending = self._inflight.get(key)
        if pending is not None:  # coalesce: wait for the probe already running
            return await asyncio.shield(pending)
        if not self._take_budget():
            emit("policy.callout_capped", recipient=address, limit=self.max_per_minute)
            return Lookup.TEMPFAIL
        fut: asyncio.Future[Lookup] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            result = await in_task(self._probe(address))
        except BaseException:
            fut.set_result(Lookup.TEMPFAIL)
            raise
        finally:
            self._inflight.pop(key, None)
        if not fut.done():
            fut.set_result(result)
        self._remember(key, result)
        return result

    def _take_budget(self) -> bool:
        now = time.monotonic()
        if now - self._budget_window >= 60.0:
            self._budget_window, self._budget_used = now, 0
        if self._budget_used >= self.max_per_minute:
            return False
        self._budget_used += 1
        return True

    def _remember(self, key: str, result: Lookup) -> None:
        ttl = {Lookup.KNOWN: self.positive_ttl, Lookup.UNKNOWN: self.negative_ttl}.get(result)
        if not ttl:
            return  # a TEMPFAIL is not cached: the next lookup probes again (budget permitting)
        self._cache[key] = (result, time.monotonic() + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > MAX_CALLOUT_CACHE:
            self._cache.popitem(last=False)

    async def _probe(self, address: str) -> Lookup:
        async with self._sem:
            self.probes += 1
            t = self.transport
            conn: SMTPConnection | None = None
            try:
                async with asyncio.timeout(self.timeout):
                    conn, greeting = await SMTPConnection.open_tcp(
                        t.host,
                        t.port,
                        f"{t.host}:{t.port}",
                        connect_timeout=self.timeout,
                        command_timeout=self.timeout,
                        data_timeout=self.timeout,
                        lmtp=t.kind == "lmtp",
                    )
                    if greeting.code != 220:
                        return Lookup.TEMPFAIL
                    if (await conn.hello(self.helo)).code != 250:
                        return Lookup.TEMPFAIL
                    if (await conn.command(f"MAIL FROM:<{self.sender}>")).code != 250:
                        return Lookup.TEMPFAIL
                    reply = await conn.command(f"RCPT TO:<{address}>")
                    result = (
                        Lookup.KNOWN
                        if reply.code in (250, 251)
                        else Lookup.UNKNOWN
                        if reply.code >= 500
                        else Lookup.TEMPFAIL
                    )
                    emit("policy.callout", recipient=address, reply=str(reply), result=result)
                    await conn.quit()
                    return result
            except (OSError, TimeoutError, Exception) as exc:
                emit("policy.callout_error", recipient=address, error=type(exc).__name__)
                return Lookup.TEMPFAIL
            finally:
                if conn is not None:
                    conn.abort()


class RecipientValidator:
    """The directory of each hosted domain, plus the role accounts."""

    def __init__(self, cfg: Config, database: DatabaseDirectory | None = None) -> None:
        p = cfg.policy
        self.database = database or DatabaseDirectory()
        static = StaticDirectory(p.recipients)
        accept = AcceptAll()
        self.directories: dict[str, RecipientDirectory] = {}
        for domain in cfg.gateway.hosted_domains:
            kind = p.directory.get(domain, p.default_directory)
            if kind == "accept":
                self.directories[domain] = accept
            elif kind == "static":
                self.directories[domain] = static
            elif kind == "database":
                self.directories[domain] = self.database
            else:
                spec = cfg.delivery.transport_for(domain)
                if spec is None:
                    raise ConfigError(
                        f"[policy] directory: {domain} uses a callout but has no "
                        "[delivery.transports] entry to probe"
                    )
                self.directories[domain] = CalloutDirectory(
                    spec,
                    helo=cfg.gateway.hostname,
                    sender=p.callout_sender,
                    positive_ttl=p.callout_positive_ttl,
                    negative_ttl=p.callout_negative_ttl,
                    timeout=p.callout_timeout,
                    max_concurrent=p.callout_max_concurrent,
                    max_per_minute=p.callout_max_per_minute,
                )
        unknown = set(p.directory) - set(cfg.gateway.hosted_domains)
        if unknown:
            raise ConfigError(
                "[policy] directory names domains that are not hosted: "
                + ", ".join(sorted(unknown))
            )

    @property
    def uses_database(self) -> bool:
        return any(d is self.database for d in self.directories.values())

    def directory_for(self, domain: str) -> RecipientDirectory:
        return self.directories.get(domain) or AcceptAll()

    @staticmethod
    def is_role(local: str) -> bool:
        return local.lower() in ROLE_ACCOUNTS

"""Recipient validation: is this address in a hosted domain a real mailbox? (no backscatter)

A ``RecipientDirectory`` answers ``await lookup(address) -> Lookup`` (``KNOWN``, ``UNKNOWN``
or ``TEMPFAIL``); ``peek(address)`` answers from memory without waiting, or None when only
``lookup`` can tell. Backends: ``AcceptAll`` (the embedded demo), ``StaticDirectory``
(``[policy] recipients``), ``DatabaseDirectory`` (addresses of enabled users in the
``users`` table, cached and reloaded when the table changes), ``LdapDirectory`` (a search
of the campus directory, see below) and ``CalloutDirectory`` (an SMTP ``RCPT`` probe to the
domain's downstream transport, see below).

``LdapDirectory`` searches ``[policy] ldap_base`` (default ``[auth.ldap] base``) with
``ldap_filter`` where ``{address}`` is the address escaped per RFC 4515
(``escape_filter_chars``), over the ``[auth.ldap]`` connection (``auth.ldapconn``: TLS rules,
search account, timeouts) on a thread pool. An entry is KNOWN, none is UNKNOWN; a directory
that is down, refuses the search or is slower than ``[auth.ldap] timeout`` is TEMPFAIL (451,
never an accept). Answers are cached for ``ldap_positive_ttl`` / ``ldap_negative_ttl`` and
concurrent lookups of one address share one search.

``CalloutDirectory`` caches positive and negative answers (``callout_positive_ttl`` /
``callout_negative_ttl``), probes an address at most once per TTL, coalesces concurrent
lookups of one address into one probe, and caps probing globally (``callout_max_concurrent``
in flight, ``callout_max_per_minute`` new probes): past the cap a lookup is a TEMPFAIL, so
a harvester cannot use the gateway to amplify probes against campus servers.

``RecipientValidator`` picks the directory per hosted domain. ``abuse@`` and
``postmaster@`` of every hosted domain are always known (CP-R4, RFC 2142).

Public names: ``Lookup``, ``RecipientDirectory``, ``AcceptAll``, ``StaticDirectory``,
``DatabaseDirectory``, ``LdapDirectory``, ``CalloutDirectory``, ``RecipientValidator``,
``ROLE_ACCOUNTS``.
Security: addresses come from untrusted clients but have passed ``smtp.address``; a probe
sends them only to the configured downstream server, never to an MX found by lookup; they
reach an LDAP filter only escaped (``escape_filter_chars``), never verbatim.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Iterable
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from ldap3.utils.conv import escape_filter_chars  # type: ignore[import-untyped]

from mailwarden.auth.ldapconn import LdapClient, LdapTempFail, read_bind_password
from mailwarden.config import TransportSpec
from mailwarden.core.events import emit
from mailwarden.delivery.smtp_conn import SMTPConnection
from mailwarden.errors import ConfigError
from mailwarden.policy.counters import in_task
from mailwarden.policy.settings import ADDRESS_PLACEHOLDER

if TYPE_CHECKING:
    from mailwarden.config import Config

ROLE_ACCOUNTS = frozenset({"abuse", "postmaster"})  # CP-R4, RFC 2142
MAX_CALLOUT_CACHE = 100_000  # cached callout answers (LRU)
MAX_LDAP_CACHE = 100_000  # cached LDAP answers (LRU)
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


class _AnswerCache:
    """KNOWN / UNKNOWN answers per lower-cased address, each with its own TTL (LRU-capped).
    A TEMPFAIL is never cached: the next lookup asks again."""

    def __init__(self, positive_ttl: float, negative_ttl: float, max_entries: int) -> None:
        self.ttls = {Lookup.KNOWN: positive_ttl, Lookup.UNKNOWN: negative_ttl}
        self.max_entries = max_entries
        self._data: OrderedDict[str, tuple[Lookup, float]] = OrderedDict()

    def get(self, key: str) -> Lookup | None:
        hit = self._data.get(key)
        if hit is None:
            return None
        result, expires = hit
        if expires <= time.monotonic():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return result

    def put(self, key: str, result: Lookup) -> None:
        ttl = self.ttls.get(result)
        if not ttl:
            return
        self._data[key] = (result, time.monotonic() + ttl)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()


class LdapDirectory:
    """Addresses that an LDAP search finds (``mail`` / ``mailAlternateAddress`` by default)."""

    def __init__(
        self,
        client: LdapClient,
        *,
        base: str,
        filter_template: str,
        positive_ttl: float = 300.0,
        negative_ttl: float = 60.0,
        timeout: float | None = None,
    ) -> None:
        if ADDRESS_PLACEHOLDER not in filter_template:
            raise ConfigError(f"[policy] ldap_filter must contain {ADDRESS_PLACEHOLDER}")
        self.client = client
        self.base = base
        self.filter_template = filter_template
        self._placeholder = ADDRESS_PLACEHOLDER
        self.timeout = client.settings.timeout if timeout is None else timeout
        self._cache = _AnswerCache(positive_ttl, negative_ttl, MAX_LDAP_CACHE)
        self._inflight: dict[str, asyncio.Future[Lookup]] = {}
        self.searches = 0  # searches sent (for tests and metrics)

    def make_filter(self, address: str) -> str:
        """The search filter for ``address`` (escaped per RFC 4515)."""
        return self.filter_template.replace(self._placeholder, escape_filter_chars(address))

    def peek(self, address: str) -> Lookup | None:
        return self._cache.get(address.lower())

    async def lookup(self, address: str) -> Lookup:
        key = address.lower()
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        pending = self._inflight.get(key)
        if pending is not None:  # coalesce: wait for the search already running
            return await asyncio.shield(pending)
        fut: asyncio.Future[Lookup] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            result = await in_task(self._search(key))
        except BaseException:
            fut.set_result(Lookup.TEMPFAIL)
            raise
        finally:
            self._inflight.pop(key, None)
        if not fut.done():
            fut.set_result(result)
        self._cache.put(key, result)
        return result

    async def _search(self, address: str) -> Lookup:
        self.searches += 1
        try:
            async with asyncio.timeout(self.timeout):
                entries = await self.client.run(
                    self.client.search, self.base, self.make_filter(address), 1
                )
        except LdapTempFail as exc:
            emit("policy.ldap_error", recipient=address, error=str(exc))
            return Lookup.TEMPFAIL
        except Exception as exc:  # LDAPException, OSError, timeout: undecided, never KNOWN
            emit("policy.ldap_error", recipient=address, error=type(exc).__name__)
            return Lookup.TEMPFAIL
        return Lookup.KNOWN if entries else Lookup.UNKNOWN

    def close(self) -> None:
        self.client.close()


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
        self._cache = _AnswerCache(positive_ttl, negative_ttl, MAX_CALLOUT_CACHE)
        self._inflight: dict[str, asyncio.Future[Lookup]] = {}
        self._budget_window = 0.0
        self._budget_used = 0
        self.probes = 0  # probes sent (for tests and metrics)

    def peek(self, address: str) -> Lookup | None:
        return self._cache.get(address.lower())

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
        self._cache.put(key, result)  # a TEMPFAIL is not cached: the next lookup probes again
        return result

    def _take_budget(self) -> bool:
        now = time.monotonic()
        if now - self._budget_window >= 60.0:
            self._budget_window, self._budget_used = now, 0
        if self._budget_used >= self.max_per_minute:
            return False
        self._budget_used += 1
        return True

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
        self.ldap: LdapDirectory | None = None  # one directory for every "ldap" domain
        self.directories: dict[str, RecipientDirectory] = {}
        for domain in cfg.gateway.hosted_domains:
            kind = p.directory.get(domain, p.default_directory)
            if kind == "accept":
                self.directories[domain] = accept
            elif kind == "static":
                self.directories[domain] = static
            elif kind == "database":
                self.directories[domain] = self.database
            elif kind == "ldap":
                if self.ldap is None:
                    self.ldap = _ldap_directory(cfg)
                self.directories[domain] = self.ldap
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

    def close(self) -> None:
        if self.ldap is not None:
            self.ldap.close()


def _ldap_directory(cfg: Config) -> LdapDirectory:
    """The ``ldap`` directory over the ``[auth.ldap]`` connection."""
    conn, p = cfg.auth.ldap, cfg.policy
    base = p.ldap_base or conn.base
    if not conn.url or not base:
        raise ConfigError(
            "[policy] directory 'ldap' needs [auth.ldap] url and a search base "
            "([policy] ldap_base or [auth.ldap] base)"
        )
    client = LdapClient(conn, read_bind_password(conn), thread_prefix="mw-ldap-rcpt")
    return LdapDirectory(
        client,
        base=base,
        filter_template=p.ldap_filter,
        positive_ttl=p.ldap_positive_ttl,
        negative_ttl=p.ldap_negative_ttl,
    )

"""Next-hop resolution with dnspython's async resolver: MX records (RFC 5321 5.1), the
A/AAAA fallback, null MX (RFC 7505) and plain host names for ``smtp:HOST:PORT``.

``MXResolver(dns_cfg).route(domain)`` returns the ordered ``Target`` list to try, or a
``RouteError`` that says whether to bounce (no such domain, null MX) or defer (SERVFAIL,
timeout); ``MXResolver.host(name)`` resolves one host name (or an IP literal). Answers
are cached for their TTL (dnspython's LRU cache, ``CACHE_SIZE`` answers per process), so a
queue of mail for one domain costs one MX lookup per TTL, not one per message; failures
(timeouts, SERVFAIL) are never cached.

Public names: ``MXResolver``, ``Target``, ``RouteError``, ``MAX_MX_ADDRESSES``.
Security: DNS answers are untrusted: the number of MX names and addresses tried is bounded,
only IP addresses parsed by ``ipaddress`` are used, and only the configured name servers are
asked (the system resolver only when the configuration lists none).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mailwarden.config import DNSConfig

MAX_MX_NAMES = 10  # MX host names looked up per domain (Postfix: smtp_mx_address_limit)
MAX_MX_ADDRESSES = 5  # addresses tried per delivery attempt (Postfix default: 5)
PREFER_IPV4 = True  # try A before AAAA addresses of the same host
DEFAULT_DNS_PORT = 53
CACHE_SIZE = 10_000  # DNS answers kept per process, each for its TTL


@dataclass(frozen=True, slots=True)
class Target:
    """One address to try: the host name (for logs and certificate checks) and its IP."""

    name: str
    ip: str
    preference: int = 0

    def label(self, port: int) -> str:
        """``mx1.example.org[192.0.2.1]:25`` (Postfix's relay= notation)."""
        return f"{self.name}[{self.ip}]:{port}"


@dataclass(frozen=True, slots=True)
class RouteError:
    """Why there is nowhere to deliver: a synthetic reply (4xx defers, 5xx bounces)."""

    code: int
    enhanced: str
    text: str


class MXResolver:
    """Resolves delivery targets using the configured name servers."""

    def __init__(self, cfg: DNSConfig) -> None:
        if cfg.nameservers:
            res = dns.asyncresolver.Resolver(configure=False)
            res.nameservers = [_nameserver(ns) for ns in cfg.nameservers]
        else:
            res = dns.asyncresolver.Resolver()
        res.timeout = cfg.timeout
        res.lifetime = cfg.timeout
        res.retry_servfail = False
        res.cache = dns.resolver.LRUCache(CACHE_SIZE)
        self._res = res

    async def route(self, domain: str) -> list[Target] | RouteError:
        """The ordered targets for mail to ``domain``."""
        literal = _address_literal(domain)
        if literal is not None:
            return [Target(domain, literal)]
        try:
            answer = await self._res.resolve(_absolute(domain), "MX", search=False)
        except dns.resolver.NXDOMAIN:
            return RouteError(550, "5.1.2", f"domain {domain} does not exist (NXDOMAIN)")
        except dns.resolver.NoAnswer:
            return await self._fallback(domain)
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            return RouteError(451, "4.4.3", f"MX lookup for {domain} failed: {_why(exc)}")
        except (dns.exception.DNSException, ValueError) as exc:
            return RouteError(451, "4.4.3", f"MX lookup for {domain} failed: {_why(exc)}")
        records = [(int(r.preference), r.exchange) for r in answer]
        if any(exchange == dns.name.root for _, exchange in records):
            return RouteError(556, "5.1.10", f"domain {domain} does not accept mail (null MX)")
        hosts = _order(
            [(pref, exchange.to_text(omit_final_dot=True).lower()) for pref, exchange in records]
        )[:MAX_MX_NAMES]
        results = await asyncio.gather(*(self._addresses(name) for _, name in hosts))
        targets: list[Target] = []
        tempfail = False
        for (pref, name), (addrs, failed) in zip(hosts, results, strict=True):
            tempfail = tempfail or failed
            targets.extend(Target(name, ip, pref) for ip in addrs)
        if targets:
            return targets[:MAX_MX_ADDRESSES]
        if tempfail:
            return RouteError(451, "4.4.3", f"cannot resolve the MX hosts of {domain}")
        return RouteError(550, "5.4.4", f"the MX hosts of {domain} have no addresses")

    async def host(self, name: str) -> list[Target] | RouteError:
        """Targets for one host name (``smtp:HOST:PORT``, the smarthost); no MX lookup."""
        try:
            return [Target(name, str(ipaddress.ip_address(name)))]
        except ValueError:
            pass
        addrs, tempfail = await self._addresses(name)
        if addrs:
            return [Target(name.lower(), ip) for ip in addrs][:MAX_MX_ADDRESSES]
        if tempfail:
            return RouteError(451, "4.4.3", f"cannot resolve host {name}")
        return RouteError(451, "4.4.4", f"host {name} has no addresses (check the transport)")

    async def _fallback(self, domain: str) -> list[Target] | RouteError:
        """RFC 5321 5.1: no MX records, so the domain itself is the implicit MX."""
        addrs, tempfail = await self._addresses(domain)
        if addrs:
            return [Target(domain, ip) for ip in addrs][:MAX_MX_ADDRESSES]
        if tempfail:
            return RouteError(451, "4.4.3", f"address lookup for {domain} failed")
        return RouteError(550, "5.4.4", f"domain {domain} has no MX and no address records")

    async def _addresses(self, name: str) -> tuple[list[str], bool]:
        """(addresses, temporary failure seen) for ``name``: A then AAAA (or the reverse)."""
        types = ("A", "AAAA") if PREFER_IPV4 else ("AAAA", "A")
        answers = await asyncio.gather(*(self._lookup(name, t) for t in types))
        addrs: list[str] = []
        tempfail = False
        for found, failed in answers:
            addrs.extend(a for a in found if a not in addrs)
            tempfail = tempfail or failed
        return addrs, tempfail

    async def _lookup(self, name: str, rdtype: str) -> tuple[list[str], bool]:
        try:
            answer = await self._res.resolve(_absolute(name), rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [], False
        except (dns.exception.DNSException, ValueError):
            return [], True
        out = []
        for rr in answer:
            try:
                out.append(str(ipaddress.ip_address(rr.address)))
            except ValueError:
                continue
        return out, False


def _nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    host, port = text, DEFAULT_DNS_PORT
    if text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    return dns.nameserver.Do53Nameserver(host, port)


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name.rstrip(".") + ".")


def _address_literal(domain: str) -> str | None:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` -> the address; otherwise None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def _order(records: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    """Sort by preference; shuffle hosts of equal preference (RFC 5321 5.1)."""
    shuffled = list(dict.fromkeys(records))
    random.shuffle(shuffled)
    return sorted(shuffled, key=lambda r: r[0])  # sort is stable: the shuffle stays


def _why(exc: BaseException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "SERVFAIL"
    return type(exc).__name__

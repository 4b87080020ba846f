"""Blocking DNS for the mail authentication libraries (pyspf, dkimpy), through the
configured resolvers.

``AuthResolver(nameservers, timeout)`` queries ``[dns] nameservers`` ("IP" or "IP:PORT";
the system resolver only when that list is empty) with every query bounded by ``timeout``
seconds, and caches answers (dnspython's thread-safe LRU cache). ``txt(name)`` returns
the TXT records (each one's strings joined), ``[]`` for NXDOMAIN/NODATA, and raises
``DNSTempError`` on a timeout or SERVFAIL. ``spf_lookup`` is the ``spf.DNSLookup`` hook:
installed once by ``install_spf_hook()``, it answers through the resolver the current
thread set with ``use_for_spf(resolver)`` (pyspf has only that one module-level hook).
These functions block: callers run them in worker threads.

Public names: ``AuthResolver``, ``DNSTempError``, ``install_spf_hook``, ``use_for_spf``,
``MAX_TXT_RECORDS``.
Security: answers are attacker-controlled data (the sender's zone); they are returned as
bytes and parsed by the callers with bounds. Queries only the configured resolvers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import spf

DEFAULT_DNS_PORT = 53
CACHE_SIZE = 20_000  # answers kept (shared by all messages of one process)
MAX_TXT_RECORDS = 20  # TXT records of one name looked at (a hostile zone can send more)


class DNSTempError(Exception):
    """A DNS query timed out or the resolver answered SERVFAIL: try again later."""


def _nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    host, port = text, DEFAULT_DNS_PORT
    if text.count(":") == 1:
        host, p = text.split(":")
        port = int(p)
    return dns.nameserver.Do53Nameserver(host, port)


class AuthResolver:
    """A synchronous, caching resolver bound to the configured nameservers."""

    def __init__(self, nameservers: Sequence[str], timeout: float) -> None:
        if nameservers:
            res = dns.resolver.Resolver(configure=False)
            res.nameservers = [_nameserver(ns) for ns in nameservers]
        else:
            res = dns.resolver.Resolver()
        res.timeout = timeout
        res.lifetime = timeout
        res.cache = dns.resolver.LRUCache(CACHE_SIZE)
        self.timeout = timeout
        self._res = res

    def resolve(self, name: str, rdtype: str, timeout: float | None = None) -> list[Any]:
        """The rdatas of ``name``/``rdtype`` ([] when there are none); ``DNSTempError``."""
        lifetime = self.timeout if timeout is None else max(0.1, min(timeout, self.timeout))
        try:
            qname = dns.name.from_text(name)
            answer = self._res.resolve(
                qname, rdtype, lifetime=lifetime, raise_on_no_answer=False, search=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong):
            return []  # not a DNS name: nothing can exist there
        except dns.exception.Timeout as exc:
            raise DNSTempError(f"DNS timeout for {name} {rdtype}") from exc
        except dns.resolver.NoNameservers as exc:
            raise DNSTempError(f"DNS server failure for {name} {rdtype}") from exc
        except dns.exception.DNSException as exc:
            raise DNSTempError(f"DNS error for {name} {rdtype}: {type(exc).__name__}") from exc
        if answer.rrset is None:
            return []
        return list(answer.rrset)[:MAX_TXT_RECORDS] if rdtype == "TXT" else list(answer.rrset)

    def txt(self, name: str, timeout: float | None = None) -> list[bytes]:
        """TXT records at ``name``, each one's character-strings joined."""
        return [b"".join(r.strings) for r in self.resolve(name, "TXT", timeout)]


_local = threading.local()
_original_lookup = spf.DNSLookup
_hook_lock = threading.Lock()


@contextmanager
def use_for_spf(resolver: AuthResolver) -> Iterator[None]:
    """pyspf queries in this thread go to ``resolver`` while the block runs."""
    _local.resolver = resolver
    try:
        yield
    finally:
        _local.resolver = None


def spf_lookup(
    name: str, qtype: str, strict: bool = True, timeout: float = 20
) -> list[tuple[tuple[str, str], Any]]:
    """``spf.DNSLookup`` replacement: same results as pyspf's dnspython lookup."""
    resolver: AuthResolver | None = getattr(_local, "resolver", None)
    if resolver is None:  # not called from our scanner: pyspf's own behaviour
        result: list[tuple[tuple[str, str], Any]] = _original_lookup(name, qtype, strict, timeout)
        return result
    try:
        rdatas = resolver.resolve(name if name.endswith(".") else name + ".", qtype, timeout)
    except DNSTempError as exc:
        raise spf.TempError(f"DNS {exc}") from exc
    out: list[tuple[tuple[str, str], Any]] = []
    for rdata in rdatas:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rdata.strings))
    return out


def install_spf_hook() -> None:
    """Route pyspf's DNS through ``spf_lookup`` (idempotent; once per process)."""
    with _hook_lock:
        if spf.DNSLookup is not spf_lookup:
            spf.DNSLookup = spf_lookup

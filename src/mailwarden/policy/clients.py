"""Client classes: off-campus, campus, registered server, authenticated user (SU-1).

``SenderRegistry`` holds the registered sending servers: those named in ``[policy]
senders`` plus those in the database (``mailwarden senders add``), kept in memory and
replaced wholesale when the database's change serial moves (``Policy`` polls it). The
most specific network containing the client wins. ``Classifier.classify(session)`` gives
a ``Client``; results per address are cached until the registry changes, so a recipient
check costs a dict lookup.

Public names: ``ClientKind``, ``Client``, ``SenderRegistry``, ``Classifier``,
``config_senders``.
Security: classification uses the socket peer address and ``session.auth_user`` (set
only by a successful SMTP AUTH inside TLS), never anything the client says (HELO, headers).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from mailwarden.core.types import Session
from mailwarden.policy.networks import CampusNetworks, IPAddress, parse_ip
from mailwarden.store.senders import RegisteredSender, parse_network

if TYPE_CHECKING:
    from mailwarden.config import Config

MAX_CACHED_CLIENTS = 65536  # distinct client addresses remembered before the cache resets


class ClientKind(StrEnum):
    OFF_CAMPUS = "off-campus"
    CAMPUS = "campus"
    REGISTERED = "registered"
    AUTHENTICATED = "authenticated"


@dataclass(frozen=True, slots=True)
class Client:
    """Who is talking to us. ``sender`` is set for a registered server, ``user`` for an
    authenticated one."""

    kind: ClientKind
    ip: str
    sender: RegisteredSender | None = None
    user: str | None = None

    @property
    def rate_key(self) -> str:
        """Identity that per-hour quotas count against."""
        if self.user is not None:
            return f"user:{self.user}"
        if self.sender is not None:
            return f"srv:{self.sender.network}"
        return f"ip:{self.ip}"


def config_senders(cfg: Config) -> list[RegisteredSender]:
    """The senders registered in ``[policy] senders`` (``[]`` = every hosted domain)."""
    hosted = tuple(cfg.gateway.hosted_domains)
    return [
        RegisteredSender(parse_network(net), "config", tuple(doms) or hosted, source="config")
        for net, doms in cfg.policy.senders.items()
    ]


class SenderRegistry:
    """Registered senders in memory, most specific network first."""

    def __init__(self, static: Iterable[RegisteredSender] = ()) -> None:
        self.static = list(static)
        self.dynamic: list[RegisteredSender] = []
        self.generation = 0
        self._ordered: list[RegisteredSender] = []
        self._reorder()

    def replace_dynamic(self, senders: Iterable[RegisteredSender]) -> None:
        self.dynamic = list(senders)
        self._reorder()

    def _reorder(self) -> None:
        everyone = [*self.dynamic, *self.static]  # database entries win over config on a tie
        self._ordered = sorted(everyone, key=lambda s: -s.network.prefixlen)
        self.generation += 1

    def all(self) -> list[RegisteredSender]:
        return list(self._ordered)

    def match(self, ip: IPAddress | None) -> RegisteredSender | None:
        if ip is None:
            return None
        for s in self._ordered:
            if s.network.version == ip.version and ip in s.network:
                return s
        return None


class Classifier:
    """Maps a session to a ``Client``; caches per peer address."""

    def __init__(self, campus: CampusNetworks, registry: SenderRegistry) -> None:
        self.campus = campus
        self.registry = registry
        self._cache: dict[str, Client] = {}
        self._generation = registry.generation

    def classify(self, session: Session) -> Client:
        if session.auth_user:
            return Client(ClientKind.AUTHENTICATED, session.peer_ip, user=session.auth_user)
        return self.by_address(session.peer_ip)

    def by_address(self, peer: str) -> Client:
        if self._generation != self.registry.generation:
            self._cache.clear()
            self._generation = self.registry.generation
        client = self._cache.get(peer)
        if client is None:
            ip = parse_ip(peer)
            sender = self.registry.match(ip)
            if sender is not None:
                client = Client(ClientKind.REGISTERED, peer, sender=sender)
            elif self.campus.contains(ip):
                client = Client(ClientKind.CAMPUS, peer)
            else:
                client = Client(ClientKind.OFF_CAMPUS, peer)
            if len(self._cache) >= MAX_CACHED_CLIENTS:
                self._cache.clear()
            self._cache[peer] = client
        return client

"""Campus networks (SU-3, SU-6): which client addresses are on campus.

``CampusNetworks(cidrs)`` answers ``contains(ip)`` for IPv4 and IPv6 (an IPv4-mapped IPv6
peer such as ``::ffff:10.1.2.3`` counts as its IPv4 address); ``parse_ip`` normalises a
peer address. ``campus_networks(cfg)`` reads ``[policy] campus_networks``.

Public names: ``IPAddress``, ``IPNetwork``, ``parse_ip``, ``CampusNetworks``,
``campus_networks``.
Security: parses peer addresses from the socket layer (not client-controlled text) and
operator CIDRs; an unparsable address is never on campus.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailwarden.config import Config

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(text: str) -> IPAddress | None:
    """The peer address, IPv4-mapped IPv6 unwrapped; None if it is not an IP address."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class CampusNetworks:
    """A set of CIDR networks with a membership test."""

    def __init__(self, networks: Iterable[str | IPNetwork]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(
            n if not isinstance(n, str) else ipaddress.ip_network(n, strict=True) for n in networks
        )

    def contains(self, ip: IPAddress | None) -> bool:
        if ip is None:
            return False
        return any(ip.version == n.version and ip in n for n in self.networks)

    def covers(self, network: IPNetwork) -> bool:
        """True when ``network`` lies wholly inside one campus network (SU-3)."""
        return any(
            n.version == network.version and network.subnet_of(n)  # type: ignore[arg-type]
            for n in self.networks
        )

    def __str__(self) -> str:
        return ", ".join(str(n) for n in self.networks) or "(none)"


def campus_networks(cfg: Config) -> CampusNetworks:
    return CampusNetworks(cfg.policy.campus_networks)

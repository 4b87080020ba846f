"""A small authoritative DNS server on loopback for the tests (UDP and TCP, dnspython).

``DNSServer(zones)`` serves zones given as a dict or as zone-file text::

    DNSServer({
        "example.org": {                      # zone origin
            "@":   {"MX": ["10 mx1", "20 mx2.example.org."], "TXT": ['"v=spf1 -all"']},
            "mx1": {"A": ["127.0.0.2"]},
            "mx2": {"A": ["127.0.0.3"], "AAAA": ["::1"]},
            "www": {"CNAME": ["mx1"]},
        },
        "nullmx.test": {"@": {"MX": ["0 ."]}},
    })
    DNSServer({"example.org": "@ 300 IN MX 10 mx1\\nmx1 300 IN A 127.0.0.2\\n"})

Names inside a record set are relative to the zone unless they end with a dot. A zone gets
an SOA and NS record if it lacks them. Answers: the records (AA set), CNAMEs followed inside
the served zones, NODATA (NOERROR + SOA) for a name without that type, NXDOMAIN for a name
that does not exist in a served zone, REFUSED outside them. ``servfail(name)`` makes every
query for ``name`` answer SERVFAIL, ``drop(name)`` makes them go unanswered (timeouts);
``set(name, rdtype, values)`` and ``remove(name)`` change data while running; ``queries``
records every (name, type) asked. UDP answers larger than the client's limit are truncated
(TC) so the client retries over TCP.

``start()`` binds 127.0.0.1 on one free port for both UDP and TCP and serves from
background threads; ``stop()`` closes everything; ``nameserver`` is the "IP:PORT" string for
``[dns] nameservers``. Also a context manager.

Security: binds loopback only; parses untrusted packets with dnspython and answers nothing
outside its own zones.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Mapping
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone

LOOPBACK = "127.0.0.1"
DEFAULT_TTL = 300
UDP_DEFAULT_PAYLOAD = 512  # without EDNS
MAX_CNAME_CHAIN = 8
TCP_TIMEOUT = 10.0  # seconds a TCP client may stay idle

ZoneData = Mapping[str, Mapping[str, Any]] | str


class DNSServer:
    """Authoritative test DNS server; see the module docstring."""

    def __init__(self, zones: Mapping[str, ZoneData] | None = None, host: str = LOOPBACK) -> None:
        self.host = host
        self.port = 0
        self._zones: dict[dns.name.Name, dns.zone.Zone] = {}
        self._lock = threading.RLock()
        self._servfail: set[dns.name.Name] = set()
        self._drop: set[dns.name.Name] = set()
        self.queries: list[tuple[str, str]] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._running = threading.Event()
        for origin, data in (zones or {}).items():
            self.add_zone(origin, data)

    # Data ------------------------------------------------------------------------------
    def add_zone(self, origin: str, data: ZoneData) -> None:
        """Add (or replace) a zone from a dict ``{name: {TYPE: [rdata, ...]}}`` or zone text."""
        oname = dns.name.from_text(origin)
        if isinstance(data, str):
            zone = dns.zone.from_text(data, origin=oname, relativize=False, check_origin=False)
        else:
            zone = dns.zone.Zone(oname, relativize=False)
            for name, types in data.items():
                for rdtype, values in types.items():
                    self._put(zone, name, rdtype, values)
        if zone.get_rdataset(oname, dns.rdatatype.SOA) is None:
            self._put(zone, "@", "SOA", [f"ns.{oname} hostmaster.{oname} 1 3600 600 86400 60"])
        if zone.get_rdataset(oname, dns.rdatatype.NS) is None:
            self._put(zone, "@", "NS", [f"ns.{oname}"])
        with self._lock:
            self._zones[oname] = zone

    @staticmethod
    def _put(zone: dns.zone.Zone, name: str, rdtype: str, values: Any) -> None:
        if isinstance(values, str):
            values = [values]
        rdt = dns.rdatatype.from_text(rdtype)
        rds = dns.rdataset.Rdataset(dns.rdataclass.IN, rdt)
        rds.update_ttl(DEFAULT_TTL)
        for v in values:
            rds.add(
                dns.rdata.from_text(dns.rdataclass.IN, rdt, v, origin=zone.origin, relativize=False)
            )
        zone.replace_rdataset(_absolute(zone, name), rds)

    def _zone_for(self, qname: dns.name.Name) -> dns.zone.Zone | None:
        best: dns.zone.Zone | None = None
        for origin, zone in self._zones.items():
            if qname.is_subdomain(origin) and (
                best is None or len(origin) > len(best.origin)  # type: ignore[arg-type]
            ):
                best = zone
        return best

    def set(self, name: str, rdtype: str, values: list[str] | str) -> None:
        """Replace the records of one type at an absolute ``name`` (its zone must exist)."""
        qname = dns.name.from_text(name)
        with self._lock:
            zone = self._zone_for(qname)
            if zone is None:
                raise KeyError(f"no zone serves {name}")
            self._put(zone, qname.to_text(), rdtype, values)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Delete a name (or one type at it) so that it answers NXDOMAIN (or NODATA)."""
        qname = dns.name.from_text(name)
        with self._lock:
            zone = self._zone_for(qname)
            if zone is None:
                return
            if rdtype is None:
                zone.delete_node(qname)
            else:
                zone.delete_rdataset(qname, dns.rdatatype.from_text(rdtype))

    def servfail(self, name: str, on: bool = True) -> None:
        """Answer SERVFAIL to every query for ``name`` (absolute), or stop doing so."""
        with self._lock:
            (self._servfail.add if on else self._servfail.discard)(dns.name.from_text(name))

    def drop(self, name: str, on: bool = True) -> None:
        """Never answer queries for ``name`` (the client times out), or stop doing so."""
        with self._lock:
            (self._drop.add if on else self._drop.discard)(dns.name.from_text(name))

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    # Answering -------------------------------------------------------------------------
    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        """The response to one parsed query (``None``: do not answer)."""
        response = dns.message.make_response(query)
        response.flags &= ~dns.flags.RA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        q = query.question[0]
        with self._lock:
            self.queries.append((q.name.to_text(), dns.rdatatype.to_text(q.rdtype)))
            if q.name in self._drop:
                return None
            if q.name in self._servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
                return response
            zone = self._zone_for(q.name)
            if zone is None:
                response.set_rcode(dns.rcode.REFUSED)
                return response
            response.flags |= dns.flags.AA
            self._resolve(response, zone, q.name, q.rdtype)
        return response

    def _resolve(
        self,
        response: dns.message.Message,
        zone: dns.zone.Zone,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
    ) -> None:
        name = qname
        for _ in range(MAX_CNAME_CHAIN):
            node = zone.get_node(name)
            if node is None:
                # An empty non-terminal (a name with children only) exists: NODATA.
                if not any(n.is_subdomain(name) and n != name for n in zone.nodes):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                self._add_soa(response, zone)
                return
            rds = node.get_rdataset(dns.rdataclass.IN, rdtype)
            if rds is not None:
                response.answer.append(_rrset(name, rds))
                return
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is None or rdtype == dns.rdatatype.CNAME:
                self._add_soa(response, zone)  # NODATA
                return
            response.answer.append(_rrset(name, cname))
            target = next(iter(cname)).target
            nxt = self._zone_for(target)
            if nxt is None:
                return  # the client resolves the rest elsewhere
            zone, name = nxt, target
        response.set_rcode(dns.rcode.SERVFAIL)  # CNAME loop

    @staticmethod
    def _add_soa(response: dns.message.Message, zone: dns.zone.Zone) -> None:
        soa = zone.get_rdataset(zone.origin, dns.rdatatype.SOA)  # type: ignore[arg-type]
        if soa is not None:
            response.authority.append(_rrset(zone.origin, soa))  # type: ignore[arg-type]

    def _wire(self, data: bytes, udp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        try:
            response = self.answer(query)
        except Exception:  # a bug here must not kill the server thread: SERVFAIL
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
        if response is None:
            return None
        if not udp:
            return response.to_wire()
        limit = query.payload if query.edns >= 0 else UDP_DEFAULT_PAYLOAD
        try:
            return response.to_wire(max_size=max(limit, UDP_DEFAULT_PAYLOAD))
        except dns.exception.TooBig:
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    # Serving ---------------------------------------------------------------------------
    def start(self) -> DNSServer:
        """Bind UDP and TCP on the same free loopback port and serve in threads."""
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            break
        else:
            raise RuntimeError("no free port for the test DNS server")
        self._udp, self._tcp, self.port = udp, tcp, port
        udp.settimeout(0.2)
        tcp.settimeout(0.2)
        self._running.set()
        for target in (self._serve_udp, self._serve_tcp):
            t = threading.Thread(target=target, name=f"dns-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _serve_udp(self) -> None:
        assert self._udp is not None
        while self._running.is_set():
            try:
                data, peer = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self._wire(data, udp=True)
            if reply is not None:
                with contextlib.suppress(OSError):
                    self._udp.sendto(reply, peer)

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        while self._running.is_set():
            try:
                conn, _ = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._tcp_client, args=(conn,), daemon=True)
            t.start()

    def _tcp_client(self, conn: socket.socket) -> None:
        conn.settimeout(TCP_TIMEOUT)
        with conn:
            while self._running.is_set():
                try:
                    head = _recv_exact(conn, 2)
                    if head is None:
                        return
                    (length,) = struct.unpack("!H", head)
                    data = _recv_exact(conn, length)
                    if data is None:
                        return
                except OSError:
                    return
                reply = self._wire(data, udp=False)
                if reply is None:
                    continue
                try:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
                except OSError:
                    return

    def stop(self) -> None:
        self._running.clear()
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        self._udp = self._tcp = None

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _absolute(zone: dns.zone.Zone, name: str) -> dns.name.Name:
    if name in ("@", ""):
        return zone.origin  # type: ignore[return-value]
    return dns.name.from_text(name, origin=zone.origin)


def _rrset(name: dns.name.Name, rds: dns.rdataset.Rdataset) -> dns.rrset.RRset:
    return dns.rrset.from_rdata_list(name, rds.ttl, list(rds))


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf

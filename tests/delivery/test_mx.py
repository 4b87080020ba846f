"""MX delivery against the loopback DNS server and smtp-sink peers on 127.0.0.x addresses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.delivery.conftest import make_cfg, make_item
from tests.support.dnsserver import DNSServer
from tests.support.ports import free_port

from mailwarden.config import DNSConfig
from mailwarden.core.types import DeliveryStatus
from mailwarden.delivery.mx import MXResolver, RouteError
from mailwarden.delivery.router import Router

DELIVERED, DEFERRED, BOUNCED = (
    DeliveryStatus.DELIVERED,
    DeliveryStatus.DEFERRED,
    DeliveryStatus.BOUNCED,
)


def _resolver(dns: DNSServer) -> MXResolver:
    return MXResolver(DNSConfig(nameservers=[dns.nameserver], timeout=2.0))


def _router(tmp_path: Path, dns: DNSServer, port: int, **kw: Any) -> Router:
    return Router(make_cfg(tmp_path, nameserver=dns.nameserver, port=port, **kw))


@pytest.mark.asyncio
async def test_preference_order(dns_server: DNSServer) -> None:
    dns_server.add_zone(
        "pref.test",
        {
            "@": {"MX": ["30 mx3", "10 mx1", "20 mx2"]},
            "mx1": {"A": "127.0.0.11"},
            "mx2": {"A": "127.0.0.12"},
            "mx3": {"A": "127.0.0.13"},
        },
    )
    targets = await _resolver(dns_server).route("pref.test")
    assert not isinstance(targets, RouteError)
    assert [t.name for t in targets] == ["mx1.pref.test", "mx2.pref.test", "mx3.pref.test"]
    assert [t.ip for t in targets] == ["127.0.0.11", "127.0.0.12", "127.0.0.13"]


@pytest.mark.asyncio
async def test_equal_preference_is_randomised(dns_server: DNSServer) -> None:
    dns_server.add_zone(
        "eq.test",
        {"@": {"MX": ["10 a", "10 b", "5 first"]}, "a": {"A": "127.0.0.21"},
         "b": {"A": "127.0.0.22"}, "first": {"A": "127.0.0.20"}},
    )  # fmt: skip
    resolver = _resolver(dns_server)
    seen = set()
    for _ in range(40):
        targets = await resolver.route("eq.test")
        assert not isinstance(targets, RouteError)
        assert targets[0].name == "first.eq.test"
        seen.add(tuple(t.name for t in targets[1:]))
    assert seen == {("a.eq.test", "b.eq.test"), ("b.eq.test", "a.eq.test")}


@pytest.mark.asyncio
async def test_fallback_to_address_records(dns_server: DNSServer) -> None:
    dns_server.add_zone("nomx.test", {"@": {"A": "127.0.0.31", "TXT": '"no mx here"'}})
    targets = await _resolver(dns_server).route("nomx.test")
    assert not isinstance(targets, RouteError)
    assert [(t.name, t.ip) for t in targets] == [("nomx.test", "127.0.0.31")]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("zone", "domain", "code", "enhanced"),
    [
        ({"@": {"MX": "0 ."}}, "null.test", 556, "5.1.10"),
        ({"@": {"TXT": '"x"'}}, "nxdomain.null.test", 550, "5.1.2"),
        ({"@": {"TXT": '"nothing"'}}, "null.test", 550, "5.4.4"),
        ({"@": {"MX": "10 ghost"}}, "null.test", 550, "5.4.4"),
    ],
)
async def test_route_errors(
    dns_server: DNSServer, zone: dict[str, Any], domain: str, code: int, enhanced: str
) -> None:
    dns_server.add_zone("null.test", zone)
    err = await _resolver(dns_server).route(domain)
    assert isinstance(err, RouteError)
    assert (err.code, err.enhanced) == (code, enhanced)


@pytest.mark.asyncio
async def test_servfail_and_timeout_defer(dns_server: DNSServer) -> None:
    dns_server.add_zone("sf.test", {"@": {"MX": "10 mx"}, "mx": {"A": "127.0.0.41"}})
    dns_server.servfail("sf.test.")
    err = await _resolver(dns_server).route("sf.test")
    assert isinstance(err, RouteError) and err.code == 451 and err.enhanced == "4.4.3"
    dns_server.servfail("sf.test.", on=False)
    dns_server.servfail("mx.sf.test.")  # the MX exists but its address lookup fails
    err = await _resolver(dns_server).route("sf.test")
    assert isinstance(err, RouteError) and err.code == 451
    dns_server.servfail("mx.sf.test.", on=False)
    dns_server.drop("sf.test.")
    quick = MXResolver(DNSConfig(nameservers=[dns_server.nameserver], timeout=0.3))
    err = await quick.route("sf.test")
    assert isinstance(err, RouteError) and err.code == 451


@pytest.mark.asyncio
async def test_delivery_prefers_lowest_mx(
    tmp_path: Path, dns_server: DNSServer, sink_factory: Any
) -> None:
    port = free_port("127.0.0.2")
    best = sink_factory(host="127.0.0.2", port=port)
    backup = sink_factory(host="127.0.0.3", port=port)
    dns_server.add_zone(
        "dept.test",
        {"@": {"MX": ["20 backup", "10 mx1"]}, "mx1": {"A": "127.0.0.2"},
         "backup": {"A": "127.0.0.3"}},
    )  # fmt: skip
    router = _router(tmp_path, dns_server, port)
    item = make_item(router, ["x@dept.test"])
    assert item.destination == "mx:dept.test"
    [r] = await router.deliver(item)
    await router.close()
    assert r.status == DELIVERED
    assert r.remote_host == f"mx1.dept.test[127.0.0.2]:{port}"
    assert len(best.messages()) == 1 and backup.messages() == []


@pytest.mark.asyncio
async def test_first_mx_down_second_used(
    tmp_path: Path, dns_server: DNSServer, sink_factory: Any
) -> None:
    port = free_port("127.0.0.5")
    backup = sink_factory(host="127.0.0.5", port=port)  # nothing listens on 127.0.0.4
    dns_server.add_zone(
        "dept.test",
        {"@": {"MX": ["10 mx1", "20 mx2"]}, "mx1": {"A": "127.0.0.4"}, "mx2": {"A": "127.0.0.5"}},
    )
    router = _router(tmp_path, dns_server, port)
    [r] = await router.deliver(make_item(router, ["x@dept.test"]))
    await router.close()
    assert r.status == DELIVERED
    assert r.remote_host == f"mx2.dept.test[127.0.0.5]:{port}"
    assert len(backup.messages()) == 1


@pytest.mark.asyncio
async def test_first_mx_tempfails_second_used(
    tmp_path: Path, dns_server: DNSServer, sink_factory: Any
) -> None:
    port = free_port("127.0.0.6")
    sink_factory("-r", "MAIL", host="127.0.0.6", port=port)
    good = sink_factory(host="127.0.0.7", port=port)
    dns_server.add_zone(
        "dept.test",
        {"@": {"MX": ["10 mx1", "20 mx2"]}, "mx1": {"A": "127.0.0.6"}, "mx2": {"A": "127.0.0.7"}},
    )
    router = _router(tmp_path, dns_server, port)
    [r] = await router.deliver(make_item(router, ["x@dept.test"]))
    await router.close()
    assert r.status == DELIVERED and "127.0.0.7" in r.remote_host
    assert len(good.messages()) == 1


@pytest.mark.asyncio
async def test_first_mx_bounce_is_final(
    tmp_path: Path, dns_server: DNSServer, sink_factory: Any
) -> None:
    port = free_port("127.0.0.8")
    sink_factory("-f", "RCPT", host="127.0.0.8", port=port)
    other = sink_factory(host="127.0.0.9", port=port)
    dns_server.add_zone(
        "dept.test",
        {"@": {"MX": ["10 mx1", "20 mx2"]}, "mx1": {"A": "127.0.0.8"}, "mx2": {"A": "127.0.0.9"}},
    )
    router = _router(tmp_path, dns_server, port)
    [r] = await router.deliver(make_item(router, ["x@dept.test"]))
    await router.close()
    assert r.status == BOUNCED and "127.0.0.8" in r.remote_host
    assert other.messages() == []


@pytest.mark.asyncio
async def test_all_mx_down_defers(tmp_path: Path, dns_server: DNSServer) -> None:
    dns_server.add_zone(
        "dept.test",
        {"@": {"MX": ["10 mx1", "20 mx2"]}, "mx1": {"A": "127.0.0.4"}, "mx2": {"A": "127.0.0.5"}},
    )
    router = _router(tmp_path, dns_server, free_port("127.0.0.4"))
    [r] = await router.deliver(make_item(router, ["x@dept.test"]))
    assert r.status == DEFERRED and r.enhanced == "4.4.1"


@pytest.mark.asyncio
async def test_fallback_to_a_delivers(
    tmp_path: Path, dns_server: DNSServer, sink_factory: Any
) -> None:
    port = free_port("127.0.0.10")
    sink = sink_factory(host="127.0.0.10", port=port)
    dns_server.add_zone("plain.test", {"@": {"A": "127.0.0.10"}})
    router = _router(tmp_path, dns_server, port)
    [r] = await router.deliver(make_item(router, ["x@plain.test"]))
    await router.close()
    assert r.status == DELIVERED and r.remote_host == f"plain.test[127.0.0.10]:{port}"
    assert len(sink.messages()) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("setup", "status", "enhanced"),
    [
        ("nullmx", BOUNCED, "5.1.10"),
        ("nxdomain", BOUNCED, "5.1.2"),
        ("servfail", DEFERRED, "4.4.3"),
    ],
)
async def test_router_maps_dns_outcomes(
    tmp_path: Path, dns_server: DNSServer, setup: str, status: DeliveryStatus, enhanced: str
) -> None:
    dns_server.add_zone("dept.test", {"@": {"MX": "0 ." if setup == "nullmx" else "10 mx"},
                                      "mx": {"A": "127.0.0.4"}})  # fmt: skip
    if setup == "servfail":
        dns_server.servfail("dept.test.")
    domain = "gone.dept.test" if setup == "nxdomain" else "dept.test"
    router = _router(tmp_path, dns_server, 25)
    [r] = await router.deliver(make_item(router, [f"x@{domain}"]))
    assert r.status == status and r.enhanced == enhanced


@pytest.mark.asyncio
async def test_smarthost_bypasses_mx(
    tmp_path: Path, dns_server: DNSServer, sink_factory: Any
) -> None:
    sink = sink_factory()
    dns_server.add_zone("dept.test", {"@": {"MX": "0 ."}})  # would bounce via MX
    router = Router(make_cfg(tmp_path, nameserver=dns_server.nameserver,
                             smarthost=f"127.0.0.1:{sink.port}"))  # fmt: skip
    assert router.destination("x@dept.test") == f"smarthost:127.0.0.1:{sink.port}"
    assert router.destination("x@example.edu") == "maildir"  # transports win
    [r] = await router.deliver(make_item(router, ["x@dept.test"]))
    await router.close()
    assert r.status == DELIVERED and len(sink.messages()) == 1
    assert dns_server.queries == []  # an IP smarthost needs no DNS at all


@pytest.mark.asyncio
async def test_transport_host_name_resolved_by_test_dns(
    tmp_path: Path, dns_server: DNSServer, sink_factory: Any
) -> None:
    sink = sink_factory()
    dns_server.add_zone("relay.test", {"smtp": {"A": "127.0.0.1"}})
    transport = f"smtp:smtp.relay.test:{sink.port}"
    router = Router(
        make_cfg(tmp_path, nameserver=dns_server.nameserver, transports={"dept.test": transport})
    )
    [r] = await router.deliver(make_item(router, ["x@dept.test"]))
    await router.close()
    assert r.status == DELIVERED and r.remote_host.startswith("smtp.relay.test[127.0.0.1]")
    assert ("smtp.relay.test.", "A") in dns_server.queries


@pytest.mark.asyncio
async def test_answers_are_cached_for_their_ttl(dns_server: DNSServer) -> None:
    dns_server.add_zone(
        "cached.test", {"@": {"MX": ["10 mx"]}, "mx": {"A": "127.0.0.31"}}
    )  # default TTL 300 s
    resolver = _resolver(dns_server)
    for _ in range(5):
        targets = await resolver.route("cached.test")
        assert not isinstance(targets, RouteError)
        assert [t.ip for t in targets] == ["127.0.0.31"]
    asked = [q for q in dns_server.queries if q[0].endswith("cached.test.")]
    assert ("cached.test.", "MX") in asked and ("mx.cached.test.", "A") in asked
    assert len(asked) == len(set(asked)), asked  # each name and type once, not five times

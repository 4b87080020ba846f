"""SMTP delivery against real peers: Postfix's smtp-sink and a private Postfix instance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.delivery.conftest import MESSAGE, make_cfg, make_item
from tests.support.ports import free_port

from mailwarden.core.types import DeliveryStatus
from mailwarden.delivery.router import Router

DELIVERED, DEFERRED, BOUNCED = (
    DeliveryStatus.DELIVERED,
    DeliveryStatus.DEFERRED,
    DeliveryStatus.BOUNCED,
)


def _router(tmp_path: Path, transport: str, **kw: Any) -> Router:
    return Router(make_cfg(tmp_path, transports={"remote.test": transport}, **kw))


@pytest.mark.asyncio
async def test_delivered_to_smtp_sink(tmp_path: Path, sink_factory: Any) -> None:
    sink = sink_factory()
    router = _router(tmp_path, sink.transport)
    assert router.destination("x@remote.test") == sink.transport
    results = await router.deliver(make_item(router, ["x@remote.test", "y@Remote.Test"]))
    await router.close()
    assert [r.status for r in results] == [DELIVERED, DELIVERED]
    assert results[0].remote_host == f"127.0.0.1[127.0.0.1]:{sink.port}"
    assert results[0].code == 250 and results[0].tls is None
    [dump] = sink.messages()
    assert b"x@remote.test" in dump and b"y@Remote.Test" in dump
    # Transparency: the dot line arrives as sent (stuffed on the wire, unstuffed by the peer).
    assert MESSAGE.replace(b"\r\n", b"\n") in dump.replace(b"\r\n", b"\n")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("reject", "status", "code_class"),
    [
        (["-f", "RCPT"], BOUNCED, 5),
        (["-r", "RCPT"], DEFERRED, 4),
        (["-f", "MAIL"], BOUNCED, 5),
        (["-r", "MAIL"], DEFERRED, 4),
        (["-f", "DATA"], BOUNCED, 5),
        (["-f", "."], BOUNCED, 5),
        (["-r", "."], DEFERRED, 4),
    ],
)
async def test_smtp_sink_rejections(
    tmp_path: Path, sink_factory: Any, reject: list[str], status: DeliveryStatus, code_class: int
) -> None:
    sink = sink_factory(*reject)
    router = _router(tmp_path, sink.transport)
    results = await router.deliver(make_item(router, ["x@remote.test", "y@remote.test"]))
    await router.close()
    assert [r.status for r in results] == [status, status]
    assert all(r.code // 100 == code_class for r in results)
    assert all(r.enhanced.startswith(f"{code_class}.") for r in results)


@pytest.mark.asyncio
async def test_connection_refused_defers(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    router = _router(tmp_path, f"smtp:127.0.0.1:{port}")
    [r] = await router.deliver(make_item(router, ["x@remote.test"]))
    assert r.status == DEFERRED and r.enhanced == "4.4.1"
    assert "refused" in r.text.lower()


@pytest.mark.asyncio
async def test_421_greeting_defers(tmp_path: Path, sink_factory: Any) -> None:
    sink = sink_factory("-Q", "CONNECT")
    router = _router(tmp_path, sink.transport)
    [r] = await router.deliver(make_item(router, ["x@remote.test"]))
    assert r.status == DEFERRED


@pytest.mark.asyncio
async def test_disconnect_after_data_defers(tmp_path: Path, sink_factory: Any) -> None:
    sink = sink_factory("-q", ".")
    router = _router(tmp_path, sink.transport)
    [r] = await router.deliver(make_item(router, ["x@remote.test"]))
    await router.close()
    assert r.status == DEFERRED and r.code == 451


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("sender", "recipients"),
    [
        ("alice@sender.test", ["x@remote.test\r\nRSET", "y@remote.test"]),
        ("alice@sender.test", ["x@remote.test\nDATA"]),
        ("alice@sender.test", ["x\0@remote.test"]),
        ("alice@sender.test\r\nRCPT TO:<evil@evil.test>", ["x@remote.test"]),
    ],
)
async def test_cr_lf_nul_refused_before_sending(
    tmp_path: Path, sink_factory: Any, proxy_factory: Any, sender: str, recipients: list[str]
) -> None:
    sink = sink_factory()
    proxy = await proxy_factory(sink.port)
    router = _router(tmp_path, f"smtp:127.0.0.1:{proxy.port}")
    item = make_item(router, recipients, sender=sender, destination=f"smtp:127.0.0.1:{proxy.port}")
    results = await router.deliver(item)
    await router.close()
    assert len(results) == len(recipients)
    bad = [r for r in results if r.status == BOUNCED]
    assert bad and all(r.enhanced in ("5.1.3", "5.1.7") for r in bad)
    for r in results:
        if any(c in r.recipient for c in "\r\n\0") or "\n" in sender:
            assert r.status == BOUNCED
    if len(bad) == len(recipients):
        assert proxy.connections == 0  # nothing at all went on the wire
    assert all(b"evil" not in m and b"RSET" not in m.split(b"\n\n")[0] for m in sink.messages())


@pytest.mark.asyncio
async def test_smtputf8_needed_but_not_offered(tmp_path: Path, sink_factory: Any) -> None:
    sink = sink_factory()  # smtp-sink does not announce SMTPUTF8
    router = _router(tmp_path, sink.transport)
    [r] = await router.deliver(make_item(router, ["jürgen@remote.test"]))
    await router.close()
    assert r.status == BOUNCED and r.enhanced == "5.6.7"
    assert sink.messages() == []


@pytest.mark.asyncio
async def test_tls_encrypt_without_starttls_defers(tmp_path: Path, sink_factory: Any) -> None:
    sink = sink_factory()  # no STARTTLS
    router = _router(tmp_path, sink.transport, tls_policy="encrypt")
    [r] = await router.deliver(make_item(router, ["x@remote.test"]))
    await router.close()
    assert r.status == DEFERRED and r.enhanced == "4.7.4"
    assert sink.messages() == []


@pytest.mark.asyncio
async def test_tls_may_without_starttls_goes_plain(tmp_path: Path, sink_factory: Any) -> None:
    sink = sink_factory()
    router = _router(tmp_path, sink.transport, tls_policy="may")
    [r] = await router.deliver(make_item(router, ["x@remote.test"]))
    await router.close()
    assert r.status == DELIVERED and r.tls is None
    assert len(sink.messages()) == 1


@pytest.mark.asyncio
async def test_per_domain_policy_overrides_default(tmp_path: Path, sink_factory: Any) -> None:
    sink = sink_factory()
    router = _router(tmp_path, sink.transport, tls_policy="may",
                     tls_policies={"remote.test": "encrypt"})  # fmt: skip
    [r] = await router.deliver(make_item(router, ["x@remote.test"]))
    await router.close()
    assert r.status == DEFERRED and r.enhanced == "4.7.4"


# Connection reuse --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_connection_reuse(tmp_path: Path, sink_factory: Any, proxy_factory: Any) -> None:
    sink = sink_factory()
    proxy = await proxy_factory(sink.port)
    router = _router(tmp_path, f"smtp:127.0.0.1:{proxy.port}", idle_reuse=60)
    for i in range(5):
        [r] = await router.deliver(make_item(router, [f"u{i}@remote.test"]))
        assert r.status == DELIVERED
    await router.close()
    assert proxy.connections == 1
    assert len(sink.messages()) == 5


@pytest.mark.asyncio
async def test_no_reuse_when_disabled(
    tmp_path: Path, sink_factory: Any, proxy_factory: Any
) -> None:
    sink = sink_factory()
    proxy = await proxy_factory(sink.port)
    router = _router(tmp_path, f"smtp:127.0.0.1:{proxy.port}", connection_reuse=False)
    for i in range(3):
        [r] = await router.deliver(make_item(router, [f"u{i}@remote.test"]))
        assert r.status == DELIVERED
    await router.close()
    assert proxy.connections == 3


@pytest.mark.asyncio
async def test_max_reuse(tmp_path: Path, sink_factory: Any, proxy_factory: Any) -> None:
    sink = sink_factory()
    proxy = await proxy_factory(sink.port)
    router = _router(tmp_path, f"smtp:127.0.0.1:{proxy.port}", max_reuse=2, idle_reuse=60)
    for i in range(5):
        [r] = await router.deliver(make_item(router, [f"u{i}@remote.test"]))
        assert r.status == DELIVERED
    await router.close()
    assert proxy.connections == 3  # 2 + 2 + 1 messages


@pytest.mark.asyncio
async def test_dead_cached_connection_retried_once(
    tmp_path: Path, sink_factory: Any, proxy_factory: Any
) -> None:
    sink = sink_factory()
    proxy = await proxy_factory(sink.port)
    router = _router(tmp_path, f"smtp:127.0.0.1:{proxy.port}", idle_reuse=60)
    [r] = await router.deliver(make_item(router, ["a@remote.test"]))
    assert r.status == DELIVERED
    proxy.cut_all()  # the cached connection is now dead (as after a server idle timeout)
    [r] = await router.deliver(make_item(router, ["b@remote.test"]))
    await router.close()
    assert r.status == DELIVERED
    assert proxy.connections == 2
    assert len(sink.messages()) == 2


@pytest.mark.asyncio
async def test_concurrent_deliveries_share_nothing_in_flight(
    tmp_path: Path, sink_factory: Any, proxy_factory: Any
) -> None:
    import asyncio

    sink = sink_factory()
    proxy = await proxy_factory(sink.port)
    router = _router(tmp_path, f"smtp:127.0.0.1:{proxy.port}", idle_reuse=60)
    items = [make_item(router, [f"u{i}@remote.test"]) for i in range(4)]
    results = await asyncio.gather(*(router.deliver(it) for it in items))
    assert all(r[0].status == DELIVERED for r in results)
    again = await asyncio.gather(*(router.deliver(it) for it in items))
    assert all(r[0].status == DELIVERED for r in again)
    await router.close()
    assert proxy.connections == 4  # the second round reused the four idle connections
    assert len(sink.messages()) == 8

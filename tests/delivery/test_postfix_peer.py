"""SMTP delivery to a real private Postfix (STARTTLS with a self-signed certificate, SIZE,
per-recipient RCPT replies) and LMTP delivery to a real Dovecot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.delivery.conftest import make_cfg, make_item
from tests.support.dnsserver import DNSServer

from mailwarden.core.events import MemorySink, get_sink, set_sink
from mailwarden.core.types import DeliveryStatus
from mailwarden.delivery.router import Router

DELIVERED, DEFERRED, BOUNCED = (
    DeliveryStatus.DELIVERED,
    DeliveryStatus.DEFERRED,
    DeliveryStatus.BOUNCED,
)
HOST = "mx.dept.test"  # the name on the Postfix certificate


@pytest.fixture
def downstream(postfix_factory: Any) -> Any:
    return postfix_factory.downstream(
        ["dept.test"], ["known@dept.test", "other@dept.test"], hostname=HOST,
        extra_main={"message_size_limit": "20000"},
    )  # fmt: skip


def _router(tmp_path: Path, pf: Any, **kw: Any) -> Router:
    return Router(make_cfg(tmp_path, transports={"dept.test": pf.transport}, **kw))


@pytest.mark.asyncio
async def test_mixed_rcpt_replies(tmp_path: Path, downstream: Any) -> None:
    router = _router(tmp_path, downstream, tls_policy="none")
    rcpts = ["known@dept.test", "nobody-here@dept.test", "other@dept.test"]
    results = await router.deliver(make_item(router, rcpts))
    await router.close()
    assert [r.status for r in results] == [DELIVERED, BOUNCED, DELIVERED]
    assert results[1].code == 550 and results[1].enhanced == "5.1.1"
    assert "RCPT TO" in results[1].text
    assert all(r.tls is None for r in results)
    assert len(downstream.wait_messages("known@dept.test")) == 1
    assert len(downstream.wait_messages("other@dept.test")) == 1


@pytest.mark.asyncio
async def test_tls_may_uses_starttls(tmp_path: Path, downstream: Any) -> None:
    router = _router(tmp_path, downstream, tls_policy="may")
    sink, previous = MemorySink(), get_sink()
    set_sink(sink)
    try:
        [r] = await router.deliver(make_item(router, ["known@dept.test"]))
    finally:
        set_sink(previous)
    await router.close()
    names = [e.name for e in sink.events]
    assert names == ["delivery.connect", "delivery.tls"]
    tls_event = sink.events[1].fields
    assert tls_event["queue_id"] == "TESTQ1" and tls_event["version"] == r.tls.version  # type: ignore[union-attr]
    assert r.status == DELIVERED
    assert r.tls is not None and r.tls.version.startswith("TLS") and r.tls.cipher
    assert r.tls.bits and r.tls.bits >= 128
    [raw] = downstream.wait_messages("known@dept.test")
    assert b"(using TLS" in raw  # Postfix's Received: header records the TLS session


@pytest.mark.asyncio
async def test_tls_encrypt_uses_starttls_without_verification(
    tmp_path: Path, downstream: Any
) -> None:
    router = _router(tmp_path, downstream, tls_policy="encrypt")
    [r] = await router.deliver(make_item(router, ["known@dept.test"]))
    await router.close()
    assert r.status == DELIVERED and r.tls is not None


@pytest.mark.asyncio
async def test_tls_verify_self_signed_defers(tmp_path: Path, downstream: Any) -> None:
    router = _router(tmp_path, downstream, tls_policy="verify")
    [r] = await router.deliver(make_item(router, ["known@dept.test"]))
    await router.close()
    assert r.status == DEFERRED and r.enhanced == "4.7.5"
    assert downstream.messages("known@dept.test") == []


@pytest.mark.asyncio
async def test_tls_verify_with_trusted_certificate_via_mx(
    tmp_path: Path, downstream: Any, dns_server: DNSServer
) -> None:
    dns_server.add_zone("dept.test", {"@": {"MX": "10 mx"}, "mx": {"A": "127.0.0.1"}})
    cfg = make_cfg(tmp_path, nameserver=dns_server.nameserver, port=downstream.port,
                   tls_policy="verify")  # fmt: skip
    cafile = str(downstream.config_dir / "cert.pem")
    router = Router(cfg, tls_cafile=cafile)
    item = make_item(router, ["known@dept.test"])
    assert item.destination == "mx:dept.test"
    [r] = await router.deliver(item)
    await router.close()
    assert r.status == DELIVERED, r
    assert r.remote_host == f"{HOST}[127.0.0.1]:{downstream.port}"
    assert r.tls is not None


@pytest.mark.asyncio
async def test_tls_verify_wrong_name_defers(
    tmp_path: Path, downstream: Any, dns_server: DNSServer
) -> None:
    # Trusted certificate, but the MX host name is not the one on the certificate.
    dns_server.add_zone("dept.test", {"@": {"MX": "10 other"}, "other": {"A": "127.0.0.1"}})
    cfg = make_cfg(tmp_path, nameserver=dns_server.nameserver, port=downstream.port,
                   tls_policy="verify")  # fmt: skip
    router = Router(cfg, tls_cafile=str(downstream.config_dir / "cert.pem"))
    [r] = await router.deliver(make_item(router, ["known@dept.test"]))
    await router.close()
    assert r.status == DEFERRED and r.enhanced == "4.7.5"


@pytest.mark.asyncio
async def test_size_limit_bounces_before_data(tmp_path: Path, downstream: Any) -> None:
    router = _router(tmp_path, downstream)
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 30
    [r] = await router.deliver(make_item(router, ["known@dept.test"], message=big))
    await router.close()
    assert r.status == BOUNCED and r.enhanced == "5.3.4"
    assert "20000" in r.text


@pytest.mark.asyncio
async def test_smtputf8_offered_by_postfix(tmp_path: Path, downstream: Any) -> None:
    router = _router(tmp_path, downstream, tls_policy="none")
    item = make_item(router, ["known@dept.test"], sender="jürgen@sender.test", smtputf8=True)
    [r] = await router.deliver(item)
    await router.close()
    assert r.status == DELIVERED
    assert len(downstream.wait_messages("known@dept.test")) == 1


@pytest.mark.asyncio
async def test_lmtp_dovecot_per_recipient(tmp_path: Path, dovecot_factory: Any) -> None:
    dv = dovecot_factory(["known@dept.test", "second@dept.test"])
    router = Router(make_cfg(tmp_path, transports={"dept.test": dv.transport}))
    assert router.destination("x@dept.test") == dv.transport
    rcpts = ["known@dept.test", "unknown@dept.test", "second@dept.test"]
    results = await router.deliver(make_item(router, rcpts))
    assert [r.status for r in results] == [DELIVERED, BOUNCED, DELIVERED]
    assert results[1].code == 550
    assert results[0].remote_host == f"127.0.0.1[127.0.0.1]:{dv.port}"
    # A second message over the cached LMTP connection.
    again = await router.deliver(make_item(router, ["second@dept.test"]))
    await router.close()
    assert again[0].status == DELIVERED
    [msg] = dv.wait_messages("known@dept.test")
    assert b"Subject: delivery test" in msg
    assert len(dv.wait_messages("second@dept.test", 2)) == 2

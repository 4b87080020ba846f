"""rspamd scanner against a real rspamd on loopback (DNS only via the loopback server).

GTUBE is rejected by rspamd's own action, ham passes with headers, a stopped rspamd fails
closed (CP-E3) and recovers; reply parsing and request headers are checked as units.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from mailwarden.core.events import MemorySink
from mailwarden.scan import (
    Action,
    BuiltinScanner,
    ClamdScanner,
    RspamdScanner,
    ScanSettings,
    VerdictEngine,
    render_headers,
)
from mailwarden.scan.rspamd import parse_result, request_headers
from mailwarden.scan.settings import ClamavSettings, RspamdSettings
from tests.scan.messages import gtube, ham, plain, scan_input
from tests.scan.test_httpclient import reply_with, serving
from tests.support.clamd import Clamd
from tests.support.rspamd import LoopbackDNS, Rspamd


def rscanner(url: str, **kw: object) -> RspamdScanner:
    return RspamdScanner(RspamdSettings(url=url, **kw))  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_gtube_rejected_by_rspamd_action(rspamd: Rspamd) -> None:
    s = rscanner(rspamd.url)
    try:
        verdict = await VerdictEngine([s]).judge(scan_input(plain(gtube())))
    finally:
        await s.aclose()
    assert "RSPAMD_ACTION_REJECT" in verdict.symbol_names
    assert "RSPAMD_GTUBE" in verdict.symbol_names
    assert verdict.action is Action.REJECT
    assert verdict.reply()[:2] == (554, "5.7.1")


@pytest.mark.asyncio
async def test_ham_accepted_with_headers_full_pipeline(
    rspamd: Rspamd, clamd: Clamd, dns_server: LoopbackDNS, events: MemorySink
) -> None:
    settings = ScanSettings(
        clamav=ClamavSettings(socket=clamd.address), rspamd=RspamdSettings(url=rspamd.url)
    )
    r = RspamdScanner(settings.rspamd)
    engine = VerdictEngine([ClamdScanner(settings.clamav), r, BuiltinScanner()], settings)
    before = dns_server.queries
    try:
        verdict = await engine.judge(scan_input(ham()))
    finally:
        await r.aclose()
    assert verdict.action is Action.ACCEPT, verdict
    assert "RSPAMD_ACTION_NO_ACTION" in verdict.symbol_names
    assert "RSPAMD_R_SPF_ALLOW" in verdict.symbol_names  # SPF came from the loopback DNS
    assert dns_server.queries > before
    headers = dict(verdict.headers)
    assert headers["X-Spam-Status"].startswith("No, score=")
    assert headers["X-Virus-Scanned"] == "mailwarden (clamav, builtin)"
    assert "RSPAMD_R_SPF_ALLOW" in headers["X-Spam-Symbols"]
    wire = render_headers(verdict.headers)
    assert wire.count(b"\r\n") == 4 and b"\n\r\n" not in wire
    (event,) = [e for e in events.events if e.name == "scan.verdict"]
    assert event.fields["action"] == "accept" and event.fields["queue_id"] == "TESTQID1"
    assert "faculty" not in json.dumps(event.to_json())  # never message content


@pytest.mark.asyncio
async def test_rspamd_stopped_tempfails_then_recovers(
    rspamd_factory: Callable[..., Rspamd],
) -> None:
    r = rspamd_factory()
    s = rscanner(r.url, timeout=10)
    engine = VerdictEngine([s, BuiltinScanner()])
    try:
        assert (await engine.judge(scan_input(plain(gtube())))).action is Action.REJECT
        r.stop()
        verdict = await engine.judge(scan_input(ham()))
        assert verdict.action is Action.TEMPFAIL
        assert verdict.symbol_names == ["RSPAMD_FAIL"]
        assert verdict.reply()[:2] == (451, "4.7.1")
        r.start()
        assert (await engine.judge(scan_input(plain(gtube())))).action is Action.REJECT
    finally:
        await s.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b"<html>not json</html>"),
        (200, b'{"error": "bad message"}'),
        (200, b'{"score": 1.0}'),
        (200, b"[1, 2, 3]"),
        (200, b'{"action": "no action", "score": "high", "symbols": {}}'),
        (200, b'{"action": "no action", "score": 1, "symbols": {"X": 5}}'),
        (500, b'{"action": "no action", "score": 0}'),
        (200, b"{" * 100000),
    ],
)
async def test_garbage_replies_are_fail(status: int, body: bytes) -> None:
    async with serving(lambda request: reply_with(status, body)) as (_, url):
        s = RspamdScanner(RspamdSettings(url=url))
        try:
            verdict = await VerdictEngine([s]).judge(scan_input(ham()))
        finally:
            await s.aclose()
    assert verdict.symbol_names == ["RSPAMD_FAIL"]
    assert verdict.action is Action.TEMPFAIL


def test_parse_result_symbols_prefixed_with_options() -> None:
    body = json.dumps(
        {
            "action": "add header",
            "score": 7.5,
            "required_score": 15.0,
            "symbols": {
                "BAYES_SPAM": {"name": "BAYES_SPAM", "score": 5.1, "options": ["99%"]},
                "odd-name.x": {"name": "odd-name.x", "score": -1},
            },
        }
    ).encode()
    got = {s.name: s for s in parse_result(body)}
    assert got["RSPAMD_BAYES_SPAM"].score == 5.1 and got["RSPAMD_BAYES_SPAM"].detail == "99%"
    assert got["RSPAMD_ODD_NAME_X"].score == -1.0
    assert "score=7.50 required=15.00" in got["RSPAMD_ACTION_ADD_HEADER"].detail


def test_request_headers_carry_envelope_without_injection() -> None:
    msg = scan_input(
        b"x", recipients=("a@x.edu", "b@x.edu"), auth_user="alice", helo="evil\r\nPass: all"
    )
    headers = request_headers(msg)
    names = [k for k, _ in headers]
    assert names.count(b"Rcpt") == 2
    assert (b"User", b"alice") in headers and (b"IP", b"192.0.2.10") in headers
    assert b"Pass" not in names
    assert dict(headers)[b"Helo"] == b"evilPass: all"

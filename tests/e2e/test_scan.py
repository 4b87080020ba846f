"""End to end: the verdict pipeline in the real gateway, with real clamd and rspamd.

Every message passes the verdict engine before ``250``: EICAR is quarantined with a clear
``250 2.7.0`` reply, GTUBE is refused ``554`` by rspamd, ham is delivered with our headers
(the client's forged ones removed), and a scanner that is down or stale fails closed with
``451`` -- nothing is queued, nothing delivered -- until it is back.

Outbound (an authenticated user and a registered server sending off campus, EICAR held
under SU-5, the outbound thresholds) is in test_outbound.py; the content hook alone is
tested in tests/scan/test_pipeline.py.

Security: clamd, rspamd, the DNS server and the gateway listen on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import smtplib
from collections.abc import Callable
from typing import Any

from tests.scan.messages import RCPT, SENDER, eicar, gtube, ham, plain
from tests.support.clamd import Clamd, build_db
from tests.support.gateway import Gateway
from tests.support.rspamd import Rspamd


def send_data(gw: Gateway, message: bytes, rcpt: str = RCPT) -> tuple[int, str]:
    """Send one message; return the reply to the end of DATA."""
    with gw.smtp() as c:
        c.ehlo()
        c.mail(SENDER)
        c.rcpt(rcpt)
        try:
            code, text = c.data(message)
        except smtplib.SMTPDataError as exc:
            code, text = exc.smtp_code, exc.smtp_error
    return code, text.decode() if isinstance(text, bytes) else str(text)


def scan_cfg(clamav: Clamd | None = None, spamd: Rspamd | None = None, **more: Any) -> dict:
    scan: dict[str, Any] = {"timeout": "20s"}
    if clamav is not None:
        scan["clamav"] = {"socket": clamav.address, "timeout": "20s", "version_check_interval": 0}
    if spamd is not None:
        scan["rspamd"] = {"url": spamd.url, "timeout": "20s"}
    return {"scan": scan | more}


def quarantine_list(gw: Gateway) -> list[dict[str, Any]]:
    out = gw.cli("quarantine", "list", "--json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_eicar_inbound_is_quarantined_with_a_clear_reply(
    gateway_factory: Callable[..., Gateway], clamd: Clamd, rspamd: Rspamd
) -> None:
    gw = gateway_factory(extra=scan_cfg(clamd, rspamd))
    code, text = send_data(gw, plain(eicar(), "invoice"))
    assert code == 250, text
    assert text.startswith("2.7.0 ") and "quarantined as " in text and "virus found" in text
    assert "will not be delivered" in text
    qid = text.split("quarantined as ")[1].split(",")[0]
    held = gw.wait_event(lambda e: e["event"] == "quarantine.held", what="quarantine.held")
    assert held["queue_id"] == qid and held["kind"] == "virus"
    assert "CLAMAV_VIRUS" in held["symbols"] and held["control"] == "CP-E4"
    [entry] = quarantine_list(gw)
    assert entry["queue_id"] == qid and entry["direction"] == "inbound"
    assert entry["recipients"] == [RCPT] and entry["sender"] == SENDER
    assert gw.queue_list() == []  # never queued
    # A message sent after it is delivered: the virus never was.
    assert send_data(gw, ham())[0] == 250
    [delivered] = gw.wait_messages(RCPT)
    assert b"Minutes of the faculty meeting" in delivered
    assert b"EICAR" not in delivered


def test_gtube_is_rejected_by_rspamd(
    gateway_factory: Callable[..., Gateway], clamd: Clamd, rspamd: Rspamd
) -> None:
    gw = gateway_factory(extra=scan_cfg(clamd, rspamd, builtin={"enabled": False}))
    code, text = send_data(gw, plain(gtube(), "cheap pills"))
    assert (code, text.split(" ")[0]) == (554, "5.7.1"), text
    assert "RSPAMD_ACTION_REJECT" in text
    verdict = gw.wait_event(lambda e: e["event"] == "scan.verdict", what="scan.verdict")
    assert verdict["action"] == "reject" and "RSPAMD_ACTION_REJECT" in verdict["symbols"]
    assert gw.queue_list() == [] and quarantine_list(gw) == []
    assert not gw.events("queue.enqueued")


def test_ham_is_delivered_with_our_headers_and_forged_ones_removed(
    gateway_factory: Callable[..., Gateway], clamd: Clamd, rspamd: Rspamd
) -> None:
    gw = gateway_factory(extra=scan_cfg(clamd, rspamd))
    forged = (
        b"X-Spam-Status: No, score=-100\r\n"
        b"X-Spam-Flag: NO\r\n"
        b"X-Virus-Scanned: clean by the sender\r\n"
        b"Authentication-Results: mailwarden.test; spf=pass smtp.mailfrom=example.org\r\n"
        b"Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=example.org\r\n"
    )
    code, text = send_data(gw, forged + ham())
    assert code == 250 and text.startswith("2.0.0 Ok: queued as"), text
    [msg] = gw.wait_messages(RCPT)
    head = msg.split(b"\n\n", 1)[0]
    assert head.count(b"X-Spam-Status:") == 1 and b"score=-100" not in head
    assert b"X-Spam-Flag" not in head and b"clean by the sender" not in head
    assert b"X-Virus-Scanned: mailwarden (clamav, builtin)" in head
    assert b"X-Spam-Symbols:" in head and b"X-Spam-Score:" in head
    # RFC 8601 section 5: only the one claiming our authserv-id is removed.
    assert b"Authentication-Results: mailwarden.test" not in head
    assert b"Authentication-Results: mx.example.org" in head
    verdict = gw.wait_event(lambda e: e["event"] == "scan.verdict", what="scan.verdict")
    assert verdict["action"] in ("accept", "add_header")
    assert not any(s.startswith(("RSPAMD_FAIL", "CLAMAV_FAIL")) for s in verdict["symbols"])


def test_clamd_down_tempfails_and_mail_is_accepted_once_it_is_back(
    gateway_factory: Callable[..., Gateway], clamd_factory: Callable[..., Clamd]
) -> None:
    daemon = clamd_factory()
    gw = gateway_factory(extra=scan_cfg(daemon))
    daemon.stop()
    code, text = send_data(gw, ham())
    assert (code, text) == (451, "4.7.1 Message could not be scanned, try again later")
    verdict = gw.wait_event(lambda e: e["event"] == "scan.verdict", what="scan.verdict")
    assert verdict["action"] == "tempfail" and "CLAMAV_FAIL" in verdict["symbols"]
    assert verdict["control"] == "CP-E3"
    assert gw.queue_list() == [] and quarantine_list(gw) == []
    assert gw.messages(RCPT) == [] and not gw.events("queue.enqueued")
    status = gw.cli("status", check=False)
    assert status.returncode == 1 and "clamav     DOWN" in status.stdout
    daemon.start()
    code, text = send_data(gw, ham())
    assert code == 250, text
    assert len(gw.wait_messages(RCPT)) == 1


def test_rspamd_stopped_tempfails_and_mail_is_accepted_once_it_is_back(
    gateway_factory: Callable[..., Gateway], rspamd_factory: Callable[..., Rspamd]
) -> None:
    daemon = rspamd_factory()
    gw = gateway_factory(extra=scan_cfg(None, daemon))
    assert send_data(gw, ham())[0] == 250
    daemon.stop()
    code, text = send_data(gw, ham())
    assert (code, text) == (451, "4.7.1 Message could not be scanned, try again later")
    verdict = gw.wait_event(
        lambda e: e["event"] == "scan.verdict" and e["action"] == "tempfail", what="tempfail"
    )
    assert "RSPAMD_FAIL" in verdict["symbols"] and verdict["control"] == "CP-E3"
    daemon.start()
    assert send_data(gw, ham())[0] == 250
    assert len(gw.wait_messages(RCPT, 2)) == 2


def test_stale_signatures_fail_closed(
    gateway_factory: Callable[..., Gateway],
    clamd_factory: Callable[..., Clamd],
    tmp_path: Any,
) -> None:
    old = build_db(tmp_path / "olddb", version=7, date="3 days ago")
    daemon = clamd_factory(old)
    gw = gateway_factory(extra=scan_cfg(daemon))
    code, text = send_data(gw, ham())
    assert code == 451 and text.startswith("4.7.1"), text
    stale = gw.wait_event(
        lambda e: e["event"] == "scan.signatures_stale", what="scan.signatures_stale"
    )
    assert stale["fail_closed"] is True and stale["control"] == "SU-5"
    assert gw.messages(RCPT) == [] and gw.queue_list() == []
    status = gw.cli("status", check=False)
    assert status.returncode == 1
    assert "signatures version 7" in status.stdout and "FAIL CLOSED" in status.stdout


def test_status_and_banner_say_when_scanning_is_limited(
    gateway_factory: Callable[..., Gateway], clamd: Clamd
) -> None:
    limited = gateway_factory()
    banner = limited.output()
    assert "virus scanning is limited (built-in signatures only)" in banner
    res = limited.cli("status")
    assert "WARNING    virus scanning is limited (built-in signatures only)" in res.stdout
    info = json.loads(limited.cli("status", "--json").stdout)
    assert info["scan"]["limited"] and "clamav" not in info["scan"]
    full = gateway_factory(extra=scan_cfg(clamd))
    assert "limited" not in full.output()
    info = json.loads(full.cli("status", "--json").stdout)
    clam = info["scan"]["clamav"]
    assert info["scan"]["limited"] is None
    assert clam["ok"] and clam["db_version"] == 4242 and not clam["fail_closed"]
    assert info["queue"]["total"] == 0 and info["quarantine"]["held"] == 0

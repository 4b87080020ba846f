"""End to end: the quarantine in the real gateway -- list, show, release, delete, expiry.

Messages are held through SMTP (EICAR by the built-in scanner; GTUBE forced to quarantine
with ``[scan.forced]``), then managed with ``mailwarden quarantine ...`` as an operator
would. Release must deliver exactly the original bytes (our ``Received:`` on top, no scan
headers); a virus is release-protected.

Security: the gateway listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any

from tests.e2e.test_scan import quarantine_list, send_data
from tests.scan.messages import RCPT, eicar, gtube, plain
from tests.support.gateway import Gateway

SPAM_HOLD = {"scan": {"forced": {"GTUBE": "quarantine"}}}


def _qid(reply: str) -> str:
    assert "quarantined as " in reply, reply
    return reply.split("quarantined as ")[1].split(",")[0]


def _lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def test_release_delivers_exactly_the_original_bytes(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gw = gateway_factory(extra=SPAM_HOLD)
    original = b"X-Spam-Status: No, forged by the sender\r\n" + plain(gtube(), "offer")
    code, text = send_data(gw, original)
    assert code == 250 and text.startswith("2.7.0"), text
    qid = _qid(text)
    [entry] = quarantine_list(gw)
    assert entry["kind"] == "spam" and entry["status"] == "held"
    assert gw.messages(RCPT) == [] and gw.queue_list() == []

    res = gw.cli("quarantine", "release", qid, "--by", "iso-alice")
    assert f"{qid}: released by iso-alice" in res.stdout
    [delivered] = gw.wait_messages(RCPT)
    # Maildir adds Return-Path and Delivered-To and stores LF line ends; below them is
    # our Received field (naming the same queue id), then the client's bytes unchanged.
    lines = delivered.split(b"\n")
    assert lines[0].startswith(b"Return-Path: ") and lines[1].startswith(b"Delivered-To: ")
    rest = b"\n".join(lines[2:])
    assert rest.startswith(b"Received: from client.test")
    received, sep, body = rest.partition(b"X-Spam-Status: No, forged by the sender\n")
    assert sep and f"id {qid}".encode() in received
    assert sep + body == _lf(original)
    assert b"X-Virus-Scanned" not in delivered  # the verdict was skipped, not re-run

    released = gw.wait_event(lambda e: e["event"] == "quarantine.released", what="release")
    assert released["queue_id"] == qid and released["by"] == "iso-alice"
    assert released["forced"] is False
    [after] = [e for e in quarantine_list_all(gw) if e["queue_id"] == qid]
    assert after["status"] == "released" and after["released_by"] == "iso-alice"
    again = gw.cli("quarantine", "release", qid, check=False)
    assert again.returncode == 1 and "already released" in again.stderr
    assert len(gw.messages(RCPT)) == 1


def quarantine_list_all(gw: Gateway) -> list[dict[str, Any]]:
    out = gw.cli("quarantine", "list", "--all", "--json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_virus_release_needs_force(gateway_factory: Callable[..., Gateway]) -> None:
    gw = gateway_factory()
    code, text = send_data(gw, plain(eicar(), "virus"))
    assert code == 250 and "virus found" in text
    qid = _qid(text)
    refused = gw.cli("quarantine", "release", qid, check=False)
    assert refused.returncode == 1
    assert "administrators only" in refused.stderr and "--force" in refused.stderr
    assert [e["status"] for e in quarantine_list(gw)] == ["held"]
    assert not gw.events("quarantine.released")
    res = gw.cli("quarantine", "release", qid, "--force", "--by", "admin-bob")
    assert res.returncode == 0
    [delivered] = gw.wait_messages(RCPT)
    assert b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE" in delivered
    event = gw.wait_event(lambda e: e["event"] == "quarantine.released", what="release")
    assert event["forced"] is True and event["by"] == "admin-bob" and event["kind"] == "virus"


def _active_content_message() -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "alice@example.org"
    msg["To"] = RCPT
    msg["Subject"] = "report ESCAPE-HERE"
    msg["Message-ID"] = "<active-1@client.test>"
    msg.set_content("Plain words for the reviewer.\n" + eicar().decode() + "\n")
    msg.add_alternative(
        "<html><body><script>alert('owned')</script><b>bold</b></body></html>", subtype="html"
    )
    msg.add_attachment(
        b"MZ\x90\x00" + b"\x00" * 300,
        maintype="application",
        subtype="octet-stream",
        filename="setup.exe",
    )
    # A raw ESC in a header: legal in SMTP DATA, hostile on a terminal.
    return msg.as_bytes().replace(b"ESCAPE-HERE", b"\x1b[31mred")


def test_show_lists_parts_and_never_renders_active_content(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gw = gateway_factory()
    code, text = send_data(gw, _active_content_message())
    assert code == 250, text
    qid = _qid(text)
    out = gw.cli("quarantine", "show", qid).stdout
    assert "Plain words for the reviewer." in out
    assert "<script>" not in out and "alert(" not in out and "<b>bold</b>" not in out
    assert "\x1b" not in out and "\\x1b[31mred" in out  # escaped, not interpreted
    assert "text/html" in out and "setup.exe" in out and "application/octet-stream" in out
    assert "Windows/DOS executable" in out
    info = json.loads(gw.cli("quarantine", "show", qid, "--json").stdout)
    assert info["kind"] == "virus" and info["queue_id"] == qid
    sizes = {a["filename"]: a["size"] for a in info["message"]["attachments"]}
    assert sizes["setup.exe"] == 304
    assert [p["path"] for p in info["message"]["text_parts"]] == ["1.1"]

    deleted = gw.cli("quarantine", "delete", qid, "--by", "carol")
    assert f"{qid}: deleted" in deleted.stdout
    assert quarantine_list(gw) == [] and gw.messages(RCPT) == []
    assert gw.cli("quarantine", "show", qid, check=False).returncode == 3
    event = gw.wait_event(lambda e: e["event"] == "quarantine.deleted", what="delete")
    assert event["by"] == "carol"


def test_expired_entries_are_removed(gateway_factory: Callable[..., Gateway]) -> None:
    gw = gateway_factory(
        extra=SPAM_HOLD | {"quarantine": {"spam_retention": "1s", "expire_interval": "0.5s"}}
    )
    code, text = send_data(gw, plain(gtube(), "short-lived"))
    assert code == 250, text
    qid = _qid(text)
    gw.wait_event(
        lambda e: e["event"] == "quarantine.expired" and e["queue_id"] == qid,
        what="quarantine.expired",
    )
    assert quarantine_list_all(gw) == []
    assert not (gw.state_dir / "quarantine" / "messages" / qid).exists()
    assert gw.messages(RCPT) == []


def test_held_messages_survive_a_restart_and_a_lost_index(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gw = gateway_factory(extra=SPAM_HOLD)
    qid = _qid(send_data(gw, plain(gtube(), "kept"))[1])
    gw.stop()
    for f in (gw.state_dir / "quarantine").glob("index.sqlite3*"):
        f.unlink()
    gw.start()
    gw.wait_event(lambda e: e["event"] == "quarantine.recovered", what="recovered")
    [entry] = quarantine_list(gw)
    assert entry["queue_id"] == qid and entry["kind"] == "spam" and entry["status"] == "held"

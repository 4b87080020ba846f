"""End to end: outbound mail through the real gateway -- EICAR is quarantined (SU-5), clean
mail goes out, and the outbound score thresholds apply to outbound mail.

Two real ways out of campus, each over real SMTP into ``mailwarden serve`` with real clamd
(the built-in scanner off, so the verdict is clamd's):

- an authenticated user on the submission listener (STARTTLS, then AUTH PLAIN; the user is
  made with ``mailwarden user add``);
- a registered campus server (``[policy.senders]``), a client bound to its own address.

The outside domain ``outside.test`` is resolved through the loopback DNS server (MX ->
127.0.0.1) and served by a private Postfix (``[delivery] port`` points MX delivery at it).
The virus gets the quarantine reply, lands in the quarantine index as ``outbound`` under
SU-5 and never reaches Postfix; a clean message sent the same way afterwards does. The last
test sends one score-11 message inbound and one outbound with the default thresholds:
inbound it is delivered with a tagged subject, outbound it is held (10 <= 11 < 12).

Security: the gateway, clamd, Postfix and the DNS server listen on 127.0.0.1 only.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.test_auth import FAST, PASSWORD, user_cli
from tests.e2e.test_scan import quarantine_list, scan_cfg
from tests.scan.messages import eicar, gtube
from tests.support.clamd import Clamd
from tests.support.dnsserver import DNSServer
from tests.support.gateway import Gateway, client_tls_context
from tests.support.maildir import header_value
from tests.support.ports import LOOPBACK
from tests.support.postfix import PostfixInstance

OUTSIDE = "outside.test"
DAVE = f"dave@{OUTSIDE}"
LAB_HOST = "127.0.0.70"  # a registered campus server
OFF_CAMPUS = "127.0.0.200"
USER_SENDER = "alice@example.edu"
LAB_SENDER = "list@lab.example.edu"
POLICY = {
    "campus_networks": ["127.0.0.1/32", "127.0.0.64/26"],
    "senders": {LAB_HOST: ["lab.example.edu"]},
}


@pytest.fixture
def zones() -> Iterator[DNSServer]:
    data = {OUTSIDE: {"@": {"MX": ["10 mx"]}, "mx": {"A": [LOOPBACK]}}}
    with DNSServer(data) as server:
        yield server


@pytest.fixture
def outside(postfix_factory: Any) -> PostfixInstance:
    """The outside world: a Postfix that accepts mail for dave@outside.test."""
    return postfix_factory.downstream([OUTSIDE], [DAVE])


def message(sender: str, subject: str, body: bytes) -> bytes:
    return (
        (
            f"From: <{sender}>\r\nTo: <{DAVE}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@campus.test>\r\n"
            "Date: Mon, 06 May 2024 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        ).encode()
        + body
        + b"\r\n"
    )


def _data(c: smtplib.SMTP, sender: str, rcpt: str, data: bytes) -> tuple[int, str]:
    c.mail(sender)
    code, text = c.rcpt(rcpt)
    assert code == 250, text  # the relay itself is allowed: only the content decides
    try:
        code, text = c.data(data)
    except smtplib.SMTPDataError as exc:
        code, text = exc.smtp_code, exc.smtp_error
    return code, text.decode(errors="replace")


def submit(gw: Gateway, rcpt: str, data: bytes) -> tuple[int, str]:
    """alice sends through the submission listener: STARTTLS, AUTH PLAIN, one message."""
    with gw.smtp(gw.submission_port) as c:
        c.ehlo()
        c.starttls(context=client_tls_context())
        c.ehlo()
        c.login("alice", PASSWORD)
        return _data(c, USER_SENDER, rcpt, data)


def relay(gw: Gateway, source: str, sender: str, rcpt: str, data: bytes) -> tuple[int, str]:
    """A client bound to ``source`` sends one message to the MX listener (no AUTH)."""
    with smtplib.SMTP(
        LOOPBACK,
        gw.smtp_port,
        local_hostname="mail.lab.example.edu",
        timeout=60,
        source_address=(source, 0),
    ) as c:
        c.ehlo()
        return _data(c, sender, rcpt, data)


def _qid(reply: str) -> str:
    assert "quarantined as " in reply, reply
    return reply.split("quarantined as ")[1].split(",")[0]


def _queued_id(reply: str) -> str:
    assert reply.startswith("2.0.0 Ok: queued as "), reply
    return reply.rsplit(" ", 1)[1]


def outbound_gateway(
    gateway_factory: Callable[..., Gateway],
    zones: DNSServer,
    outside: PostfixInstance,
    clamd: Clamd,
) -> Gateway:
    extra: dict[str, Any] = scan_cfg(clamd, builtin={"enabled": False})
    extra |= {"policy": POLICY, "auth": dict(FAST)}
    gw = gateway_factory(
        start=False, nameserver=zones.nameserver, delivery={"port": outside.port}, extra=extra
    )
    add = user_cli(
        gw, "add", "alice", "--address", USER_SENDER, "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert add.returncode == 0, add.stderr
    return gw.start()


@pytest.mark.parametrize("path", ["submission", "registered-server"])
def test_outbound_eicar_is_quarantined_and_clean_mail_goes_out(
    path: str,
    gateway_factory: Callable[..., Gateway],
    zones: DNSServer,
    outside: PostfixInstance,
    clamd: Clamd,
) -> None:
    gw = outbound_gateway(gateway_factory, zones, outside, clamd)
    sender = USER_SENDER if path == "submission" else LAB_SENDER

    def send(subject: str, body: bytes) -> tuple[int, str]:
        data = message(sender, subject, body)
        if path == "submission":
            return submit(gw, DAVE, data)
        return relay(gw, LAB_HOST, sender, DAVE, data)

    # The virus: the client is told it is held and will not be delivered.
    code, text = send("outbound virus", eicar())
    assert code == 250, text
    assert text.startswith("2.7.0 Ok: message quarantined as "), text
    assert "will not be delivered (virus found: " in text and "EICAR" in text
    virus_qid = _qid(text)
    held = gw.wait_event(lambda e: e["event"] == "quarantine.held", what="quarantine.held")
    assert held["queue_id"] == virus_qid and held["kind"] == "virus"
    assert held["control"] == "SU-5" and "CLAMAV_VIRUS" in held["symbols"]
    verdict = gw.wait_event(
        lambda e: e["event"] == "scan.verdict" and e["queue_id"] == virus_qid, what="verdict"
    )
    assert verdict["direction"] == "outbound" and verdict["action"] == "quarantine"
    [entry] = quarantine_list(gw)
    assert entry["queue_id"] == virus_qid and entry["direction"] == "outbound"
    assert entry["kind"] == "virus" and entry["sender"] == sender
    assert entry["recipients"] == [DAVE]
    assert gw.queue_list() == []

    # A clean message the same way goes out to the outside server (so the path works).
    code, text = send("outbound minutes", b"The minutes of the faculty meeting.")
    assert code == 250, text
    clean_qid = _queued_id(text)
    [delivered] = outside.wait_messages(DAVE, 1)
    assert header_value(delivered, "Message-ID") == "<outbound-minutes@campus.test>"
    assert b"The minutes of the faculty meeting." in delivered
    assert b"X-Virus-Scanned: mailwarden (clamav)" in delivered
    if path == "submission":
        assert b"ESMTPSA" in delivered  # our Received: the authenticated submission
    gw.wait_queue_empty()
    # The virus never reached the outside, nor the queue, nor a delivery attempt.
    assert len(outside.messages(DAVE)) == 1
    assert all(b"EICAR" not in m for m in outside.messages(DAVE))
    results = gw.events("delivery.result")
    assert {e["queue_id"] for e in results} == {clean_qid}
    assert virus_qid not in {e.get("queue_id") for e in gw.events("queue.enqueued")}
    assert [e["status"] for e in quarantine_list(gw)] == ["held"]


def test_outbound_thresholds_apply_to_outbound_mail(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """Default thresholds, one symbol scored 11: inbound tags (10), outbound holds (10)."""
    extra = {"scan": {"timeout": "20s", "scores": {"GTUBE": 11.0}}, "policy": POLICY}
    gw = gateway_factory(extra=extra)
    spam = gtube()
    code, text = relay(
        gw,
        OFF_CAMPUS,
        "x@elsewhere.test",
        "bob@example.edu",
        message("x@elsewhere.test", "inbound offer", spam),
    )
    assert code == 250 and text.startswith("2.0.0 Ok: queued as "), text
    [inbound] = gw.wait_messages("bob@example.edu")
    assert header_value(inbound, "Subject") == "[SPAM] inbound offer"
    assert b"X-Spam-Status: Yes, score=11.00 required=6.00" in inbound

    code, text = relay(gw, LAB_HOST, LAB_SENDER, DAVE, message(LAB_SENDER, "outbound offer", spam))
    assert code == 250 and text.startswith("2.7.0 Ok: message quarantined as "), text
    assert "held as spam (score 11.00)" in text
    qid = _qid(text)
    [entry] = quarantine_list(gw)
    assert entry["queue_id"] == qid and entry["direction"] == "outbound"
    assert entry["kind"] == "spam" and entry["action"] == "quarantine"
    verdicts = {e["direction"]: e["action"] for e in gw.events("scan.verdict")}
    assert verdicts == {"inbound": "tag_subject", "outbound": "quarantine"}
    assert gw.queue_list() == []

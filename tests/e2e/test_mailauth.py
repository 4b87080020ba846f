"""End to end: mail authentication and DKIM signing in the real gateway (``mailwarden
serve``) against a loopback authoritative DNS server serving the test zones.

Inbound (clients bound to 127.0.0.x): SPF pass delivers with our Authentication-Results
header and the forged one claiming our host name removed; a DMARC ``p=reject`` domain with
SPF fail and no DKIM is refused ``554`` at end of DATA; a message ARC-sealed by a forwarder
whose key is in the zone is delivered with ``arc=pass``, the same message changed after
sealing with ``arc=fail`` (delivered: a broken chain is scored, not refused).
Outbound (the registered server 127.0.0.1 relaying to a non-hosted domain routed to the
gateway's Maildir): the message is DKIM-signed with the key ``mailwarden dkim keygen``
made, and dkimpy verifies it against the DNS server.

Security: the gateway and the DNS server listen on 127.0.0.1 only.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Callable, Iterator
from email import policy
from email.message import EmailMessage
from pathlib import Path

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest

from mailwarden.scan.dkimsign import generate_key
from tests.support.dnsserver import DNSServer
from tests.support.gateway import Gateway
from tests.support.ports import LOOPBACK

RCPT = "bob@example.edu"
MAILAUTH = {"scan": {"timeout": "20s", "mailauth": {"enabled": True, "timeout": "10s"}}}


@pytest.fixture
def zones() -> Iterator[DNSServer]:
    data = {
        "sender.test": {
            "@": {"TXT": ['"v=spf1 ip4:127.0.0.5 -all"']},
            "_dmarc": {"TXT": ['"v=DMARC1; p=reject"']},
        },
        "example.edu": {"@": {"TXT": ['"v=spf1 ip4:127.0.0.1 -all"']}},
        "forwarder.test": {"@": {"TXT": ['"v=spf1 -all"']}},
    }
    with DNSServer(data) as server:
        yield server


def message(sender: str, to: str = RCPT, extra: str = "") -> bytes:
    msg = EmailMessage(policy=policy.SMTP)
    if extra:
        name, _, value = extra.partition(": ")
        msg[name] = value
    msg["From"] = f"Alice <{sender}>"
    msg["To"] = to
    msg["Subject"] = "Minutes of the faculty meeting"
    msg["Message-ID"] = "<m1@sender.test>"
    msg["Date"] = "Mon, 06 May 2024 10:00:00 +0000"
    msg.set_content("The minutes are attached in the body.\n")
    return msg.as_bytes()


def send(gw: Gateway, source: str, sender: str, rcpt: str, data: bytes) -> tuple[int, str]:
    with smtplib.SMTP(
        LOOPBACK,
        gw.smtp_port,
        local_hostname="mail.sender.test",
        timeout=60,
        source_address=(source, 0),
    ) as c:
        c.ehlo()
        c.mail(sender)
        code, text = c.rcpt(rcpt)
        assert code == 250, text
        try:
            code, text = c.data(data)
        except smtplib.SMTPDataError as exc:
            code, text = exc.smtp_code, exc.smtp_error
    return code, text.decode(errors="replace")


def header_fields(raw: bytes, name: str) -> list[str]:
    head = raw.split(b"\n\n", 1)[0].replace(b"\r\n", b"\n")
    unfolded = re.sub(rb"\n[ \t]+", b" ", head).decode(errors="replace")
    return [
        line.split(":", 1)[1].strip()
        for line in unfolded.split("\n")
        if line.lower().startswith(name.lower() + ":")
    ]


def test_spf_pass_delivers_with_our_header_and_the_forged_one_removed(
    gateway_factory: Callable[..., Gateway], zones: DNSServer
) -> None:
    gw = gateway_factory(nameserver=zones.nameserver, extra=MAILAUTH)
    forged = "Authentication-Results: mailwarden.test; spf=pass smtp.mailfrom=paypal.com"
    code, text = send(
        gw, "127.0.0.5", "alice@sender.test", RCPT, message("alice@sender.test", extra=forged)
    )
    assert code == 250, text
    [delivered] = gw.wait_messages(RCPT)
    [ar] = header_fields(delivered, "Authentication-Results")
    assert ar.startswith("mailwarden.test;")
    assert "spf=pass smtp.mailfrom=sender.test" in ar and "dkim=none" in ar
    assert "dmarc=pass header.from=sender.test" in ar
    assert "paypal.com" not in delivered.decode(errors="replace")
    assert ("sender.test.", "TXT") in zones.queries
    ev = gw.wait_event(lambda e: e["event"] == "mailauth.result", what="mailauth.result")
    assert ev["spf"] == "pass" and ev["dmarc"] == "pass" and ev["client"] == "127.0.0.5"


def test_dmarc_reject_with_spf_fail_and_no_dkim_is_554(
    gateway_factory: Callable[..., Gateway], zones: DNSServer
) -> None:
    gw = gateway_factory(nameserver=zones.nameserver, extra=MAILAUTH)
    code, text = send(gw, "127.0.0.66", "alice@sender.test", RCPT, message("alice@sender.test"))
    assert code == 554, text
    assert "DMARC_POLICY_REJECT" in text
    verdict = gw.wait_event(lambda e: e["event"] == "scan.verdict", what="scan.verdict")
    assert verdict["action"] == "reject" and "SPF_FAILED" in verdict["symbols"]
    assert gw.queue_list() == [] and gw.messages(RCPT) == []


def test_outbound_mail_is_dkim_signed_and_verifies(
    gateway_factory: Callable[..., Gateway], zones: DNSServer
) -> None:
    gw = gateway_factory(
        start=False,
        nameserver=zones.nameserver,
        delivery={"transports": {"example.edu": "maildir", "remote.test": "maildir"}},
        extra=MAILAUTH,
    )
    res = gw.cli("dkim", "keygen", "example.edu", "--bits", "1024")
    record = res.stdout.strip()
    assert record.startswith('mw1._domainkey.example.edu. IN TXT "v=DKIM1; k=rsa; p=')
    again = gw.cli("dkim", "keygen", "example.edu", check=False)
    assert again.returncode == 2 and "--force" in again.stderr
    txt = "".join(re.findall(r'"([^"]*)"', record))
    zones.set("mw1._domainkey.example.edu.", "TXT", f'"{txt}"')
    gw.start()
    code, text = send(
        gw,
        "127.0.0.1",
        "carol@example.edu",
        "dave@remote.test",
        message("carol@example.edu", to="dave@remote.test"),
    )
    assert code == 250, text
    [delivered] = gw.wait_messages("dave@remote.test")
    [sig] = header_fields(delivered, "DKIM-Signature")
    assert "d=example.edu" in sig and "s=mw1" in sig and "c=relaxed/relaxed" in sig
    assert header_fields(delivered, "Authentication-Results") == []  # outbound: not checked

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        q = dns.message.make_query(name.decode(), dns.rdatatype.TXT)
        r = dns.query.udp(q, LOOPBACK, timeout=timeout, port=zones.port)
        for rrset in r.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return None

    assert dkim.verify(delivered, dnsfunc=dnsfunc)
    tampered = delivered.replace(b"minutes are attached", b"minutes are missing")
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)


def test_arc_chain_is_validated_and_a_broken_one_still_delivered(
    gateway_factory: Callable[..., Gateway], zones: DNSServer, tmp_path: Path
) -> None:
    key, record = generate_key("forwarder.test", "arc1", tmp_path / "keys", bits=1024)
    zones.set("arc1._domainkey.forwarder.test.", "TXT", "".join(re.findall(r'"[^"]*"', record)))
    raw = b"Authentication-Results: forwarder.test; spf=pass smtp.mailfrom=sender.test\r\n"
    raw += message("alice@sender.test")
    arc_set = dkim.arc_sign(
        raw, b"arc1", b"forwarder.test", key.read_bytes(), b"forwarder.test",
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )  # fmt: skip
    sealed = b"".join(arc_set) + raw
    gw = gateway_factory(nameserver=zones.nameserver, extra=MAILAUTH)
    code, text = send(gw, "127.0.0.5", "alice@sender.test", RCPT, sealed)
    assert code == 250, text
    [delivered] = gw.wait_messages(RCPT)
    [ours] = [
        v
        for v in header_fields(delivered, "Authentication-Results")
        if v.startswith("mailwarden.test;")
    ]
    assert "arc=pass (i=1 d=forwarder.test) header.oldest-pass=0" in ours
    assert "smtp.remote-ip=127.0.0.5" in ours and "dmarc=pass" in ours

    tampered = sealed.replace(b"minutes are attached", b"minutes are elsewhere")
    assert tampered != sealed
    code, text = send(gw, "127.0.0.5", "alice@sender.test", RCPT, tampered)
    assert code == 250 and text.startswith("2.0.0"), text
    second = [m for m in gw.wait_messages(RCPT, 2) if b"minutes are elsewhere" in m]
    assert len(second) == 1
    [ours] = [
        v
        for v in header_fields(second[0], "Authentication-Results")
        if v.startswith("mailwarden.test;")
    ]
    assert 'arc=fail (i=1 d=forwarder.test) reason="message signature i=1 did not verify"' in ours
    results = [e["arc"] for e in gw.events("mailauth.result")]
    assert results == ["pass", "fail"]
    verdicts = [e for e in gw.events("scan.verdict")]
    assert [v["action"] for v in verdicts] == ["accept", "accept"]
    assert "ARC_PASS" in verdicts[0]["symbols"] and "ARC_FAILED" in verdicts[1]["symbols"]

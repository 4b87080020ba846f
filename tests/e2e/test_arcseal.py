"""End to end: ARC sealing and trusted ARC sealers in the real gateway (``mailwarden
serve``) against a loopback authoritative DNS server serving the test zones and the keys.

Sealing (``[scan.mailauth] arc_seal``; the key made by ``mailwarden dkim keygen
campus.test`` and published): a fresh inbound message is delivered with one ARC set
(i=1, cv=none) that dkimpy's ARC verifier accepts, made after the subject tag and X-Spam
headers, whose ARC-Authentication-Results are the gateway's Authentication-Results; a
message with a forwarder's valid chain gets i=2 cv=pass; a broken chain gets cv=fail
(never pass); with sealing off no ARC field is added; without a key the mail is still
delivered, unsealed, with an event.
Trusted sealers: a DMARC p=reject failure whose valid chain was sealed by a listed sealer
that vouched for the From domain is delivered (DMARC_ARC_OVERRIDE, said in
Authentication-Results and sealed onwards); the same through an untrusted sealer, a broken
chain from the trusted one, or a trusted sealer that saw DMARC fail, is refused 554.

Security: the gateway and the DNS server listen on 127.0.0.1 only.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest
from dkim.util import parse_tag_value

from mailwarden.scan.dkimsign import generate_key
from tests.e2e.test_mailauth import header_fields, message, send
from tests.support.dnsserver import DNSServer
from tests.support.gateway import Gateway
from tests.support.ports import LOOPBACK

RCPT = "bob@example.edu"
HOST = "mailwarden.test"  # the gateway's host name: authserv-id of its results
SENDER = "alice@sender.test"
SPOOFED = "127.0.0.66"  # not in sender.test's SPF: with no DKIM, DMARC p=reject fails
VOUCH = "spf=pass smtp.mailfrom=sender.test; dmarc=pass header.from=sender.test"
ARC_SIGNED = [b"from", b"to", b"subject", b"date", b"message-id"]


@pytest.fixture
def zones() -> Iterator[DNSServer]:
    data = {
        "sender.test": {
            "@": {"TXT": ['"v=spf1 ip4:127.0.0.5 -all"']},
            "_dmarc": {"TXT": ['"v=DMARC1; p=reject"']},
        },
        "example.edu": {"@": {"TXT": ['"v=spf1 ip4:127.0.0.1 -all"']}},
        "campus.test": {"@": {"TXT": ['"v=spf1 -all"']}},
        "lists.test": {"@": {"TXT": ['"v=spf1 -all"']}},
        "other.test": {"@": {"TXT": ['"v=spf1 -all"']}},
    }
    with DNSServer(data) as server:
        yield server


def mailauth(**extra: Any) -> dict[str, Any]:
    return {
        "timeout": "20s",
        "mailauth": {"enabled": True, "timeout": "10s"} | extra,
    }


SEALING = {"arc_seal": True, "arc_seal_domain": "campus.test"}


def publish(zones: DNSServer, domain: str, record: str) -> None:
    selector = record.split("._domainkey.", 1)[0]
    txt = "".join(re.findall(r'"([^"]*)"', record))
    zones.set(f"{selector}._domainkey.{domain}.", "TXT", f'"{txt}"')


def forwarder_key(zones: DNSServer, tmp_path: Path, domain: str) -> bytes:
    path, record = generate_key(domain, "arc1", tmp_path / "keys", bits=1024)
    publish(zones, domain, record)
    return path.read_bytes()


def forwarded(raw: bytes, domain: str, pem: bytes, results: str) -> bytes:
    """``raw`` as ``domain`` relays it: its Authentication-Results and its ARC set."""
    raw = f"Authentication-Results: mx.{domain}; {results}\r\n".encode() + raw
    arc_set = dkim.arc_sign(
        raw, b"arc1", domain.encode(), pem, f"mx.{domain}".encode(), include_headers=ARC_SIGNED
    )
    assert len(arc_set) == 3
    return b"".join(arc_set) + raw


def sealing_gateway(
    factory: Callable[..., Gateway], zones: DNSServer, scan: dict[str, Any]
) -> Gateway:
    """A gateway with ``[scan]`` = ``scan`` and campus.test's key made and published."""
    gw = factory(start=False, nameserver=zones.nameserver, extra={"scan": scan})
    publish(zones, "campus.test", gw.cli("dkim", "keygen", "campus.test", "--bits", "1024").stdout)
    return gw.start()


def verifier(zones: DNSServer) -> Callable[..., bytes | None]:
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        q = dns.message.make_query(name.decode(), dns.rdatatype.TXT)
        r = dns.query.udp(q, LOOPBACK, timeout=timeout, port=zones.port)
        for rrset in r.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return None

    return dnsfunc


def tags(value: str) -> dict[bytes, bytes]:
    return dict(parse_tag_value(" ".join(value.split()).encode()))


def ours(delivered: bytes) -> str:
    [ar] = [v for v in header_fields(delivered, "Authentication-Results") if v.startswith(HOST)]
    return ar


def delivered_with(gw: Gateway, marker: bytes, count: int) -> bytes:
    [msg] = [m for m in gw.wait_messages(RCPT, count) if marker in m]
    return msg


def test_inbound_mail_is_sealed_after_every_header_edit(
    gateway_factory: Callable[..., Gateway], zones: DNSServer
) -> None:
    # Thresholds so that this clean message is tagged: the seal must cover the new Subject.
    scan = mailauth(**SEALING) | {
        "inbound": {"add_header": 1.0, "tag_subject": 2.0, "quarantine": 50.0, "reject": 60.0},
        "scores": {"DMARC_PASS": 5.0},
    }
    gw = sealing_gateway(gateway_factory, zones, scan)
    code, text = send(gw, "127.0.0.5", SENDER, RCPT, message(SENDER))
    assert code == 250, text
    [delivered] = gw.wait_messages(RCPT)
    assert header_fields(delivered, "Subject") == ["[SPAM] Minutes of the faculty meeting"]
    assert header_fields(delivered, "X-Spam-Status")[0].startswith("Yes, score=")
    [seal] = header_fields(delivered, "ARC-Seal")
    [ams] = header_fields(delivered, "ARC-Message-Signature")
    [aar] = header_fields(delivered, "ARC-Authentication-Results")
    assert tags(seal)[b"i"] == b"1" and tags(seal)[b"cv"] == b"none"
    assert tags(seal)[b"d"] == b"campus.test" and tags(seal)[b"s"] == b"mw1"
    assert b"subject" in tags(ams)[b"h"].split(b" : ")
    assert aar == "i=1; " + ours(delivered)  # the gateway's own results, word for word
    cv, results, why = dkim.arc_verify(delivered, dnsfunc=verifier(zones))
    assert cv == dkim.CV_Pass, why
    assert [(r["instance"], r["as-domain"]) for r in results] == [(1, b"campus.test")]
    untagged = delivered.replace(b"[SPAM] Minutes", b"Minutes")
    assert dkim.arc_verify(untagged, dnsfunc=verifier(zones))[0] == dkim.CV_Fail
    [event] = gw.events("arc.sealed")
    assert event["instance"] == 1 and event["cv"] == "none" and event["queue_id"]


def test_incoming_chain_is_sealed_i2_pass_and_a_broken_one_cv_fail(
    gateway_factory: Callable[..., Gateway], zones: DNSServer, tmp_path: Path
) -> None:
    gw = sealing_gateway(gateway_factory, zones, mailauth(**SEALING))
    pem = forwarder_key(zones, tmp_path, "lists.test")
    chain = forwarded(message(SENDER), "lists.test", pem, VOUCH)
    code, text = send(gw, "127.0.0.5", SENDER, RCPT, chain)
    assert code == 250, text
    delivered = delivered_with(gw, b"minutes are attached", 1)
    seals = header_fields(delivered, "ARC-Seal")
    assert [tags(s)[b"i"] for s in seals] == [b"2", b"1"]
    assert tags(seals[0])[b"cv"] == b"pass" and tags(seals[0])[b"d"] == b"campus.test"
    cv, results, why = dkim.arc_verify(delivered, dnsfunc=verifier(zones))
    assert cv == dkim.CV_Pass, why
    assert [(r["instance"], r["as-domain"]) for r in results] == [
        (2, b"campus.test"),
        (1, b"lists.test"),
    ]
    assert "arc=pass" in header_fields(delivered, "ARC-Authentication-Results")[0]

    broken = chain.replace(b"minutes are attached", b"minutes are elsewhere")
    code, text = send(gw, "127.0.0.5", SENDER, RCPT, broken)
    assert code == 250, text  # a broken chain is scored, not refused
    delivered = delivered_with(gw, b"minutes are elsewhere", 2)
    seals = header_fields(delivered, "ARC-Seal")
    assert tags(seals[0])[b"i"] == b"2" and tags(seals[0])[b"cv"] == b"fail"
    assert dkim.arc_verify(delivered, dnsfunc=verifier(zones))[0] != dkim.CV_Pass
    assert [(e["instance"], e["cv"]) for e in gw.events("arc.sealed")] == [(2, "pass"), (2, "fail")]


def test_sealing_off_adds_no_arc_fields(
    gateway_factory: Callable[..., Gateway], zones: DNSServer, tmp_path: Path
) -> None:
    gw = gateway_factory(nameserver=zones.nameserver, extra={"scan": mailauth()})
    pem = forwarder_key(zones, tmp_path, "lists.test")
    code, text = send(gw, "127.0.0.5", SENDER, RCPT, message(SENDER))
    assert code == 250, text
    [plain] = gw.wait_messages(RCPT)
    assert ours(plain).startswith(HOST)  # mail authentication ran ...
    arc_names = ("ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results")
    assert all(header_fields(plain, n) == [] for n in arc_names)  # ... no seal was added
    chain = forwarded(message(SENDER, extra="Comments: forwarded"), "lists.test", pem, VOUCH)
    code, text = send(gw, "127.0.0.5", SENDER, RCPT, chain)
    assert code == 250, text
    relayed = delivered_with(gw, b"Comments: forwarded", 2)
    assert [len(header_fields(relayed, n)) for n in arc_names] == [1, 1, 1]
    assert gw.events("arc.") == []


def test_a_sealing_error_delivers_the_mail_unsealed(
    gateway_factory: Callable[..., Gateway], zones: DNSServer
) -> None:
    gw = gateway_factory(nameserver=zones.nameserver, extra={"scan": mailauth(**SEALING)})
    code, text = send(gw, "127.0.0.5", SENDER, RCPT, message(SENDER))  # no key was made
    assert code == 250, text
    [delivered] = gw.wait_messages(RCPT)
    assert header_fields(delivered, "ARC-Seal") == [] and ours(delivered).startswith(HOST)
    event = gw.wait_event(lambda e: e["event"] == "arc.unsealed", what="arc.unsealed")
    assert "no usable key" in event["reason"] and "dkim keygen campus.test" in event["reason"]


def test_dmarc_reject_is_excused_only_by_a_trusted_sealers_valid_chain(
    gateway_factory: Callable[..., Gateway], zones: DNSServer, tmp_path: Path
) -> None:
    scan = mailauth(**SEALING, arc_trusted_sealers=["lists.test"])
    gw = sealing_gateway(gateway_factory, zones, scan)
    banner = gw.output()
    assert "trusted ARC sealers lists.test; ARC sealing as campus.test" in banner
    trusted = forwarder_key(zones, tmp_path / "t", "lists.test")
    untrusted = forwarder_key(zones, tmp_path / "u", "other.test")

    def relay(raw: bytes) -> tuple[int, str]:
        try:
            return send(gw, SPOOFED, SENDER, RCPT, raw)
        except smtplib.SMTPException as exc:  # pragma: no cover (diagnostics)
            raise AssertionError(gw.output()) from exc

    via_list = forwarded(message(SENDER), "lists.test", trusted, VOUCH)
    code, text = relay(via_list)
    assert code == 250, text
    delivered = delivered_with(gw, b"minutes are attached", 1)
    ar = ours(delivered)
    assert "spf=fail" in ar and "arc=pass (i=1 d=lists.test)" in ar
    assert (
        'dmarc=fail reason="policy overridden: trusted ARC sealer lists.test" '
        "header.from=sender.test policy.dmarc=reject" in ar
    )
    [verdict] = gw.events("scan.verdict")
    assert verdict["action"] != "reject" and "DMARC_ARC_OVERRIDE" in verdict["symbols"]
    assert "DMARC_POLICY_REJECT" not in verdict["symbols"]
    [result] = gw.events("mailauth.result")
    assert result["dmarc"] == "fail" and result["dmarc_override"] == "lists.test"
    # ... and our seal on top tells the next hop: i=2, cv=pass, the override in our AAR.
    assert dkim.arc_verify(delivered, dnsfunc=verifier(zones))[0] == dkim.CV_Pass
    assert "policy overridden" in header_fields(delivered, "ARC-Authentication-Results")[0]

    refused = {
        "untrusted sealer": forwarded(message(SENDER), "other.test", untrusted, VOUCH),
        "broken chain": via_list.replace(b"minutes are attached", b"minutes are changed"),
        "sealer saw it fail": forwarded(
            message(SENDER), "lists.test", trusted, "spf=fail; dmarc=fail header.from=sender.test"
        ),
    }
    for what, raw in refused.items():
        code, text = relay(raw)
        assert code == 554 and "DMARC_POLICY_REJECT" in text, (what, code, text)
    verdicts = gw.events("scan.verdict")[1:]
    assert [v["action"] for v in verdicts] == ["reject"] * 3
    assert all("DMARC_ARC_OVERRIDE" not in v["symbols"] for v in verdicts)
    assert len(gw.messages(RCPT)) == 1

"""ARC sealing (scan.arcseal) against a loopback authoritative DNS server: the message goes
through the real mail authentication scanner first (its Authentication-Results and ARC_*
symbols are what the sealer vouches for), then gets our set, which dkimpy's ARC verifier
checks with the keys published in the zones. First hop (i=1, cv=none), on top of a valid
chain (i=2, cv=pass), on top of a broken one (cv=fail), a chain that already ended with
cv=fail, the 50-set limit, a temporary error, a forged second Authentication-Results,
results that disagree with the symbols, key problems (events; never an exception), and
the settings' validation.

Security: the DNS server listens on 127.0.0.1 only; keys are made in the test's directory.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest
from dkim.util import parse_tag_value
from pydantic import ValidationError

from mailwarden.config import check_config
from mailwarden.core import events as ev
from mailwarden.scan.arcseal import MAX_ARC_INSTANCE, ArcSealer
from mailwarden.scan.base import ScanInput
from mailwarden.scan.dkimsign import generate_key
from mailwarden.scan.settings import DkimSettings, MailAuthSettings
from mailwarden.scan.verdict import render_headers
from tests.scan.test_mailauth import HOST, arc_seal, message, publish, scan, scanner, zones
from tests.support.dnsserver import DNSServer

SEALER = "campus.test"


@pytest.fixture
def dns_zones() -> Iterator[DNSServer]:
    data = zones() | {SEALER: {"@": {"TXT": ['"v=spf1 -all"']}}}
    with DNSServer(data) as server:
        yield server


def seal_key(server: DNSServer, root: Path, selector: str = "mw1") -> None:
    """What the operator does: ``mailwarden dkim keygen campus.test`` and publish it."""
    _, record = generate_key(SEALER, selector, root, bits=1024)
    txt = "".join(re.findall(r'"([^"]*)"', record))
    server.set(f"{selector}._domainkey.{SEALER}.", "TXT", f'"{txt}"')


def sealer(root: Path, selector: str = "", dkim_selector: str = "mw1") -> ArcSealer:
    settings = MailAuthSettings(
        enabled=True, arc_seal=True, arc_seal_domain=SEALER, arc_seal_selector=selector
    )
    return ArcSealer(settings, DkimSettings(selector=dkim_selector), root, HOST)


def dnsfunc(server: DNSServer) -> object:
    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        q = dns.message.make_query(name.decode(), dns.rdatatype.TXT)
        r = dns.query.udp(q, "127.0.0.1", timeout=timeout, port=server.port)
        for rrset in r.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return None

    return lookup


def gateway_pass(
    server: DNSServer, s: ArcSealer, raw: bytes, **env: object
) -> tuple[bytes | None, bytes, ScanInput, list[str]]:
    """Scan ``raw`` as the gateway does, prepend our Authentication-Results, seal.
    Returns (the ARC set, the message it was made for, the scan input, symbols)."""
    names, msg = scan(scanner(server), raw, **env)
    out = render_headers(msg.headers) + raw
    return asyncio.run(s.seal(out, names, "Q1")), out, msg, names


def unfold(value: bytes | str) -> str:
    text = value.decode() if isinstance(value, bytes) else value
    return " ".join(text.split())


def field_value(arc_set: bytes, name: bytes) -> bytes:
    [line] = [f for f in re.split(rb"\r\n(?=\S)", arc_set) if f.startswith(name + b":")]
    return line.split(b":", 1)[1]


def seal_tags(arc_set: bytes) -> dict[bytes, bytes]:
    return dict(parse_tag_value(unfold(field_value(arc_set, b"ARC-Seal")).encode()))


def unsealed(events: ev.MemorySink) -> list[str]:
    return [str(e.fields["reason"]) for e in events.events if e.name == "arc.unsealed"]


def test_first_hop_is_i1_cv_none_verifies_and_carries_our_results(
    dns_zones: DNSServer, tmp_path: Path, events: ev.MemorySink
) -> None:
    seal_key(dns_zones, tmp_path)
    arc_set, out, msg, names = gateway_pass(dns_zones, sealer(tmp_path), message())
    assert "ARC_NA" in names and arc_set is not None
    assert arc_set.startswith(b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=campus.test; s=mw1;")
    cv, results, why = dkim.arc_verify(arc_set + out, dnsfunc=dnsfunc(dns_zones))
    assert cv == dkim.CV_Pass, why
    assert [r["instance"] for r in results] == [1] and results[0]["as-domain"] == b"campus.test"
    [(_, ours)] = msg.headers
    aar = unfold(field_value(arc_set, b"ARC-Authentication-Results"))
    assert aar == "i=1; " + unfold(ours)  # our Authentication-Results, word for word
    ams = dict(parse_tag_value(unfold(field_value(arc_set, b"ARC-Message-Signature")).encode()))
    assert ams[b"h"].split(b" : ") == [  # the [dkim] headers the message has, in that order
        b"from", b"subject", b"date", b"message-id", b"to", b"mime-version", b"content-type",
        b"content-transfer-encoding",
    ]  # fmt: skip
    [sealed] = [e.fields for e in events.events if e.name == "arc.sealed"]
    assert sealed["queue_id"] == "Q1" and sealed["instance"] == 1 and sealed["cv"] == "none"
    # Changing the message after sealing breaks it: the set covers what is queued.
    tampered = (arc_set + out).replace(b"Hello Bob.", b"Hello Eve.")
    assert dkim.arc_verify(tampered, dnsfunc=dnsfunc(dns_zones))[0] == dkim.CV_Fail


def test_valid_chain_is_sealed_i2_cv_pass(dns_zones: DNSServer, tmp_path: Path) -> None:
    seal_key(dns_zones, tmp_path)
    fwd = publish(dns_zones, tmp_path, "forwarder.test")
    chain = arc_seal(message(), "forwarder.test", fwd, "spf=pass smtp.mailfrom=sender.test")
    arc_set, out, _, names = gateway_pass(dns_zones, sealer(tmp_path), chain)
    assert "ARC_PASS" in names and arc_set is not None
    assert seal_tags(arc_set)[b"i"] == b"2" and seal_tags(arc_set)[b"cv"] == b"pass"
    cv, results, why = dkim.arc_verify(arc_set + out, dnsfunc=dnsfunc(dns_zones))
    assert cv == dkim.CV_Pass, why
    assert [(r["instance"], r["as-domain"]) for r in results] == [
        (2, b"campus.test"),
        (1, b"forwarder.test"),
    ]
    aar = unfold(field_value(arc_set, b"ARC-Authentication-Results"))
    assert aar.startswith(f"i=2; {HOST}; spf=pass") and "arc=pass" in aar


def test_broken_chain_is_sealed_cv_fail_never_pass(dns_zones: DNSServer, tmp_path: Path) -> None:
    seal_key(dns_zones, tmp_path)
    fwd = publish(dns_zones, tmp_path, "forwarder.test")
    chain = arc_seal(message(), "forwarder.test", fwd, "spf=pass smtp.mailfrom=sender.test")
    broken = chain.replace(b"Hello Bob.", b"Hello Eve.")
    arc_set, out, _, names = gateway_pass(dns_zones, sealer(tmp_path), broken)
    assert "ARC_FAILED" in names and arc_set is not None
    assert seal_tags(arc_set)[b"i"] == b"2" and seal_tags(arc_set)[b"cv"] == b"fail"
    cv, _, _ = dkim.arc_verify(arc_set + out, dnsfunc=dnsfunc(dns_zones))
    assert cv != dkim.CV_Pass  # None: our seal ended the chain
    # Symbols that claim a pass while our own results say fail: refused, not sealed "pass".
    s = sealer(tmp_path)
    assert asyncio.run(s.seal(out, ["ARC_PASS"], "Q2")) is None


def test_no_seal_on_a_terminated_chain_or_past_50_sets(
    dns_zones: DNSServer, tmp_path: Path, events: ev.MemorySink
) -> None:
    seal_key(dns_zones, tmp_path)
    fwd = publish(dns_zones, tmp_path, "forwarder.test")
    lists = publish(dns_zones, tmp_path, "lists.test")
    one = arc_seal(message(), "forwarder.test", fwd, "spf=pass smtp.mailfrom=sender.test")
    ended = arc_seal(one.replace(b"Hello Bob.", b"Hello list."), "lists.test", lists, "arc=fail")
    s = sealer(tmp_path)
    arc_set, _, _, names = gateway_pass(dns_zones, s, ended)
    assert "ARC_FAILED" in names and arc_set is None
    assert unsealed(events) == ["the incoming chain already ended with cv=fail (RFC 8617 5.1.1)"]

    raw = message()
    for i in range(1, MAX_ARC_INSTANCE):  # 49 sets (one authserv-id each): ours is the 50th
        srv = f"hop{i}.forwarder.test"
        raw = f"Authentication-Results: {srv}; arc={'pass' if i > 1 else 'none'}\r\n".encode() + raw
        arc_set = dkim.arc_sign(
            raw, b"s1", b"forwarder.test", fwd, srv.encode(), include_headers=[b"from"]
        )
        assert b"cv=fail" not in arc_set[0]
        raw = b"".join(arc_set) + raw
    arc_set, out, _, names = gateway_pass(dns_zones, s, raw)
    assert "ARC_FAILED" in names and arc_set is not None  # we validate only 10 sets
    assert seal_tags(arc_set)[b"i"] == b"50" and seal_tags(arc_set)[b"cv"] == b"fail"
    arc_set, _, _, _ = gateway_pass(dns_zones, s, arc_set + out)
    assert arc_set is None
    assert unsealed(events)[-1] == "the message has 50 ARC sets, the most RFC 8617 allows"


def test_temperror_and_forged_results_are_not_sealed(
    dns_zones: DNSServer, tmp_path: Path, events: ev.MemorySink
) -> None:
    seal_key(dns_zones, tmp_path)
    s = sealer(tmp_path)
    _, out, _, names = gateway_pass(dns_zones, s, message())
    temp = [n for n in names if n != "ARC_NA"] + ["ARC_TEMPERROR"]
    assert asyncio.run(s.seal(out, temp)) is None
    assert unsealed(events) == ["the incoming ARC chain could not be checked (DNS)"]
    # Not checked by mail authentication (no ARC_* symbol): silently unsealed.
    assert asyncio.run(s.seal(out, ["SPF_PASS"])) is None and len(unsealed(events)) == 1
    # A second field claiming our authserv-id (here behind a nested comment) would be
    # sealed into our ARC-Authentication-Results: refuse.
    forged = b"Authentication-Results: (a (b) c) " + HOST.encode() + b"; dkim=pass\r\n"
    end = out.index(b"\r\n\r\n") + 2
    assert asyncio.run(s.seal(out[:end] + forged + out[end:], ["ARC_NA"])) is None
    assert unsealed(events)[-1] == f"2 Authentication-Results fields claim {HOST}"


def test_key_problems_are_events_and_never_raise(
    dns_zones: DNSServer, tmp_path: Path, events: ev.MemorySink
) -> None:
    s = sealer(tmp_path)
    arc_set, out, _, names = gateway_pass(dns_zones, s, message())
    assert arc_set is None
    assert asyncio.run(s.seal(out, names)) is None
    [problem] = unsealed(events)  # once per reason and worker, not per message
    assert problem.startswith(f"no usable key {tmp_path}/campus.test/mw1.key")
    key = tmp_path / SEALER / "mw1.key"
    seal_key(dns_zones, tmp_path)
    key.chmod(0o644)
    assert asyncio.run(s.seal(out, names)) is None
    assert "is readable by others (chmod 600)" in unsealed(events)[-1]
    key.write_bytes(b"-----BEGIN RSA PRIVATE KEY-----\nnot a key\n-----END RSA PRIVATE KEY-----\n")
    key.chmod(0o600)
    assert asyncio.run(s.seal(out, names, "Q9")) is None
    assert unsealed(events)[-1] == f"key {key} is not a PEM RSA private key"


def test_selector_comes_from_the_dkim_section_unless_set(
    dns_zones: DNSServer, tmp_path: Path
) -> None:
    seal_key(dns_zones, tmp_path, "arc2025")
    for s in (sealer(tmp_path, dkim_selector="arc2025"), sealer(tmp_path, selector="arc2025")):
        arc_set, out, _, _ = gateway_pass(dns_zones, s, message())
        assert arc_set is not None and seal_tags(arc_set)[b"s"] == b"arc2025"
        assert dkim.arc_verify(arc_set + out, dnsfunc=dnsfunc(dns_zones))[0] == dkim.CV_Pass


def test_sealing_settings_are_checked(tmp_path: Path) -> None:
    ok = MailAuthSettings(enabled=True, arc_seal=True, arc_seal_domain="Campus.Test.")
    assert ok.arc_seal_domain == "campus.test" and ok.arc_seal_selector == ""
    bad: list[dict[str, object]] = [
        {"enabled": True, "arc_seal": True},  # no domain
        {"arc_seal": True, "arc_seal_domain": "campus.test"},  # mail authentication off
        {"enabled": True, "arc": False, "arc_seal": True, "arc_seal_domain": "campus.test"},
        {"arc_seal_domain": "not a domain"},
        {"arc_seal_selector": "bad selector"},
    ]
    for kw in bad:
        with pytest.raises(ValidationError):
            MailAuthSettings(**kw)  # type: ignore[arg-type]
    cfg = tmp_path / "mw.toml"
    cfg.write_text('[scan.mailauth]\nenabled = true\narc_seal = true\narc_sealer = "x"\n')
    _, problems = check_config(cfg)
    assert problems == [f"{cfg}:4: scan.mailauth.arc_sealer: unknown key"]
    cfg.write_text("[scan.mailauth]\nenabled = true\narc_seal = true\n")
    _, problems = check_config(cfg)
    assert len(problems) == 1 and "arc_seal needs arc_seal_domain" in problems[0]

"""Mail authentication (scan.mailauth) and DKIM signing (scan.dkimsign) against a loopback
authoritative DNS server serving test zones: SPF pass/fail/softfail, DKIM valid/broken,
DMARC policies and alignment, ARC chains (sealed with dkimpy's ``arc_sign`` by keys
published in the zones: one and two hops pass, a changed body or seal, a chain that
already failed, a missing key, too many sets, a DNS timeout), DNS timeouts as TEMPERROR
(never fail closed, bounded), the Authentication-Results header, the verdict engine's
forced actions, and signing keys.

Security: the DNS server listens on 127.0.0.1 only; keys are made in the test's directory.
"""

from __future__ import annotations

import asyncio
import re
import stat
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest

from mailwarden.core import events as ev
from mailwarden.core.types import Direction
from mailwarden.scan.base import ScanInput
from mailwarden.scan.dkimsign import DkimSigner, KeyExists, generate_key
from mailwarden.scan.mailauth import (
    MAX_ARC_SETS,
    MailAuthScanner,
    aligned,
    from_domains,
    parse_dmarc,
)
from mailwarden.scan.settings import DkimSettings, MailAuthSettings, ScanSettings
from mailwarden.scan.verdict import Action, VerdictEngine
from tests.support.dnsserver import DNSServer

HOST = "mx.campus.test"


def zones() -> dict[str, dict[str, dict[str, list[str]]]]:
    return {
        "sender.test": {
            "@": {"TXT": ['"v=spf1 ip4:127.0.0.5 ~all"']},
            "strict": {"TXT": ['"v=spf1 ip4:127.0.0.5 -all"']},
            "_dmarc": {"TXT": ['"v=DMARC1; p=reject"']},
        },
        "quar.test": {
            "@": {"TXT": ['"v=spf1 ip4:127.0.0.5 -all"']},
            "_dmarc": {"TXT": ['"v=DMARC1; p=quarantine"']},
        },
        "relaxed.test": {
            "@": {"TXT": ['"v=spf1 -all"']},
            "_dmarc": {"TXT": ['"v=DMARC1; p=reject; sp=none"']},
            "news": {"TXT": ['"v=spf1 ip4:127.0.0.9 -all"']},
        },
        "nopolicy.test": {"@": {"TXT": ['"v=spf1 ip4:127.0.0.5 -all"']}},
        "slow.test": {"@": {"TXT": ['"v=spf1 ip4:127.0.0.5 -all"']}},
        "forwarder.test": {"@": {"TXT": ['"v=spf1 -all"']}},
        "lists.test": {"@": {"TXT": ['"v=spf1 -all"']}},
    }


@pytest.fixture
def dns_zones() -> Iterator[DNSServer]:
    with DNSServer(zones()) as server:
        yield server


def message(sender: str = "alice@sender.test", body: str = "Hello Bob.\n") -> bytes:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = f"Alice <{sender}>"
    msg["To"] = "bob@example.edu"
    msg["Subject"] = "Minutes"
    msg["Message-ID"] = "<1@sender.test>"
    msg["Date"] = "Mon, 06 May 2024 10:00:00 +0000"
    msg.set_content(body)
    return msg.as_bytes()


def scanner(
    server: DNSServer, *, timeout: float = 10.0, dns_timeout: float = 2.0, **kw: object
) -> MailAuthScanner:
    settings = MailAuthSettings(enabled=True, timeout=timeout, **kw)  # type: ignore[arg-type]
    return MailAuthScanner(settings, HOST, [server.nameserver], dns_timeout)


def scan(s: MailAuthScanner, raw: bytes, **env: object) -> tuple[list[str], ScanInput]:
    fields: dict[str, object] = {
        "client_ip": "127.0.0.5",
        "helo": "mail.sender.test",
        "sender": "alice@sender.test",
        "direction": Direction.INBOUND,
    }
    fields |= env
    msg = ScanInput(raw=raw, queue_id="Q1", **fields)  # type: ignore[arg-type]
    symbols = asyncio.run(s.scan(msg))
    return sorted(x.name for x in symbols), msg


def keypair(tmp_path: Path, domain: str, selector: str = "s1") -> tuple[bytes, str]:
    """A private key (PEM) and the TXT value of its public half."""
    path, record = generate_key(domain, selector, tmp_path / "keys", bits=1024)
    txt = " ".join(re.findall(r'"([^"]*)"', record))
    return path.read_bytes(), txt.replace(" ", "")


def sign(raw: bytes, domain: str, pem: bytes, selector: str = "s1") -> bytes:
    sig = dkim.sign(
        raw,
        selector.encode(),
        domain.encode(),
        pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return bytes(sig) + raw


def auth_results(msg: ScanInput) -> str:
    [(name, value)] = msg.headers
    assert name == "Authentication-Results"
    return value


# -- SPF --------------------------------------------------------------------------------------
def test_spf_pass_from_the_listed_address(dns_zones: DNSServer) -> None:
    names, msg = scan(scanner(dns_zones), message())
    assert "SPF_PASS" in names
    ar = auth_results(msg)
    assert ar.startswith(HOST + ";") and "spf=pass smtp.mailfrom=sender.test" in ar


def test_spf_softfail_and_fail(dns_zones: DNSServer) -> None:
    s = scanner(dns_zones)
    names, msg = scan(s, message(), client_ip="127.0.0.6")
    assert "SPF_SOFTFAIL" in names and "spf=softfail" in auth_results(msg)
    names, msg = scan(
        s, message("a@strict.sender.test"), client_ip="127.0.0.6", sender="a@strict.sender.test"
    )
    assert "SPF_FAILED" in names and "spf=fail" in auth_results(msg)
    assert not any(n.endswith("_FAIL") for n in names)  # never the fail-closed suffix


def test_spf_none_without_a_record_and_null_sender_uses_helo(dns_zones: DNSServer) -> None:
    s = scanner(dns_zones)
    names, _ = scan(s, message("a@nowhere.nopolicy.test"), sender="a@nowhere.nopolicy.test")
    assert "SPF_NONE" in names
    names, msg = scan(s, message(), sender="", helo="strict.sender.test", client_ip="127.0.0.7")
    assert "SPF_FAILED" in names
    assert "smtp.helo=strict.sender.test" in auth_results(msg)


# -- DKIM -------------------------------------------------------------------------------------
def test_dkim_valid_and_broken(dns_zones: DNSServer, tmp_path: Path) -> None:
    pem, txt = keypair(tmp_path, "sender.test")
    dns_zones.set("s1._domainkey.sender.test.", "TXT", f'"{txt}"')
    s = scanner(dns_zones)
    signed = sign(message(), "sender.test", pem)
    names, msg = scan(s, signed, client_ip="127.0.0.66")  # SPF softfail, DKIM carries it
    assert "DKIM_VALID" in names and "DMARC_PASS" in names
    ar = auth_results(msg)
    assert "dkim=pass header.d=sender.test header.s=s1" in ar and "dmarc=pass" in ar
    broken = signed.replace(b"Hello Bob.", b"Hello Mallory.")
    names, msg = scan(s, broken, client_ip="127.0.0.66")
    assert "DKIM_INVALID" in names and "DKIM_VALID" not in names
    assert "dkim=fail" in auth_results(msg)
    # SPF softfail, DKIM broken: DMARC fails under p=reject.
    assert "DMARC_FAILED" in names and "DMARC_POLICY_REJECT" in names


def test_dkim_none_and_missing_key(dns_zones: DNSServer, tmp_path: Path) -> None:
    s = scanner(dns_zones)
    names, msg = scan(s, message())
    assert "DKIM_NONE" in names and "dkim=none" in auth_results(msg)
    pem, _ = keypair(tmp_path, "sender.test", "gone")
    names, msg = scan(s, sign(message(), "sender.test", pem, "gone"))
    assert "DKIM_INVALID" in names and "dkim=permerror" in auth_results(msg)


# -- DMARC ------------------------------------------------------------------------------------
def test_dmarc_reject_and_quarantine_are_forced_actions(dns_zones: DNSServer) -> None:
    s = scanner(dns_zones)
    engine = VerdictEngine([s], ScanSettings())
    msg = ScanInput(
        raw=message(), client_ip="127.0.0.66", helo="x.test", sender="alice@sender.test"
    )
    verdict = asyncio.run(engine.judge(msg))
    assert verdict.action is Action.REJECT and "DMARC_POLICY_REJECT" in verdict.reason
    msg = ScanInput(
        raw=message("a@quar.test"), client_ip="127.0.0.66", helo="x.test", sender="a@quar.test"
    )
    verdict = asyncio.run(engine.judge(msg))
    assert verdict.action is Action.QUARANTINE and "DMARC_POLICY_QUARANTINE" in verdict.reason


def test_dmarc_enforcement_off_only_scores(dns_zones: DNSServer) -> None:
    names, msg = scan(scanner(dns_zones, dmarc_enforce=False), message(), client_ip="127.0.0.66")
    assert "DMARC_FAILED" in names and "DMARC_POLICY_REJECT" not in names
    assert "dmarc=fail header.from=sender.test policy.dmarc=reject" in auth_results(msg)


def test_dmarc_subdomain_policy_and_relaxed_alignment(dns_zones: DNSServer) -> None:
    s = scanner(dns_zones)
    # news.relaxed.test has no record of its own: the parent's sp=none applies.
    names, msg = scan(
        s, message("a@news.relaxed.test"), client_ip="127.0.0.66", sender="a@news.relaxed.test"
    )
    assert "SPF_FAILED" in names and "DMARC_FAILED" in names
    assert "DMARC_POLICY_REJECT" not in names and "policy.dmarc=none" in auth_results(msg)
    # SPF passes for news.relaxed.test; From relaxed.test aligns (relaxed, by suffix).
    names, _ = scan(
        s, message("a@relaxed.test"), client_ip="127.0.0.9", sender="b@news.relaxed.test"
    )
    assert "SPF_PASS" in names and "DMARC_PASS" in names


def test_dmarc_none_and_bad_from(dns_zones: DNSServer) -> None:
    s = scanner(dns_zones)
    names, _ = scan(s, message("a@nopolicy.test"), sender="a@nopolicy.test")
    assert "DMARC_NONE" in names
    raw = message().replace(b"From: ", b"From: evil@attacker.test\r\nFrom: ", 1)
    names, msg = scan(s, raw)
    assert "DMARC_BAD_FROM" in names and "dmarc=permerror" in auth_results(msg)


def test_alignment_and_record_parsing() -> None:
    assert aligned("example.org", "example.org", strict=True)
    assert aligned("mail.example.org", "example.org", strict=False)
    assert not aligned("mail.example.org", "example.org", strict=True)
    assert not aligned("evil.github.io", "victim.github.io", strict=False)
    assert not aligned("", "example.org", strict=False)
    assert parse_dmarc(b"v=DMARC1; p=reject; pct=50") == {"v": "DMARC1", "p": "reject", "pct": "50"}
    assert parse_dmarc(b"v=spf1 -all") is None and parse_dmarc(b"\xff") is None
    assert from_domains(b"From: A <a@Example.ORG>\r\n") == ["example.org"]
    assert from_domains(b"To: b@example.org\r\n") is None
    assert from_domains(b"From: a@x.test\r\nFrom: b@y.test\r\n") is None


# -- DNS trouble: TEMPERROR, bounded, never fail closed ----------------------------------------
def test_dns_timeout_is_temperror_not_failure(dns_zones: DNSServer) -> None:
    dns_zones.drop("slow.test.")
    dns_zones.drop("_dmarc.slow.test.")
    s = scanner(dns_zones, timeout=5.0, dns_timeout=0.5)
    engine = VerdictEngine([s], ScanSettings())
    msg = ScanInput(
        raw=message("a@slow.test"), client_ip="127.0.0.66", helo="x.test", sender="a@slow.test"
    )
    verdict = asyncio.run(engine.judge(msg))
    names = set(verdict.symbol_names)
    assert {"SPF_TEMPERROR", "DMARC_TEMPERROR"} <= names
    assert verdict.action is Action.ACCEPT  # not 451, not 554
    assert "spf=temperror" in auth_results(msg) and "dmarc=temperror" in auth_results(msg)


def test_servfail_is_temperror(dns_zones: DNSServer) -> None:
    dns_zones.servfail("sender.test.")
    names, _ = scan(scanner(dns_zones), message(), client_ip="127.0.0.66")
    assert "SPF_TEMPERROR" in names
    assert "DMARC_POLICY_REJECT" not in names  # no policy on a temporary error


def test_outbound_and_authenticated_are_not_checked(dns_zones: DNSServer) -> None:
    s = scanner(dns_zones)
    before = len(dns_zones.queries)
    assert scan(s, message(), direction=Direction.OUTBOUND)[0] == []
    assert scan(s, message(), auth_user="alice")[0] == []
    assert len(dns_zones.queries) == before


def test_header_values_cannot_be_injected(dns_zones: DNSServer, tmp_path: Path) -> None:
    raw = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=evil.test\r\n\tX-Injected: yes;"
        b' s=a"b; h=from; bh=AAAA; b=AAAA\r\n'
    ) + message()
    names, msg = scan(scanner(dns_zones), raw)
    ar = auth_results(msg)
    assert "X-Injected" not in ar and "dkim=permerror" in ar and "DKIM_INVALID" in names
    assert all(32 <= ord(c) < 127 or c in "\r\n\t" for c in ar)


# -- DKIM signing -----------------------------------------------------------------------------
def test_keygen_writes_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path, record = generate_key("example.edu", "mw1", tmp_path, bits=1024)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert record.startswith('mw1._domainkey.example.edu. IN TXT "v=DKIM1; k=rsa; p=')
    with pytest.raises(KeyExists):
        generate_key("example.edu", "mw1", tmp_path, bits=1024)
    before = path.read_bytes()
    generate_key("example.edu", "mw1", tmp_path, bits=1024, force=True)
    assert path.read_bytes() != before
    with pytest.raises(ValueError):
        generate_key("example.edu", "mw1", tmp_path, bits=512, force=True)


def test_signer_signs_enabled_domains_with_a_key(dns_zones: DNSServer, tmp_path: Path) -> None:
    root = tmp_path / "dkim"
    _, record = generate_key("sender.test", "mw1", root, bits=1024)
    txt = "".join(re.findall(r'"([^"]*)"', record))
    dns_zones.set("mw1._domainkey.sender.test.", "TXT", f'"{txt}"')
    signer = DkimSigner(DkimSettings(), root)
    raw = message()
    sig = asyncio.run(signer.signature(raw))
    assert sig is not None and sig.startswith(b"DKIM-Signature: ")
    assert b"c=relaxed/relaxed" in sig and b"a=rsa-sha256" in sig and b"s=mw1" in sig
    names, _ = scan(scanner(dns_zones), sig + raw, client_ip="127.0.0.66")
    assert "DKIM_VALID" in names and "DMARC_PASS" in names
    # A domain without a key, or not enabled, is not signed.
    assert asyncio.run(signer.signature(message("a@other.test"))) is None
    only_other = DkimSigner(DkimSettings(domains=["other.test"]), root)
    assert asyncio.run(only_other.signature(raw)) is None


# -- ARC --------------------------------------------------------------------------------------
ARC_SIGNED = [b"from", b"to", b"subject", b"date", b"message-id"]


def arc_seal(raw: bytes, domain: str, pem: bytes, results: str, selector: str = "s1") -> bytes:
    """``raw`` as ``domain`` forwards it: its Authentication-Results, then its ARC set."""
    raw = f"Authentication-Results: {domain}; {results}\r\n".encode() + raw
    arc_set = dkim.arc_sign(
        raw, selector.encode(), domain.encode(), pem, domain.encode(), include_headers=ARC_SIGNED
    )
    assert len(arc_set) == 3  # AS, AMS, AAR
    return b"".join(arc_set) + raw


def publish(server: DNSServer, tmp_path: Path, domain: str, selector: str = "s1") -> bytes:
    pem, txt = keypair(tmp_path / domain, domain, selector)
    server.set(f"{selector}._domainkey.{domain}.", "TXT", f'"{txt}"')
    return pem


def arc_clause(msg: ScanInput) -> str:
    [clause] = [p.strip() for p in auth_results(msg).split(";") if p.strip().startswith("arc=")]
    return clause


def test_arc_none_without_arc_fields(dns_zones: DNSServer) -> None:
    names, msg = scan(scanner(dns_zones), message())
    assert "ARC_NA" in names and not {"ARC_PASS", "ARC_FAILED"} & set(names)
    assert arc_clause(msg) == "arc=none"
    assert not any("_domainkey" in name for name, _ in dns_zones.queries)


def test_arc_pass_one_and_two_hops(
    dns_zones: DNSServer, tmp_path: Path, events: ev.MemorySink
) -> None:
    fwd = publish(dns_zones, tmp_path, "forwarder.test")
    lists = publish(dns_zones, tmp_path, "lists.test")
    one = arc_seal(message(), "forwarder.test", fwd, "spf=pass smtp.mailfrom=sender.test")
    names, msg = scan(scanner(dns_zones), one)
    assert "ARC_PASS" in names and "ARC_FAILED" not in names
    assert arc_clause(msg) == (
        "arc=pass (i=1 d=forwarder.test) header.oldest-pass=0 smtp.remote-ip=127.0.0.5"
    )
    assert ("s1._domainkey.forwarder.test.", "TXT") in dns_zones.queries
    [event] = [e for e in events.events if e.name == "mailauth.result"]
    assert event.fields["arc"] == "pass" and event.fields["arc_domain"] == "forwarder.test"
    # A mailing list re-seals what the forwarder sealed: chain of two, cv=pass.
    two = arc_seal(one, "lists.test", lists, "arc=pass; spf=pass smtp.mailfrom=forwarder.test")
    names, msg = scan(scanner(dns_zones), two)
    assert "ARC_PASS" in names
    assert arc_clause(msg).startswith("arc=pass (i=2 d=lists.test) header.oldest-pass=0")


def test_arc_changed_body_or_seal_fails_but_is_only_scored(
    dns_zones: DNSServer, tmp_path: Path
) -> None:
    pem = publish(dns_zones, tmp_path, "forwarder.test")
    sealed = arc_seal(message(), "forwarder.test", pem, "spf=pass smtp.mailfrom=sender.test")
    s = scanner(dns_zones)
    body = sealed.replace(b"Hello Bob.", b"Hello Mallory.")
    assert body != sealed
    names, msg = scan(s, body)
    assert "ARC_FAILED" in names and "ARC_PASS" not in names
    assert arc_clause(msg) == (
        'arc=fail (i=1 d=forwarder.test) reason="message signature i=1 did not verify"'
        " smtp.remote-ip=127.0.0.5"
    )
    # The seal covers the ARC-Authentication-Results the forwarder recorded: forge it.
    aar = b"ARC-Authentication-Results: i=1; forwarder.test;\r\n spf=pass"
    assert aar in sealed
    seal = sealed.replace(aar, aar[:-4] + b"fail")
    names, msg = scan(s, seal)
    assert "ARC_FAILED" in names and 'reason="seal i=1 did not verify"' in arc_clause(msg)
    # A failed chain is scored (a little), never rejected by default.
    engine = VerdictEngine([s], ScanSettings())
    verdict = asyncio.run(
        engine.judge(
            ScanInput(raw=body, client_ip="127.0.0.5", helo="x.test", sender="alice@sender.test")
        )
    )
    assert verdict.action is Action.ACCEPT and "ARC_FAILED" in verdict.symbol_names
    # ... and the score is the operator's: [scan.scores] applies like everywhere.
    strict = VerdictEngine([s], ScanSettings(scores={"ARC_FAILED": 20.0}))
    verdict = asyncio.run(
        strict.judge(
            ScanInput(raw=body, client_ip="127.0.0.5", helo="x.test", sender="alice@sender.test")
        )
    )
    assert verdict.action is Action.REJECT


def test_arc_chain_that_already_failed_and_missing_key(
    dns_zones: DNSServer, tmp_path: Path
) -> None:
    fwd = publish(dns_zones, tmp_path, "forwarder.test")
    lists = publish(dns_zones, tmp_path, "lists.test")
    one = arc_seal(message(), "forwarder.test", fwd, "spf=pass smtp.mailfrom=sender.test")
    broken = one.replace(b"Hello Bob.", b"Hello list.")
    failed = arc_seal(broken, "lists.test", lists, "arc=fail; spf=pass smtp.mailfrom=x.test")
    assert b"cv=fail" in failed
    s = scanner(dns_zones)
    names, msg = scan(s, failed)
    assert "ARC_FAILED" in names and "(cv=fail)" in arc_clause(msg)
    pem, _ = keypair(tmp_path / "gone", "forwarder.test", "gone")  # never published
    names, msg = scan(s, arc_seal(message(), "forwarder.test", pem, "spf=pass", "gone"))
    assert "ARC_FAILED" in names and 'reason="no key in DNS"' in arc_clause(msg)


def test_arc_dns_timeout_is_temperror(dns_zones: DNSServer, tmp_path: Path) -> None:
    pem = publish(dns_zones, tmp_path, "forwarder.test")
    sealed = arc_seal(message(), "forwarder.test", pem, "spf=pass smtp.mailfrom=sender.test")
    dns_zones.drop("s1._domainkey.forwarder.test.")
    s = scanner(dns_zones, timeout=5.0, dns_timeout=0.5)
    engine = VerdictEngine([s], ScanSettings())
    msg = ScanInput(raw=sealed, client_ip="127.0.0.5", helo="x.test", sender="alice@sender.test")
    verdict = asyncio.run(engine.judge(msg))
    assert "ARC_TEMPERROR" in verdict.symbol_names and "ARC_FAILED" not in verdict.symbol_names
    assert verdict.action is Action.ACCEPT  # not 451: a DNS problem is not a scanner failure
    # RFC 8617 registers no temperror for arc: an unchecked chain is reported as not passing.
    assert arc_clause(msg).startswith('arc=fail (i=1 d=forwarder.test) reason="temporary DNS')


def test_arc_too_many_sets_and_hostile_fields(dns_zones: DNSServer) -> None:
    i = MAX_ARC_SETS + 1
    many = (
        f"ARC-Seal: i={i}; a=rsa-sha256; cv=pass; d=forwarder.test; s=s1; b=AAAA\r\n"
        f"ARC-Message-Signature: i={i}; a=rsa-sha256; d=forwarder.test; s=s1; h=from;"
        f" bh=AAAA; b=AAAA\r\nARC-Authentication-Results: i={i}; forwarder.test; spf=pass\r\n"
    ).encode() + message()
    s = scanner(dns_zones)
    names, msg = scan(s, many)
    assert "ARC_FAILED" in names and f'reason="more than {MAX_ARC_SETS} ARC sets"' in arc_clause(
        msg
    )
    assert not any("_domainkey" in name for name, _ in dns_zones.queries)  # not even tried
    hostile = (
        b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=evil.test\r\n\tX-Injected: yes;"
        b' s=a"b; b=AAAA\r\nARC-Message-Signature: i=1; a=rsa-sha256; d=evil.test;'
        b" s=s1; h=from; bh=AAAA; b=AAAA\r\nARC-Authentication-Results: i=1; evil.test;"
        b" spf=pass\r\n"
    ) + message()
    names, msg = scan(s, hostile)
    ar = auth_results(msg)
    assert "ARC_FAILED" in names and "ARC_TEMPERROR" not in names
    assert 'arc=fail (i=1) reason="malformed or incomplete ARC set"' in arc_clause(msg)
    assert "X-Injected" not in ar and '"b' not in ar
    assert all(32 <= ord(c) < 127 or c in "\r\n\t" for c in ar)


def test_arc_off_checks_nothing(dns_zones: DNSServer, tmp_path: Path) -> None:
    pem = publish(dns_zones, tmp_path, "forwarder.test")
    sealed = arc_seal(message(), "forwarder.test", pem, "spf=pass smtp.mailfrom=sender.test")
    names, msg = scan(scanner(dns_zones, arc=False), sealed)
    assert not any(n.startswith("ARC_") for n in names)
    assert "arc=" not in auth_results(msg).replace("dmarc=", "")
    assert ("s1._domainkey.forwarder.test.", "TXT") not in dns_zones.queries

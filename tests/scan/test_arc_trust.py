"""Trusted ARC sealers (``[scan.mailauth] arc_trusted_sealers``) against a loopback DNS
server: a DMARC ``p=reject``/``p=quarantine`` failure is excused (``DMARC_ARC_OVERRIDE``, no
forced action, said in Authentication-Results and the event) only when the chain passes,
the newest sealer is listed, and its ARC-Authentication-Results vouch for the From domain.
An untrusted sealer, a broken chain, an older trusted hop under an untrusted one, a trusted
sealer that saw the message fail, or an empty list change nothing. Also the settings'
validation and ``aar_vouches`` as a table.

Security: the DNS server listens on 127.0.0.1 only; keys are made in the test's directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from mailwarden.core import events as ev
from mailwarden.core.types import Direction, Symbol
from mailwarden.scan.mailauth import DEFAULT_SCORES, aar_vouches
from mailwarden.scan.settings import MailAuthSettings, ScanSettings
from mailwarden.scan.verdict import Action, VerdictEngine
from tests.scan.test_mailauth import (
    arc_seal,
    auth_results,
    message,
    publish,
    scan,
    scanner,
    zones,
)
from tests.support.dnsserver import DNSServer

SPOOFED = "127.0.0.66"  # not in sender.test's SPF record: DMARC fails without DKIM
VOUCH = "spf=pass smtp.mailfrom=sender.test; dmarc=pass header.from=sender.test"


@pytest.fixture
def dns_zones() -> Iterator[DNSServer]:
    with DNSServer(zones() | {"other.test": {"@": {"TXT": ['"v=spf1 -all"']}}}) as server:
        yield server


def decide(names: list[str]) -> Action:
    engine = VerdictEngine([], ScanSettings())
    syms = [Symbol(n, DEFAULT_SCORES.get(n, 0.0), "") for n in names]
    return engine.decide(syms, Direction.INBOUND).action


def dmarc_clause(results: str) -> str:
    [clause] = [p.strip() for p in results.split(";") if p.strip().startswith("dmarc=")]
    return " ".join(clause.split())


def test_trusted_sealers_valid_chain_excuses_dmarc_reject(
    dns_zones: DNSServer, tmp_path: Path, events: ev.MemorySink
) -> None:
    lists = publish(dns_zones, tmp_path, "lists.test")
    sealed = arc_seal(message(), "lists.test", lists, VOUCH)
    trusting = scanner(dns_zones, arc_trusted_sealers=["lists.test"])
    names, msg = scan(trusting, sealed, client_ip=SPOOFED)
    assert "ARC_PASS" in names and "DMARC_FAILED" in names
    assert "DMARC_ARC_OVERRIDE" in names and "DMARC_POLICY_REJECT" not in names
    assert decide(names) is Action.ACCEPT  # -3 cancels DMARC_FAILED; SPF_FAILED remains
    assert dmarc_clause(auth_results(msg)) == (
        'dmarc=fail reason="policy overridden: trusted ARC sealer lists.test" '
        "header.from=sender.test policy.dmarc=reject"
    )
    [event] = [e.fields for e in events.events if e.name == "mailauth.result"]
    assert event["dmarc"] == "fail" and event["dmarc_override"] == "lists.test"

    # The same chain without the list, or with another domain listed: rejected as today.
    for settings in ({}, {"arc_trusted_sealers": ["other.test"]}):
        names, msg = scan(scanner(dns_zones, **settings), sealed, client_ip=SPOOFED)
        assert "ARC_PASS" in names and "DMARC_POLICY_REJECT" in names
        assert "DMARC_ARC_OVERRIDE" not in names and decide(names) is Action.REJECT
        assert "reason=" not in dmarc_clause(auth_results(msg))
    assert events.events[-1].fields["dmarc_override"] is None


def test_quarantine_policy_is_excused_too(dns_zones: DNSServer, tmp_path: Path) -> None:
    lists = publish(dns_zones, tmp_path, "lists.test")
    vouch = "spf=pass smtp.mailfrom=quar.test; dmarc=pass header.from=quar.test"
    sealed = arc_seal(message("alice@quar.test"), "lists.test", lists, vouch)
    s = scanner(dns_zones, arc_trusted_sealers=["lists.test"])
    names, _ = scan(s, sealed, client_ip=SPOOFED, sender="alice@quar.test")
    assert "DMARC_ARC_OVERRIDE" in names and "DMARC_POLICY_QUARANTINE" not in names


def test_what_a_trusted_sealer_cannot_excuse(dns_zones: DNSServer, tmp_path: Path) -> None:
    lists = publish(dns_zones, tmp_path, "lists.test")
    other = publish(dns_zones, tmp_path, "other.test")
    s = scanner(dns_zones, arc_trusted_sealers=["lists.test"])
    sealed = arc_seal(message(), "lists.test", lists, VOUCH)

    def outcome(raw: bytes) -> list[str]:
        names, _ = scan(s, raw, client_ip=SPOOFED)
        return names

    # A broken chain (changed after the trusted seal).
    names = outcome(sealed.replace(b"Hello Bob.", b"Hello Eve."))
    assert "ARC_FAILED" in names and "DMARC_POLICY_REJECT" in names
    assert "DMARC_ARC_OVERRIDE" not in names
    # The trusted sealer is an older hop; the newest seal is someone else's.
    on_top = arc_seal(sealed, "other.test", other, "arc=pass; " + VOUCH)
    names = outcome(on_top)
    assert "ARC_PASS" in names and "DMARC_POLICY_REJECT" in names
    # The trusted sealer saw the message fail DMARC itself (a spoof it relayed).
    spoof = arc_seal(message(), "lists.test", lists, "spf=fail; dmarc=fail header.from=sender.test")
    names = outcome(spoof)
    assert "ARC_PASS" in names and "DMARC_POLICY_REJECT" in names
    # ... or vouched for another From domain.
    names = outcome(arc_seal(message(), "lists.test", lists, "dmarc=pass header.from=x.test"))
    assert "DMARC_POLICY_REJECT" in names
    # A DMARC pass needs no excuse: no override symbol.
    names, _ = scan(s, sealed)
    assert "DMARC_PASS" in names and "DMARC_ARC_OVERRIDE" not in names


@pytest.mark.parametrize(
    ("aar", "vouches"),
    [
        ("i=1; mx.lists.test; dmarc=pass header.from=sender.test", True),
        ("i=3; mx.lists.test; arc=pass; DMARC=Pass header.from=Sender.Test", True),
        ("i=1; mx.lists.test; dmarc=pass", True),  # no header.from: about this message
        ("i=1; mx.lists.test; dmarc=fail header.from=sender.test; dkim=pass header.d=sender.test",
         False),
        ("i=1; mx.lists.test; dmarc=pass header.from=other.test", False),
        ("i=1; mx.lists.test; dkim=pass header.d=mail.sender.test", True),  # aligned, no dmarc
        ("i=1; mx.lists.test; dkim=pass header.d=other.test", False),
        ("i=1; mx.lists.test; spf=pass smtp.mailfrom=bounce@sender.test", True),
        ("i=1; mx.lists.test; spf=fail smtp.mailfrom=sender.test", False),
        ("i=1; mx.lists.test; none", False),
        ("i=1; ((( not results", False),
        ("i=1; mx.lists.test; dmarc=pass; x=" + "a" * 9000, False),  # past MAX_AAR_CHARS
    ],
)  # fmt: skip
def test_aar_vouches(aar: str, vouches: bool) -> None:
    assert aar_vouches(aar, "sender.test") is vouches


def test_trusted_sealers_setting_is_checked() -> None:
    ok = MailAuthSettings(arc_trusted_sealers=["Lists.Test."])
    assert ok.arc_trusted_sealers == ["lists.test"]
    for kw in ({"arc": False, "arc_trusted_sealers": ["lists.test"]},
               {"arc_trusted_sealers": ["not a domain"]}):  # fmt: skip
        with pytest.raises(ValidationError):
            MailAuthSettings(**kw)  # type: ignore[arg-type]

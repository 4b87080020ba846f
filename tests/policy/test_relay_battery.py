"""The open-relay battery (``relay.txt``: nmap's 16 ``smtp-open-relay`` tests plus variants)
against the real gateway (``mailwarden serve`` with the embedded policy defaults): from an
off-campus address every relay attempt is refused; from the registered server only the
legitimate ones are accepted. Every decision is a ``policy.decision`` event."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.policy.table import Case, read_cases, run_case
from tests.support.gateway import Gateway

CASES = read_cases(Path(__file__).with_name("relay.txt"))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("relay"))
    gw.start()
    yield gw
    gw.stop()


@pytest.mark.parametrize("case", CASES, ids=[c.where for c in CASES])
def test_relay_case(gateway: Gateway, case: Case) -> None:
    got = run_case(gateway.smtp_port, case)
    assert got.startswith(case.expected), f"{case.where}: {case.rcpt}: got {got!r}"


def test_battery_covers_both_views() -> None:
    off = [c for c in CASES if c.client == "127.0.0.66"]
    registered = [c for c in CASES if c.client == "127.0.0.1"]
    assert len(off) >= 16 + 10 and len(registered) >= 10
    # Off campus, nothing outside the hosted domain is ever accepted.
    for c in off:
        if c.expected.startswith("250"):
            assert c.rcpt.endswith("@example.edu>") and not any(x in c.rcpt for x in '%!"')


def test_decisions_are_events(gateway: Gateway) -> None:
    run_case(
        gateway.smtp_port,
        Case("x", "127.0.0.66", "relay.test", "<a@b.example>", "<victim@elsewhere.example>", ""),
    )
    ev = gateway.wait_event(
        lambda e: (
            e.get("event") == "policy.decision"
            and e.get("stage") == "rcpt"
            and e.get("recipient") == "victim@elsewhere.example"
        ),
        what="the RCPT decision event",
    )
    assert ev["action"] == "reject" and ev["control"] == "SU-6"
    assert ev["reply"] == "554 5.7.1 Relay access denied (SU-6)"
    assert ev["client"] == "127.0.0.66"

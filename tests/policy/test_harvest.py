"""Directory-harvest defence (CP-E2) against the real gateway: a client probing random
addresses is slowed (tarpit events) within 10 invalid recipients, disconnected within 20,
then blocked at connect; a valid sender from another address is unaffected; the block is
listed and lifted with ``mailwarden blocks``, and expires by itself. Tarpit delays are
checked through the ``policy.tarpit`` events, never by wall-clock."""

from __future__ import annotations

import json
import secrets
from typing import Any

from tests.policy.helpers import greeting, session
from tests.support.gateway import Gateway
from tests.support.tmpdirs import poll

PROBER = "127.0.0.66"
OTHER = "127.0.0.77"

HARVEST = {
    "default_directory": "static",
    "recipients": ["alice@example.edu", "bob@example.edu"],
    "harvest_soft_limit": 3,
    "harvest_hard_limit": 8,
    "tarpit_delay": 0.01,
    "tarpit_max": 0.05,
    "harvest_threshold": 12,
    "block_duration": "1h",
    "registry_refresh": 0.2,
}


def _probe(port: int, source: str, n: int) -> tuple[list[str], str]:
    """RCPT ``n`` random addresses until the server closes; the replies and session id."""
    c = session(port, source)
    replies = []
    try:
        for _ in range(n):
            reply = c.cmd(f"RCPT TO:<{secrets.token_hex(5)}@example.edu>")
            replies.append(reply)
            if reply.startswith("421"):
                assert c.closed()
                break
    finally:
        c.close()
    return replies, ""


def _session_events(gw: Gateway, name: str, client: str) -> list[dict[str, Any]]:
    return [e for e in gw.events(name) if e.get("client") == client]


def test_harvester_is_slowed_disconnected_blocked_and_unblocked(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory(extra={"policy": HARVEST})
    port = gw.smtp_port

    # Session 1: unknown recipients get 550 5.1.1; from the 4th on, each reply is tarpitted;
    # the 8th is 421 and the connection closes.
    replies, _ = _probe(port, PROBER, 100)
    assert len(replies) <= 20
    assert all(r.startswith("550 5.1.1") for r in replies[:-1])
    assert replies[-1].startswith("421 4.7.0") and "(CP-E2)" in replies[-1]
    tarpits = poll(
        lambda: (
            [
                e
                for e in _session_events(gw, "policy.tarpit", PROBER)
                if e["event"] == "policy.tarpit"
            ]
            or None
        ),
        30,
        what="tarpit events",
    )
    first = min(e["invalid"] for e in tarpits)
    assert first <= 10 and first == HARVEST["harvest_soft_limit"] + 1
    assert sorted(e["invalid"] for e in tarpits) == list(range(4, 8))
    assert all(e["delay"] > 0 for e in tarpits)
    delays = [e["delay"] for e in sorted(tarpits, key=lambda e: e["invalid"])]
    assert delays == sorted(delays) and delays[-1] > delays[0]  # growing
    assert _session_events(gw, "policy.harvest_disconnect", PROBER)

    # Meanwhile a valid sender from another address is unaffected.
    c = session(port, OTHER)
    assert c.cmd("RCPT TO:<alice@example.edu>").startswith("250 2.1.5")
    assert c.cmd("RCPT TO:<postmaster@example.edu>").startswith("250 2.1.5")
    c.close()

    # Session 2: the address crosses the cross-session threshold (12) and is blocked.
    replies, _ = _probe(port, PROBER, 100)
    assert replies[-1].startswith("421 4.7.0 Client address blocked")
    assert len(replies) == HARVEST["harvest_threshold"] - HARVEST["harvest_hard_limit"]
    block = gw.wait_event(lambda e: e.get("event") == "policy.block", what="policy.block")
    assert block["client"] == PROBER and block["control"] == "CP-E2"

    # Blocked at connect, visible in the CLI; another address still gets in.
    assert greeting(port, PROBER).startswith("554 5.7.1 Client address blocked")
    assert greeting(port, OTHER).startswith("220")
    listed = poll(
        lambda: [json.loads(x) for x in gw.cli("blocks", "list", "--json").stdout.splitlines()],
        30,
        what="the block in `blocks list`",
    )
    assert [b["address"] for b in listed] == [PROBER]
    assert "invalid recipients" in listed[0]["reason"]
    assert PROBER in gw.cli("blocks", "list").stdout

    # Lifted by the operator: a running gateway lets the address in again.
    res = gw.cli("blocks", "remove", PROBER)
    assert "lifted" in res.stdout
    poll(lambda: greeting(port, PROBER).startswith("220"), 30, what="the block to be lifted")
    assert gw.cli("blocks", "list", "--json").stdout.strip() == ""
    assert gw.cli("blocks", "remove", PROBER, check=False).returncode == 3
    assert gw.cli("blocks", "remove", "not-an-ip", check=False).returncode == 2


def test_block_expires_and_honeypot_blocks_at_once(gateway_factory: Any) -> None:
    policy = HARVEST | {"block_duration": "1s", "honeypots": ["trap@example.edu"]}
    gw: Gateway = gateway_factory(extra={"policy": policy})
    port = gw.smtp_port
    c = session(port, PROBER)
    reply = c.cmd("RCPT TO:<trap@example.edu>")
    assert reply.startswith("421 4.7.0 Client address blocked"), reply
    c.close()
    ev = gw.wait_event(lambda e: e.get("event") == "policy.block", what="policy.block")
    assert ev["reason"] == "honeypot address" and ev["client"] == PROBER
    # The block ends by itself (poll: no timing is asserted).
    poll(lambda: greeting(port, PROBER).startswith("220"), 60, what="the block to expire")
    # The honeypot means nothing to a registered server: just an unknown user.
    c = session(port, "127.0.0.1")
    assert c.cmd("RCPT TO:<trap@example.edu>").startswith("550 5.1.1")
    c.close()

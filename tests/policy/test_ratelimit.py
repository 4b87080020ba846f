"""Outbound quotas (SU-1) against the real gateway: a registered server sending past its
hourly message quota gets ``451 4.7.1`` at the end of DATA and one ``policy.rate_alert``
event; past its recipient quota the RCPT gets ``451 4.7.1``. Inbound mail is not counted."""

from __future__ import annotations

from typing import Any

from tests.policy.helpers import session
from tests.support.gateway import Gateway

QUOTA = {"sender_messages_per_hour": 3, "sender_recipients_per_hour": 6}
MESSAGE = "Subject: report\r\n\r\nweekly numbers\r\n."


def _send(port: int, rcpts: list[str], sender: str = "<lab@example.edu>") -> list[str]:
    c = session(port, "127.0.0.1", sender)
    try:
        out = [c.cmd(f"RCPT TO:<{r}>") for r in rcpts]
        if any(r.startswith("250") for r in out):
            assert c.cmd("DATA").startswith("354")
            out.append(c.cmd(MESSAGE))
        c.cmd("QUIT")
        return out
    finally:
        c.close()


def test_registered_server_past_its_hourly_quota_is_tempfailed_and_alerted(
    gateway_factory: Any,
) -> None:
    gw: Gateway = gateway_factory(extra={"policy": QUOTA})
    port = gw.smtp_port
    for i in range(3):
        replies = _send(port, [f"r{i}@outside.example"])
        assert replies[0].startswith("250 2.1.5") and replies[-1].startswith("250 2.0.0")
    # Inbound mail from the same server does not count against its outbound quota.
    assert _send(port, ["u@example.edu"])[-1].startswith("250 2.0.0")
    # The 4th outbound message: recipients still fine, the message is tempfailed.
    replies = _send(port, ["r3@outside.example"])
    assert replies[0].startswith("250 2.1.5")
    assert replies[-1].startswith("451 4.7.1 Rate limit exceeded: too many messages"), replies
    assert replies[-1].endswith("(SU-1)")
    # Recipients: 4 counted so far, quota 6: the 7th outbound recipient is refused.
    replies = _send(port, ["r4@outside.example", "r5@outside.example", "r6@outside.example"])
    assert [r[:3] for r in replies[:3]] == ["250", "250", "451"]
    assert replies[2].startswith("451 4.7.1 Rate limit exceeded: too many recipients")
    assert replies[-1].startswith("451 4.7.1")  # and that message is over the quota too

    alerts = gw.wait_event(
        lambda e: e.get("event") == "policy.rate_alert" and e.get("kind") == "recipients",
        what="the recipients alert",
    )
    assert alerts["client"] == "127.0.0.1" and alerts["limit"] == 6
    msg_alerts = [e for e in gw.events("policy.rate_alert") if e["kind"] == "messages"]
    assert len(msg_alerts) == 1  # one alarm per window, however many refusals follow
    assert msg_alerts[0]["who"] == "srv:127.0.0.1/32" and msg_alerts[0]["count"] == 4
    assert msg_alerts[0]["control"] == "SU-1"
    refused = [
        e
        for e in gw.events("policy.decision")
        if e["stage"] == "data" and e["action"] == "tempfail"
    ]
    assert len(refused) == 2


def test_connection_rate_per_client(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory(
        extra={"policy": {"connection_rate": 3, "connection_rate_window": "1h"}}
    )
    from tests.policy.helpers import greeting

    got = [greeting(gw.smtp_port, "127.0.0.66")[:3] for _ in range(5)]
    assert got == ["220", "220", "220", "421", "421"]
    assert greeting(gw.smtp_port, "127.0.0.67").startswith("220")  # per address
    # Registered servers are not limited by connection rate.
    assert all(greeting(gw.smtp_port, "127.0.0.1").startswith("220") for _ in range(5))

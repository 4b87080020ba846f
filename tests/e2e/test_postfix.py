"""End to end with real Postfix peers: gateway -> Postfix downstream (a departmental
server) and Postfix upstream (a campus server relaying through the gateway) -> Maildir.

Security: loopback only; every Postfix instance is private and uses no DNS.
"""

from __future__ import annotations

from tests.e2e.helpers import make_message, received_headers, same_body
from tests.support.maildir import header_value

DEPT = "dept.example.edu"


def test_gateway_to_postfix_downstream(gateway_factory, postfix_factory):
    down = postfix_factory.downstream([DEPT], [f"erin@{DEPT}", f"frank@{DEPT}"])
    gw = gateway_factory(hosted={"example.edu": "maildir", DEPT: down.transport})
    rcpts = [f"erin@{DEPT}", f"frank@{DEPT}"]
    mid, msg = make_message("s@other.test", rcpts)
    assert gw.send("s@other.test", rcpts, msg, starttls=True) == {}
    for r in rcpts:
        [raw] = down.wait_messages(r, 1)
        assert header_value(raw, "Message-ID") == mid
        assert same_body(raw, msg)
        rec = received_headers(raw)
        # Postfix's own Received (from the gateway, over TLS: tls_policy may) on top of the
        # gateway's.
        assert "downstream.postfix.test" in rec[0] and "TLS" in rec[0], rec[0]
        assert any("mailwarden.test" in r for r in rec[1:]), rec


def test_postfix_upstream_through_gateway_to_maildir(gateway_factory, postfix_factory):
    gw = gateway_factory(hosted={"example.edu": "maildir"})
    up = postfix_factory.upstream(relay_port=gw.smtp_port)
    mid1, msg1 = make_message("prof@upstream.postfix.test", ["alice@example.edu"])
    mid2, msg2 = make_message("prof@upstream.postfix.test", ["alice@example.edu"])
    up.send("prof@upstream.postfix.test", ["alice@example.edu"], msg1)
    up.sendmail("prof@upstream.postfix.test", ["alice@example.edu"], msg2)
    got = gw.wait_messages("alice@example.edu", 2, deadline=90)
    assert sorted(header_value(m, "Message-ID") for m in got) == sorted([mid1, mid2])
    for raw in got:
        sent = msg1 if header_value(raw, "Message-ID") == mid1 else msg2
        assert same_body(raw, sent)
        top = received_headers(raw)[0]
        # The gateway's Received names the upstream and the STARTTLS Postfix negotiated.
        assert "upstream.postfix.test" in top and "TLS" in top, top
    up.wait_queue_empty()

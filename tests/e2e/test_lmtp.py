"""End to end: gateway -> real Dovecot LMTP -> the user's Maildir; an unknown user yields
an RFC 3464 DSN back to the sender (whose domain the gateway hosts on Maildir).

Security: loopback only; Dovecot runs unprivileged from the project's contrib config.
"""

from __future__ import annotations

from tests.e2e.helpers import dsn_parts, make_message, received_headers, same_body
from tests.support.maildir import header_value
from tests.support.tmpdirs import poll

DEPT = "dept.example.edu"


def test_lmtp_delivery_and_dsn_for_unknown_user(gateway_factory, dovecot_factory):
    dv = dovecot_factory([f"carol@{DEPT}", f"dave@{DEPT}"])
    gw = gateway_factory(hosted={"example.edu": "maildir", DEPT: dv.transport})
    sender = "alice@example.edu"
    rcpts = [f"carol@{DEPT}", f"dave@{DEPT}", f"ghost@{DEPT}"]
    mid, msg = make_message(sender, rcpts, subject="to dovecot")
    assert gw.send(sender, rcpts, msg) == {}

    for user in rcpts[:2]:
        [raw] = dv.wait_messages(user, 1)
        assert header_value(raw, "Message-ID") == mid
        assert same_body(raw, msg)
        assert any("mailwarden.test" in r for r in received_headers(raw))

    # The unknown user: a DSN to the sender, from the null sender, per RFC 3464.
    dsns = poll(
        lambda: [m for m in gw.messages(sender) if b"multipart/report" in m],
        60,
        what="a DSN to the sender",
    )
    assert len(dsns) == 1
    raw = dsns[0]
    assert header_value(raw, "Return-Path") in ("<>", None), "a DSN has the null sender"
    report, blocks = dsn_parts(raw)
    per_message, per_rcpt = blocks[0], blocks[1:]
    assert per_message.get("Reporting-MTA", "").lower().startswith("dns;")
    failed = [b for b in per_rcpt if b.get("Action", "").strip().lower() == "failed"]
    assert len(failed) == 1, [dict(b) for b in per_rcpt]
    block = failed[0]
    assert f"ghost@{DEPT}" in block.get("Final-Recipient", "").lower()
    assert block.get("Final-Recipient", "").lower().startswith("rfc822;")
    assert block.get("Status", "").strip().startswith("5."), block.get("Status")
    diag = block.get("Diagnostic-Code", "")
    assert diag.lower().startswith("smtp;") and "550" in diag, diag
    # Only the failed recipient is reported; the delivered ones are not.
    assert not any(f"carol@{DEPT}" in b.get("Final-Recipient", "") for b in failed)
    # The original message (or its headers) is attached and names the original Message-ID.
    assert mid.encode() in raw
    # The DSN is addressed to the sender, and never to the null sender.
    assert sender in (report.get("To") or "")
    assert not dv.messages(f"ghost@{DEPT}")

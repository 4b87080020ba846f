"""Self-tests of the daemon fixtures: the real Dovecot and Postfix accept and store mail.

These prove the test infrastructure itself (tests/support/dovecot.py, postfix.py), so a
failing gateway test can be told apart from a broken peer.
Security: loopback only.
"""

from __future__ import annotations

import smtplib

from tests.support.maildir import header_value

MSG = b"Subject: fixture test\r\nMessage-ID: <fixture-%d@test>\r\n\r\nhello\r\n"


def test_dovecot_lmtp_delivers_and_refuses_unknown(dovecot_factory):
    dv = dovecot_factory(["alice@dept.example.edu"])
    with smtplib.LMTP(dv.host, dv.port) as lmtp:
        lmtp.ehlo("fixture.test")
        lmtp.mail("sender@other.test")
        assert lmtp.rcpt("alice@dept.example.edu")[0] == 250
        assert lmtp.rcpt("nobody@dept.example.edu")[0] == 550
        assert lmtp.data(MSG % 1)[0] == 250
    got = dv.wait_messages("alice@dept.example.edu", 1)
    assert header_value(got[0], "Message-ID") == "<fixture-1@test>"
    assert got[0].rstrip().endswith(b"hello")


def test_postfix_downstream_and_upstream_relay(postfix_factory):
    down = postfix_factory.downstream(["dept.example.edu"], ["alice@dept.example.edu"])
    refused = down.send("s@other.test", ["alice@dept.example.edu"], MSG % 2, starttls=True)
    assert refused == {}
    got = down.wait_messages("alice@dept.example.edu", 1)
    assert header_value(got[0], "Message-ID") == "<fixture-2@test>"
    assert "TLS" in (header_value(got[0], "Received") or "")

    # Unknown users are refused at RCPT.
    try:
        down.send("s@other.test", ["bob@dept.example.edu"], MSG % 3)
    except smtplib.SMTPRecipientsRefused as exc:
        assert exc.recipients["bob@dept.example.edu"][0] == 550
    else:
        raise AssertionError("unknown user accepted")

    # An upstream relays through to the downstream (here in place of the gateway).
    up = postfix_factory.upstream(relay_port=down.port)
    up.sendmail("s@other.test", ["alice@dept.example.edu"], MSG % 4)
    down.wait_messages("alice@dept.example.edu", 2)
    up.wait_queue_empty()


def test_postfix_downstream_can_start_late(postfix_factory):
    down = postfix_factory.downstream(["dept.example.edu"], ["a@dept.example.edu"], start=False)
    port = down.port
    down.start()
    assert down.port == port
    down.stop()
    down.start()
    down.send("s@other.test", ["a@dept.example.edu"], MSG % 5)
    down.wait_messages("a@dept.example.edu", 1)

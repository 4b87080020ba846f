"""End to end: SMTP clients (smtplib, swaks) -> gateway -> its own Maildir delivery.

Covers plain SMTP, STARTTLS and implicit TLS (the Received header names TLS), PIPELINING
with swaks, SIZE refusal (in MAIL FROM and for an oversize DATA), and content integrity
(body byte-compared, dot-stuffing transparent, Received and Message-ID present).
Security: loopback only; the gateway is a real subprocess.
"""

from __future__ import annotations

import pytest

from tests.e2e.helpers import (
    make_message,
    new_message_id,
    received_headers,
    same_body,
    swaks,
)
from tests.support.gateway import client_tls_context
from tests.support.maildir import header_value

RCPT = "alice@example.edu"


@pytest.fixture
def gateway(gateway_factory):
    return gateway_factory(hosted={"example.edu": "maildir"})


def _check_stored(raw: bytes, sent: bytes, mid: str) -> None:
    assert header_value(raw, "Message-ID") == mid
    assert received_headers(raw), "the gateway adds a Received header"
    assert same_body(raw, sent), "body arrives byte for byte (modulo CRLF -> LF)"


@pytest.mark.parametrize("mode", ["plain", "starttls", "implicit"])
def test_smtplib_to_maildir(gateway, mode):
    mid, msg = make_message("sender@other.test", [RCPT, "bob@example.edu"])
    refused = gateway.send(
        "sender@other.test",
        [RCPT, "bob@example.edu"],
        msg,
        starttls=mode == "starttls",
        implicit_tls=mode == "implicit",
    )
    assert refused == {}
    for rcpt in (RCPT, "bob@example.edu"):
        [raw] = gateway.wait_messages(rcpt, 1)
        _check_stored(raw, msg, mid)
        top = received_headers(raw)[0]
        assert "mailwarden.test" in top, top
        if mode == "plain":
            assert "TLS" not in top, top
        else:
            assert "TLS" in top, f"Received must mention TLS: {top}"


def test_message_id_added_when_missing(gateway):
    msg = b"From: s@other.test\r\nTo: alice@example.edu\r\nSubject: no id\r\n\r\nbody\r\n"
    assert gateway.send("s@other.test", [RCPT], msg) == {}
    [raw] = gateway.wait_messages(RCPT, 1)
    mid = header_value(raw, "Message-ID")
    assert mid and mid.startswith("<") and mid.endswith(">") and "@" in mid
    assert received_headers(raw)


@pytest.mark.parametrize(
    "flags",
    [[], ["--tls"], ["--tls-on-connect"], ["--pipeline"], ["--tls", "--pipeline"]],
    ids=["plain", "starttls", "implicit", "pipeline", "starttls-pipeline"],
)
def test_swaks_to_maildir(gateway, flags):
    mid, msg = make_message("swaks@other.test", [RCPT])
    port = gateway.smtps_port if "--tls-on-connect" in flags else gateway.smtp_port
    res = swaks(port, "--from", "swaks@other.test", "--to", RCPT, *flags, data=msg)
    assert res.returncode == 0, res.stdout + res.stderr
    if "--pipeline" in flags:
        assert "PIPELINING" in res.stdout
    [raw] = gateway.wait_messages(RCPT, 1)
    _check_stored(raw, msg, mid)
    if "--tls" in flags or "--tls-on-connect" in flags:
        assert "TLS" in received_headers(raw)[0]


def test_swaks_pipelined_multiple_recipients(gateway):
    """PIPELINING: MAIL, several RCPTs (one refused) and DATA in one write."""
    rcpts = ["a1@example.edu", "a2@example.edu", "a3@example.edu"]
    mid, msg = make_message("p@other.test", rcpts)
    res = swaks(
        gateway.smtp_port,
        "--pipeline",
        "--from",
        "p@other.test",
        "--to",
        ",".join([*rcpts, "x@not-hosted.test"]),
        data=msg,
    )
    # swaks exits non-zero when a recipient is refused (relaying is denied): the others
    # must still get the message.
    assert "250" in res.stdout
    assert any(
        line.startswith("<** 5") or line.startswith("<~** 5") for line in res.stdout.splitlines()
    ), res.stdout
    for r in rcpts:
        [raw] = gateway.wait_messages(r, 1)
        _check_stored(raw, msg, mid)


def test_size_refusal(gateway_factory):
    limit = 20_000
    gw = gateway_factory(hosted={"example.edu": "maildir"}, limits={"max_message_size": limit})
    with gw.smtp() as c:
        code, resp = c.ehlo()
        assert code == 250
        assert c.has_extn("size") and int(c.esmtp_features["size"]) == limit
        # Declared too big in MAIL FROM: refused at once with 552.
        code, resp = c.docmd(f"MAIL FROM:<s@other.test> SIZE={limit * 2}")
        assert code == 552, resp
        c.rset()
        # Not declared, but the data is too big: refused after DATA with 552.
        _, big = make_message("s@other.test", [RCPT], body=(b"y" * 76 + b"\r\n") * 400)
        assert len(big) > limit
        # (smtplib.sendmail would declare SIZE itself; speak the commands one by one.)
        assert c.mail("s@other.test")[0] == 250
        assert c.rcpt(RCPT)[0] == 250
        code, resp = c.data(big)
        assert code == 552, resp
        # The session is still usable and a small message goes through.
        mid, small = make_message("s@other.test", [RCPT])
        c.rset()
        assert c.sendmail("s@other.test", [RCPT], small) == {}
    [raw] = gw.wait_messages(RCPT, 1)
    assert header_value(raw, "Message-ID") == mid


def test_starttls_then_ehlo_resets_and_received_has_cipher(gateway):
    with gateway.smtp() as c:
        c.ehlo()
        assert c.has_extn("starttls")
        c.starttls(context=client_tls_context())
        c.ehlo()
        assert not c.has_extn("starttls"), "STARTTLS is not offered twice"
        mid = new_message_id()
        _, msg = make_message("t@other.test", [RCPT], message_id=mid)
        assert c.sendmail("t@other.test", [RCPT], msg) == {}
    [raw] = gateway.wait_messages(RCPT, 1)
    top = received_headers(raw)[0]
    assert "TLS" in top and ("ESMTPS" in top or "cipher" in top.lower()), top

"""The SMTP edge over real loopback sockets: commands, limits, strict input, queue hand-off."""

from __future__ import annotations

import smtplib
import socket
import time
from collections.abc import Callable

import pytest

from tests.smtp.harness import RawClient, Running

Serve = Callable[..., Running]
MSG = b"Subject: test\r\nFrom: a@sender.example\r\n\r\nHello\r\n"


def _wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def _session(c: RawClient, rcpt: str = "u@example.edu") -> None:
    assert c.cmd("EHLO client.example").startswith("250")
    assert c.cmd("MAIL FROM:<a@sender.example>").startswith("250 2.1.0")
    assert c.cmd(f"RCPT TO:<{rcpt}>").startswith("250 2.1.5")


def test_greeting_and_ehlo_extensions(serve: Serve) -> None:
    srv = serve(tls="starttls")
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as c:
        code, _ = c.ehlo("client.example")
        assert code == 250
        for ext in (
            "pipelining",
            "size",
            "8bitmime",
            "smtputf8",
            "enhancedstatuscodes",
            "starttls",
        ):
            assert c.has_extn(ext), ext
        assert c.esmtp_features["size"] == str(srv.cfg.limits.max_message_size)
        assert not c.has_extn("chunking")


def test_plain_listener_does_not_offer_starttls(serve: Serve) -> None:
    srv = serve()
    c = RawClient(srv.port)
    assert c.greeting.startswith("220 mx.test.example ESMTP")
    assert "STARTTLS" not in c.cmd("EHLO x.example")
    assert c.cmd("STARTTLS").startswith("502 5.5.1")


def test_message_is_queued_with_trace_headers(serve: Serve) -> None:
    srv = serve()
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as c:
        c.ehlo("client.example")
        refused = c.sendmail("a@sender.example", ["u@example.edu"], MSG + b".leading dot\r\n")
        assert refused == {}
    assert len(srv.sink.items) == 1
    snap, data = srv.sink.items[0]
    assert snap.mail_from == "a@sender.example"
    assert snap.recipients == ("u@example.edu",)
    assert snap.client_ip == "127.0.0.1"
    assert snap.client_helo == "client.example"
    assert snap.size == len(data)
    assert snap.message_id == f"<{snap.queue_id}@mx.test.example>"
    assert data.startswith(b"Received: from client.example (unknown [127.0.0.1])\r\n")
    assert f"with ESMTP id {snap.queue_id}".encode() in data
    assert b"for <u@example.edu>; " in data
    assert f"\r\nMessage-ID: <{snap.queue_id}@mx.test.example>\r\n\r\nHello".encode() in data
    assert data.endswith(b"\r\nHello\r\n.leading dot\r\n")  # dot-unstuffed
    accept = srv.named("smtp.accept")
    assert accept and accept[0].fields["queue_id"] == snap.queue_id
    assert accept[0].fields["recipients"] == ["u@example.edu"]
    assert srv.named("smtp.connect")
    assert _wait_for(lambda: bool(srv.named("smtp.disconnect")))


def test_existing_message_id_is_kept(serve: Serve) -> None:
    srv = serve()
    c = RawClient(srv.port)
    _session(c)
    assert c.cmd("DATA").startswith("354")
    reply = c.cmd(b"Message-ID: <abc@host.example>\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    snap, data = srv.sink.items[0]
    assert reply.endswith(snap.queue_id)
    assert snap.message_id == "<abc@host.example>"
    assert data.count(b"Message-ID") == 1


def test_message_without_header_separator_gets_one(serve: Serve) -> None:
    srv = serve()
    c = RawClient(srv.port)
    _session(c)
    c.cmd("DATA")
    assert c.cmd(b"just a body line\r\n.\r\n").startswith("250")
    _, data = srv.sink.items[0]
    assert b"\r\nMessage-ID: <" in data
    assert data.endswith(b">\r\n\r\njust a body line\r\n")


def test_empty_message(serve: Serve) -> None:
    srv = serve()
    c = RawClient(srv.port)
    _session(c)
    c.cmd("DATA")
    assert c.cmd(b".\r\n").startswith("250")
    assert len(srv.sink.items) == 1


def test_pipelining_in_one_write(serve: Serve) -> None:
    srv = serve()
    c = RawClient(srv.port, source="127.0.0.66")  # off campus: relaying refused
    c.send(
        b"EHLO client.example\r\nMAIL FROM:<a@sender.example>\r\n"
        b"RCPT TO:<u@example.edu>\r\nRCPT TO:<nobody@elsewhere.example>\r\n"
        b"RCPT TO:<v@example.edu>\r\nDATA\r\n"
    )
    assert c.reply().startswith("250-mx.test.example")
    assert c.reply().startswith("250 2.1.0")
    assert c.reply().startswith("250 2.1.5")
    assert c.reply() == "554 5.7.1 Relay access denied (SU-6)"
    assert c.reply().startswith("250 2.1.5")
    assert c.reply().startswith("354")
    # The message, its end and the next transaction, in one write.
    c.send(MSG + b".\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as")
    assert c.reply().startswith("250 2.1.0")
    assert c.reply().startswith("250 2.1.5")
    assert c.reply().startswith("354")
    assert c.cmd(MSG + b".\r\nQUIT\r\n").startswith("250 2.0.0")
    assert c.reply().startswith("221")
    assert [s.recipients for s, _ in srv.sink.items] == [
        ("u@example.edu", "v@example.edu"),
        ("postmaster",),
    ]
    assert srv.sink.items[1][0].mail_from == ""


def test_sequence_errors(serve: Serve) -> None:
    srv = serve()
    c = RawClient(srv.port)
    assert c.cmd("MAIL FROM:<a@b.example>") == "503 5.5.1 Error: send HELO/EHLO first"
    c.cmd("EHLO client.example")
    assert c.cmd("RCPT TO:<u@example.edu>") == "503 5.5.1 Error: need MAIL command"
    assert c.cmd("DATA") == "503 5.5.1 Error: need MAIL command"
    c.cmd("MAIL FROM:<a@b.example>")
    assert c.cmd("MAIL FROM:<a@b.example>") == "503 5.5.1 Error: nested MAIL command"
    assert c.cmd("DATA") == "554 5.5.1 Error: no valid recipients"
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    assert c.cmd("RCPT TO:<u@example.edu>").startswith("503 5.5.1")


def test_syntax_errors_and_parameters(serve: Serve) -> None:
    srv = serve()
    c = RawClient(srv.port)
    assert c.cmd("EHLO").startswith("501 5.5.4")
    assert c.cmd("FROB").startswith("500 5.5.2")
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL TO:<a@b.example>").startswith("501 5.5.4")
    assert c.cmd("MAIL FROM:a@b.example").startswith("501 5.1.7")
    assert c.cmd("MAIL FROM:<a@b.example> FOO=bar").startswith("555 5.5.4")
    assert c.cmd("MAIL FROM:<a@b.example> SIZE=abc").startswith("501 5.5.4")
    assert c.cmd("MAIL FROM:<a@b.example> BODY=9BIT").startswith("501 5.5.4")
    assert c.cmd("MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME").startswith("250 2.1.0")
    assert c.cmd("RCPT TO:<>").startswith("501 5.1.3")
    assert c.cmd("RCPT TO:<u@example.edu> NOTIFY=NEVER").startswith("555 5.5.4")
    assert c.cmd("RCPT TO:<ü@example.edu>").startswith("553 5.6.7")
    assert c.cmd("DATA now").startswith("501 5.5.4")


def test_helo_client_gets_no_parameters(serve: Serve) -> None:
    srv = serve()
    c = RawClient(srv.port)
    assert c.cmd("HELO client.example") == "250 mx.test.example"
    assert c.cmd("MAIL FROM:<a@b.example> SIZE=10").startswith("555 5.5.4")


def test_smtputf8_addresses(serve: Serve) -> None:
    srv = serve()
    c = RawClient(srv.port)
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<jörg@bücher.example>").startswith("553 5.6.7")
    assert c.cmd("MAIL FROM:<jörg@BÜCHER.example> SMTPUTF8").startswith("250 2.1.0")
    assert c.cmd("RCPT TO:<ü@example.edu>").startswith("250 2.1.5")
    c.cmd("DATA")
    assert c.cmd("Subject: ü\r\n\r\nü\r\n.\r\n".encode()).startswith("250")
    snap, data = srv.sink.items[0]
    assert snap.smtputf8 and snap.mail_from == "jörg@bücher.example"
    assert b"with UTF8SMTP id" in data


def test_vrfy_expn_help_noop(serve: Serve) -> None:
    srv = serve()
    c = RawClient(srv.port)
    assert c.cmd("VRFY u@example.edu").startswith("252 2.5.2")
    assert c.cmd("VRFY").startswith("501")
    assert c.cmd("EXPN staff").startswith("502 5.5.1")
    assert c.cmd("HELP").startswith("214 2.0.0")
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    assert c.closed()


def test_size_declared_too_big(serve: Serve) -> None:
    srv = serve(max_message_size=2048)
    c = RawClient(srv.port)
    assert "SIZE 2048" in c.cmd("EHLO client.example")
    reply = c.cmd("MAIL FROM:<a@b.example> SIZE=2049")
    assert reply.startswith("552 5.3.4")
    assert c.cmd("MAIL FROM:<a@b.example> SIZE=2048").startswith("250")


def test_message_too_big_during_data(serve: Serve) -> None:
    srv = serve(max_message_size=2048)
    c = RawClient(srv.port)
    _session(c)
    assert c.cmd("DATA").startswith("354")
    body = b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 1000
    assert c.cmd(body + b".\r\n") == "552 5.3.4 Error: message file too big"
    assert srv.sink.items == []
    # The session goes on: a new transaction that fits is accepted.
    _session_again = c.cmd("MAIL FROM:<a@b.example>")
    assert _session_again.startswith("250")
    c.cmd("RCPT TO:<u@example.edu>")
    c.cmd("DATA")
    assert c.cmd(MSG + b".\r\n").startswith("250 2.0.0")
    assert len(srv.sink.items) == 1


@pytest.mark.parametrize(
    "line",
    [b"NOOP\n", b"NOOP\rX\r\n", b"MAIL FROM:<a@b.example>\rRCPT TO:<u@example.edu>\r\n"],
    ids=["bare-lf", "bare-cr", "bare-cr-smuggled-command"],
)
def test_bare_cr_or_lf_in_command_is_refused_and_disconnects(serve: Serve, line: bytes) -> None:
    srv = serve()
    c = RawClient(srv.port)
    c.cmd("EHLO client.example")
    reply = c.cmd(line)
    assert reply.startswith("500 5.5.2"), reply
    assert c.closed()
    assert any(
        e.fields["error"] in ("bare LF", "bare CR") for e in srv.named("smtp.protocol_error")
    )


def test_nul_in_command_is_refused(serve: Serve) -> None:
    srv = serve()
    c = RawClient(srv.port)
    assert c.cmd(b"EHLO cli\x00ent\r\n").startswith("500 5.5.2")
    assert c.cmd("NOOP") == "250 2.0.0 Ok"


SMUGGLE = (
    b"Subject: outer\r\n\r\nouter body\r\n"
    b"\n.\r\nMAIL FROM:<admin@example.edu>\r\nRCPT TO:<victim@example.edu>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nsmuggled\r\n"
)


@pytest.mark.parametrize(
    "body",
    [
        SMUGGLE,
        SMUGGLE.replace(b"\n.\r\n", b"\r\n.\n"),
        SMUGGLE.replace(b"\n.\r\n", b"\r.\r\n"),
        b"Subject: x\r\n\r\nline with bare\rCR\r\n",
        b"Subject: x\n\nunix line ends\r\n",
    ],
    ids=["lf-dot-crlf", "crlf-dot-lf", "cr-dot-crlf", "bare-cr", "bare-lf"],
)
def test_bare_cr_or_lf_in_data_is_refused_nothing_queued(serve: Serve, body: bytes) -> None:
    srv = serve()
    c = RawClient(srv.port)
    _session(c)
    c.cmd("DATA")
    c.send(body + b".\r\n")
    reply = c.reply()
    assert reply == ("554 5.6.0 Message refused: bare CR or LF in message (SMTP smuggling defence)")
    # Exactly one reply: nothing hidden in the data was run as a command.
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert srv.sink.items == []
    assert c.cmd("RCPT TO:<u@example.edu>").startswith("503")  # transaction was reset


def test_nul_and_long_line_in_data_are_refused(serve: Serve) -> None:
    srv = serve()
    c = RawClient(srv.port)
    _session(c)
    c.cmd("DATA")
    assert c.cmd(b"Subject: x\r\n\r\na\x00b\r\n.\r\n").startswith("554 5.6.0")
    _session_mail = c.cmd("MAIL FROM:<a@b.example>")
    assert _session_mail.startswith("250")
    c.cmd("RCPT TO:<u@example.edu>")
    c.cmd("DATA")
    assert c.cmd(b"Subject: x\r\n\r\n" + b"y" * 999 + b"\r\n.\r\n").startswith("554 5.6.0")
    assert srv.sink.items == []


def test_overlong_command_lines(serve: Serve) -> None:
    srv = serve()
    c = RawClient(srv.port)
    c.cmd("EHLO client.example")
    assert c.cmd("NOOP " + "x" * 520).startswith("500 5.5.2")  # > 512 for a plain command
    local = "l" * 60
    # MAIL may use the ESMTP parameter allowance ...
    assert c.cmd(f"MAIL FROM:<{local}@b.example> SIZE=10" + " " * 500).startswith("250")
    # ... but a line past every limit is refused, and its remainder is skipped.
    c.send(b"RCPT TO:<" + b"x" * 3000)
    c.send(b"@example.edu>\r\nNOOP\r\n")
    assert c.reply().startswith("500 5.5.2")
    assert c.reply() == "250 2.0.0 Ok"


def test_too_many_recipients(serve: Serve) -> None:
    srv = serve(max_recipients=3)
    c = RawClient(srv.port)
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@b.example>")
    for i in range(3):
        assert c.cmd(f"RCPT TO:<u{i}@example.edu>").startswith("250")
    assert c.cmd("RCPT TO:<u9@example.edu>") == "452 4.5.3 Error: too many recipients"
    c.cmd("DATA")
    assert c.cmd(MSG + b".\r\n").startswith("250")
    assert len(srv.sink.items[0][0].recipients) == 3


def test_max_connections_per_client(serve: Serve) -> None:
    srv = serve(max_connections_per_client=2)
    a, b = RawClient(srv.port), RawClient(srv.port)
    assert a.greeting.startswith("220") and b.greeting.startswith("220")
    third = RawClient(srv.port, greet=False)
    assert third.reply().startswith("421 4.7.0")
    assert third.closed()
    # Another client address is not affected.
    other = RawClient(srv.port, source="127.0.0.2")
    assert other.greeting.startswith("220")
    a.cmd("QUIT")
    assert a.closed()
    assert _wait_for(lambda: srv.in_loop(lambda: len(srv.server.sessions)) == 2)
    assert RawClient(srv.port).greeting.startswith("220")


def test_max_connections_total(serve: Serve) -> None:
    srv = serve(max_connections=2)
    clients = [RawClient(srv.port, source=f"127.0.0.{i}") for i in (1, 2)]
    assert all(c.greeting.startswith("220") for c in clients)
    third = RawClient(srv.port, source="127.0.0.3", greet=False)
    assert third.reply().startswith("421 4.7.0")


def test_idle_timeout(serve: Serve) -> None:
    srv = serve(idle_timeout=0.3)
    c = RawClient(srv.port)
    c.cmd("EHLO client.example")
    assert c.reply() == "421 4.4.2 mx.test.example Error: timeout exceeded"
    assert c.closed()


def test_data_timeout(serve: Serve) -> None:
    srv = serve(data_timeout=0.3)
    c = RawClient(srv.port)
    _session(c)
    c.cmd("DATA")
    c.send(b"Subject: partial\r\n")
    assert c.reply().startswith("421 4.4.2")
    assert srv.sink.items == []


def test_too_many_errors_disconnects(serve: Serve) -> None:
    srv = serve(max_errors_per_session=3)
    c = RawClient(srv.port)
    c.send(b"FOO\r\nFOO\r\nFOO\r\nFOO\r\nNOOP\r\n")
    replies = [c.reply() for _ in range(5)]
    assert replies[:4] == ["500 5.5.2 Error: command not recognized"] * 4
    assert replies[4] == "421 4.7.0 mx.test.example Error: too many errors"
    assert c.closed()


def test_http_request_is_dropped(serve: Serve) -> None:
    srv = serve()
    c = RawClient(srv.port)
    assert c.cmd("GET / HTTP/1.1").startswith("421")
    assert c.closed()


def test_mail_loop_is_refused(serve: Serve) -> None:
    srv = serve(max_received_headers=5)
    c = RawClient(srv.port)
    _session(c)
    c.cmd("DATA")
    hops = b"".join(b"Received: from h%d by h%d; date\r\n" % (i, i) for i in range(6))
    assert c.cmd(hops + MSG + b".\r\n") == "554 5.4.6 Too many hops (mail loop)"
    c.cmd("MAIL FROM:<a@b.example>")
    c.cmd("RCPT TO:<u@example.edu>")
    c.cmd("DATA")
    five = b"".join(b"received:\r\n\tfrom h%d by h%d; date\r\n" % (i, i) for i in range(5))
    assert c.cmd(five + MSG + b".\r\n").startswith("250")
    assert srv.sink.items[0][1].count(b"eceived:") == 6


def test_header_too_large(serve: Serve) -> None:
    srv = serve(max_header_size=2048, max_message_size=100_000)
    c = RawClient(srv.port)
    _session(c)
    c.cmd("DATA")
    big = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 60) for i in range(100))
    assert c.cmd(big + b"\r\nbody\r\n.\r\n").startswith("552 5.3.4")
    assert srv.sink.items == []


def test_enqueue_failure_is_a_tempfail(serve: Serve) -> None:
    srv = serve()
    srv.sink.fail = True
    c = RawClient(srv.port)
    _session(c)
    c.cmd("DATA")
    assert c.cmd(MSG + b".\r\n").startswith("451 4.3.0")
    srv.sink.fail = False
    _session_retry = c.cmd("MAIL FROM:<a@sender.example>")
    assert _session_retry.startswith("250")
    c.cmd("RCPT TO:<u@example.edu>")
    c.cmd("DATA")
    assert c.cmd(MSG + b".\r\n").startswith("250 2.0.0")
    assert len(srv.sink.items) == 1


def test_input_is_held_while_enqueue_waits(serve: Serve) -> None:
    import asyncio

    srv = serve()
    gate = srv.in_loop(asyncio.Event)
    srv.sink.gate = gate
    c = RawClient(srv.port)
    _session(c)
    c.cmd("DATA")
    c.send(MSG + b".\r\nNOOP\r\n")
    c.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        c.reply()  # no 250 before the sink returns, and NOOP is not answered first
    c.sock.settimeout(10)
    srv.in_loop(gate.set)
    assert c.reply().startswith("250 2.0.0 Ok: queued as")
    assert c.reply() == "250 2.0.0 Ok"


def test_shutdown_sends_421(serve: Serve) -> None:
    srv = serve()
    c = RawClient(srv.port)
    c.cmd("EHLO client.example")
    srv.call(srv.server.shutdown())
    assert c.reply() == "421 4.3.2 Service shutting down"
    assert c.closed()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).recv(1)

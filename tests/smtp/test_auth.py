"""SMTP AUTH over real sockets (RFC 4954, RFC 4616, SU-8): only inside TLS, only on
submission listeners; PLAIN and LOGIN against the real user database; cancels, bad base64,
sequence errors, the RFC 4954 line limit, tempfail of a broken backend, throttling, and no
password in any event."""

from __future__ import annotations

import json
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailwarden.auth.service import AuthService
from mailwarden.core.events import Event
from mailwarden.policy.engine import Policy
from mailwarden.smtp.limits import MAX_AUTH_LINE
from mailwarden.smtp.tls import ensure_certificate
from tests.auth.helpers import (
    DictBackend,
    auth_settings,
    b64,
    database_service,
    plain,
    store_config,
    user_store,
)
from tests.smtp.harness import RawClient, Running, client_context

PASSWORD = "Corr3ct-horse-battery"
MSG = b"Subject: auth\r\n\r\nHello\r\n"


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def make(
        tls: str = "starttls",
        *,
        submission: bool = True,
        backend: Any = None,
        users: dict[str, str] | None = None,
        disabled: tuple[str, ...] = (),
        **auth: Any,
    ) -> Running:
        cfg = store_config(tmp_path, **auth)
        ensure_certificate(cfg.cert_path, cfg.key_path, cfg.gateway.hostname)
        if backend is not None:
            service: AuthService = AuthService(auth_settings(**auth), backend)
        else:
            store = user_store(cfg, users if users is not None else {"alice": PASSWORD}, disabled)
            service = database_service(cfg, store)
        policy = Policy(cfg)  # started: it loads the users' sender addresses (SU-1)
        running = Running(cfg, tls=tls, submission=submission, auth=service, policy=policy)
        started.append(running)
        running.call(policy.start())
        return running

    yield make
    for running in started:
        running.call(running.server.policy.close())
        running.stop()
        if running.server.auth is not None:
            running.server.auth.close()


def tls_client(srv: Running) -> RawClient:
    """Connected, STARTTLS done, EHLO sent again inside TLS."""
    c = RawClient(srv.port)
    c.cmd("EHLO client.example")
    assert c.cmd("STARTTLS").startswith("220")
    c.starttls()
    ehlo = c.cmd("EHLO client.example")
    assert "250-AUTH PLAIN LOGIN" in ehlo
    return c


def all_events(srv: Running) -> str:
    return "\n".join(json.dumps(e.to_json()) for e in srv.events.events)


def auth_events(srv: Running) -> list[Event]:
    return srv.named("smtp.auth")


# -- SU-8: never before TLS, only on submission listeners -----------------------------------
def test_auth_not_advertised_before_starttls_and_refused_with_530(start: Any) -> None:
    srv = start()
    c = RawClient(srv.port)
    ehlo = c.cmd("EHLO client.example")
    assert "STARTTLS" in ehlo
    assert "AUTH" not in ehlo
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == (
        "530 5.7.0 Must issue a STARTTLS command first (SU-8)"
    )
    assert c.cmd("AUTH LOGIN") == "530 5.7.0 Must issue a STARTTLS command first (SU-8)"
    # Refused before any continuation: the next line is a command again.
    assert c.cmd("NOOP").startswith("250")
    rejects = [e for e in srv.named("smtp.reject") if e.fields["command"] == "AUTH"]
    assert rejects and rejects[0].fields["control"] == "SU-8"
    assert not auth_events(srv)
    assert PASSWORD not in all_events(srv)


def test_auth_after_starttls_plain_initial_response(start: Any) -> None:
    srv = start()
    c = tls_client(srv)
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "235 2.7.0 Authentication successful"
    assert c.cmd("MAIL FROM:<alice@example.edu>").startswith("250")
    assert c.cmd("RCPT TO:<u@example.edu>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    assert c.cmd(MSG + b".\r\n").startswith("250")
    snapshot, data = srv.sink.items[0]
    assert snapshot.auth_user == "alice"
    assert b"with ESMTPSA id" in data  # RFC 3848
    ev = auth_events(srv)
    assert [(e.fields["user"], e.fields["mechanism"], e.fields["result"]) for e in ev] == [
        ("alice", "PLAIN", "ok")
    ]


def test_smtplib_plain_and_login(start: Any) -> None:
    srv = start()
    for mechanism in ("PLAIN", "LOGIN"):
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as s:
            s.ehlo("client.example")
            assert not s.has_extn("auth")
            s.starttls(context=client_context())
            s.ehlo("client.example")
            assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
            s.user, s.password = "alice", PASSWORD
            auth = s.auth_plain if mechanism == "PLAIN" else s.auth_login
            code, _ = s.auth(mechanism, auth, initial_response_ok=False)
            assert code == 235
            assert s.sendmail("alice@example.edu", ["u@example.edu"], MSG) == {}
    assert [e.fields["mechanism"] for e in auth_events(srv)] == ["PLAIN", "LOGIN"]
    assert all(s.auth_user == "alice" for s, _ in srv.sink.items)


def test_plain_continuation_and_login_forms(start: Any) -> None:
    srv = start()
    c = tls_client(srv)
    assert c.cmd("AUTH PLAIN") == "334 "
    assert c.cmd(plain("alice", PASSWORD)).startswith("235 2.7.0")
    c.close()
    c = tls_client(srv)
    assert c.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert c.cmd(b64("alice")) == "334 UGFzc3dvcmQ6"
    assert c.cmd(b64(PASSWORD)).startswith("235 2.7.0")
    c.close()
    c = tls_client(srv)  # LOGIN with the user name as initial response
    assert c.cmd("AUTH LOGIN " + b64("Alice")) == "334 UGFzc3dvcmQ6"
    assert c.cmd(b64(PASSWORD)).startswith("235 2.7.0")
    assert [e.fields["result"] for e in auth_events(srv)] == ["ok", "ok", "ok"]


def test_wrong_password_unknown_and_disabled_user(start: Any) -> None:
    srv = start(users={"alice": PASSWORD, "bob": PASSWORD}, disabled=("bob",))
    c = tls_client(srv)
    invalid = "535 5.7.8 Authentication credentials invalid"
    assert c.cmd("AUTH PLAIN " + plain("alice", "wrong-password")) == invalid
    assert c.cmd("AUTH PLAIN " + plain("nobody", PASSWORD)) == invalid
    c.close()
    c = tls_client(srv)
    assert c.cmd("AUTH PLAIN " + plain("bob", PASSWORD)) == invalid
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD, authzid="bob")) == invalid
    c.close()
    results = [(e.fields["user"], e.fields["result"]) for e in auth_events(srv)]
    assert results == [
        ("alice", "invalid"),
        ("nobody", "invalid"),
        ("bob", "invalid"),
        ("alice", "invalid"),
    ]
    assert all(s.auth_user is None for s, _ in srv.sink.items)


def test_implicit_tls_listener(start: Any) -> None:
    srv = start(tls="implicit")
    with smtplib.SMTP_SSL("127.0.0.1", srv.port, timeout=10, context=client_context()) as s:
        s.ehlo("client.example")
        assert "auth" in s.esmtp_features
        s.login("alice", PASSWORD)
        assert s.sendmail("alice@example.edu", ["u@example.edu"], MSG) == {}
    assert srv.sink.items[0][0].auth_user == "alice"


def test_not_offered_on_a_non_submission_listener(start: Any) -> None:
    srv = start(submission=False)
    c = RawClient(srv.port)
    c.cmd("EHLO client.example")
    assert c.cmd("STARTTLS").startswith("220")
    c.starttls()
    assert "AUTH" not in c.cmd("EHLO client.example")
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == (
        "503 5.5.1 Error: authentication not enabled"
    )
    assert c.cmd("NOOP").startswith("250")


# -- the exchange ------------------------------------------------------------------------------
def test_cancel_bad_base64_and_malformed(start: Any) -> None:
    srv = start()
    c = tls_client(srv)
    assert c.cmd("AUTH PLAIN") == "334 "
    assert c.cmd("*") == "501 5.7.0 Authentication cancelled"
    assert c.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert c.cmd(b64("alice")) == "334 UGFzc3dvcmQ6"
    assert c.cmd("*") == "501 5.7.0 Authentication cancelled"
    assert c.cmd("AUTH PLAIN not*base64!") == "501 5.5.2 Cannot decode response"
    assert c.cmd("AUTH PLAIN") == "334 "
    # Inside the exchange a line is a response, not a command ("QUIT" is valid base64).
    assert c.cmd("QUIT") == "501 5.5.2 Invalid PLAIN response"
    assert c.cmd("AUTH PLAIN " + b64("no-nul-separators")) == "501 5.5.2 Invalid PLAIN response"
    assert c.cmd("AUTH PLAIN =") == "501 5.5.2 Invalid PLAIN response"  # empty response
    assert c.cmd("AUTH CRAM-MD5").startswith("504 5.5.4")
    assert c.cmd("AUTH").startswith("501 5.5.4")
    # After all that, a good exchange still works.
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)).startswith("235")
    results = [e.fields["result"] for e in auth_events(srv)]
    assert results == [
        "cancelled",
        "cancelled",
        "malformed",
        "malformed",
        "malformed",
        "malformed",
        "ok",
    ]


def test_sequence_errors(start: Any) -> None:
    srv = start()
    c = RawClient(srv.port)
    c.cmd("EHLO client.example")
    c.cmd("STARTTLS")
    c.starttls()
    # STARTTLS forgot EHLO (RFC 3207): AUTH needs a new EHLO first.
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == "503 5.5.1 Error: send EHLO first"
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@example.edu>").startswith("250")
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == (
        "503 5.5.1 Error: AUTH not permitted during a transaction"
    )
    assert c.cmd("RSET").startswith("250")
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)).startswith("235")
    again = "503 5.5.1 Error: already authenticated"
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == again
    assert c.cmd("AUTH LOGIN") == again


def test_pipelined_auth_then_mail(start: Any) -> None:
    srv = start()
    c = tls_client(srv)
    c.send(f"AUTH PLAIN {plain('alice', PASSWORD)}\r\nMAIL FROM:<alice@example.edu>\r\n".encode())
    assert c.reply().startswith("235")
    assert c.reply().startswith("250")


def test_rfc4954_line_limit(start: Any) -> None:
    srv = start()
    c = tls_client(srv)
    # Longer than a command line (1024) but within 12288: read, decoded, refused as invalid.
    long_password = "x" * 3000
    line = "AUTH PLAIN " + plain("alice", long_password)
    assert 1024 < len(line) + 2 <= MAX_AUTH_LINE
    assert c.cmd(line) == "535 5.7.8 Authentication credentials invalid"
    # A continuation line past the limit ends the exchange with 500 5.5.6.
    assert c.cmd("AUTH PLAIN") == "334 "
    assert c.cmd("A" * MAX_AUTH_LINE) == "500 5.5.6 Authentication Exchange line is too long"
    assert c.cmd("NOOP").startswith("250")  # back in command mode
    # The same length as a plain command stays refused as before.
    assert c.cmd("NOOP " + "x" * 2000) == "500 5.5.2 Error: line too long"
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)).startswith("235")


def test_long_auth_line_not_allowed_on_non_submission(start: Any) -> None:
    srv = start(submission=False)
    c = RawClient(srv.port)
    c.cmd("EHLO client.example")
    assert c.cmd("AUTH PLAIN " + "A" * 2000) == "500 5.5.2 Error: line too long"


def test_login_is_escaped_in_events(start: Any) -> None:
    srv = start()
    c = tls_client(srv)
    evil = "mallory\x1b[31m\u2028x"
    assert c.cmd("AUTH PLAIN " + plain(evil, "whatever-pass")).startswith("535")
    (ev,) = auth_events(srv)
    assert ev.fields["user"] == "mallory\\x1b[31m\\u2028x"


# -- backend failures: tempfail, never success --------------------------------------------------
def test_backend_error_is_tempfail(start: Any) -> None:
    backend = DictBackend({"alice": PASSWORD})
    backend.fail = RuntimeError("directory exploded")
    srv = start(backend=backend)
    c = tls_client(srv)
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == (
        "454 4.7.0 Temporary authentication failure"
    )
    assert auth_events(srv)[0].fields["result"] == "tempfail"
    assert [e.fields["error"] for e in srv.named("auth.error")] == ["RuntimeError"]
    assert c.cmd("MAIL FROM:<alice@example.edu>").startswith("250")
    c.cmd("RCPT TO:<u@example.edu>")
    c.cmd("DATA")
    c.cmd(MSG + b".\r\n")
    assert srv.sink.items[0][0].auth_user is None


def test_backend_timeout_is_tempfail(start: Any) -> None:
    backend = DictBackend({"alice": PASSWORD})
    backend.hang = True
    srv = start(backend=backend, timeout="0.3s")
    c = tls_client(srv)
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == (
        "454 4.7.0 Temporary authentication failure"
    )
    assert [e.fields["error"] for e in srv.named("auth.error")] == ["timeout"]


# -- throttling -------------------------------------------------------------------------------
def test_session_failure_limit_disconnects(start: Any) -> None:
    srv = start(session_max_failures=2)
    c = tls_client(srv)
    assert c.cmd("AUTH PLAIN " + plain("alice", "bad-1")).startswith("535")
    reply = c.cmd("AUTH PLAIN " + plain("alice", "bad-2"))
    assert reply.startswith("421 4.7.0") and "Too many failed authentication attempts" in reply
    assert c.closed()


def test_client_soft_and_hard_limits(start: Any) -> None:
    srv = start(client_soft_limit=2, client_hard_limit=4)
    c = tls_client(srv)
    assert c.cmd("AUTH PLAIN " + plain("alice", "bad-1")).startswith("535")
    c.close()
    c = tls_client(srv)
    assert c.cmd("AUTH PLAIN " + plain("alice", "bad-2")).startswith("535")
    c.close()
    # Past the soft limit even the right password is not checked: 454.
    c = tls_client(srv)
    throttled = "454 4.7.0 Too many failed authentication attempts, try again later"
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)) == throttled
    reply = c.cmd("AUTH PLAIN " + plain("alice", PASSWORD))  # 4th attempt: the hard limit
    assert reply.startswith("421 4.7.0")
    assert c.closed()
    c = tls_client(srv)  # a new session from the same address is dropped at once
    assert c.cmd("AUTH LOGIN").startswith("421 4.7.0")
    assert c.closed()
    # Another client address is not affected.
    other = RawClient(srv.port, source="127.0.0.2")
    other.cmd("EHLO client.example")
    other.cmd("STARTTLS")
    other.starttls()
    other.cmd("EHLO client.example")
    assert other.cmd("AUTH PLAIN " + plain("alice", PASSWORD)).startswith("235")
    results = [e.fields["result"] for e in auth_events(srv)]
    assert results == ["invalid", "invalid", "throttled", "disconnect", "disconnect", "ok"]


def test_account_limit(start: Any) -> None:
    srv = start(users={"alice": PASSWORD, "bob": PASSWORD}, account_soft_limit=2)
    for i in range(2):
        c = tls_client(srv)
        assert c.cmd("AUTH PLAIN " + plain("Alice", f"bad-{i}")).startswith("535")
        c.close()
    c = tls_client(srv)
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORD)).startswith("454 4.7.0")
    assert c.cmd("AUTH PLAIN " + plain("bob", PASSWORD)).startswith("235")


# -- secrets ------------------------------------------------------------------------------------
def test_password_never_in_events(start: Any) -> None:
    srv = start()
    c = tls_client(srv)
    c.cmd("AUTH PLAIN " + plain("alice", PASSWORD))
    c.close()
    c = tls_client(srv)
    c.cmd("AUTH PLAIN " + plain("alice", PASSWORD + "-wrong"))
    c.cmd("AUTH LOGIN")
    c.cmd(b64("alice"))
    c.cmd(b64(PASSWORD))
    c.close()
    text = all_events(srv)
    assert "smtp.auth" in text
    for secret in (PASSWORD, plain("alice", PASSWORD), b64(PASSWORD)):
        assert secret not in text

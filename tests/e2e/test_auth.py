"""End to end: SMTP AUTH through the real gateway (SU-8).

Users are created with the ``mailwarden user`` CLI (password on standard input), then
smtplib and swaks authenticate on the submission listener (STARTTLS) and the implicit-TLS
listener; AUTH is never offered before TLS (530), nor on the MX listener. Disabling and
re-keying a user takes effect in the running gateway. Failed-auth throttling (454, 421).
LDAP through the gateway against a real slapd, including a stopped directory (454).
Afterwards the password is looked for in the events file, the gateway's output and every
CLI output: it must appear nowhere.
Security: loopback only; the gateway and slapd are real subprocesses started by the test.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import SWAKS
from tests.support.gateway import Gateway, client_tls_context
from tests.support.slapd import PEOPLE, SEARCH_DN, SEARCH_PASSWORD, Slapd, slapd_available
from tests.support.tmpdirs import poll

PASSWORD = "Gw-auth-pass-4821"
NEW_PASSWORD = "Gw-auth-pass-9377"
FAST = {
    "argon2": {"time_cost": 1, "memory_cost": 1024, "parallelism": 1},
    "failure_delay": 0,
}
MSG = b"From: alice@example.edu\r\nTo: bob@example.edu\r\nSubject: auth e2e\r\n\r\nhello\r\n"


def user_cli(gw: Gateway, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailwarden", "user", *args, "-c", str(gw.config_file)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=gw.workdir,
    )


def secrets_absent(gw: Gateway, outputs: list[str], *secrets: str) -> None:
    texts = [gw.events_file.read_text(errors="replace"), gw.output(), *outputs]
    for secret in secrets:
        for text in texts:
            assert secret not in text


def submission(gw: Gateway) -> smtplib.SMTP:
    c = gw.smtp(gw.submission_port)
    c.ehlo()
    return c


@pytest.fixture
def gateway(gateway_factory: Any) -> Gateway:
    gw: Gateway = gateway_factory(start=False, extra={"auth": dict(FAST)})
    return gw


def test_database_users_end_to_end(gateway: Gateway) -> None:
    outputs: list[str] = []
    add = user_cli(
        gateway,
        "add",
        "alice",
        "--address",
        "alice@example.edu",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    outputs += [add.stdout, add.stderr]
    assert add.returncode == 0, add.stderr
    dup = user_cli(gateway, "add", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    assert dup.returncode == 1
    short = user_cli(gateway, "add", "carol", "--password-stdin", stdin="short\n")
    assert short.returncode == 2
    listed = user_cli(gateway, "list", "--json")
    outputs.append(listed.stdout)
    [row] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["login"] == "alice" and row["addresses"] == ["alice@example.edu"]
    assert "hash" not in listed.stdout and "argon2" not in listed.stdout
    gateway.start()

    # Before TLS: not advertised, refused with 530 (SU-8).
    with submission(gateway) as c:
        assert not c.has_extn("auth")
        assert c.docmd("AUTH", "PLAIN")[0] == 530
    # The MX listener never offers AUTH, not even inside TLS.
    with gateway.smtp() as c:
        c.ehlo()
        c.starttls(context=client_tls_context())
        c.ehlo()
        assert not c.has_extn("auth")
        assert c.docmd("AUTH", "PLAIN")[0] == 503

    # Inside TLS: PLAIN and LOGIN succeed, the message is accepted as alice's.
    for mechanism in ("PLAIN", "LOGIN"):
        with submission(gateway) as c:
            c.starttls(context=client_tls_context())
            c.ehlo()
            assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
            c.user, c.password = "alice", PASSWORD
            auth = c.auth_plain if mechanism == "PLAIN" else c.auth_login
            assert c.auth(mechanism, auth, initial_response_ok=mechanism == "PLAIN")[0] == 235
            assert c.sendmail("alice@example.edu", ["bob@example.edu"], MSG) == {}
    msgs = gateway.wait_messages("bob@example.edu", 2)
    assert all(b"ESMTPSA" in m for m in msgs)

    # Implicit TLS listener.
    with gateway.smtp(implicit_tls=True) as c:
        c.ehlo()
        c.login("alice", PASSWORD)
    # Wrong password.
    with submission(gateway) as c:
        c.starttls(context=client_tls_context())
        c.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            c.login("alice", "not-the-password")
        assert err.value.smtp_code == 535

    # swaks interop (its own TLS and AUTH implementation).
    for mechanism in ("PLAIN", "LOGIN"):
        res = subprocess.run(
            [
                SWAKS,
                "--server",
                f"127.0.0.1:{gateway.submission_port}",
                "--tls",
                "--auth",
                mechanism,
                "--auth-user",
                "alice",
                "--auth-password",
                PASSWORD,
                "--from",
                "alice@example.edu",
                "--to",
                "bob@example.edu",
                "--helo",
                "client.test",
                "--timeout",
                "60",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert "235 2.7.0 Authentication successful" in res.stdout
    gateway.wait_messages("bob@example.edu", 4)

    # Disable, enable and re-key take effect in the running gateway.
    assert user_cli(gateway, "disable", "alice").returncode == 0
    with gateway.smtp(implicit_tls=True) as c:
        c.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("alice", PASSWORD)
    assert user_cli(gateway, "enable", "alice").returncode == 0
    pw = user_cli(gateway, "passwd", "alice", "--password-stdin", stdin=NEW_PASSWORD + "\n")
    outputs += [pw.stdout, pw.stderr]
    assert pw.returncode == 0, pw.stderr
    assert user_cli(gateway, "passwd", "nobody", "--password-stdin", stdin="x" * 9).returncode == 3
    with gateway.smtp(implicit_tls=True) as c:
        c.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("alice", PASSWORD)
    with gateway.smtp(implicit_tls=True) as c:
        c.ehlo()
        c.login("alice", NEW_PASSWORD)

    results = [(e["user"], e["mechanism"], e["result"]) for e in gateway.events("smtp.auth")]
    assert results.count(("alice", "PLAIN", "ok")) >= 3
    assert ("alice", "LOGIN", "ok") in results
    assert ("alice", "PLAIN", "invalid") in results or ("alice", "LOGIN", "invalid") in results
    assert [e["event"] for e in gateway.events("user.")] == [
        "user.add",
        "user.disable",
        "user.enable",
        "user.passwd",
    ]
    secrets_absent(gateway, outputs, PASSWORD, NEW_PASSWORD)


def test_throttling_end_to_end(gateway_factory: Any) -> None:
    auth = dict(FAST) | {"client_soft_limit": 2, "client_hard_limit": 4}
    gateway: Gateway = gateway_factory(start=False, extra={"auth": auth})
    assert (
        user_cli(gateway, "add", "alice", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    )
    gateway.start()
    for attempt in range(2):
        with gateway.smtp(implicit_tls=True) as c:
            c.ehlo()
            assert c.docmd("AUTH", "PLAIN " + _plain("alice", f"wrong-{attempt}"))[0] == 535
    c = gateway.smtp(implicit_tls=True)
    c.ehlo()
    code, text = c.docmd("AUTH", "PLAIN " + _plain("alice", PASSWORD))
    assert (code, text[:5]) == (454, b"4.7.0")  # the right password, not even checked
    code, _ = c.docmd("AUTH", "PLAIN " + _plain("alice", PASSWORD))
    assert code == 421  # the hard limit
    with pytest.raises(smtplib.SMTPServerDisconnected):
        c.noop()  # disconnected
    c.close()
    # The gateway writes the last event after the client has seen the disconnect: wait for it.
    poll(lambda: len(gateway.events("smtp.auth")) >= 4, 30, what="four smtp.auth events")
    results = [e["result"] for e in gateway.events("smtp.auth")]
    assert results == ["invalid", "invalid", "throttled", "disconnect"]
    assert gateway.events("smtp.auth")[0]["client"] == "127.0.0.1"
    secrets_absent(gateway, [], PASSWORD)


def _plain(login: str, password: str) -> str:
    import base64

    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


@pytest.mark.skipif(not slapd_available(), reason="slapd is not installed")
def test_ldap_backend_end_to_end(gateway_factory: Any, tmp_path: Path) -> None:
    directory = Slapd(tmp_path / "ldap", {"dave": PASSWORD})
    directory.start()
    try:
        secret = tmp_path / "ldap-search-password"
        secret.write_text(SEARCH_PASSWORD + "\n")
        auth = dict(FAST) | {
            "backend": "ldap",
            "ldap": {
                "url": directory.url,
                "base": PEOPLE,
                "bind_dn": SEARCH_DN,
                "bind_password_file": str(secret),
                "timeout": "3s",
            },
        }
        gateway: Gateway = gateway_factory(extra={"auth": auth})
        with gateway.smtp(implicit_tls=True) as c:
            c.ehlo()
            c.login("dave", PASSWORD)
        with gateway.smtp(implicit_tls=True) as c:
            c.ehlo()
            # A filter-injection login with a real password matches nobody.
            assert c.docmd("AUTH", "PLAIN " + _plain("*)(uid=*", PASSWORD))[0] == 535
        directory.stop()
        with gateway.smtp(implicit_tls=True) as c:
            c.ehlo()
            code, text = c.docmd("AUTH", "PLAIN " + _plain("dave", PASSWORD))
            assert (code, text) == (454, b"4.7.0 Temporary authentication failure")
        results = [(e["user"], e["result"]) for e in gateway.events("smtp.auth")]
        assert results == [("dave", "ok"), ("*)(uid=*", "invalid"), ("dave", "tempfail")]
        secrets_absent(gateway, [], PASSWORD, SEARCH_PASSWORD)
    finally:
        directory.stop()

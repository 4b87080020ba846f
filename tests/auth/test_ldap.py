"""The LDAP backend against a real slapd on loopback: search the DN with an escaped filter,
bind as it; injection attempts refused; a stopped directory is a tempfail (454 over SMTP)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailwarden.auth.base import AuthResult
from mailwarden.auth.ldap import LdapAuthenticator
from mailwarden.auth.service import AuthService
from mailwarden.auth.settings import LdapSettings
from mailwarden.smtp.tls import ensure_certificate
from tests.auth.helpers import auth_settings, plain, store_config
from tests.smtp.harness import RawClient, Running, client_context
from tests.support.slapd import PEOPLE, SEARCH_DN, SEARCH_PASSWORD, Slapd, slapd_available

ALICE_PW = "Alice-ldap-pass-1"
pytestmark = pytest.mark.skipif(not slapd_available(), reason="slapd is not installed")


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[Slapd]:
    d = Slapd(tmp_path / "ldap", {"alice": ALICE_PW, "bob": "Bob-ldap-pass-1", "carol": "x1"})
    d.start()
    yield d
    d.stop()


def backend(d: Slapd, **kw: Any) -> LdapAuthenticator:
    settings = LdapSettings(url=d.url, base=PEOPLE, bind_dn=SEARCH_DN, timeout=3.0, **kw)
    return LdapAuthenticator(settings, SEARCH_PASSWORD)


def check(b: LdapAuthenticator, login: str, password: str) -> AuthResult:
    return asyncio.run(b.authenticate(login, password))


def test_success_wrong_password_unknown_user(slapd: Slapd) -> None:
    b = backend(slapd)
    try:
        assert check(b, "alice", ALICE_PW) is AuthResult.OK
        assert check(b, "alice", "wrong-password") is AuthResult.INVALID
        assert check(b, "nobody", ALICE_PW) is AuthResult.INVALID
        assert check(b, "alice", "") is AuthResult.INVALID  # no unauthenticated bind
    finally:
        b.close()


@pytest.mark.parametrize(
    "login",
    [
        "*)(uid=*",  # the classic: turns (uid=X) into (uid=*)(uid=*)
        "*",
        "al*",
        "alice)(|(uid=*",
        "*)(userPassword=*",
        "alice\\",
        "uid=alice,ou=people,dc=example,dc=edu",  # a DN is not a login
    ],
)
def test_filter_injection_refused(slapd: Slapd, login: str) -> None:
    b = backend(slapd)
    try:
        # Even with a real user's password, a crafted login never matches anyone.
        assert check(b, login, ALICE_PW) is AuthResult.INVALID
    finally:
        b.close()


def test_anonymous_search_refused_by_directory_is_tempfail(slapd: Slapd) -> None:
    # This directory lets only the service account search: without it the backend
    # cannot decide, which is a tempfail, never a success.
    b = LdapAuthenticator(LdapSettings(url=slapd.url, base=PEOPLE, timeout=3.0))
    try:
        result = check(b, "alice", ALICE_PW)
    finally:
        b.close()
    assert result is AuthResult.TEMPFAIL


def test_wrong_service_password_is_tempfail(slapd: Slapd) -> None:
    settings = LdapSettings(url=slapd.url, base=PEOPLE, bind_dn=SEARCH_DN, timeout=3.0)
    b = LdapAuthenticator(settings, "not-the-service-password")
    try:
        assert check(b, "alice", ALICE_PW) is AuthResult.TEMPFAIL
    finally:
        b.close()


def test_stopped_directory_is_tempfail(slapd: Slapd) -> None:
    b = backend(slapd)
    try:
        assert check(b, "alice", ALICE_PW) is AuthResult.OK
        slapd.stop()
        assert check(b, "alice", ALICE_PW) is AuthResult.TEMPFAIL
        slapd.start()
        assert check(b, "alice", ALICE_PW) is AuthResult.OK
    finally:
        b.close()


def test_smtp_auth_with_ldap_backend(slapd: Slapd, tmp_path: Path) -> None:
    cfg = store_config(tmp_path)
    ensure_certificate(cfg.cert_path, cfg.key_path, cfg.gateway.hostname)
    b = backend(slapd)
    srv = Running(cfg, tls="implicit", submission=True, auth=AuthService(auth_settings(), b))
    try:
        c = RawClient(srv.port, greet=False)
        c.sock = client_context().wrap_socket(c.sock, server_hostname="mx.test.example")
        assert c.reply().startswith("220")
        assert "AUTH PLAIN LOGIN" in c.cmd("EHLO client.example")
        assert c.cmd("AUTH PLAIN " + plain("alice", "wrong-password")).startswith("535 5.7.8")
        assert c.cmd("AUTH PLAIN " + plain("*)(uid=*", ALICE_PW)).startswith("535 5.7.8")
        slapd.stop()
        assert c.cmd("AUTH PLAIN " + plain("alice", ALICE_PW)) == (
            "454 4.7.0 Temporary authentication failure"
        )
        slapd.start()
        assert c.cmd("AUTH PLAIN " + plain("alice", ALICE_PW)).startswith("235 2.7.0")
        results = [(e.fields["user"], e.fields["result"]) for e in srv.named("smtp.auth")]
        assert results == [
            ("alice", "invalid"),
            ("*)(uid=*", "invalid"),
            ("alice", "tempfail"),
            ("alice", "ok"),
        ]
        text = "\n".join(str(e.to_json()) for e in srv.events.events)
        assert ALICE_PW not in text and SEARCH_PASSWORD not in text
    finally:
        srv.stop()
        b.close()

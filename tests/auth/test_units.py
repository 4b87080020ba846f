"""Units of the AUTH backends: settings validation, the sliding-window counter, the throttle,
argon2 re-hash on login, disabled users, login escaping, the service's fail-closed rules."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mailwarden.auth.base import AuthResult, escape_login
from mailwarden.auth.passwords import Hasher
from mailwarden.auth.service import AuthService, Outcome
from mailwarden.auth.settings import Argon2Settings, AuthSettings, LdapSettings
from mailwarden.auth.throttle import AuthThrottle, MemoryWindowCounter, ThrottleVerdict
from mailwarden.store import users as user_table
from tests.auth.helpers import (
    FAST_ARGON2,
    DictBackend,
    auth_settings,
    database_service,
    store_config,
    user_store,
)


@pytest.mark.parametrize(
    "kw",
    [
        {"url": "ldap://ldap.example.edu/"},  # clear-text passwords over the network (SU-8)
        {"url": "ldap://10.0.0.5:389/"},
        {"url": "http://ldap.example.edu/"},
        {"url": "ldaps://ldap.example.edu/", "filter": "(uid=%s)"},
        {"url": "ldaps://ldap.example.edu/", "filter": "(uid={login}){0}"},
        {"url": "ldaps://ldap.example.edu/", "filter": "uid={login}"},
    ],
)
def test_ldap_settings_refused(kw: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        LdapSettings.model_validate(kw)


def test_ldap_settings_accepted() -> None:
    assert LdapSettings(url="ldap://127.0.0.1:3890/").port == 3890
    assert LdapSettings(url="ldap://ldap.example.edu/", start_tls=True).port == 389
    s = LdapSettings(url="ldaps://ldap.example.edu/", filter="(&(uid={login})(mail=*))")
    assert s.use_ssl and s.port == 636
    assert s.make_filter("a\\2a") == "(&(uid=a\\2a)(mail=*))"


def test_auth_settings_cross_checks() -> None:
    with pytest.raises(ValidationError):
        AuthSettings(client_soft_limit=10, client_hard_limit=5)
    with pytest.raises(ValidationError):
        AuthSettings(backend="ldap")  # needs url and base


def test_sliding_window_counter() -> None:
    now = [1000.0]
    c = MemoryWindowCounter(clock=lambda: now[0])

    async def run() -> list[int]:
        out = [await c.add("k", 60), await c.add("k", 60)]
        now[0] += 30
        out.append(await c.add("k", 60))
        now[0] += 31  # the first two are now older than the window
        out.append(await c.count("k", 60))
        now[0] += 60
        out.append(await c.count("k", 60))
        return out

    assert asyncio.run(run()) == [1, 2, 3, 1, 0]
    assert len(c) == 0  # empty keys are dropped


def test_throttle_verdicts() -> None:
    s = auth_settings(client_soft_limit=2, client_hard_limit=3, account_soft_limit=5)
    t = AuthThrottle(s)

    async def run() -> list[object]:
        out: list[object] = [await t.check("192.0.2.1", "alice")]
        await t.failed("192.0.2.1", "alice")
        out.append(await t.check("192.0.2.1", "alice"))
        out.append(await t.failed("192.0.2.1", "alice"))  # 2: soft limit reached
        out.append(await t.check("192.0.2.1", None))
        out.append(await t.refused("192.0.2.1"))  # 3: hard limit
        out.append(await t.check("192.0.2.1", None))
        out.append(await t.check("192.0.2.2", "alice"))  # other address, same login
        return out

    assert asyncio.run(run()) == [
        ThrottleVerdict.ALLOW,
        ThrottleVerdict.ALLOW,
        False,
        ThrottleVerdict.TEMPFAIL,
        True,
        ThrottleVerdict.DISCONNECT,
        ThrottleVerdict.ALLOW,
    ]


def test_escape_login() -> None:
    assert escape_login("alice") == "alice"
    assert escape_login("a\r\nb\x00") == "a\\r\\nb\\x00"
    assert escape_login("x" * 400).endswith("...")


def test_database_backend_rehash_and_disabled(tmp_path: Path, db_url: str) -> None:
    cfg = store_config(tmp_path, db_url)
    store = user_store(cfg, {"alice": "pw-alice-1", "bob": "pw-bob-1"}, disabled=("bob",))
    old_hash = user_table.get_user(store, "alice").password_hash  # type: ignore[union-attr]
    svc = database_service(cfg, store)

    async def run() -> list[AuthResult]:
        b = svc.backend
        return [
            await b.authenticate("alice", "pw-alice-1"),
            await b.authenticate("ALICE ", "pw-alice-1"),  # logins are case-insensitive
            await b.authenticate("alice", "pw-alice-2"),
            await b.authenticate("bob", "pw-bob-1"),
            await b.authenticate("nobody", "pw-alice-1"),
            await b.authenticate("alice", ""),
        ]

    try:
        assert asyncio.run(run()) == [
            AuthResult.OK,
            AuthResult.OK,
            AuthResult.INVALID,
            AuthResult.INVALID,
            AuthResult.INVALID,
            AuthResult.INVALID,
        ]
        assert user_table.get_user(store, "alice").password_hash == old_hash  # type: ignore[union-attr]
        # New parameters: the next successful login re-hashes with them.
        stronger = Argon2Settings(**(FAST_ARGON2 | {"time_cost": 2}))
        svc2 = AuthService(svc.settings, type(svc.backend)(store, Hasher(stronger)))  # type: ignore[call-arg]
        assert asyncio.run(svc2.backend.authenticate("alice", "pw-alice-1")) is AuthResult.OK
        new_hash = user_table.get_user(store, "alice").password_hash  # type: ignore[union-attr]
        assert new_hash != old_hash and "$argon2id$" in new_hash and ",t=2," in new_hash
        assert Hasher(stronger).verify(new_hash, "pw-alice-1") == (True, None)
    finally:
        svc.close()


def test_database_down_is_tempfail(tmp_path: Path) -> None:
    cfg = store_config(tmp_path)
    store = user_store(cfg, {"alice": "pw-alice-1"})
    svc = database_service(cfg, store)
    store.engine.dispose()
    (tmp_path / "var" / "mailwarden.db").unlink()
    (tmp_path / "var" / "mailwarden.db").mkdir()  # the database file is gone: cannot open
    try:
        result = asyncio.run(svc.attempt("192.0.2.1", "alice", "pw-alice-1"))
        assert result.outcome is Outcome.TEMPFAIL
    finally:
        svc.close()


def test_postgresql_down_is_tempfail_and_recovers(tmp_path: Path, pg_database: Any) -> None:
    pg_database.reset()
    cfg = store_config(tmp_path, pg_database.url)
    svc = database_service(cfg, user_store(cfg, {"alice": "pw-alice-1"}))
    try:
        pg_database.refuse_connections()
        try:
            result = asyncio.run(svc.attempt("192.0.2.1", "alice", "pw-alice-1"))
            assert result.outcome is Outcome.TEMPFAIL
        finally:
            pg_database.allow_connections()
        result = asyncio.run(svc.attempt("192.0.2.1", "alice", "pw-alice-1"))
        assert result.outcome is Outcome.OK
    finally:
        svc.close()


def test_service_fails_closed() -> None:
    backend = DictBackend({"alice": "pw"})
    svc = AuthService(auth_settings(), backend)

    class Weird:
        name = "weird"

        async def authenticate(self, login: str, password: str) -> object:
            return "yes"  # not an AuthResult: never a success

    backend.fail = OSError("down")
    assert asyncio.run(svc.attempt("192.0.2.1", "alice", "pw")).outcome is Outcome.TEMPFAIL
    weird = AuthService(auth_settings(), Weird())  # type: ignore[arg-type]
    assert asyncio.run(weird.attempt("192.0.2.1", "alice", "pw")).outcome is Outcome.TEMPFAIL


def test_shared_counters_adapter_over_policy_counters() -> None:
    from mailwarden.auth.throttle import SharedCounters
    from mailwarden.policy.counters import MemoryCounters

    t = AuthThrottle(
        auth_settings(client_soft_limit=1, client_hard_limit=2), SharedCounters(MemoryCounters())
    )

    async def run() -> list[object]:
        return [
            await t.check("192.0.2.9", "alice"),
            await t.failed("192.0.2.9", "alice"),
            await t.check("192.0.2.9", "alice"),
            await t.refused("192.0.2.9"),
            await t.check("192.0.2.9", None),
        ]

    assert asyncio.run(run()) == [
        ThrottleVerdict.ALLOW,
        False,
        ThrottleVerdict.TEMPFAIL,
        True,
        ThrottleVerdict.DISCONNECT,
    ]

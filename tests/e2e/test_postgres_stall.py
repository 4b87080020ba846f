"""End to end: SMTP AUTH while the PostgreSQL server stops answering in the middle of a session.

A server that is connected and acknowledges what it is sent but never answers (a hung
backend, a proxy that stopped forwarding) cannot be made with the real PostgreSQL, so the
fault is injected: ``tests.support.pgfault.PgBlackhole`` is the gateway's database
host:port, passing everything to the real server (its Unix socket) until the test stalls
the path. ``[database] call_timeout`` is short and ``[auth] timeout`` long, longer than the
client's own timeout: an AUTH that waited for the database (or for ``[auth] timeout``)
would make the client give up and the test fail. No duration is asserted.

The gateway (one worker) on PostgreSQL: alice authenticates (``235``); the path stalls;
AUTH answers ``454 4.7.0`` while the query is still held (events ``store.call_timeout`` and
``auth.error`` with ``StoreTimeout``), the query's connection is interrupted and its thread
is back while the path still stalls (``store.call_interrupted``, ``store.call_returned``),
the policy reports the outage from its refresh and keeps deciding from its caches; the path
flows again: the policy recovers and AUTH succeeds again, without a restart.
The URL's password and alice's are never printed.

Security: the gateway and the injector listen on 127.0.0.1 only; PostgreSQL is reached
over its Unix socket; the test database is dropped afterwards.
"""

from __future__ import annotations

from typing import Any

from tests.e2e.test_auth import FAST, PASSWORD, user_cli
from tests.e2e.test_postgres import POLICY, auth_reply
from tests.support.gateway import Gateway
from tests.support.pgfault import PgBlackhole
from tests.support.postgres import PgDatabase
from tests.support.tmpdirs import poll

URL_PASSWORD = "Db-pass-7204"  # trust authentication ignores it; it must never be printed
CLIENT_TIMEOUT = 30  # seconds the client waits for a reply: a hang is a test failure
DATABASE = {"call_timeout": "1s"}
AUTH = dict(FAST) | {"timeout": "90s"}  # longer than the client waits: not what answers


def auth_code(gw: Gateway) -> int:
    """AUTH PLAIN as alice (the session is closed again): the reply code."""
    code, c = auth_reply(gw, PASSWORD, timeout=CLIENT_TIMEOUT)
    if c is not None:
        c.quit()
    return code


def gateway_behind(
    path: PgBlackhole, gateway_factory: Any, pg_database: PgDatabase, database: dict[str, str]
) -> tuple[Gateway, list[str]]:
    """A one-worker gateway (not started) whose database URL (with a password) goes through
    ``path``, and user alice added with the CLI; returns it and the CLI's output (checked
    later for the password)."""
    url = path.url(pg_database.role, pg_database.name, URL_PASSWORD)
    gw: Gateway = gateway_factory(
        start=False,
        workers=1,
        extra={"database": {"url": url} | database, "policy": POLICY, "auth": AUTH},
    )
    add = user_cli(
        gw, "add", "alice", "--address", "alice@example.edu", "--password-stdin",
        stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert add.returncode == 0, add.stderr
    return gw, [add.stdout, add.stderr]


def test_auth_answers_454_while_the_database_stalls(
    gateway_factory: Any, pg_database: PgDatabase
) -> None:
    pg_database.reset()
    with PgBlackhole() as path:
        path.pass_through()
        gw, outputs = gateway_behind(path, gateway_factory, pg_database, DATABASE)
        gw.start()
        assert auth_code(gw) == 235  # connected: the session is established

        path.stall()  # from now on the server's side of the path says nothing
        try:
            assert auth_code(gw) == 454
            assert path.stalled() >= 1  # answered while the query was still held
            [timeout] = [e for e in gw.events("store.call_timeout") if e["function"] == "get_user"]
            assert timeout["timeout"] == 1.0 and timeout["started"] is True
            errors = [e["error"] for e in gw.events("auth.error")]
            assert errors == ["StoreTimeout"], errors
            down = gw.wait_event(
                lambda e: e.get("event") == "policy.store_unavailable",
                what="the policy's refresh to report the outage",
            )
            assert "no answer from the database" in down["error"]
            # Its connection interrupted, the AUTH query's thread is back, the path still stalled.
            gw.wait_event(
                lambda e: e.get("event") == "store.call_returned" and e["function"] == "get_user",
                what="the held AUTH query's thread to come back",
            )
            interrupted = gw.events("store.call_interrupted")
            assert [e["connections"] for e in interrupted if e["function"] == "get_user"] == [1]
            assert path.stalled() >= 1
        finally:
            path.pass_through()

        gw.wait_event(
            lambda e: e.get("event") == "policy.store_recovered", what="the policy to recover"
        )
        poll(lambda: auth_code(gw) == 235, 120, what="AUTH to succeed again")
        gw.stop()

    texts = [gw.events_file.read_text(errors="replace"), gw.output(), *outputs]
    for text in texts:
        assert URL_PASSWORD not in text and PASSWORD not in text

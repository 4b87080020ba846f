"""End to end: the gateway starts while the path to PostgreSQL stalls just after the login.

The injector (``tests.support.pgfault.PgBlackhole``, the gateway's database host:port) lets
every connection log in and then forwards nothing more (``stall(after_login=True)``): a
server or proxy that accepts and stops answering. No timeout of libpq's or the server's
fires then; only ``[database] open_timeout`` (short here) ends an open. ``[auth] timeout``
is longer than the client waits: an AUTH that waited for the open would make the client give
up and the test fail. No duration is asserted.

The gateway (one worker) starts degraded: the banner says the database is UNAVAILABLE (its
first open, in the start-up check, ran out of time), the worker's own open times out too
(``store.open_timeout``, ``store.call_interrupted``, ``policy.store_unavailable``), AUTH
answers ``454 4.7.0`` (the AUTH backend's open times out in turn), ``mailwarden status`` and
``mailwarden user list`` each end with one line. Then the stalled flows stay dead for good
while new connections get through (a lost NAT entry, a failover): only a new attempt can
succeed, so the worker's recovery (``policy.store_recovered``, AUTH ``235``) shows its
background retry kept going after the timeouts. The URL's password and alice's are never
printed.

Security: the gateway and the injector listen on 127.0.0.1 only; PostgreSQL is reached
over its Unix socket; the test database is dropped afterwards.
"""

from __future__ import annotations

from typing import Any

from tests.e2e.test_auth import PASSWORD, user_cli
from tests.e2e.test_postgres_stall import URL_PASSWORD, auth_code, gateway_behind
from tests.support.pgfault import PgBlackhole
from tests.support.postgres import PgDatabase
from tests.support.tmpdirs import poll

OPEN_TIMEOUT = "1s"
# start_wait longer than open_timeout: the start-up check answers "unavailable" itself.
DATABASE = {"open_timeout": OPEN_TIMEOUT, "call_timeout": "1s", "start_wait": "10s"}


def test_a_worker_whose_open_stalls_retries_until_the_database_answers(
    gateway_factory: Any, pg_database: PgDatabase
) -> None:
    pg_database.reset()
    with PgBlackhole() as path:
        path.pass_through()  # the set-up (schema, alice) goes through it
        gw, outputs = gateway_behind(path, gateway_factory, pg_database, DATABASE)

        path.stall(after_login=True)  # connections log in, then nothing more is answered
        gw.start()
        assert "database   UNAVAILABLE:" in gw.output()
        assert f"no answer within {OPEN_TIMEOUT.rstrip('s')} s" in gw.output()
        opened = gw.wait_event(
            lambda e: e.get("event") == "store.open_timeout", what="the worker's open to time out"
        )
        assert opened["function"] == "open_store" and opened["timeout"] == 1.0
        down = gw.wait_event(
            lambda e: e.get("event") == "policy.store_unavailable", what="the outage event"
        )
        assert down["since_start"] is True and "no answer within" in down["error"]
        interrupted = gw.events("store.call_interrupted")
        assert interrupted and {e["function"] for e in interrupted} == {"open_store"}

        assert auth_code(gw) == 454  # the AUTH backend's own open ran out of time
        errors = gw.events("auth.error")
        assert {"error": "StoreUnavailable", "step": "open"}.items() <= errors[0].items()

        status = gw.cli("status", check=False)
        assert status.returncode == 1 and "UNAVAILABLE: no answer within" in status.stdout
        listed = user_cli(gw, "list")
        assert listed.returncode == 1
        assert listed.stderr.count("\n") == 1 and "cannot reach the database" in listed.stderr
        outputs += [status.stdout, status.stderr, listed.stdout, listed.stderr]

        # The flows held so far stay dead; new connections get through.
        path.stall(existing_only=True)
        gw.wait_event(
            lambda e: e.get("event") == "policy.store_recovered", what="the policy to recover"
        )
        poll(lambda: auth_code(gw) == 235, 120, what="AUTH to succeed again")
        assert path.stalled() >= 1  # the timed-out opens' statements, never answered
        gw.stop()

    texts = [gw.events_file.read_text(errors="replace"), gw.output(), *outputs]
    for text in texts:
        assert URL_PASSWORD not in text and PASSWORD not in text

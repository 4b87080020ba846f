"""End to end: the gateway starts while its PostgreSQL server does not answer at all.

A server behind a firewall that drops packets cannot be made with the real PostgreSQL, so
the fault is injected: ``tests.support.pgfault.PgBlackhole`` is the gateway's database
host:port; it accepts connections and never answers, until the test lets them through to
the real server (its Unix socket). The URL sets ``connect_timeout=600``: each worker's
first connection attempt stays pending until then, so the assertions are about order and
state (answers given while that attempt is still held), never about durations.

The gateway (two workers) starts with the server silent: every listener greets, the banner
says the database is NOT ANSWERING, and while the workers' first attempts are held a
registered server's relay is ``451 4.3.0``, AUTH ``454 4.7.0``, inbound mail to a
static-directory domain is delivered, and each worker has reported one
``policy.store_unavailable`` (``pending``). Then the injector passes the held attempts on:
each worker reports ``policy.store_recovered`` from that same attempt, the relay is
accepted and AUTH succeeds, without a restart. The URL's password is never printed.

Security: the gateway and the injector listen on 127.0.0.1 only; PostgreSQL is reached
over its Unix socket; the test database is dropped afterwards.
"""

from __future__ import annotations

from typing import Any

from tests.e2e.test_auth import FAST, PASSWORD, user_cli
from tests.e2e.test_postgres import DAVE, LAB, POLICY, auth_reply, message, rcpt_reply
from tests.support.pgfault import PgBlackhole
from tests.support.postgres import PgDatabase
from tests.support.tmpdirs import poll

URL_PASSWORD = "Db-pass-6620"  # trust authentication ignores it; it must never be printed
WORKERS = 2


def test_gateway_listens_while_the_database_is_silent(
    gateway_factory: Any, pg_database: PgDatabase
) -> None:
    pg_database.reset()
    policy = POLICY | {"default_directory": "static", "recipients": ["bob@example.edu"]}
    with PgBlackhole() as hole:
        hole.pass_through()  # the set-up goes through it, as the gateway's will
        url = hole.url(pg_database.role, pg_database.name, URL_PASSWORD, "connect_timeout=600")
        gw = gateway_factory(
            start=False,
            workers=WORKERS,
            extra={
                "database": {"url": url},
                "policy": policy,
                "auth": dict(FAST) | {"timeout": "3s"},
            },
        )
        add = user_cli(
            gw, "add", "alice", "--address", "alice@example.edu", "--password-stdin",
            stdin=PASSWORD + "\n",
        )  # fmt: skip
        assert add.returncode == 0, add.stderr
        res = gw.cli("senders", "add", LAB, "--name", "lab", "--domain", "lab.example.edu")
        outputs = [add.stdout, add.stderr, res.stdout, res.stderr]

        hole.hole()
        gw.start()  # returns once every listener has greeted
        assert "database   NOT ANSWERING" in gw.output(), gw.output()
        poll(lambda: hole.held() >= WORKERS, 60, what="each worker's first attempt to be held")

        assert rcpt_reply(gw, LAB, "list@lab.example.edu").startswith("451 4.3.0")
        assert auth_reply(gw)[0] == 454
        assert gw.send("x@outside.test", ["bob@example.edu"], message(DAVE, "inbound")) == {}
        assert gw.wait_messages("bob@example.edu", 1)
        # All of that was answered while the workers' first attempts were still pending.
        assert hole.held() >= WORKERS
        assert gw.events("policy.store_recovered") == []
        down = gw.events("policy.store_unavailable")
        assert len(down) == WORKERS and all(e["pending"] for e in down), down
        assert all("still connecting" in e["error"] for e in down), down

        hole.pass_through()  # the server is reachable: the held attempts complete
        poll(
            lambda: len(gw.events("policy.store_recovered")) >= WORKERS,
            120,
            what="both workers to report policy.store_recovered",
        )
        assert rcpt_reply(gw, LAB, "list@lab.example.edu").startswith("250")
        poll(lambda: auth_reply(gw)[0] == 235, 120, what="AUTH to reach its database")
        code, c = auth_reply(gw)
        assert code == 235 and c is not None
        c.quit()
        assert len(gw.events("policy.store_unavailable")) == WORKERS  # one outage each
        status = gw.cli("status", check=False)
        outputs += [status.stdout, status.stderr]
        assert status.returncode == 0 and ": ok" in status.stdout, status.stdout
        gw.stop()

    texts = [gw.events_file.read_text(errors="replace"), gw.output(), *outputs]
    for text in texts:
        assert URL_PASSWORD not in text and PASSWORD not in text

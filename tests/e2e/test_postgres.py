"""End to end on PostgreSQL: the real gateway (two workers) with ``[database] url`` pointing
at a fresh PostgreSQL database (over its Unix socket, as an unprivileged role).

A campus server registered with ``mailwarden senders add`` while the gateway runs relays
mail out through it to a private Postfix (the outside world, as the smarthost); a user made
with ``mailwarden user add`` authenticates with SMTP AUTH on the submission listener and
sends out too. Then the database goes away for real (its sessions terminated and new ones
refused): AUTH answers ``454 4.7.0`` while relaying for the registered server goes on from
the policy's cache; connections killed by the server (``pg_terminate_backend``) are
replaced without a client noticing; once the database is back AUTH succeeds again and a
sender registered meanwhile is picked up. The database password of the URL never shows in
the events or the gateway's output.

Security: the gateway and Postfix listen on 127.0.0.1 only; PostgreSQL is reached over its
Unix socket; the test database is dropped afterwards.
"""

from __future__ import annotations

import smtplib
from typing import Any

from tests.e2e.test_auth import FAST, PASSWORD, user_cli
from tests.support.gateway import Gateway, client_tls_context
from tests.support.ports import LOOPBACK
from tests.support.postgres import PgDatabase
from tests.support.tmpdirs import poll

OUTSIDE = "outside.test"
DAVE = f"dave@{OUTSIDE}"
LAB = "127.0.0.70"
LAB2 = "127.0.0.71"
POLICY = {"campus_networks": ["127.0.0.1/32", "127.0.0.64/26"], "registry_refresh": 0.2}
URL_PASSWORD = "Db-pass-5531"  # trust authentication ignores it; it must never be printed


def message(sender: str, subject: str) -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{DAVE}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@campus.test>\r\n"
        "Date: Mon, 06 May 2024 10:00:00 +0000\r\n\r\nhello from campus\r\n"
    ).encode()


def rcpt_reply(gw: Gateway, source: str, sender: str) -> str:
    with smtplib.SMTP(
        LOOPBACK,
        gw.smtp_port,
        local_hostname="mail.lab.test",
        timeout=60,
        source_address=(source, 0),
    ) as c:
        c.ehlo()
        c.mail(sender)
        code, text = c.rcpt(DAVE)
        return f"{code} {text.decode(errors='replace')}"


def relayed(gw: Gateway, source: str, sender: str, subject: str) -> bool:
    """``relay``, or False if the worker that took the connection does not know the
    server as registered yet (nothing was sent then)."""
    try:
        relay(gw, source, sender, subject)
    except smtplib.SMTPRecipientsRefused as exc:
        [(code, text)] = exc.recipients.values()
        assert code == 554 and b"not a registered" in text, exc.recipients
        return False
    return True


def relay(gw: Gateway, source: str, sender: str, subject: str) -> None:
    with smtplib.SMTP(
        LOOPBACK,
        gw.smtp_port,
        local_hostname="mail.lab.test",
        timeout=60,
        source_address=(source, 0),
    ) as c:
        c.ehlo()
        assert c.sendmail(sender, [DAVE], message(sender, subject)) == {}


def auth_reply(
    gw: Gateway, password: str = PASSWORD, timeout: float = 60
) -> tuple[int, smtplib.SMTP | None]:
    """AUTH PLAIN as alice on the submission listener after STARTTLS: (code, the session
    if it succeeded, for sending). ``timeout`` bounds every reply the client waits for."""
    c = gw.smtp(gw.submission_port, timeout=timeout)
    c.ehlo()
    c.starttls(context=client_tls_context())
    c.ehlo()
    c.user, c.password = "alice", password
    try:
        code, _ = c.auth("PLAIN", c.auth_plain)
    except smtplib.SMTPAuthenticationError as exc:
        c.quit()
        return exc.smtp_code, None
    return code, c


def _gateway_with_alice(
    gateway_factory: Any, postfix_factory: Any, pg_database: PgDatabase, policy: dict[str, Any]
) -> tuple[Gateway, Any, list[str]]:
    """A fresh database, Postfix as the smarthost, a two-worker gateway (not started) on
    PostgreSQL with a password in its URL, and user alice added with the CLI; returns the
    gateway, the Postfix and the CLI output so far (checked later for secrets)."""
    pg_database.reset()
    outside = postfix_factory.downstream([OUTSIDE], [DAVE])
    url = pg_database.url.replace(f"//{pg_database.role}@", f"//{pg_database.role}:{URL_PASSWORD}@")
    gw: Gateway = gateway_factory(
        start=False,
        workers=2,
        delivery={"smarthost": f"{LOOPBACK}:{outside.port}"},
        extra={"database": {"url": url}, "policy": policy, "auth": dict(FAST)},
    )
    add = user_cli(
        gw, "add", "alice", "--address", "alice@example.edu", "--password-stdin",
        stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert add.returncode == 0, add.stderr
    return gw, outside, [add.stdout, add.stderr]


def test_gateway_on_postgresql(
    gateway_factory: Any, postfix_factory: Any, pg_database: PgDatabase
) -> None:
    gw, outside, outputs = _gateway_with_alice(
        gateway_factory, postfix_factory, pg_database, POLICY
    )
    gw.start()
    assert f"{pg_database.role}:***@/{pg_database.name}" in gw.output()
    assert pg_database.sessions("mailwarden")  # the workers really use PostgreSQL

    # Not registered yet: SU-1 refusal. Registered with the CLI: relays within the refresh.
    assert "not a registered" in rcpt_reply(gw, LAB, "list@lab.example.edu")
    res = gw.cli("senders", "add", LAB, "--name", "lab", "--domain", "lab.example.edu")
    outputs += [res.stdout, res.stderr]
    # Each worker refreshes on its own; a connection may reach the one that has not yet.
    poll(
        lambda: relayed(gw, LAB, "list@lab.example.edu", "relayed by the lab"),
        30,
        what="the registration to reach the workers",
    )

    # SMTP AUTH against the users table in PostgreSQL, then mail out as alice.
    code, c = auth_reply(gw)
    assert code == 235 and c is not None
    with c:
        assert c.sendmail("alice@example.edu", [DAVE], message("alice@example.edu", "auth")) == {}
    assert auth_reply(gw, "wrong-password-1")[0] == 535
    got = outside.wait_messages(DAVE, 2, deadline=120)
    assert {b"Subject: relayed by the lab" in m for m in got} == {True, False}

    # Connections killed by the server: nobody notices.
    assert pg_database.terminate() >= 1
    code, c = auth_reply(gw)
    assert code == 235 and c is not None
    c.quit()

    # The database is down: AUTH is a temporary failure, the registry works from memory.
    pg_database.refuse_connections()
    try:
        assert auth_reply(gw)[0] == 454
        assert rcpt_reply(gw, LAB, "list@lab.example.edu").startswith("250")
        gw.wait_event(lambda e: e.get("event") == "auth.error", what="an auth.error event")
        gw.wait_event(
            lambda e: e.get("event") == "policy.refresh_error", what="a policy.refresh_error"
        )
    finally:
        pg_database.allow_connections()

    # Back: AUTH works again, and what changed meanwhile is picked up.
    poll(lambda: auth_reply(gw)[0] == 235, 30, what="AUTH to succeed again")
    res = gw.cli("senders", "add", LAB2, "--name", "lab2", "--domain", "lab.example.edu")
    outputs += [res.stdout, res.stderr]
    poll(
        lambda: rcpt_reply(gw, LAB2, "x@lab.example.edu").startswith("250"),
        30,
        what="the second registration to arrive after the outage",
    )

    texts = [gw.events_file.read_text(errors="replace"), gw.output(), *outputs]
    for text in texts:
        assert URL_PASSWORD not in text and PASSWORD not in text


def test_gateway_starts_while_the_database_is_down(
    gateway_factory: Any, postfix_factory: Any, pg_database: PgDatabase
) -> None:
    """The database refuses connections when the gateway (two workers) starts: it greets,
    inbound mail to a static-directory domain is delivered, a registered server's relay is
    ``451 4.3.0``, AUTH ``454 4.7.0``, ``mailwarden status`` says UNAVAILABLE; once the
    database takes connections again each worker reports ``policy.store_recovered`` and
    the relay and AUTH work, without a restart."""
    policy = POLICY | {"default_directory": "static", "recipients": ["bob@example.edu"]}
    gw, outside, outputs = _gateway_with_alice(
        gateway_factory, postfix_factory, pg_database, policy
    )
    res = gw.cli("senders", "add", LAB, "--name", "lab", "--domain", "lab.example.edu")
    outputs += [res.stdout, res.stderr]

    pg_database.refuse_connections()
    try:
        gw.start()  # greets on every listener although the database is down
        assert "database   UNAVAILABLE" in gw.output()
        status = gw.cli("status", check=False)
        outputs += [status.stdout, status.stderr]
        assert status.returncode == 1 and "UNAVAILABLE" in status.stdout, status.stdout
        # Inbound mail to a hosted domain does not need the database.
        assert gw.send("x@outside.test", ["bob@example.edu"], message(DAVE, "inbound")) == {}
        assert gw.wait_messages("bob@example.edu", 1)
        # A static-directory refusal is still a refusal.
        assert (
            gw.send(
                "x@outside.test",
                ["nobody@example.edu", "bob@example.edu"],
                message(DAVE, "inbound 2"),
            )["nobody@example.edu"][0]
            == 550
        )
        # The registered server cannot be told apart from an unregistered one: 451.
        assert rcpt_reply(gw, LAB, "list@lab.example.edu").startswith("451 4.3.0")
        assert auth_reply(gw)[0] == 454
        # Off campus is refused as always (it can never be registered, SU-3).
        assert rcpt_reply(gw, "127.0.0.200", "a@x.test").startswith("554 5.7.1")
        down = gw.wait_event(
            lambda e: e.get("event") == "policy.store_unavailable",
            what="a policy.store_unavailable event",
        )
        assert "not currently accepting connections" in down["error"]
    finally:
        pg_database.allow_connections()

    poll(
        lambda: len(gw.events("policy.store_recovered")) >= 2,
        120,
        what="both workers to report policy.store_recovered",
    )
    assert rcpt_reply(gw, LAB, "list@lab.example.edu").startswith("250")
    relay(gw, LAB, "list@lab.example.edu", "relayed after the outage")

    def authenticated() -> smtplib.SMTP | None:
        # Each worker reopens its own store on an AUTH after its backoff: keep the first
        # session that got in (the next connection may land on the other worker, not yet).
        code, c = auth_reply(gw)
        return c if code == 235 else None

    c = poll(authenticated, 120, what="AUTH to open its database")
    assert c is not None
    with c:
        assert c.sendmail("alice@example.edu", [DAVE], message("alice@example.edu", "auth")) == {}
    got = outside.wait_messages(DAVE, 2, deadline=120)
    assert {b"Subject: relayed after the outage" in m for m in got} == {True, False}
    status = gw.cli("status", check=False)
    outputs += [status.stdout, status.stderr]
    assert status.returncode == 0 and ": ok" in status.stdout, status.stdout
    # One outage: one unavailable and one recovered event per worker.
    assert len(gw.events("policy.store_unavailable")) == 2
    assert len(gw.events("policy.store_recovered")) == 2

    texts = [gw.events_file.read_text(errors="replace"), gw.output(), *outputs]
    for text in texts:
        assert URL_PASSWORD not in text and PASSWORD not in text

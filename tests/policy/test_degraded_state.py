"""The policy state when its PostgreSQL database is unreachable at start (the database's
own connections refused, ``ALLOW_CONNECTIONS false``; the shared server keeps running).

``start`` does not raise: the state is ``unavailable``, checks that need the database
answer ``451 4.3.0`` (a campus host's relay, a registered server's sender outside its
configured domains, an authenticated user's sender, the ``database`` directory), checks
that do not keep working (inbound mail to an ``accept`` domain, the off-campus relay
refusal), nobody is blocked, and one ``policy.store_unavailable`` event names the redacted
error. Once connections are allowed the background retry loads everything
(``policy.store_recovered``) and the decisions are the normal ones; a block decided
meanwhile reaches the database. Also: which open errors count as "unreachable for now",
and the database AUTH backend built during the outage (TEMPFAIL, backed-off reopening).

Untrusted input here is only the SMTP-side values the checks receive (addresses).
"""

from __future__ import annotations

import asyncio
import time
from itertools import islice
from pathlib import Path

import pytest

from mailwarden import store
from mailwarden.config import Config, default_config
from mailwarden.core.controls import Control
from mailwarden.core.events import MemorySink, get_sink, set_sink
from mailwarden.core.types import Action, Decision, Envelope, Session
from mailwarden.errors import StoreError, StoreUnavailable
from mailwarden.policy.engine import Policy
from mailwarden.policy.networks import campus_networks
from mailwarden.policy.state import RETRY_FIRST, RETRY_MAX, PolicyState, backoff
from mailwarden.store.blocks import list_blocks
from mailwarden.store.senders import add_sender
from tests.support.postgres import PgDatabase

LAB = "127.0.0.70"  # registered in the database only
CAMPUS = "127.0.0.80"  # a campus host nobody registered
OUTSIDE = "192.0.2.10"
HARVESTER = "192.0.2.66"
SECRET = "Db-pass-8841"  # trust authentication ignores it; it must never be shown
RECOVERY_DEADLINE = 60.0  # a test timeout, not an assertion on how long recovery takes


def _config(tmp_path: Path, url: str) -> Config:
    return default_config(
        gateway={
            "state_dir": str(tmp_path),
            "hosted_domains": ["example.edu", "staff.example.edu"],
        },
        delivery={"transports": {"example.edu": "maildir", "staff.example.edu": "maildir"}},
        database={"url": url},
        policy={
            "campus_networks": ["127.0.0.1/32", "127.0.0.64/26"],
            "directory": {"staff.example.edu": "database"},
        },
    )


def _secret_url(db: PgDatabase) -> str:
    return db.url.replace(f"//{db.role}@", f"//{db.role}:{SECRET}@")


def _session(ip: str, user: str | None = None) -> Session:
    s = Session(ip, 40000, "127.0.0.1", 25, "smtp")
    s.auth_user = user
    return s


async def _rcpt(policy: Policy, ip: str, sender: str, rcpt: str) -> Decision:
    return await policy.check_rcpt(_session(ip), Envelope(sender), rcpt)


def _tempfail(d: Decision) -> bool:
    return d.action is Action.TEMPFAIL and d.code == 451 and d.enhanced == "4.3.0"


async def _wait_event(sink: MemorySink, name: str) -> None:
    end = time.monotonic() + RECOVERY_DEADLINE
    while not any(e.name == name for e in sink.events):
        if time.monotonic() > end:
            pytest.fail(f"no {name} event within {RECOVERY_DEADLINE} s")
        await asyncio.sleep(0.05)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert list(islice(backoff(), 7)) == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert (RETRY_FIRST, RETRY_MAX) == (1.0, 30.0)


def test_only_an_unreachable_server_is_unavailable(tmp_path: Path, pg_database: PgDatabase) -> None:
    pg_database.refuse_connections()
    try:
        with pytest.raises(StoreUnavailable) as err:
            store.open(_config(tmp_path, _secret_url(pg_database)))
        assert "not currently accepting connections" in str(err.value)
        assert SECRET not in str(err.value) and ":***@" in str(err.value)
    finally:
        pg_database.allow_connections()
    # A database that does not exist is a configuration error: no retrying.
    missing = pg_database.url.replace(f"/{pg_database.name}?", "/mwtest_no_such_db?")
    with pytest.raises(StoreError) as err2:
        store.open(_config(tmp_path, missing))
    assert not isinstance(err2.value, StoreUnavailable)
    assert "does not exist" in str(err2.value)
    # An SQLite path that cannot be made: fail fast too.
    bad = tmp_path / "file"
    bad.write_text("")
    with pytest.raises(StoreError) as err3:
        store.open(_config(tmp_path, f"sqlite:///{bad}/sub/mailwarden.db"))
    assert not isinstance(err3.value, StoreUnavailable)


@pytest.mark.asyncio
async def test_start_degraded_then_recover(tmp_path: Path, pg_database: PgDatabase) -> None:
    pg_database.reset()
    cfg = _config(tmp_path, _secret_url(pg_database))
    admin = store.open(cfg)  # schema and the lab server, made before the outage
    add_sender(
        admin, LAB, name="lab", domains=["lab.example.edu"], campus=campus_networks(cfg).networks
    )
    state = PolicyState(cfg)
    state.retry_first = 0.05  # keep the test short; the default is RETRY_FIRST
    policy = Policy(cfg, state=state)
    sink, previous = MemorySink(), get_sink()
    set_sink(sink)
    pg_database.refuse_connections()
    try:
        try:
            await policy.start()  # does not raise
            assert state.unavailable and state.store is None

            # Needs the database: 451 4.3.0, never a 5xx, never an accept.
            assert _tempfail(await _rcpt(policy, LAB, "a@lab.example.edu", "d@outside.test"))
            assert _tempfail(await _rcpt(policy, CAMPUS, "a@lab.example.edu", "d@outside.test"))
            assert _tempfail(await _rcpt(policy, OUTSIDE, "a@x.test", "bob@staff.example.edu"))
            mail = await policy.check_mail(
                _session(LAB, user="alice"), Envelope(""), "alice@example.edu"
            )
            assert _tempfail(mail)
            # Does not need it: inbound to an accept domain, the off-campus refusal.
            ok = await _rcpt(policy, OUTSIDE, "a@x.test", "bob@example.edu")
            assert ok.action is Action.ACCEPT
            denied = await _rcpt(policy, OUTSIDE, "a@x.test", "d@outside.test")
            assert denied.code == 554 and denied.control == Control.SU_6
            # Blocks are unknown: nobody is blocked; a new block holds here meanwhile.
            connect = await policy.check_connect(_session(HARVESTER))
            assert connect.action in (Action.ACCEPT, Action.CONTINUE)
            state.blocks.add(HARVESTER, "harvest", time.time() + 600)
            blocked = await policy.check_connect(_session(HARVESTER))
            assert blocked.action is Action.REJECT

            await asyncio.sleep(0.3)  # several retries fail: still one event for the outage
            down = [e.fields for e in sink.events if e.name == "policy.store_unavailable"]
            assert len(down) == 1
            assert "not currently accepting connections" in down[0]["error"]
            assert SECRET not in down[0]["error"]
            assert not any(e.name == "policy.store_recovered" for e in sink.events)
        finally:
            pg_database.allow_connections()

        await _wait_event(sink, "policy.store_recovered")
        assert not state.unavailable and state.store is not None
        relayed = await _rcpt(policy, LAB, "a@lab.example.edu", "d@outside.test")
        assert relayed.action is Action.ACCEPT and relayed.control == Control.SU_1
        refused = await _rcpt(policy, CAMPUS, "a@lab.example.edu", "d@outside.test")
        assert refused.code == 554 and refused.control == Control.SU_1
        unknown = await _rcpt(policy, OUTSIDE, "a@x.test", "bob@staff.example.edu")
        assert unknown.code == 550
        mail = await policy.check_mail(
            _session(LAB, user="alice"), Envelope(""), "alice@example.edu"
        )
        assert mail.code == 553
        # The block decided during the outage is in the database now.
        end = time.monotonic() + RECOVERY_DEADLINE
        while HARVESTER not in [b.address for b in list_blocks(admin)]:
            assert time.monotonic() < end, "the block never reached the database"
            await asyncio.sleep(0.05)
        assert (await policy.check_connect(_session(HARVESTER))).action is Action.REJECT
        names = [e.name for e in sink.events if e.name.startswith("policy.store_")]
        assert names.count("policy.store_unavailable") == 1
        assert names.count("policy.store_recovered") == 1
    finally:
        await policy.close()
        admin.close()
        set_sink(previous)


@pytest.mark.asyncio
async def test_auth_tempfails_then_opens_its_store(tmp_path: Path, pg_database: PgDatabase) -> None:
    """AUTH built while the database refuses: 454 (TEMPFAIL), the failed open is backed
    off; once it is back (and the backoff has passed) the same service logs in."""
    from mailwarden.auth.database import DatabaseAuthenticator
    from mailwarden.auth.service import Outcome, build_auth_service
    from tests.auth.helpers import store_config, user_store

    pg_database.reset()
    cfg = store_config(tmp_path, _secret_url(pg_database))
    user_store(cfg, {"alice": "pw-alice-1"}).close()
    sink, previous = MemorySink(), get_sink()
    set_sink(sink)
    pg_database.refuse_connections()
    try:
        try:
            service = build_auth_service(cfg)  # does not raise
            backend = service.backend
            assert isinstance(backend, DatabaseAuthenticator) and backend.store is None
            first = await service.attempt("192.0.2.1", "alice", "pw-alice-1")
            assert first.outcome is Outcome.TEMPFAIL
            assert backend._next_open > 0  # the failed open is backed off
            again = await service.attempt("192.0.2.1", "alice", "pw-alice-1")
            assert again.outcome is Outcome.TEMPFAIL  # inside the backoff: no new open
            opens = [e for e in sink.events if e.fields.get("step") == "open"]
            assert len(opens) == 1
        finally:
            pg_database.allow_connections()
        backend._next_open = 0.0  # the backoff has passed
        ok = await service.attempt("192.0.2.1", "alice", "pw-alice-1")
        assert ok.outcome is Outcome.OK and backend.store is not None
        assert SECRET not in repr([e.fields for e in sink.events])
    finally:
        service.close()
        set_sink(previous)

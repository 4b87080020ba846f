"""A PostgreSQL server that does not answer at all (packets dropped): nothing waits for it.

The fault is injected with ``tests.support.pgfault.PgBlackhole`` (a loopback port that
accepts connections and never answers, then passes them on to the real test server): a
real PostgreSQL cannot be made to stay silent. The URLs set ``connect_timeout=600`` so the
first connection attempt stays pending for the whole test: every assertion is about order
and state (the attempt is still held when the answer comes), never about how long
something took.

- ``store.reach``: ``call_within`` / ``run_detached`` give up on a call without waiting
  for it and release what it returns late; ``first_contact`` tells a server that answers
  (ok, refusing, no such database) from one that does not (pending, its attempt killed).
- ``PolicyState.start(wait=0)``: returns while the first attempt is held, answers 451 for
  what needs the database (one ``policy.store_unavailable`` with ``pending``), and recovers
  from that same attempt once the server is reachable; ``close`` does not wait for it; a
  database found unusable in the background is an outage that is retried, not a crash.
- A server that stops answering mid-session (``PgBlackhole.stall``: the path stalls, no
  timeout of TCP's or the server's fires): each refresh gives up at ``[database]
  call_timeout``, the caches stay and keep deciding, one ``policy.store_unavailable`` is
  reported, a block decided meanwhile holds and is written once the path flows again.

Untrusted input here is only the SMTP-side values the checks receive (addresses).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailwarden import store
from mailwarden.config import Config, default_config
from mailwarden.core.controls import Control
from mailwarden.core.events import MemorySink
from mailwarden.core.types import Action, Decision, Envelope, Session
from mailwarden.policy.engine import Policy
from mailwarden.policy.networks import campus_networks
from mailwarden.policy.state import PolicyState
from mailwarden.store.blocks import list_blocks
from mailwarden.store.reach import Answer, call_within, first_contact, run_detached
from mailwarden.store.senders import add_sender
from tests.support.pgfault import PgBlackhole
from tests.support.ports import free_port
from tests.support.postgres import PgDatabase

LAB = "127.0.0.70"  # registered in the database only
OUTSIDE = "192.0.2.10"
SECRET = "Db-pass-3317"  # trust authentication ignores it; it must never be shown
HOLD = "connect_timeout=600"  # the first attempt outlives the test
DEADLINE = 60.0  # a test timeout, not an assertion on how long anything takes


def _config(tmp_path: Path, url: str, policy: dict[str, Any] | None = None, **db: Any) -> Config:
    return default_config(
        gateway={"state_dir": str(tmp_path), "hosted_domains": ["example.edu"]},
        delivery={"transports": {"example.edu": "maildir"}},
        database={"url": url} | db,
        policy={"campus_networks": ["127.0.0.1/32", "127.0.0.64/26"]} | (policy or {}),
    )


def _lab_policy(admin: store.Store, cfg: Config) -> tuple[PolicyState, Policy]:
    """The registered LAB server in the database, and a policy reading it through ``cfg``."""
    add_sender(
        admin, LAB, name="lab", domains=["lab.example.edu"], campus=campus_networks(cfg).networks
    )
    state = PolicyState(cfg)
    return state, Policy(cfg, state=state)


@pytest.fixture
def hole() -> Iterator[PgBlackhole]:
    with PgBlackhole() as h:
        yield h


def _session(ip: str) -> Session:
    return Session(ip, 40000, "127.0.0.1", 25, "smtp")


async def _rcpt(policy: Policy, ip: str, sender: str, rcpt: str) -> Decision:
    return await policy.check_rcpt(_session(ip), Envelope(sender), rcpt)


async def _until(what: str, check: Callable[[], bool]) -> None:
    end = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {DEADLINE} s")
        await asyncio.sleep(0.02)


def test_call_within_gives_up_and_releases_late_results() -> None:
    assert call_within(lambda: 7, DEADLINE) == 7

    def fails() -> int:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        call_within(fails, DEADLINE)

    release, late = threading.Event(), []

    def slow() -> str:
        release.wait(DEADLINE)
        return "late store"

    with pytest.raises(TimeoutError):
        call_within(slow, 0.05, late.append)
    assert late == []  # still running: given up, not finished
    release.set()
    end = time.monotonic() + DEADLINE
    while late != ["late store"]:
        assert time.monotonic() < end, "the late result was never released"
        time.sleep(0.01)


@pytest.mark.asyncio
async def test_run_detached_cancelled_releases_the_result() -> None:
    assert await run_detached(lambda: 3) == 3
    release, late = threading.Event(), []

    def slow() -> str:
        release.wait(DEADLINE)
        return "late store"

    fut = run_detached(slow, late.append)
    fut.cancel()  # what close() does to a pending open: nobody waits for the thread
    await asyncio.sleep(0)
    assert fut.cancelled() and late == []
    release.set()
    await _until("the late result released", lambda: late == ["late store"])


def test_first_contact_tells_silence_from_answers(
    tmp_path: Path, pg_database: PgDatabase, hole: PgBlackhole
) -> None:
    pg_database.reset()
    ok = first_contact(_config(tmp_path, pg_database.url), DEADLINE)
    assert ok.answer is Answer.OK and pg_database.name in ok.text

    refused = f"postgresql+psycopg://mw:{SECRET}@127.0.0.1:{free_port()}/mw"
    down = first_contact(_config(tmp_path, refused), DEADLINE)
    assert down.answer is Answer.UNAVAILABLE, down
    assert "Connection refused" in down.text and SECRET not in down.text
    assert "\n" not in down.text and "mw:***@127.0.0.1" in down.text

    missing = pg_database.url.replace(f"/{pg_database.name}?", "/mwtest_no_such_db?")
    bad = first_contact(_config(tmp_path, missing), DEADLINE)
    assert bad.answer is Answer.ERROR and "does not exist" in bad.text

    silent = hole.url(pg_database.role, pg_database.name, SECRET, HOLD)
    pending = first_contact(_config(tmp_path, silent), 0.2)
    assert pending.answer is Answer.PENDING
    assert hole.accepted == 1
    # The child and its attempt are gone: the connection the hole held is closed.
    end = time.monotonic() + DEADLINE
    while hole.held():
        assert time.monotonic() < end, "the probe's connection attempt was left behind"
        time.sleep(0.02)


@pytest.mark.asyncio
async def test_start_does_not_wait_for_a_silent_server(
    tmp_path: Path, pg_database: PgDatabase, hole: PgBlackhole, sink: MemorySink
) -> None:
    pg_database.reset()
    admin = store.open(_config(tmp_path, pg_database.url))  # over the socket, not the hole
    cfg = _config(tmp_path, hole.url(pg_database.role, pg_database.name, SECRET, HOLD))
    state, policy = _lab_policy(admin, cfg)
    try:
        await policy.start(wait=0)  # returns with the first attempt still on its way
        assert state.unavailable and state.store is None
        await _until("the first attempt to reach the server", lambda: hole.held() == 1)

        relay = await _rcpt(policy, LAB, "a@lab.example.edu", "d@outside.test")
        assert (relay.action, relay.code, relay.enhanced) == (Action.TEMPFAIL, 451, "4.3.0")
        inbound = await _rcpt(policy, OUTSIDE, "a@x.test", "bob@example.edu")
        assert inbound.action is Action.ACCEPT
        # Those answers came while the one and only attempt was still held, unanswered.
        assert hole.held() == 1 and hole.accepted == 1
        down = [e.fields for e in sink.events if e.name == "policy.store_unavailable"]
        assert len(down) == 1 and down[0]["pending"] is True and down[0]["since_start"]
        assert "still connecting" in down[0]["error"] and SECRET not in down[0]["error"]
        assert ":***@127.0.0.1" in down[0]["error"]
        assert not any(e.name == "policy.store_recovered" for e in sink.events)

        hole.pass_through()  # the server is reachable: that same attempt completes
        await _until(
            "policy.store_recovered",
            lambda: any(e.name == "policy.store_recovered" for e in sink.events),
        )
        assert not state.unavailable and state.store is not None
        relayed = await _rcpt(policy, LAB, "a@lab.example.edu", "d@outside.test")
        assert relayed.action is Action.ACCEPT and relayed.control == Control.SU_1
        names = [e.name for e in sink.events if e.name.startswith("policy.store_")]
        assert names == ["policy.store_unavailable", "policy.store_recovered"]
    finally:
        await policy.close()
        admin.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("sink")
async def test_close_does_not_wait_for_a_pending_attempt(
    tmp_path: Path, pg_database: PgDatabase, hole: PgBlackhole
) -> None:
    cfg = _config(tmp_path, hole.url(pg_database.role, pg_database.name, SECRET, HOLD))
    state = PolicyState(cfg)
    await state.start(wait=0)
    await _until("the first attempt to reach the server", lambda: hole.held() == 1)
    await state.close()  # returns although the attempt is still held
    assert hole.held() == 1 and state.store is None


@pytest.mark.asyncio
async def test_unusable_database_found_in_the_background_is_retried(
    tmp_path: Path, pg_database: PgDatabase, sink: MemorySink
) -> None:
    """Started without waiting, the first open then finds no such database: not a crash
    of the worker but an outage, retried, each try a ``policy.config_error`` with why."""
    missing = pg_database.url.replace(f"/{pg_database.name}?", "/mwtest_no_such_db?")
    state = PolicyState(_config(tmp_path, missing))
    state.retry_first = 0.05  # keep the test short; the default is RETRY_FIRST
    try:
        await state.start(wait=0)
        await _until(
            "two policy.config_error events",
            lambda: sum(e.name == "policy.config_error" for e in sink.events) >= 2,
        )
        assert state.unavailable and state.store is None
        errors = [e.fields["error"] for e in sink.events if e.name == "policy.config_error"]
        assert all("does not exist" in err for err in errors), errors
        down = [e.fields for e in sink.events if e.name == "policy.store_unavailable"]
        assert len(down) == 1 and down[0]["pending"] is True  # one outage
    finally:
        await state.close()


@pytest.mark.asyncio
async def test_a_stalled_server_keeps_the_caches(
    tmp_path: Path, pg_database: PgDatabase, hole: PgBlackhole, sink: MemorySink
) -> None:
    pg_database.reset()
    admin = store.open(_config(tmp_path, pg_database.url))  # over the socket, not the hole
    hole.pass_through()
    url = hole.url(pg_database.role, pg_database.name, SECRET)
    cfg = _config(tmp_path, url, {"registry_refresh": 0.1}, call_timeout=0.3)
    state, policy = _lab_policy(admin, cfg)
    try:
        await policy.start()
        assert not state.unavailable
        relayed = await _rcpt(policy, LAB, "a@lab.example.edu", "d@outside.test")
        assert relayed.action is Action.ACCEPT and relayed.control == Control.SU_1

        hole.stall()  # connected, and from now on nothing answers
        await _until(
            "policy.store_unavailable",
            lambda: any(e.name == "policy.store_unavailable" for e in sink.events),
        )
        [down] = [e.fields for e in sink.events if e.name == "policy.store_unavailable"]
        assert "no answer from the database" in down["error"] and not down["since_start"]
        assert SECRET not in down["error"] and ":***@127.0.0.1" in down["error"]
        errors = [e.fields["error"] for e in sink.events if e.name == "policy.refresh_error"]
        assert errors and set(errors) == {"StoreTimeout"}
        assert any(e.name == "store.call_timeout" for e in sink.events)
        # The caches still decide: the registered server relays, a block holds at once.
        relayed = await _rcpt(policy, LAB, "a@lab.example.edu", "d@outside.test")
        assert relayed.action is Action.ACCEPT and relayed.control == Control.SU_1
        state.blocks.add(OUTSIDE, "harvest", time.time() + 600)
        assert (await policy.check_connect(_session(OUTSIDE))).action is Action.REJECT
        await _until(
            "policy.store_error",
            lambda: any(e.name == "policy.store_error" for e in sink.events),
        )
        [failed] = [e.fields for e in sink.events if e.name == "policy.store_error"]
        assert failed["error"] == "StoreTimeout" and failed["client"] == OUTSIDE
        assert hole.stalled() >= 1  # all of that while the path was still stalled
        assert not any(e.name == "policy.store_recovered" for e in sink.events)

        hole.pass_through()
        await _until(
            "policy.store_recovered",
            lambda: any(e.name == "policy.store_recovered" for e in sink.events),
        )
        await _until(
            "the block written",
            lambda: OUTSIDE in [b.address for b in list_blocks(admin)],
        )
        names = [e.name for e in sink.events if e.name.startswith("policy.store_")]
        assert names.count("policy.store_unavailable") == 1
    finally:
        hole.pass_through()
        await policy.close()
        admin.close()

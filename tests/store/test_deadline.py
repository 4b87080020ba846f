"""The deadline of ``Store.call`` (``[database] call_timeout``), on a real SQLite store.

A database call that does not return in time is a ``StoreTimeout`` (a ``StoreUnavailable``:
what every caller already answers as "database down") with a ``store.call_timeout`` event;
on SQLite the thread running it is not interrupted, so it is counted as abandoned until
it returns (``store.call_returned``), a call still waiting for a thread when its deadline
passes never runs, every thread held means every later call times out too (never a hang),
and ``close`` does not wait for an abandoned call. The blocking functions here stand for a
server that does not answer: they wait on an event the test sets (the PostgreSQL stall
itself, and the interruption of its connection, are in tests/store/test_postgres.py and
tests/store/test_interrupt.py).

Also the validation of ``call_timeout``, ``open_timeout`` and ``statement_timeout`` (the
deadline of opening a PostgreSQL store is in tests/store/test_open_deadline.py). No
untrusted input.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mailwarden import store
from mailwarden.config import Config, default_config
from mailwarden.core.events import MemorySink
from mailwarden.errors import StoreTimeout, StoreUnavailable
from mailwarden.store.db import DB_THREADS
from mailwarden.store.senders import list_senders
from mailwarden.store.settings import DatabaseSettings
from tests.support.tmpdirs import poll

DEADLINE = 60.0  # bounds a wait that must end; never an assertion on a duration
SHORT = 0.05  # the deadline given to calls that are meant to miss it


def _config(tmp_path: Path, **database: Any) -> Config:
    return default_config(gateway={"state_dir": str(tmp_path)}, database=database)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[store.Store]:
    s = store.open(_config(tmp_path))
    yield s
    s.close()


def _fields(sink: MemorySink, name: str) -> list[dict[str, Any]]:
    return [dict(e.fields) for e in sink.events if e.name == name]


def _blocker(release: threading.Event, started: threading.Event | None = None) -> Callable[[], str]:
    def stalled_query() -> str:  # a server that does not answer until the test says so
        if started is not None:
            started.set()
        release.wait(DEADLINE)
        return "late"

    return stalled_query


def test_a_call_past_its_deadline_is_store_timeout(db: store.Store, sink: MemorySink) -> None:
    release = threading.Event()

    async def main() -> None:
        with pytest.raises(StoreTimeout) as info:
            await db.call(_blocker(release), timeout=SHORT)
        assert isinstance(info.value, StoreUnavailable)  # the callers' "database down" path
        assert "no answer from the database" in str(info.value) and db.label in str(info.value)
        assert db.abandoned == 1  # its thread is still held
        # The other thread still answers.
        assert await db.call(list_senders, db, timeout=DEADLINE) == []

    try:
        asyncio.run(main())
        [timeout] = _fields(sink, "store.call_timeout")
        assert timeout == {
            "function": "stalled_query",
            "timeout": SHORT,
            "started": True,
            "abandoned": 1,
            "threads": DB_THREADS,
        }
        assert _fields(sink, "store.call_returned") == []
        assert _fields(sink, "store.call_interrupted") == []  # SQLite: nothing to interrupt
    finally:
        release.set()
    poll(lambda: _fields(sink, "store.call_returned"), DEADLINE, what="store.call_returned")
    [returned] = _fields(sink, "store.call_returned")
    assert returned["function"] == "stalled_query" and returned["abandoned"] == 0
    assert returned.get("error") is None and returned["seconds"] >= 0
    assert db.abandoned == 0


def test_every_thread_held_means_every_call_times_out(db: store.Store, sink: MemorySink) -> None:
    release = threading.Event()
    ran: list[str] = []

    def queued() -> str:
        ran.append("queued")
        return "queued"

    async def main() -> None:
        for _ in range(DB_THREADS):
            with pytest.raises(StoreTimeout):
                await db.call(_blocker(release), timeout=SHORT)
        assert db.abandoned == DB_THREADS
        # No thread is free: the call waits for one, misses its deadline and is dropped.
        for _ in range(3):
            with pytest.raises(StoreTimeout):
                await db.call(queued, timeout=SHORT)
        release.set()
        await asyncio.to_thread(poll, lambda: db.abandoned == 0, DEADLINE, 0.01, "threads")
        # The server answers again: so do the calls, on the same store.
        assert await db.call(list_senders, db, timeout=DEADLINE) == []

    try:
        asyncio.run(main())
    finally:
        release.set()
    assert ran == []  # the dropped calls never ran, not even after the threads came back
    timeouts = _fields(sink, "store.call_timeout")
    assert [t["started"] for t in timeouts] == [True] * DB_THREADS + [False] * 3
    assert [t["abandoned"] for t in timeouts][-1] == DB_THREADS
    assert len(_fields(sink, "store.call_returned")) == DB_THREADS


def test_the_default_deadline_is_call_timeout(tmp_path: Path, sink: MemorySink) -> None:
    db = store.open(_config(tmp_path, call_timeout=SHORT))
    release = threading.Event()

    async def main() -> None:
        with pytest.raises(StoreTimeout, match=f"within {SHORT:g} s"):
            await db.call(_blocker(release))

    try:
        asyncio.run(main())
        assert _fields(sink, "store.call_timeout")[0]["timeout"] == SHORT
    finally:
        release.set()
        db.close()


def test_a_result_that_comes_in_time_is_returned(db: store.Store) -> None:
    async def main() -> tuple[str, list[object]]:
        name = await db.call(lambda: threading.current_thread().name, timeout=DEADLINE)
        return name, await db.call(list_senders, db)

    name, rows = asyncio.run(main())
    assert name.startswith("mw-db") and rows == []


def test_a_cancelled_caller_abandons_the_call(db: store.Store, sink: MemorySink) -> None:
    """An AUTH past ``[auth] timeout`` cancels its backend: the call is abandoned, not
    waited for, and its late result is dropped."""
    release, started = threading.Event(), threading.Event()

    async def main() -> None:
        task = asyncio.ensure_future(db.call(_blocker(release, started), timeout=DEADLINE))
        assert await asyncio.to_thread(started.wait, DEADLINE)
        assert db.abandoned == 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert db.abandoned == 1
        release.set()
        await asyncio.to_thread(poll, lambda: db.abandoned == 0, DEADLINE, 0.01, "thread")

    try:
        asyncio.run(main())
    finally:
        release.set()
    assert _fields(sink, "store.call_timeout") == []  # cancelled, not timed out
    assert len(_fields(sink, "store.call_returned")) == 1


def test_close_does_not_wait_for_an_abandoned_call(tmp_path: Path) -> None:
    db = store.open(_config(tmp_path))
    release = threading.Event()

    async def main() -> None:
        with pytest.raises(StoreTimeout):
            await db.call(_blocker(release), timeout=SHORT)

    try:
        asyncio.run(main())
        closer = threading.Thread(target=db.close)
        closer.start()
        closer.join(DEADLINE)
        assert not closer.is_alive(), "close() waited for a call its caller had given up"
        assert db.abandoned == 1  # the thread is still held by the stalled call
    finally:
        release.set()
    poll(lambda: db.abandoned == 0, DEADLINE, what="the abandoned call to return")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("call_timeout", 0, "call_timeout must be between"),
        ("call_timeout", "1h", "call_timeout must be between"),
        ("call_timeout", "soon", "not a duration"),
        ("open_timeout", 0, "open_timeout must be between"),
        ("open_timeout", "11m", "open_timeout must be between"),
        ("statement_timeout", 0.0001, "statement_timeout must be 0 (off) or between"),
        ("statement_timeout", "2d", "statement_timeout must be 0 (off) or between"),
        ("statement_timeout", -1, "cannot be negative"),
    ],
)
def test_timeouts_are_validated(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        DatabaseSettings(**{field: value})
    [error] = info.value.errors()
    assert error["loc"] == (field,) and message in error["msg"]


def test_timeout_defaults_and_spellings() -> None:
    s = DatabaseSettings()
    assert (s.call_timeout, s.open_timeout, s.statement_timeout) == (10.0, 30.0, 30.0)
    s = DatabaseSettings(call_timeout="2m", open_timeout="0.5s", statement_timeout="0")
    assert (s.call_timeout, s.open_timeout, s.statement_timeout) == (120.0, 0.5, 0.0)

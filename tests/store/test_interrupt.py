"""A database call past its deadline frees its thread (``store.interrupt``), on a real
PostgreSQL server behind ``tests.support.pgfault.PgBlackhole`` (a path that stalls).

Without the interruption the thread running a call on a stalled path stays blocked until the
path flows again (perhaps never), and with every thread of the store held so, every later
call times out. Here: the call times out, its connection is interrupted
(``store.call_interrupted``) and its thread is back (``store.call_returned``,
``abandoned`` 0) while the path is still stalled, whether it was blocked in the ping of a
pooled connection or in its own statement; with the old connections black-holed and new ones
getting through, DB_THREADS+1 later calls all run and succeed; the cancel request stops a
statement the server is still running for nobody; a cancelled caller's call is interrupted
at its deadline, not at once; a call that had no connection at its deadline is not
interrupted but gets none afterwards; an SQLite store keeps its behaviour.

``BACK`` bounds the wait for a thread that must come back (it would never come back without
the interruption); ``DEADLINE`` any other wait that must end. No duration is asserted.
No untrusted input; the injector listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from mailwarden import store
from mailwarden.config import Config, default_config
from mailwarden.core.events import MemorySink
from mailwarden.errors import StoreTimeout
from mailwarden.store.db import DB_THREADS
from mailwarden.store.senders import list_senders
from tests.support.pgfault import PgBlackhole
from tests.support.postgres import PgDatabase
from tests.support.tmpdirs import poll

DEADLINE = 60.0  # bounds a wait that must end; never an assertion on a duration
BACK = 5.0  # bounds the wait for an interrupted thread (without it: until the path flows)
SHORT = 0.5  # the deadline of calls meant to miss it
SLOW_START = 5.0  # the deadline of a call that must have started its statement before it


def _config(tmp_path: Path, url: str, **database: Any) -> Config:
    return default_config(gateway={"state_dir": str(tmp_path)}, database={"url": url} | database)


def _fields(sink: MemorySink, name: str) -> list[dict[str, Any]]:
    return [dict(e.fields) for e in sink.events if e.name == name]


@pytest.fixture
def db(tmp_path: Path, pg: PgDatabase, path: PgBlackhole) -> Iterator[store.Store]:
    """A store whose connections go through ``path`` (pass-through until a test stalls it)."""
    s = store.open(_config(tmp_path, path.url(pg.role, pg.name)))
    yield s
    path.pass_through()
    s.close()


def _call(db: store.Store, timeout: float = DEADLINE) -> Any:
    return asyncio.run(db.call(list_senders, db, timeout=timeout))


def _thread_back(db: store.Store, sink: MemorySink, count: int = 1) -> list[dict[str, Any]]:
    """The ``store.call_returned`` events once ``count`` abandoned calls are back."""
    poll(lambda: len(_fields(sink, "store.call_returned")) >= count, BACK, 0.02, "thread back")
    poll(lambda: db.abandoned == 0, BACK, 0.02, "abandoned == 0")
    return _fields(sink, "store.call_returned")


def test_a_ping_on_a_stalled_path_is_interrupted(
    db: store.Store, path: PgBlackhole, sink: MemorySink
) -> None:
    """The pooled connection's ping before the call's query is what the stall holds."""
    assert _call(db) == []  # a pooled connection, established
    path.stall()
    with pytest.raises(StoreTimeout):
        _call(db, SHORT)
    assert path.stalled() >= 1  # the ping is held on the way
    [returned] = _thread_back(db, sink)  # while the path is still stalled
    assert path.stalled() >= 1
    [interrupted] = _fields(sink, "store.call_interrupted")
    assert interrupted["function"] == "list_senders" and interrupted["connections"] == 1
    assert interrupted["cancel"] is True and interrupted["seconds"] >= 0
    # Its ping failed; the pool's new connection for it is refused before connecting.
    assert returned["function"] == "list_senders" and returned["error"] == "StoreTimeout"
    [timeout] = _fields(sink, "store.call_timeout")
    assert timeout["started"] is True and timeout["abandoned"] == 1

    path.pass_through()
    assert _call(db) == []  # a new connection in the interrupted one's place


def test_a_statement_on_a_stalled_path_is_interrupted(
    db: store.Store, path: PgBlackhole, sink: MemorySink
) -> None:
    """The path stalls after the connection was checked out: the query itself is held."""
    ready, go = threading.Event(), threading.Event()

    def count_senders(s: store.Store) -> int:
        with s.engine.connect() as conn:
            ready.set()
            go.wait(DEADLINE)
            return int(conn.execute(text("SELECT count(*) FROM senders")).scalar_one())

    async def main() -> None:
        task = asyncio.ensure_future(db.call(count_senders, db, timeout=SLOW_START))
        assert await asyncio.to_thread(ready.wait, DEADLINE)
        path.stall()
        go.set()
        with pytest.raises(StoreTimeout):
            await task

    try:
        asyncio.run(main())
    finally:
        go.set()
    [returned] = _thread_back(db, sink)
    assert returned["function"] == "count_senders" and returned["error"] == "OperationalError"
    [interrupted] = _fields(sink, "store.call_interrupted")
    assert interrupted["function"] == "count_senders" and interrupted["connections"] == 1
    path.pass_through()
    assert _call(db) == []


def test_interrupted_threads_are_free_for_the_next_calls(
    db: store.Store, pg: PgDatabase, path: PgBlackhole, sink: MemorySink
) -> None:
    """Every thread's connection black-holed, new connections getting through: once the
    stalled calls are interrupted, DB_THREADS+1 calls all get a thread and succeed (without
    the interruption every thread would stay held and each of them would time out)."""
    barrier = threading.Barrier(DB_THREADS)

    def hold(s: store.Store) -> None:  # each thread has a connection of its own at once
        with s.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            barrier.wait(DEADLINE)

    async def fill() -> None:
        await asyncio.gather(*(db.call(hold, db, timeout=DEADLINE) for _ in range(DB_THREADS)))

    async def stalled() -> list[BaseException | list[Any]]:
        calls = (db.call(list_senders, db, timeout=SHORT) for _ in range(DB_THREADS))
        return await asyncio.gather(*calls, return_exceptions=True)

    async def after() -> list[list[Any]]:
        calls = (db.call(list_senders, db, timeout=DEADLINE) for _ in range(DB_THREADS + 1))
        return await asyncio.gather(*calls)

    asyncio.run(fill())
    assert len(pg.sessions("mailwarden")) >= DB_THREADS  # pooled, through the path
    path.stall(existing_only=True)
    results = asyncio.run(stalled())
    assert all(isinstance(r, StoreTimeout) for r in results), results
    assert path.stalled() >= DB_THREADS  # each thread's ping is held
    _thread_back(db, sink, DB_THREADS)
    assert len(_fields(sink, "store.call_interrupted")) == DB_THREADS

    assert asyncio.run(after()) == [[]] * (DB_THREADS + 1)
    timeouts = _fields(sink, "store.call_timeout")
    assert [t["started"] for t in timeouts] == [True] * DB_THREADS  # none after them


def test_the_cancel_request_stops_the_statement(
    tmp_path: Path, pg: PgDatabase, sink: MemorySink
) -> None:
    """A server that is there but slow (no statement_timeout): the interrupted call's
    statement is cancelled on the server too, not left running for nobody. Over the Unix
    socket, no injector: the server answers, the statement is just long."""
    db = store.open(_config(tmp_path, pg.url, statement_timeout=0))

    def sleep_long(s: store.Store) -> None:
        with s.engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(600)"))  # a test timeout, were it not cut

    def sleeping() -> list[tuple[Any, ...]]:
        return pg.sql(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND state = 'active'"
            " AND query LIKE 'SELECT pg_sleep(%%'",
            (pg.name,),
        )

    async def main() -> None:
        task = asyncio.ensure_future(db.call(sleep_long, db, timeout=SLOW_START))
        await asyncio.to_thread(poll, sleeping, DEADLINE, 0.05, "the statement to run")
        assert not task.done(), "the call's deadline passed before its statement started"
        with pytest.raises(StoreTimeout):
            await task

    try:
        assert asyncio.run(db.call(list_senders, db)) == []
        asyncio.run(main())
        [interrupted] = _fields(sink, "store.call_interrupted")
        assert interrupted["function"] == "sleep_long" and interrupted["cancel"] is True
        [returned] = _thread_back(db, sink)
        assert returned["error"] == "OperationalError"
        poll(lambda: not sleeping(), DEADLINE, 0.1, "the server to stop the statement")
        assert asyncio.run(db.call(list_senders, db)) == []
    finally:
        db.close()


def test_a_cancelled_caller_is_interrupted_at_its_deadline(
    db: store.Store, path: PgBlackhole, sink: MemorySink
) -> None:
    """An AUTH past ``[auth] timeout`` cancels its call: the call is interrupted when its
    own deadline passes (not at once: a client hanging up must not cost a connection)."""
    assert _call(db) == []
    path.stall()

    async def main() -> None:
        task = asyncio.ensure_future(db.call(list_senders, db, timeout=SLOW_START))
        await asyncio.to_thread(poll, path.stalled, DEADLINE, 0.02, "the ping to be held")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _fields(sink, "store.call_interrupted") == []  # its deadline is still ahead
        assert db.abandoned == 1
        # The loop runs on: the interruption is scheduled on it.
        await asyncio.to_thread(
            poll, lambda: db.abandoned == 0, SLOW_START + BACK, 0.02, "the thread back"
        )

    asyncio.run(main())
    assert _fields(sink, "store.call_timeout") == []  # cancelled, not timed out
    assert len(_fields(sink, "store.call_interrupted")) == 1
    assert len(_fields(sink, "store.call_returned")) == 1


def test_a_call_without_a_connection_at_its_deadline_gets_none_after(
    db: store.Store, sink: MemorySink
) -> None:
    """Nothing to interrupt when the deadline passes (the function had not asked for a
    connection yet): the call is abandoned as before, and when it asks for one afterwards
    it gets ``StoreTimeout`` instead of doing work whose result nobody waits for."""
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def late_read(s: store.Store) -> list[Any]:
        started.set()
        release.wait(DEADLINE)
        ran.append("asked")
        return list_senders(s)

    async def main() -> None:
        task = asyncio.ensure_future(db.call(late_read, db, timeout=SHORT))
        assert await asyncio.to_thread(started.wait, DEADLINE)
        with pytest.raises(StoreTimeout):
            await task

    try:
        asyncio.run(main())
        assert _fields(sink, "store.call_interrupted") == []
        assert db.abandoned == 1
    finally:
        release.set()
    [returned] = _thread_back(db, sink)
    assert ran == ["asked"] and returned["error"] == "StoreTimeout"
    assert _call(db) == []  # the pool is intact


def test_sqlite_is_not_interrupted(tmp_path: Path, sink: MemorySink) -> None:
    """SQLite is a local file: a call past its deadline keeps its connection and thread
    until it ends, as before; the store goes on working."""
    db = store.open(default_config(gateway={"state_dir": str(tmp_path)}))
    ready, release = threading.Event(), threading.Event()

    def hold_then_read(s: store.Store) -> int:
        with s.engine.connect() as conn:
            ready.set()
            release.wait(DEADLINE)
            return int(conn.execute(text("SELECT count(*) FROM senders")).scalar_one())

    async def main() -> None:
        task = asyncio.ensure_future(db.call(hold_then_read, db, timeout=SHORT))
        assert await asyncio.to_thread(ready.wait, DEADLINE)
        with pytest.raises(StoreTimeout):
            await task
        assert await db.call(list_senders, db, timeout=DEADLINE) == []  # the other thread

    try:
        asyncio.run(main())
        assert db.abandoned == 1  # still held: nothing interrupted it
        assert _fields(sink, "store.call_interrupted") == []
        release.set()
        poll(lambda: db.abandoned == 0, DEADLINE, 0.02, "the call to end")
        [returned] = _fields(sink, "store.call_returned")
        assert returned.get("error") is None  # it ran to its end; the result was dropped
        assert asyncio.run(db.call(list_senders, db)) == []
    finally:
        release.set()
        db.close()

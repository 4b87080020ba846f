"""The deadline of opening a PostgreSQL store (``[database] open_timeout``), on a real server
behind ``tests.support.pgfault.PgBlackhole`` (a path that stalls after the connection was
made).

No timeout of libpq's or the server's fires on a path that accepted the connection and then
stopped forwarding, so without the deadline ``open_store`` (engine, schema creation under
the advisory lock, version check) would wait until the path flows again, perhaps never; a
gateway worker's first open, or its background retry, would wait with it. Here: the path
stalls right after the login (the dialect's first statements are held) or at the schema
step (the advisory lock's statement is held); either way ``open_store`` raises
``StoreUnavailable`` (the transient failure the gateway retries) with ``store.open_timeout``,
the connection it held is interrupted (``store.call_interrupted``) and its thread is back
while the path is still stalled; with the old flows dead and new connections getting
through, the next open succeeds. ``probe_store`` (``mailwarden status``) has the same
deadline. The URL's password never shows. Also ``store.interrupt.run_bounded`` itself (on
SQLite, with a function that waits for the test): an outcome in time is the caller's, one
past the limit goes to ``late``.

``BACK`` bounds every wait for something that must happen (without the deadline the open
would not come back before the path flows); no duration is asserted. No untrusted input;
the injector listens on 127.0.0.1 only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event

from mailwarden import store
from mailwarden.config import Config, default_config
from mailwarden.core.events import MemorySink
from mailwarden.errors import StoreUnavailable
from mailwarden.store import db as store_db
from mailwarden.store.interrupt import Call, CallWatch, Overdue, run_bounded
from mailwarden.store.senders import list_senders
from tests.support.pgfault import PgBlackhole
from tests.support.postgres import PgDatabase
from tests.support.tmpdirs import poll

BACK = 20.0  # bounds a wait that must end (the open, its thread); never an assertion
SHORT = 1.0  # the open_timeout of opens meant to miss it
LONG = 60.0  # the open_timeout of opens meant to succeed
URL_PASSWORD = "Db-pass-3391"  # trust authentication ignores it; it must never show


def _config(tmp_path: Path, path: PgBlackhole, pg: PgDatabase, timeout: float) -> Config:
    url = path.url(pg.role, pg.name, URL_PASSWORD)
    return default_config(
        gateway={"state_dir": str(tmp_path)}, database={"url": url, "open_timeout": timeout}
    )


def _fields(sink: MemorySink, name: str) -> list[dict[str, Any]]:
    return [dict(e.fields) for e in sink.events if e.name == name]


def _opening_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mw-db-open_store")]


def _in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` on a daemon thread; the returned function waits at most BACK for its
    outcome (a hang fails the test instead of holding it until the path flows)."""
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except Exception as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result() -> Any:
        thread.join(BACK)
        assert outcome, f"no answer within {BACK:g} s: it hangs on the stalled path"
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    return result


def _stall_at_first_checkout(monkeypatch: pytest.MonkeyPatch, path: PgBlackhole) -> None:
    """The next engine made stalls its path when the schema step checks its connection out
    (connected, the dialect's checks done): the advisory lock's statement is held."""
    make_engine = store_db.make_engine

    def make(*args: Any, **kwargs: Any) -> Engine:
        engine = make_engine(*args, **kwargs)
        event.listen(engine, "checkout", lambda *_: path.stall(existing_only=True), once=True)
        return engine

    monkeypatch.setattr(store_db, "make_engine", make)


def _check_timed_out(sink: MemorySink, info: pytest.ExceptionInfo[StoreUnavailable]) -> None:
    message = str(info.value)
    assert "cannot reach the database" in message and f"no answer within {SHORT:g} s" in message
    assert URL_PASSWORD not in message and "***" in message
    [timeout] = _fields(sink, "store.open_timeout")
    assert timeout["function"] == "open_store" and timeout["timeout"] == SHORT
    assert URL_PASSWORD not in timeout["database"]
    [interrupted] = _fields(sink, "store.call_interrupted")
    assert interrupted["function"] == "open_store" and interrupted["connections"] == 1


def test_open_on_a_path_that_stalls_after_login(
    tmp_path: Path, pg: PgDatabase, path: PgBlackhole, sink: MemorySink
) -> None:
    path.stall(after_login=True)
    opened = _in_thread(lambda: store.open(_config(tmp_path, path, pg, SHORT)))
    with pytest.raises(StoreUnavailable) as info:
        opened()
    _check_timed_out(sink, info)
    # The opening thread is back (its connection shut down) while the path still stalls.
    poll(lambda: not _opening_threads(), BACK, 0.02, "the opening thread to end")
    assert path.stalled() >= 1

    # The old flow stays dead, new connections get through: the next open succeeds.
    path.stall(existing_only=True)
    db = _in_thread(lambda: store.open(_config(tmp_path, path, pg, LONG)))()
    try:
        assert list_senders(db) == []
    finally:
        db.close()
    assert len(_fields(sink, "store.open_timeout")) == 1


def test_open_on_a_path_that_stalls_at_the_schema_step(
    tmp_path: Path,
    pg: PgDatabase,
    path: PgBlackhole,
    sink: MemorySink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _stall_at_first_checkout(monkeypatch, path)
    opened = _in_thread(lambda: store.open(_config(tmp_path, path, pg, SHORT)))
    with pytest.raises(StoreUnavailable) as info:
        opened()
    _check_timed_out(sink, info)
    poll(lambda: not _opening_threads(), BACK, 0.02, "the opening thread to end")
    assert path.stalled() >= 1  # the schema step's statement, still held
    assert not pg.sql(  # the schema was never created: its transaction never reached it
        "SELECT 1 FROM pg_tables WHERE schemaname = 'public' AND tablename = 'senders'"
    )

    monkeypatch.undo()
    db = _in_thread(lambda: store.open(_config(tmp_path, path, pg, LONG)))()
    try:
        assert list_senders(db) == []
    finally:
        db.close()


def test_probe_has_the_open_deadline(
    tmp_path: Path, pg: PgDatabase, path: PgBlackhole, sink: MemorySink
) -> None:
    path.stall(after_login=True)
    reason = _in_thread(lambda: store_db.probe_store(_config(tmp_path, path, pg, SHORT)))()
    assert reason == f"no answer within {SHORT:g} s"
    [timeout] = _fields(sink, "store.open_timeout")
    assert timeout["function"] == "probe_store"
    path.stall(existing_only=True)
    assert _in_thread(lambda: store_db.probe_store(_config(tmp_path, path, pg, LONG)))() is None


def test_an_open_that_answers_in_time_is_not_cut(
    tmp_path: Path, pg: PgDatabase, path: PgBlackhole, sink: MemorySink
) -> None:
    """A path that flows: the store opens as before, its calls use the open's watch."""
    db = store.open(_config(tmp_path, path, pg, LONG))
    try:
        assert list_senders(db) == []
    finally:
        db.close()
    assert _fields(sink, "store.open_timeout") == []
    assert _fields(sink, "store.call_interrupted") == []


def test_run_bounded_hands_what_ends_too_late_to_late() -> None:
    engine = create_engine("sqlite://")
    watch = CallWatch(engine)
    release = threading.Event()
    overdue: list[str] = []
    late: list[str] = []

    def slow() -> str:
        release.wait(BACK)
        return "done"

    def run(fn: Callable[[], Any], limit: float) -> Any:
        return run_bounded(
            watch, Call(fn.__name__), limit, fn,
            overdue=lambda: overdue.append(fn.__name__), late=lambda: late.append(fn.__name__),
        )  # fmt: skip

    try:
        assert run(lambda: 7, BACK) == 7
        with pytest.raises(ZeroDivisionError):
            run(lambda: 1 / 0, BACK)
        assert overdue == [] and late == []
        with pytest.raises(Overdue, match=r"no answer within 0\.05 s"):
            run(slow, 0.05)
        assert overdue == ["slow"] and late == []
    finally:
        release.set()
    poll(lambda: late, BACK, 0.02, "late() on the thread that ended")
    assert late == ["slow"]
    engine.dispose()

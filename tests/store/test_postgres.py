"""The store on a real PostgreSQL server, what only PostgreSQL has: session settings from the
config and the URL, a bounded pool, connections the server killed are replaced without an
error, a database that is down fails fast (AUTH answers TEMPFAIL, the policy keeps its
caches) and is used again as soon as it is back, a writer gives up at ``lock_timeout``
and a statement at ``statement_timeout`` instead of hanging, and a server that stops
answering mid-session (the path stalls: ``tests.support.pgfault``) is a call timeout whose
connection is interrupted (details in tests/store/test_interrupt.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from mailwarden import store
from mailwarden.auth.base import AuthResult
from mailwarden.auth.database import DatabaseAuthenticator
from mailwarden.auth.passwords import Hasher
from mailwarden.auth.settings import Argon2Settings
from mailwarden.config import Config, default_config
from mailwarden.core.events import MemorySink, get_sink, set_sink
from mailwarden.errors import StoreError, StoreTimeout
from mailwarden.store.blocks import add_block, list_blocks
from mailwarden.store.db import DB_THREADS
from mailwarden.store.senders import add_sender, list_senders
from mailwarden.store.users import add_user
from tests.support.pgfault import PgBlackhole
from tests.support.postgres import PgDatabase, admin_connect
from tests.support.tmpdirs import poll

FAST_ARGON2 = Argon2Settings(time_cost=1, memory_cost=1024, parallelism=1)
CAMPUS = [ipaddress.ip_network("10.0.0.0/8")]


def _config(tmp_path: Path, url: str, **database: Any) -> Config:
    return default_config(gateway={"state_dir": str(tmp_path)}, database={"url": url} | database)


@pytest.fixture
def pg(pg_database: PgDatabase) -> PgDatabase:
    pg_database.allow_connections()  # in case a failed test left it refused
    pg_database.reset()
    return pg_database


def test_session_settings_from_config_and_url(tmp_path: Path, pg: PgDatabase) -> None:
    # The operator's own libpq options in the URL are kept next to ours.
    url = pg.url + "&options=-c%20TimeZone%3DPacific/Chatham"
    db = store.open(_config(tmp_path, url, busy_timeout=1.5))
    try:
        with db.engine.connect() as conn:
            assert conn.execute(text("SHOW lock_timeout")).scalar() == "1500ms"
            assert conn.execute(text("SHOW TimeZone")).scalar() == "Pacific/Chatham"
            assert conn.execute(text("SHOW application_name")).scalar() == "mailwarden"
            assert conn.execute(text("SELECT current_user")).scalar() == "mailwarden_test"
            superuser = "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
            assert conn.execute(text(superuser)).scalar() is False
        # Times are epoch seconds: the session's time zone changes nothing.
        s = add_sender(db, "10.9.9.9", name="x", domains=["a.example"], campus=CAMPUS)
        assert list_senders(db)[0].added_at == s.added_at
        add_block(db, "192.0.2.1", "x", time.time() + 3600)
        add_block(db, "192.0.2.2", "x", time.time() - 1)
        assert [b.address for b in list_blocks(db)] == ["192.0.2.1"]
    finally:
        db.close()


def test_pool_is_bounded(tmp_path: Path, pg: PgDatabase) -> None:
    db = store.open(_config(tmp_path, pg.url, pool_size=3))
    try:
        assert db.engine.pool.size() == 3  # type: ignore[attr-defined]
        assert db.engine.pool._max_overflow == 0  # type: ignore[attr-defined]

        async def burst() -> None:
            await asyncio.gather(*(db.call(list_senders, db) for _ in range(50)))

        asyncio.run(burst())
        # Calls run on DB_THREADS threads: never more sessions than that (and pool_size).
        assert 1 <= len(pg.sessions("mailwarden")) <= min(3, DB_THREADS)
    finally:
        db.close()
    # close() ends every connection (the server notices within moments).
    poll(lambda: pg.sessions("mailwarden") == [], 30, what="the sessions to end")


def test_connections_killed_by_the_server_are_replaced(tmp_path: Path, pg: PgDatabase) -> None:
    db = store.open(_config(tmp_path, pg.url))
    try:
        add_sender(db, "10.1.1.1", name="a", domains=["a.example"], campus=CAMPUS)
        before = set(pg.sessions("mailwarden"))
        assert before
        assert pg.terminate() >= len(before)  # what a server restart does to its clients
        # The next calls get new connections, no error reaches the caller.
        assert [str(s.network) for s in list_senders(db)] == ["10.1.1.1/32"]
        add_sender(db, "10.1.1.2", name="b", domains=["a.example"], campus=CAMPUS)
        poll(
            lambda: not before & set(pg.sessions("mailwarden")),
            30,
            what="the terminated sessions to go",
        )
    finally:
        db.close()


def test_database_down_fails_fast_and_recovers(tmp_path: Path, pg: PgDatabase) -> None:
    cfg = _config(tmp_path, pg.url)
    db = store.open(cfg)
    hasher = Hasher(FAST_ARGON2)
    add_user(db, "alice", hasher.hash("pw-alice-1"), ["alice@example.edu"])
    auth = DatabaseAuthenticator(db, hasher)

    async def login() -> AuthResult:
        return await auth.authenticate("Alice", "pw-alice-1")

    try:
        assert asyncio.run(login()) is AuthResult.OK
        pg.refuse_connections()
        try:
            with pytest.raises(OperationalError, match="not currently accepting connections"):
                list_senders(db)
            assert asyncio.run(login()) is AuthResult.TEMPFAIL  # SMTP: 454 4.7.0
            with pytest.raises(StoreError):
                store.open(cfg)  # a gateway starting now stops with a clear error
        finally:
            pg.allow_connections()
        # Back: the same Store (same engine and pool) works again.
        assert asyncio.run(login()) is AuthResult.OK
        assert list_senders(db) == []
    finally:
        auth.close()  # closes db too


def test_writer_gives_up_at_lock_timeout(tmp_path: Path, pg: PgDatabase) -> None:
    db = store.open(_config(tmp_path, pg.url, busy_timeout=0.3))
    try:
        with admin_connect(pg.name) as holder:
            holder.autocommit = False
            holder.execute("LOCK TABLE blocks IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(OperationalError) as info:
                add_block(db, "192.0.2.1", "x", time.time() + 60)
            assert isinstance(info.value.orig, psycopg.errors.LockNotAvailable)
            holder.rollback()
        add_block(db, "192.0.2.1", "x", time.time() + 60)  # the lock is gone: it works
        assert [b.address for b in list_blocks(db)] == ["192.0.2.1"]
    finally:
        db.close()


def test_tcp_connections_carry_keepalives_and_a_user_timeout(
    tmp_path: Path, pg: PgDatabase
) -> None:
    """Over TCP (through a pass-through port to the test server: the suite's network
    namespace reaches PostgreSQL only by its Unix socket), the socket libpq opened has the
    options a vanished server needs, read back from the kernel; the URL's own value wins."""
    with PgBlackhole() as port:
        port.pass_through()
        url = port.url(pg.role, pg.name, query="keepalives_idle=45")
        db = store.open(_config(tmp_path, url))
        try:
            with db.engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar() == 1
                raw = conn.connection.dbapi_connection
                assert isinstance(raw, psycopg.Connection)
                sock = socket.socket(fileno=os.dup(raw.pgconn.socket))
                try:
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 45
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
                finally:
                    sock.close()
        finally:
            db.close()


def test_statement_timeout_from_config_and_url(tmp_path: Path, pg: PgDatabase) -> None:
    """``[database] statement_timeout`` on every session: the server cancels a statement
    that runs longer; 0 turns it off; the URL's own ``options=`` win over the config."""
    db = store.open(_config(tmp_path, pg.url, statement_timeout=0.2))
    try:
        with db.engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "200ms"
            with pytest.raises(OperationalError) as info:
                conn.execute(text("SELECT pg_sleep(30)"))  # a test timeout, were it not cut
            assert isinstance(info.value.orig, psycopg.errors.QueryCanceled)
            assert "canceling statement due to statement timeout" in str(info.value.orig)
        assert list_senders(db) == []  # the pool goes on with the next statement
    finally:
        db.close()

    db = store.open(_config(tmp_path, pg.url, statement_timeout=0))
    try:
        with db.engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "0"
    finally:
        db.close()

    own = "&options=-c%20statement_timeout%3D4321%20-c%20lock_timeout%3D1234"
    db = store.open(_config(tmp_path, pg.url + own, statement_timeout=0.2, busy_timeout=1.5))
    try:
        with db.engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "4321ms"
            assert conn.execute(text("SHOW lock_timeout")).scalar() == "1234ms"
    finally:
        db.close()


def test_a_stalled_server_is_a_timeout_not_a_hang(tmp_path: Path, pg: PgDatabase) -> None:
    """Connected, then the path to the server stalls (``PgBlackhole.stall``: what the client
    sends is acknowledged, nothing comes back, no timeout of TCP's or the server's fires):
    each call gives up at ``call_timeout`` (AUTH answers TEMPFAIL, the store reports the
    timeout), its connection is interrupted so its thread is back while the path is still
    stalled; a new connection made meanwhile is held by the path, so the next call times out
    too; once the path flows again the same store answers."""
    with PgBlackhole() as path:
        path.pass_through()
        cfg = _config(tmp_path, path.url(pg.role, pg.name), call_timeout=0.5)
        db = store.open(cfg)
        hasher = Hasher(FAST_ARGON2)
        add_user(db, "alice", hasher.hash("pw-alice-1"), ["alice@example.edu"])
        auth = DatabaseAuthenticator(db, hasher)
        sink, previous = MemorySink(), get_sink()
        set_sink(sink)

        def events(name: str) -> list[dict[str, Any]]:
            return [dict(e.fields) for e in sink.events if e.name == name]

        async def login() -> AuthResult:  # a hang fails the test, not a duration
            return await asyncio.wait_for(auth.authenticate("alice", "pw-alice-1"), 120)

        try:
            assert asyncio.run(login()) is AuthResult.OK
            path.stall()
            assert asyncio.run(login()) is AuthResult.TEMPFAIL  # SMTP: 454 4.7.0
            assert path.stalled() >= 1  # answered while the query was still held
            [timeout] = events("store.call_timeout")
            assert timeout["function"] == "get_user" and timeout["started"] is True
            assert timeout["abandoned"] == 1
            assert events("auth.error") == [{"backend": "database", "error": "StoreTimeout"}]
            # Interrupted: its thread is back while the path still holds the query.
            poll(lambda: db.abandoned == 0, 60, what="the stalled call to return")
            [interrupted] = events("store.call_interrupted")
            assert interrupted["function"] == "get_user"
            assert path.stalled() >= 1
            with pytest.raises(StoreTimeout):  # the next call too, while it lasts
                asyncio.run(db.call(list_senders, db))

            path.pass_through()
            poll(lambda: db.abandoned == 0, 60, what="the held connection attempt to return")
            assert len(events("store.call_returned")) == 2
            assert asyncio.run(login()) is AuthResult.OK
        finally:
            path.pass_through()
            set_sink(previous)
            auth.close()  # closes db too

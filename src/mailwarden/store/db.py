"""Opening the data store: engine, schema creation, WAL mode, a thread for blocking calls.

``open_store(cfg)`` builds the engine from ``[database] url`` (empty: SQLite at
``state_dir/mailwarden.db`` in WAL mode), creates the tables if needed, records the schema
version and returns a ``Store``. ``Store.call(fn, *args)`` runs a blocking function on the
store's own small thread pool so the event loop never waits on the database; CLI commands
call the same functions directly.

A call has a deadline (``[database] call_timeout``, or ``timeout=``): a server that is
connected but does not answer (a hung backend, a lock or I/O stall, a proxy that stopped
forwarding) makes it raise ``StoreTimeout``, a ``StoreUnavailable``, so every caller
answers as for a server that is down (AUTH ``454``, the policy keeps its caches), with a
``store.call_timeout`` event. On PostgreSQL the connection the call's thread holds is then
interrupted (``store.interrupt``: its socket shut down, a cancel request sent; event
``store.call_interrupted``): the thread comes back at once with an error, the pool replaces
the connection. A call whose caller was cancelled is interrupted likewise when its deadline
passes. A thread still opening a new connection holds none yet: it comes back within
libpq's ``connect_timeout``. On SQLite (a local file: nothing to interrupt) the thread stays
busy until the call ends. Either way the returning thread says so (``store.call_returned``)
and its result is discarded; while every thread is busy so, later calls wait for a free one
and time out too (4xx, never a hang); ``close`` does not wait for such calls.

PostgreSQL (``postgresql+psycopg://``): a bounded pool (``[database] pool_size``, no
overflow) whose connections are pinged before use (by the ``Store``'s ``CallWatch``, so a
ping can be interrupted too), so connections the server dropped (a restart,
``pg_terminate_backend``, an idle timeout) are replaced transparently; while the server is
down each call fails fast with ``OperationalError`` (callers answer 4xx) and the first call
after it is back succeeds. Every session gets ``lock_timeout`` (``busy_timeout``),
``statement_timeout`` and a ``connect_timeout``; the URL's own ``options=`` come after
ours, so they win. Schema creation holds a transaction-scoped advisory lock, so
gateway nodes and CLI commands that start at once on an empty database do not collide.
``bump_serial`` increments in SQL (no lost update between two writers).

A PostgreSQL server that cannot be reached right now (``is_transient``: connection refused,
no socket, timeout, too many connections, database not accepting connections, starting or
shutting down) makes ``open_store`` raise ``StoreUnavailable`` at once, without retrying:
the gateway starts degraded and retries in the background. So does an open that has not
ended within ``[database] open_timeout`` (a server or path that stalls after accepting the
connection: no timeout of libpq's or the server's fires then): it runs on a thread of its
own as a call of the new store's ``CallWatch`` (``store.interrupt.run_bounded``), and past
the deadline the connection it holds is interrupted (events ``store.open_timeout``,
``store.call_interrupted``). Everything else (a bad URL, a role or database that does not
exist, an unusable SQLite path) is a plain ``StoreError``. ``probe_store`` checks, with the
same deadline, that the configured server answers (``mailwarden status``). Both take
``connect_timeout`` (libpq's, seconds per address; the URL's own wins): the CLI gives a
shorter one than the gateway. Error texts are one line (``error_reason``: the driver's
first line, redacted; libpq's hint lines are dropped).

Public names: ``Store``, ``open_store``, ``probe_store``, ``store_label``, ``error_reason``,
``is_transient``, ``bump_serial``, ``SCHEMA_VERSION``.
Security: the driver's error text (untrusted: it may quote the server) is only matched
against fixed substrings and printed redacted; the SQLite file is created mode 0600; the
URL's password is never logged or printed: labels use ``DatabaseSettings.safe_url`` and
error texts (which may quote the driver) pass through ``DatabaseSettings.redact``. All SQL
is built by SQLAlchemy with bound parameters.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    String,
    cast,
    create_engine,
    event,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from mailwarden.core.events import emit
from mailwarden.core.sqlite import enable_wal
from mailwarden.errors import StoreError, StoreTimeout, StoreUnavailable
from mailwarden.store.interrupt import Call, CallWatch, Overdue, run_bounded
from mailwarden.store.schema import (
    BLOCKS_SERIAL,
    SCHEMA_VERSION,
    SENDERS_SERIAL,
    USERS_SERIAL,
    meta,
    metadata,
)
from mailwarden.store.settings import DatabaseSettings

if TYPE_CHECKING:
    from mailwarden.config import Config

T = TypeVar("T")
DB_THREADS = 2  # threads per process for database calls (SQLite has one writer anyway)
DB_FILE = "mailwarden.db"
CONNECT_TIMEOUT = 10  # seconds for a new PostgreSQL connection (libpq connect_timeout)
# libpq's TCP options (ignored on Unix sockets; the URL's own win). Without them a server
# host that vanishes while a query is in flight holds that connection, and the thread
# waiting on it, for the kernel's retransmission timeout (about 15 minutes): with them a
# query whose bytes go unacknowledged for 30 s fails, and an idle connection to a dead
# host is noticed within about a minute (30 s idle + 3 probes 10 s apart).
TCP_OPTIONS = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # milliseconds
}
POOL_RECYCLE = 1800  # seconds; older PostgreSQL connections are replaced (idle firewalls)
APPLICATION_NAME = "mailwarden"  # pg_stat_activity.application_name of our sessions
SCHEMA_LOCK = 0x6D77_5343  # pg_advisory_xact_lock key held while the schema is created
INIT_ATTEMPTS = 3  # schema creation tries (SQLite: several processes may race)

__all__ = [
    "SCHEMA_VERSION",
    "Store",
    "error_reason",
    "is_transient",
    "open_store",
    "probe_store",
    "store_label",
]

# libpq's texts (lower-cased) for a server that is there but cannot take us right now, or
# is not there at all. psycopg gives no SQLSTATE for a failed connection, so the text is
# all there is; a role or database that does not exist matches none of them (fail fast).
TRANSIENT_TEXTS = (
    "connection refused",
    "no such file or directory",  # the server's Unix socket is gone: it is down
    "timeout expired",
    "timed out",
    "too many clients",
    "too many connections",
    "remaining connection slots are reserved",
    "is not currently accepting connections",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "server closed the connection unexpectedly",
    "terminating connection due to administrator command",
    "network is unreachable",
    "no route to host",
    "temporary failure in name resolution",
)
TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57")  # connection, resources, operator action


def _sqlite_pragmas(busy_ms: int) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        enable_wal(dbapi_conn, busy_ms)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; fine for WAL
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return on_connect


class Store:
    """An open database: the engine plus a private thread pool for blocking calls."""

    def __init__(
        self,
        engine: Engine,
        settings: DatabaseSettings,
        label: str,
        watch: CallWatch | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.label = label  # printable location (no password)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._abandoned = 0  # see ``abandoned``
        # PostgreSQL: the connections of calls past their deadline can be interrupted
        # (``watch``: the one ``open_store`` made for the engine already).
        if watch is None and engine.dialect.name == "postgresql":
            watch = CallWatch(engine)
        self._watch = watch

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @property
    def abandoned(self) -> int:
        """Calls whose caller stopped waiting (deadline passed, or cancelled) that still
        hold one of the store's threads: waiting for a server that does not answer."""
        with self._lock:
            return self._abandoned

    async def call(
        self, fn: Callable[..., T], *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> T:
        """Run ``fn(*args, **kwargs)`` (blocking database work) off the event loop.

        Waits at most ``timeout`` seconds (default ``[database] call_timeout``), then raises
        ``StoreTimeout`` (a ``StoreUnavailable``) and emits ``store.call_timeout``. A call
        still waiting for a free thread then is dropped; a running one is abandoned: on
        PostgreSQL its connection is interrupted (``store.call_interrupted``), on SQLite its
        thread goes on until it ends; either way ``store.call_returned`` says when the
        thread is free, and the result is discarded."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="mw-db")
        limit = self.settings.call_timeout if timeout is None else timeout
        call = Call(getattr(fn, "__name__", type(fn).__name__))
        name, since = call.name, call.since
        if self._watch is None:
            work = self._pool.submit(fn, *args, **kwargs)
        else:
            work = self._pool.submit(self._watch.run, call, fn, *args, **kwargs)
        future = asyncio.wrap_future(work)
        try:
            # asyncio.wait, not asyncio.timeout: it works outside a task too (smtp.aio)
            done, _ = await asyncio.wait({future}, timeout=limit)
        except BaseException:  # our caller was cancelled (an AUTH past [auth] timeout)
            future.cancel()
            if self._abandon(work, name, since) and self._watch is not None:
                # Not at once (a client that hangs up mid-AUTH must not cost a connection):
                # at the deadline the call would have had, if it is still running then.
                left = max(0.0, since + limit - time.monotonic())
                asyncio.get_running_loop().call_later(left, self._overdue, work, call)
            raise
        future.cancel()  # done or not: our answer is decided below
        if done or (work.done() and not work.cancelled()):  # (finished as the deadline passed)
            return work.result()
        started = self._abandon(work, name, since)
        emit(
            "store.call_timeout",
            function=name,
            timeout=limit,
            started=started,
            abandoned=self.abandoned,
            threads=DB_THREADS,
        )
        if started and self._watch is not None:
            self._watch.interrupt(call)  # its thread comes back (store.call_returned)
        raise StoreTimeout(f"no answer from the database {self.label} within {limit:g} s")

    def _overdue(self, work: Future[Any], call: Call) -> None:
        """The deadline of a call whose caller was cancelled: interrupt it if it still runs."""
        if self._watch is not None and not work.done():
            self._watch.interrupt(call)

    def _abandon(self, work: Future[Any], name: str, since: float) -> bool:
        """Nobody waits for ``work`` any more: drop it if no thread has started it (False),
        else (True) count it until its thread is free again."""
        if work.cancel():  # still queued behind busy threads: it never runs
            return False
        with self._lock:
            if work.done():  # finished just now
                return True
            self._abandoned += 1
        work.add_done_callback(partial(self._returned, name, since))
        return True

    def _returned(self, name: str, since: float, work: Future[Any]) -> None:
        """An abandoned call finished (on its thread): the thread is free again."""
        with self._lock:
            self._abandoned -= 1
            left = self._abandoned
        exc = work.exception()
        emit(
            "store.call_returned",
            function=name,
            seconds=round(time.monotonic() - since, 3),
            error=type(exc).__name__ if exc is not None else None,
            abandoned=left,
        )

    def serial(self, key: str) -> int:
        """The change serial ``key`` (0 if never bumped)."""
        with self.engine.connect() as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()
        return int(value) if value is not None else 0

    def close(self) -> None:
        """Release the pool and the engine; calls that were abandoned are not waited for
        (their server may never answer)."""
        if self._pool is not None:
            self._pool.shutdown(wait=not self.abandoned)
            self._pool = None
        self.engine.dispose()


def bump_serial(conn: Connection, key: str) -> None:
    """Increment change serial ``key`` inside the caller's transaction.

    One ``UPDATE ... SET value = value + 1``: two writers in different processes never
    both write the same new value (a read-then-write would lose one increment on
    PostgreSQL, and a reader could then miss the second change)."""
    res = conn.execute(
        update(meta)
        .where(meta.c.key == key)
        .values(value=cast(cast(meta.c.value, BigInteger) + 1, String))
    )
    if not res.rowcount:  # a database made before the serial existed
        conn.execute(meta.insert().values(key=key, value="1"))


def database_url(settings: DatabaseSettings, state_dir: Path) -> str:
    if settings.url:
        return settings.url
    return f"sqlite:///{(state_dir / DB_FILE).resolve()}"


def _create_sqlite_file(url: str) -> None:
    path = url.removeprefix("sqlite:///")
    if not path or path == ":memory:" or os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)


def store_label(cfg: Config) -> str:
    """Where the database is, printable (the URL's password as ``***``)."""
    settings: DatabaseSettings = cfg.database
    return settings.safe_url or f"sqlite:///{cfg.state_path / DB_FILE}"


def error_reason(settings: DatabaseSettings, exc: BaseException) -> str:
    """The driver's message of ``exc`` as one line, with the URL's password as ``***``.

    libpq adds hint lines ("Is the server running on that host ...?") and psycopg lists
    every failed address after the first line; the first line says what went wrong."""
    text = settings.redact(str(getattr(exc, "orig", None) or exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def make_engine(
    settings: DatabaseSettings, state_dir: Path, *, connect_timeout: int = CONNECT_TIMEOUT
) -> Engine:
    url = database_url(settings, state_dir)
    if url.startswith("sqlite"):
        _create_sqlite_file(url)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas(int(settings.busy_timeout * 1000)))
        return engine
    parsed = make_url(url)
    options = (
        f"-c lock_timeout={round(settings.busy_timeout * 1000)}"
        f" -c statement_timeout={round(settings.statement_timeout * 1000)}"
    )
    given = parsed.query.get("options")
    if given:  # the operator's own options (from the URL) come last: the server's last wins
        options = f"{options} {given if isinstance(given, str) else ' '.join(given)}"
    args: dict[str, Any] = {"options": options}
    if "connect_timeout" not in parsed.query:
        args["connect_timeout"] = connect_timeout
    if "application_name" not in parsed.query:
        args["application_name"] = APPLICATION_NAME
    for key, value in TCP_OPTIONS.items():  # a server that vanishes mid-connection
        if key not in parsed.query:
            args[key] = value
    return create_engine(
        parsed,
        pool_size=settings.pool_size,
        max_overflow=0,  # pool_size is a hard cap per store (docs/config.md: sizing)
        pool_timeout=connect_timeout + settings.busy_timeout,
        # Connections the server dropped are replaced before use: the Store's CallWatch
        # pings them (store.interrupt; pool_pre_ping would ping before the pool's checkout
        # event, where a ping on a stalled path could not be interrupted).
        pool_pre_ping=False,
        pool_recycle=POOL_RECYCLE,
        connect_args=args,
    )


def _init_schema(engine: Engine) -> None:
    """Create the tables and the ``meta`` rows once, whoever else is starting right now."""
    with engine.connect() as conn:
        # One creator at a time, the check and the creation in one transaction: SQLite
        # takes the write lock first (waiting up to busy_timeout), PostgreSQL an advisory
        # lock (its DDL is transactional, so the next one in sees every table or none).
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
        metadata.create_all(conn, checkfirst=True)
        current = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
        if current is None:
            conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            for key in (SENDERS_SERIAL, BLOCKS_SERIAL, USERS_SERIAL):
                conn.execute(meta.insert().values(key=key, value="0"))
        elif int(current) > SCHEMA_VERSION:
            raise StoreError(
                f"the database schema is version {current}, newer than this mailwarden "
                f"({SCHEMA_VERSION}): upgrade mailwarden"
            )
        conn.commit()


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (a SQLAlchemy or driver error) says the PostgreSQL server is
    unreachable for now, as opposed to a configuration or permission problem."""
    orig = getattr(exc, "orig", None) or exc
    state = getattr(orig, "sqlstate", None)
    if isinstance(state, str) and state[:2] in TRANSIENT_SQLSTATE_CLASSES:
        return True
    message = str(orig).lower()
    return any(t in message for t in TRANSIENT_TEXTS)


def _within_open_timeout(
    engine: Engine, settings: DatabaseSettings, label: str, name: str, fn: Callable[[], None]
) -> CallWatch:
    """``fn()`` (the work of ``open_store`` or ``probe_store``, named ``name``) as a call
    of a new ``CallWatch`` of the PostgreSQL ``engine``, within ``[database] open_timeout``:
    past it ``store.open_timeout`` is emitted, the connection ``fn`` holds is interrupted
    (``store.call_interrupted``), ``engine`` is disposed of once ``fn``'s thread is back
    and ``Overdue`` is raised. Returns the watch (the ``Store``'s from then on)."""
    watch = CallWatch(engine)
    limit = settings.open_timeout

    def overdue() -> None:
        emit("store.open_timeout", function=name, database=label, timeout=limit)

    run_bounded(watch, Call(name), limit, fn, overdue=overdue, late=engine.dispose)
    return watch


def probe_store(cfg: Config, *, connect_timeout: int = CONNECT_TIMEOUT) -> str | None:
    """``None`` when the configured database answers a query, else the redacted reason.

    The embedded default (SQLite under ``state_dir``) has no server to reach: ``None``. A
    server that does not answer within ``[database] open_timeout`` (a path that stalled
    after the connection was made) is a reason too."""
    settings: DatabaseSettings = cfg.database
    if not settings.url:
        return None
    try:
        engine = make_engine(settings, cfg.state_path, connect_timeout=connect_timeout)
    except (SQLAlchemyError, ImportError, ValueError, OSError) as exc:
        return error_reason(settings, exc)

    def check() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    try:
        if engine.dialect.name == "postgresql":
            _within_open_timeout(engine, settings, store_label(cfg), "probe_store", check)
        else:  # an explicit sqlite:// URL: a local file
            check()
    except SQLAlchemyError as exc:
        return error_reason(settings, exc)
    except Overdue as exc:
        return str(exc)
    finally:
        engine.dispose()
    return None


def _create_schema(engine: Engine, settings: DatabaseSettings, label: str) -> None:
    """``_init_schema`` (retried: SQLite writers may race); ``StoreUnavailable`` when the
    server cannot be reached right now, else ``StoreError``. The engine is disposed of
    when it fails."""
    for attempt in range(INIT_ATTEMPTS):
        try:
            _init_schema(engine)
            return
        except (OperationalError, IntegrityError) as exc:
            if engine.dialect.name != "sqlite" and is_transient(exc):
                engine.dispose()  # the server is down or full: the caller retries later
                reason = error_reason(settings, exc)
                raise StoreUnavailable(f"cannot reach the database {label}: {reason}") from None
            if attempt == INIT_ATTEMPTS - 1:
                engine.dispose()
                reason = error_reason(settings, exc)
                raise StoreError(f"cannot initialise the database {label}: {reason}") from None
        except SQLAlchemyError as exc:
            engine.dispose()
            reason = error_reason(settings, exc)
            raise StoreError(f"cannot open the database {label}: {reason}") from None
        except StoreError:
            engine.dispose()
            raise


def open_store(cfg: Config, *, connect_timeout: int = CONNECT_TIMEOUT) -> Store:
    """Open (and create if needed) the configured database; raise ``StoreError``, or
    ``StoreUnavailable`` when the server cannot be reached right now or (PostgreSQL) the
    open did not end within ``[database] open_timeout`` (event ``store.open_timeout``)."""
    settings: DatabaseSettings = cfg.database
    label = store_label(cfg)
    try:
        engine = make_engine(settings, cfg.state_path, connect_timeout=connect_timeout)
    except (SQLAlchemyError, ImportError, ValueError, OSError) as exc:
        # e.g. a driver that is not installed; never echo the URL's password
        reason = error_reason(settings, exc)
        raise StoreError(f"cannot open the database {label}: {reason}") from None
    if engine.dialect.name != "postgresql":  # SQLite: a local file, busy_timeout bounds it
        _create_schema(engine, settings, label)
        return Store(engine, settings, label)
    create = partial(_create_schema, engine, settings, label)
    try:
        watch = _within_open_timeout(engine, settings, label, "open_store", create)
    except Overdue as exc:
        raise StoreUnavailable(f"cannot reach the database {label}: {exc}") from None
    return Store(engine, settings, label, watch)

"""Interrupting the PostgreSQL connection of a database call whose caller gave up.

``Store.call`` (``store.db``) stops waiting for a call at its deadline, but the thread
running it stays blocked in libpq for as long as the server, or a proxy that stopped
forwarding, says nothing. ``CallWatch(engine)`` (PostgreSQL engines only) frees that thread:

- ``run(call, fn, ...)`` runs ``fn`` on a store thread and notes which ``Call`` that thread
  is running;
- pool events note the connections such a thread has made or checked out: from the moment
  a new connection is made (before SQLAlchemy's own first statements on it, the dialect's
  checks of a new engine's first connection) or a pooled one is checked out, until its
  checkin (or close, or the end of the call), the watch keeps a duplicate of the
  connection's socket, so the socket it names is always that connection's, whatever libpq
  does with its own descriptor;
- the check of a pooled connection before it is handed out (what ``pool_pre_ping`` does) is
  made here, after the connection is noted: a ping on a stalled path is interrupted too;
- ``interrupt(call)`` marks the call abandoned and shuts the sockets of the connections its
  thread holds down (``shutdown(SHUT_RDWR)`` on the duplicate; libpq's descriptor is never
  closed here): the blocked read or write fails at once, psycopg raises
  ``OperationalError``, SQLAlchemy invalidates the connection and the pool opens a new one
  for a later call. It also sends the server a cancel request for the statement, on a
  short-lived thread (libpq 17's non-blocking cancel, with its own deadline): a server that
  is there but slow stops working for a caller that is gone (without it, the statement
  would run until ``statement_timeout``). An abandoned call that then asks for a connection
  again (the ping failed, the function's next statement) gets ``StoreTimeout`` without a
  connection attempt, and a connection it was still making when it was abandoned is closed
  as soon as it is made. One ``store.call_interrupted`` event per interrupted call.

A thread that is opening a new connection holds no socket yet: it cannot be interrupted and
waits at most libpq's ``connect_timeout``.

``run_bounded(watch, call, limit, fn, ...)`` runs ``fn`` as ``call`` on a thread of its own
and waits at most ``limit`` seconds: past it ``overdue()`` is called, the call is
interrupted as above and ``Overdue`` raised; when the thread ends after that, ``late()``
runs on it (to dispose of an engine nobody else will use). ``store.db`` opens a store and
probes a server this way (``[database] open_timeout``).

Public names: ``Call``, ``CallWatch``, ``Overdue``, ``run_bounded``.
Security: no untrusted input; shuts down only sockets of this process's own database
connections (through its own duplicates of them) and sends cancel requests only to the
server a connection is connected to.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from sqlalchemy import Engine, event
from sqlalchemy.exc import DisconnectionError

from mailwarden.core.events import emit
from mailwarden.errors import StoreTimeout

T = TypeVar("T")
CANCEL_TIMEOUT = 10.0  # seconds a cancel request may take (connect, send, the server's reply)
MAX_CANCELS = 4  # cancel requests in flight per store; past it the socket is only shut down
FRESH = "mailwarden.fresh"  # connection_record.info key: connected, not yet handed out

__all__ = ["Call", "CallWatch", "Overdue", "run_bounded"]


@dataclass(eq=False)
class Call:
    """One ``Store.call``: the function's name, when it was made, whether it was given up."""

    name: str
    since: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # its caller stopped waiting: no new connection for it


@dataclass(eq=False)
class _Held:
    """A connection checked out by a thread running ``call``, and our duplicate of its socket."""

    call: Call
    dbapi: Any  # the psycopg connection (kept alive by this reference: its id stays unique)
    sock: socket.socket


def _has_cancel_conn() -> bool:
    """Whether libpq's non-blocking cancel is there (psycopg >= 3.2 and libpq >= 17)."""
    try:
        from psycopg import capabilities  # only PostgreSQL stores have a watch
    except ImportError:  # psycopg 3.1
        return False
    return capabilities.has_cancel_safe()


def _abandoned(call: Call) -> StoreTimeout:
    return StoreTimeout(f"{call.name}: given up at its deadline, no new database work")


class CallWatch:
    """See the module docstring. One per PostgreSQL ``Store``; thread-safe."""

    def __init__(self, engine: Engine) -> None:
        self._dialect = engine.dialect
        self._lock = threading.Lock()  # guards the two maps and every use of a duplicate
        self._running: dict[int, Call] = {}  # thread id -> the call it runs
        self._held: dict[int, _Held] = {}  # id(psycopg connection) -> its checkout
        self._can_cancel = _has_cancel_conn()
        self._cancels = threading.BoundedSemaphore(MAX_CANCELS)
        event.listen(engine, "do_connect", self._on_do_connect)
        # First of the connect listeners: before the dialect's first statements on it.
        event.listen(engine, "connect", self._on_connect, insert=True)
        event.listen(engine, "checkout", self._on_checkout)
        event.listen(engine, "checkin", self._on_checkin)
        event.listen(engine, "close", self._on_close)  # before the connection is closed
        event.listen(engine, "detach", self._on_detach)
        event.listen(engine, "close_detached", self._release)

    # -- the store's side -----------------------------------------------------------------
    def run(self, call: Call, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on this (store) thread, as ``call``."""
        ident = threading.get_ident()
        with self._lock:
            if call.abandoned:  # the deadline passed just as a thread took it
                raise _abandoned(call)
            self._running[ident] = call
        try:
            return fn(*args, **kwargs)
        finally:
            with self._lock:
                del self._running[ident]
                # Noted when made but never checked in (its connect events failed, say):
                # nothing can interrupt it for this call any more.
                for key in [k for k, h in self._held.items() if h.call is call]:
                    self._held.pop(key).sock.close()

    def interrupt(self, call: Call) -> int:
        """``call``'s caller stopped waiting: shut down the connections its thread holds
        now (and ask the server to cancel their statements), so the thread comes back; it
        gets no new connection. How many connections were shut down (0: none was held)."""
        cancels: list[Any] = []
        with self._lock:
            call.abandoned = True
            held = [h for h in self._held.values() if h.call is call]
            if not held:
                return 0
            for h in held:  # before the shutdown: the connection is intact and still ours
                cancel = self._cancel_request(h.dbapi)
                if cancel is not None:
                    cancels.append(cancel)
            # Emitted before the shutdown, so it comes before the freed thread's
            # store.call_returned.
            emit(
                "store.call_interrupted",
                function=call.name,
                seconds=round(time.monotonic() - call.since, 3),
                connections=len(held),
                cancel=bool(cancels),
            )
            for h in held:
                with contextlib.suppress(OSError):
                    h.sock.shutdown(socket.SHUT_RDWR)
        for cancel in cancels:
            self._start_cancel(cancel)
        return len(held)

    # -- pool events (on the thread using the connection, or a garbage collector's) --------
    def _on_do_connect(self, _dialect: Any, _record: Any, _cargs: Any, _cparams: Any) -> None:
        """Before libpq connects: an abandoned call does not open a new connection."""
        with self._lock:
            call = self._running.get(threading.get_ident())
        if call is not None and call.abandoned:
            raise _abandoned(call)

    def _on_connect(self, dbapi: Any, record: Any) -> None:
        """A new connection is made: note it (if a store call made it), before anything
        runs on it; an abandoned call's is closed (SQLAlchemy closes a connection whose
        connect event fails)."""
        record.info[FRESH] = True  # just made: no need to check it at its first checkout
        with self._lock:
            call = self._running.get(threading.get_ident())
            if call is not None and not call.abandoned:
                self._note(call, dbapi)
        if call is not None and call.abandoned:  # made after its caller gave up
            raise _abandoned(call)

    def _on_checkout(self, dbapi: Any, record: Any, _proxy: Any) -> None:
        """Note the connection (if a store call takes it), then check it is still alive:
        ``DisconnectionError`` makes the pool replace it (its ``pool_pre_ping`` would check it
        before this event, where a stalled ping could not be interrupted)."""
        with self._lock:
            call = self._running.get(threading.get_ident())
            if call is not None and not call.abandoned:
                self._note(call, dbapi)
        if call is not None and call.abandoned:
            raise _abandoned(call)  # the pool returns the connection (and closes it)
        if record.info.pop(FRESH, False):
            return
        try:
            self._dialect.do_ping(dbapi)
        except self._dialect.loaded_dbapi.Error as exc:
            if self._dialect.is_disconnect(exc, dbapi, None):
                raise DisconnectionError("the connection did not answer a ping") from exc
            raise

    def _on_checkin(self, dbapi: Any, _record: Any) -> None:
        self._release(dbapi)

    def _on_close(self, dbapi: Any, _record: Any) -> None:
        self._release(dbapi)

    def _on_detach(self, dbapi: Any, _record: Any) -> None:
        self._release(dbapi)

    def _release(self, dbapi: Any) -> None:
        if dbapi is None:  # checkin of an invalidated connection (released at its close)
            return
        with self._lock:
            held = self._held.pop(id(dbapi), None)
            if held is not None:
                held.sock.close()

    # -- inside ---------------------------------------------------------------------------
    def _note(self, call: Call, dbapi: Any) -> None:
        """``call``'s thread holds ``dbapi`` (under the lock; noted once: at its connect,
        or at its checkout)."""
        if id(dbapi) in self._held:
            return
        held = self._duplicate(call, dbapi)
        if held is not None:
            self._held[id(dbapi)] = held

    @staticmethod
    def _duplicate(call: Call, dbapi: Any) -> _Held | None:
        """Our own descriptor for the connection's socket (None: the connection is already
        broken, or no descriptor is left; it cannot be interrupted then)."""
        try:
            fd = dbapi.pgconn.socket  # psycopg raises OperationalError if the connection is gone
        except Exception:
            return None
        try:
            return _Held(call, dbapi, socket.socket(fileno=os.dup(fd)))
        except OSError:
            return None

    def _cancel_request(self, dbapi: Any) -> Any:
        """A libpq cancel connection for ``dbapi``'s current statement, not yet started (None:
        libpq < 17, whose blocking ``PQcancel`` has no deadline, or too many in flight)."""
        if not self._can_cancel or not self._cancels.acquire(blocking=False):
            return None
        try:
            return dbapi.pgconn.cancel_conn()  # copies the server address and backend key
        except Exception:
            self._cancels.release()
            return None

    def _start_cancel(self, cancel: Any) -> None:
        thread = threading.Thread(
            target=self._send_cancel, args=(cancel,), name="mw-db-cancel", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # no thread to be had (interpreter shutdown): skip it
            cancel.finish()
            self._cancels.release()

    def _send_cancel(self, cancel: Any) -> None:
        """Send the cancel request and wait for the server's reply, at most CANCEL_TIMEOUT.

        Written out (libpq's ``PQcancelStart``/``PQcancelPoll``) rather than psycopg's
        ``Connection.cancel_safe``: that one reads the connection when it runs, and by then
        the freed store thread may be closing it; ``cancel`` was copied while it was ours.
        Best effort: a failure changes nothing, the connection is shut down already."""
        from psycopg.pq import PollingStatus

        deadline = time.monotonic() + CANCEL_TIMEOUT
        try:
            cancel.start()
            while (status := cancel.poll()) not in (PollingStatus.OK, PollingStatus.FAILED):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                poller = select.poll()
                mask = select.POLLIN if status == PollingStatus.READING else select.POLLOUT
                poller.register(cancel.socket, mask)
                poller.poll(left * 1000)
        except Exception:  # the server is unreachable or refused: nothing more to do
            return
        finally:
            cancel.finish()
            self._cancels.release()


class Overdue(Exception):
    """``run_bounded``: the function did not end within its limit (it was interrupted)."""


def run_bounded(
    watch: CallWatch,
    call: Call,
    limit: float,
    fn: Callable[[], T],
    *,
    overdue: Callable[[], None],
    late: Callable[[], None],
) -> T:
    """``fn()`` as ``call`` of ``watch`` on a thread of its own: its result or exception
    within ``limit`` seconds, else ``overdue()``, the interruption of ``call`` and
    ``Overdue``; ``late()`` then runs on that thread when it ends (whatever ``fn`` did)."""
    lock = threading.Lock()  # the caller gives up, or the thread hands over its outcome
    done = threading.Event()
    outcome: list[tuple[bool, Any]] = []  # (True, result) or (False, exception), once
    gone: list[bool] = []  # the caller gave up: set once, under the lock

    def work() -> None:
        try:
            result: tuple[bool, Any] = (True, watch.run(call, fn))
        except BaseException as exc:  # the caller's to raise (or nobody's, if it is gone)
            result = (False, exc)
        with lock:
            outcome.append(result)
            given_up = bool(gone)
        done.set()
        if given_up:
            late()

    threading.Thread(target=work, name=f"mw-db-{call.name}", daemon=True).start()
    done.wait(limit)
    with lock:
        if not outcome:
            gone.append(True)
    if not gone:
        ok, value = outcome[0]
        if ok:
            return cast(T, value)
        raise value
    overdue()
    watch.interrupt(call)  # its thread comes back (or, still connecting, gets no connection)
    raise Overdue(f"no answer within {limit:g} s")

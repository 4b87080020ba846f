"""Reaching the database without waiting on it: a deadline, a detached thread, a probe child.

A PostgreSQL server behind a firewall that drops packets (or on a host that is gone)
answers nothing: a connection attempt then lasts the whole connect timeout, and a DNS
server that does not answer adds its own. Three ways not to be held up by that:

- ``call_within(fn, deadline)`` runs ``fn`` on a daemon thread and raises ``TimeoutError``
  when it has not returned after ``deadline`` seconds. The thread is left to finish on its
  own (it cannot be interrupted); what it returns late is handed to ``discard``. The CLI
  opens the store like this (``cli.dbaccess``).
- ``run_detached(fn)`` the same for the event loop: a future whose cancellation does not
  wait for the thread, where ``asyncio.to_thread`` would keep the loop's executor (and so
  a stopping worker) waiting for the connect timeout. A gateway worker opens the store like
  this (``policy.state``, ``auth.database``).
- ``first_contact(cfg, wait)`` opens the store (creating the schema) in a forked child and
  returns its answer if it comes within ``wait`` seconds, else ``PENDING`` (the child is
  killed). ``mailwarden serve`` calls it before it forks its workers: a thread still stuck
  in a connect would be a hazard at ``fork`` (locks it holds stay held in the children);
  a child process is not.

Public names: ``call_within``, ``run_detached``, ``first_contact``, ``Contact``, ``Answer``.
Security: the child's answer comes from our own process over a pipe, is length-bounded and
parsed as JSON of a fixed shape (anything else is an ``ERROR`` answer); its texts are the
store's error messages, already redacted and one line (``store.db.error_reason``). Nothing
here prints or logs the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from mailwarden.errors import StoreError, StoreUnavailable
from mailwarden.store.db import error_reason, open_store, store_label

if TYPE_CHECKING:
    from mailwarden.config import Config

T = TypeVar("T")
MAX_TEXT = 1000  # characters of a reason in the probe child's answer
MAX_ANSWER = 4096  # bytes read from the child (its answer is one write below PIPE_BUF)

__all__ = ["Answer", "Contact", "call_within", "first_contact", "run_detached"]


def _keep(_value: object) -> None:
    """The default ``discard``: nothing to release."""


def _discard_later(discard: Callable[[T], None], value: T) -> None:
    """Release a late result off the caller's thread (closing a store may block)."""
    threading.Thread(target=discard, args=(value,), name="mw-db-discard", daemon=True).start()


class _Late(Generic[T]):
    """The result slot shared by a caller that may give up and the thread it started."""

    def __init__(self, discard: Callable[[T], None]) -> None:
        self.discard = discard
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.abandoned = False
        self.result: tuple[T] | None = None  # set once, under the lock
        self.error: Exception | None = None

    def run(self, fn: Callable[[], T]) -> None:
        try:
            value = fn()
        except Exception as exc:
            with self.lock:
                self.error = exc
        else:
            with self.lock:
                if self.abandoned:  # the caller is gone: nobody else will release it
                    self.discard(value)
                    return
                self.result = (value,)
        self.done.set()


def call_within(fn: Callable[[], T], deadline: float, discard: Callable[[T], None] = _keep) -> T:
    """``fn()`` on a daemon thread: its result or exception, or ``TimeoutError`` after
    ``deadline`` seconds (a result that comes later goes to ``discard``)."""
    slot: _Late[T] = _Late(discard)
    threading.Thread(target=slot.run, args=(fn,), name="mw-db-call", daemon=True).start()
    slot.done.wait(deadline)
    with slot.lock:
        if slot.error is not None:
            raise slot.error
        if slot.result is not None:
            return slot.result[0]
        slot.abandoned = True
    raise TimeoutError(f"no answer within {deadline:g} s")


def run_detached(fn: Callable[[], T], discard: Callable[[T], None] = _keep) -> asyncio.Future[T]:
    """``fn()`` on a daemon thread, as a future of the running loop. Cancelling the future
    does not wait for the thread; a result it returns after that goes to ``discard``."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    gone = threading.Event()  # the future was cancelled: the thread releases its result

    def on_done(f: asyncio.Future[T]) -> None:
        if f.cancelled():
            gone.set()

    def settle(ok: bool, value: Any) -> None:  # on the loop
        if future.cancelled():
            if ok:
                _discard_later(discard, value)
        elif ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            value = fn()
        except Exception as exc:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, False, exc)
            return
        if gone.is_set():
            discard(value)
            return
        try:
            loop.call_soon_threadsafe(settle, True, value)
        except RuntimeError:  # the loop is closed
            discard(value)

    future.add_done_callback(on_done)
    threading.Thread(target=run, name="mw-db-open", daemon=True).start()
    return future


class Answer(StrEnum):
    OK = "ok"  # opened, schema created: ``text`` is the database's label
    UNAVAILABLE = "unavailable"  # StoreUnavailable: refused, full, starting ... (``text``)
    ERROR = "error"  # cannot be used at all (bad URL, no such database ...): ``text``
    PENDING = "pending"  # no answer within the wait: still connecting, or dropped


@dataclass(frozen=True, slots=True)
class Contact:
    answer: Answer
    text: str  # the label (OK) or the redacted one-line reason


def _probe(cfg: Config) -> bytes:
    """In the child: open the store once and say how it went, as one short JSON object."""
    try:
        store = open_store(cfg)
    except StoreUnavailable as exc:
        answer, text = Answer.UNAVAILABLE, str(exc)
    except StoreError as exc:
        answer, text = Answer.ERROR, str(exc)
    except Exception as exc:  # unexpected: still an answer, never a traceback
        reason = error_reason(cfg.database, exc)
        answer, text = Answer.ERROR, f"cannot open the database {store_label(cfg)}: {reason}"
    else:
        store.close()
        answer, text = Answer.OK, store.label
    return json.dumps({"answer": answer.value, "text": text[:MAX_TEXT]}).encode()


def _parse(data: bytes, cfg: Config) -> Contact:
    failed = Contact(
        Answer.ERROR, f"cannot open the database {store_label(cfg)}: its check process failed"
    )
    try:
        obj = json.loads(data)
        answer, text = Answer(obj["answer"]), obj["text"]
    except (ValueError, KeyError, TypeError):
        return failed
    if not isinstance(text, str) or answer is Answer.PENDING:
        return failed
    return Contact(answer, text)


def first_contact(cfg: Config, wait: float) -> Contact:
    """Open the configured store in a child process; its answer within ``wait`` seconds,
    else ``PENDING`` (the child, and its connection attempt, are killed)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer once, never return into the caller's code
        try:
            os.close(r)
            os.write(w, _probe(cfg))
        finally:
            os._exit(0)
    os.close(w)
    answered = False
    try:
        ready, _, _ = select.select([r], [], [], wait)
        if not ready:
            return Contact(Answer.PENDING, f"no answer within {wait:g} s")
        answered = True
        return _parse(os.read(r, MAX_ANSWER), cfg)
    finally:
        os.close(r)
        if not answered:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

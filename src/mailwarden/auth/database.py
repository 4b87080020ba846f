"""The user-database AUTH backend: the ``users`` table of the data store, argon2id hashes.

``DatabaseAuthenticator(store, hasher)``: the account is read on the store's thread pool,
the hash is verified on a small private pool (argon2 is CPU and memory heavy: at most
``HASH_THREADS`` run at once per process), so the event loop never blocks. A disabled account
or an unknown login is ``INVALID`` after the same argon2 work as a wrong password (no login
enumeration by timing). A hash made with old parameters is replaced after a successful
login. A database error is ``TEMPFAIL``, and so is a database that does not answer a call
within ``[database] call_timeout`` (``StoreTimeout``, a stalled server; ``[auth] timeout``
bounds the whole AUTH as well, whichever comes first).

Built without a store (``store=None``, the server was unreachable when the worker started)
it answers ``TEMPFAIL`` and opens the store with ``opener`` on a later attempt: one
open at a time (concurrent AUTHs wait for it), after ``RETRY_FIRST`` seconds, then twice
as long after each failure up to ``RETRY_MAX`` (a flood of AUTH commands is not a flood
of connection attempts). The open runs on a detached thread (``store.reach``): a worker
that stops never waits for a connect to a server that does not answer.

Public names: ``DatabaseAuthenticator``, ``HASH_THREADS``.
Security: the password goes only to argon2; database errors are reported by type only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError

from mailwarden.auth.base import AuthResult, acceptable_credentials
from mailwarden.auth.passwords import Hasher
from mailwarden.core.events import emit
from mailwarden.errors import StoreError
from mailwarden.policy.state import RETRY_FIRST, RETRY_MAX
from mailwarden.store import users as user_table
from mailwarden.store.db import Store
from mailwarden.store.reach import run_detached

HASH_THREADS = 2  # argon2 verifications at once per process (memory_cost KiB each)
T = TypeVar("T")


class DatabaseAuthenticator:
    """SMTP AUTH against the ``users`` table."""

    name = "database"

    def __init__(
        self,
        store: Store | None,
        hasher: Hasher,
        opener: Callable[[], Store] | None = None,
    ) -> None:
        self.store = store
        self.hasher = hasher
        self.opener = opener
        self._pool: ThreadPoolExecutor | None = None
        self._opening: asyncio.Task[Store | None] | None = None
        self._next_open = 0.0  # time.monotonic() before which no open is attempted
        self._delay = RETRY_FIRST

    async def _open(self) -> Store | None:
        """The store, opened now if it was unreachable and the backoff allows a try.

        The open runs as a task of its own (shielded): an AUTH that times out does not
        cancel it, and its store is kept for the next attempt instead of leaking."""
        if self.store is not None:
            return self.store
        if self.opener is None:
            return None
        if self._opening is None:
            if time.monotonic() < self._next_open:
                return None
            self._opening = asyncio.get_running_loop().create_task(self._open_now(self.opener))
        return await asyncio.shield(self._opening)

    async def _open_now(self, opener: Callable[[], Store]) -> Store | None:
        try:
            store = await run_detached(opener, Store.close)  # a stopping loop does not wait
        except (SQLAlchemyError, StoreError, OSError) as exc:
            self._next_open = time.monotonic() + self._delay
            self._delay = min(self._delay * 2, RETRY_MAX)
            emit("auth.error", backend=self.name, error=type(exc).__name__, step="open")
            return None
        finally:
            self._opening = None
        self.store, self._delay = store, RETRY_FIRST
        return store

    async def _hash_work(self, fn: Callable[[], T]) -> T:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="mw-argon2")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def authenticate(self, login: str, password: str) -> AuthResult:
        if not acceptable_credentials(login, password):
            return AuthResult.INVALID
        store = await self._open()
        if store is None:
            emit("auth.error", backend=self.name, error="StoreUnavailable")
            return AuthResult.TEMPFAIL
        try:
            user = await store.call(user_table.get_user, store, login)
        except (SQLAlchemyError, StoreError, OSError) as exc:
            emit("auth.error", backend=self.name, error=type(exc).__name__)
            return AuthResult.TEMPFAIL
        if user is None or user.disabled:
            await self._hash_work(partial(self.hasher.dummy_verify, password))
            return AuthResult.INVALID
        ok, new_hash = await self._hash_work(
            partial(self.hasher.verify, user.password_hash, password)
        )
        if not ok:
            return AuthResult.INVALID
        if new_hash is not None:
            try:
                await store.call(user_table.set_password_hash, store, user.login, new_hash)
                emit("auth.rehash", backend=self.name, user=user.login)
            except (SQLAlchemyError, StoreError, OSError) as exc:  # the login still succeeds
                emit("auth.error", backend=self.name, error=type(exc).__name__, step="rehash")
        return AuthResult.OK

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        if self.store is not None:
            self.store.close()

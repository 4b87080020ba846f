"""The user-database AUTH backend: the ``users`` table of the data store, argon2id hashes.

``DatabaseAuthenticator(store, hasher)``: the account is read on the store's thread pool,
the hash is verified on a small private pool (argon2 is CPU and memory heavy: at most
``HASH_THREADS`` run at once per process), so the event loop never blocks. A disabled account
or an unknown login is ``INVALID`` after the same argon2 work as a wrong password (no login
enumeration by timing). A hash made with old parameters is replaced after a successful
login. A database error is ``TEMPFAIL``.

Public names: ``DatabaseAuthenticator``, ``HASH_THREADS``.
Security: the password goes only to argon2; database errors are reported by type only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError

from mailwarden.auth.base import AuthResult, acceptable_credentials
from mailwarden.auth.passwords import Hasher
from mailwarden.core.events import emit
from mailwarden.errors import StoreError
from mailwarden.store import users as user_table
from mailwarden.store.db import Store

HASH_THREADS = 2  # argon2 verifications at once per process (memory_cost KiB each)
T = TypeVar("T")


class DatabaseAuthenticator:
    """SMTP AUTH against the ``users`` table."""

    name = "database"

    def __init__(self, store: Store, hasher: Hasher) -> None:
        self.store = store
        self.hasher = hasher
        self._pool: ThreadPoolExecutor | None = None

    async def _hash_work(self, fn: Callable[[], T]) -> T:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="mw-argon2")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def authenticate(self, login: str, password: str) -> AuthResult:
        if not acceptable_credentials(login, password):
            return AuthResult.INVALID
        try:
            user = await self.store.call(user_table.get_user, self.store, login)
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
                await self.store.call(
                    user_table.set_password_hash, self.store, user.login, new_hash
                )
                emit("auth.rehash", backend=self.name, user=user.login)
            except (SQLAlchemyError, StoreError, OSError) as exc:  # the login still succeeds
                emit("auth.error", backend=self.name, error=type(exc).__name__, step="rehash")
        return AuthResult.OK

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        self.store.close()

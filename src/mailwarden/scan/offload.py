"""A small process pool for scans too heavy for the event loop (large messages).

``ScanPool(workers)`` runs a picklable function in a ``ProcessPoolExecutor`` that is created
on first use (``spawn``: a fresh interpreter, no inherited listening sockets, threads or
event loop), so a gateway that never sees a large message never starts one. ``await
pool.run(fn, *args)`` returns ``fn(*args)`` computed in a worker process, while the event
loop goes on serving other sessions. Failures are exceptions the caller turns into a
fail-closed ``*_FAIL`` symbol:

- a worker that dies (killed, out of memory, crashed) -> ``PoolError``; the broken pool is
  dropped and the next call starts a new one;
- a call that is cancelled while a worker runs it (the verdict engine's timeout, the
  content hook's pipeline timeout) kills the pool's workers, so a runaway scan cannot go on
  burning CPU; other calls in flight on that pool then fail with ``PoolError`` (they are
  tempfailed and retried by their clients) and the next call starts a new pool.

Workers are recycled after ``MAX_TASKS_PER_WORKER`` calls, so the memory a huge message
made a worker take is given back. ``aclose()`` shuts the pool down (the gateway does it
when it stops).

Public names: ``ScanPool``, ``PoolError``, ``POOL_WORKERS``, ``MAX_TASKS_PER_WORKER``.
Security: the arguments (hostile message bytes) are pickled to our own child processes
only; results come back through the executor's pipe from those children. Nothing is
executed from the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

POOL_WORKERS = 2  # worker processes per gateway worker; more large messages wait their turn
MAX_TASKS_PER_WORKER = 50  # calls before a worker is replaced (returns a big scan's memory)

T = TypeVar("T")


class PoolError(Exception):
    """The pool could not compute the result (a worker died or was killed)."""


class ScanPool:
    """A lazily started, bounded process pool that fails closed."""

    def __init__(
        self, workers: int = POOL_WORKERS, max_tasks_per_worker: int = MAX_TASKS_PER_WORKER
    ) -> None:
        self.workers = workers
        self.max_tasks = max_tasks_per_worker
        self._pool: ProcessPoolExecutor | None = None
        self.killed: list[int] = []  # workers killed by the last cancelled call

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                max_tasks_per_child=self.max_tasks,
            )
        return self._pool

    def pids(self) -> list[int]:
        """Process ids of the current workers (for ``mailwarden status`` and tests)."""
        if self._pool is None:
            return []
        processes: dict[int, Any] = getattr(self._pool, "_processes", None) or {}
        return sorted(processes)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        pool = self._executor()
        try:
            future = pool.submit(fn, *args)
        except BrokenProcessPool as exc:
            self._drop(pool)
            raise PoolError("scan worker process died") from exc
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool as exc:
            self._drop(pool)
            raise PoolError("scan worker process died") from exc
        except asyncio.CancelledError:
            if not future.cancel():  # already running in a worker: stop that worker
                self._kill(pool)
            raise

    def _drop(self, pool: ProcessPoolExecutor) -> None:
        if self._pool is pool:
            self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def _kill(self, pool: ProcessPoolExecutor) -> None:
        processes: dict[int, Any] = getattr(pool, "_processes", None) or {}
        self.killed = sorted(processes)
        for proc in list(processes.values()):
            with contextlib.suppress(Exception):
                proc.kill()
        self._drop(pool)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

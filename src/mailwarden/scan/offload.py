"""A small process pool for scans too heavy for the event loop (large messages).

``ScanPool(workers)`` runs a picklable function in a ``ProcessPoolExecutor`` that is created
on first use (``spawn``: a fresh interpreter, no inherited listening sockets, threads or
event loop), so a gateway that never sees a large message never starts one. ``await
pool.run(fn, *args)`` returns ``fn(*args)`` computed in a worker process, while the event
loop goes on serving other sessions. Failures are exceptions the caller turns into a
fail-closed ``*_FAIL`` symbol:

- a worker that dies (killed, out of memory, crashed) breaks its whole pool: every call in
  it, running or queued, fails with it, and ``concurrent.futures`` cannot say which call
  was the cause. So each of them gets one retry, alone: retries take turns in a separate
  one-worker retry pool (started when needed, shut down when no retry is left). A retry
  whose pool breaks was the only call in it, so it is the cause: ``PoolError``. No call is
  tried more than twice.
- a call that is cancelled while a worker runs it (the verdict engine's timeout, the
  content hook's pipeline timeout) kills the pool's workers, so a runaway scan cannot go on
  burning CPU; the cancelled call stays cancelled (its caller fails it), the other calls in
  that pool are retried as above.
- a broken pool is dropped once, by the first call that sees it, with a
  ``scan.pool_restart`` event (``pool``, ``reason``, ``in_flight``); the next call starts a
  new one.

Workers are recycled after ``MAX_TASKS_PER_WORKER`` calls, so the memory a huge message
made a worker take is given back. ``aclose()`` shuts the pools down (the gateway does it
when it stops); a call still queued then fails with ``PoolError``.

Public names: ``ScanPool``, ``PoolError``, ``POOL_WORKERS``, ``MAX_TASKS_PER_WORKER``.
Security: the arguments (hostile message bytes) are pickled to our own child processes
only; results come back through the executor's pipe from those children. Nothing is
executed from the message. Events carry counts and reasons, never message content.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from mailwarden.core.events import emit

POOL_WORKERS = 2  # worker processes per gateway worker; more large messages wait their turn
MAX_TASKS_PER_WORKER = 50  # calls before a worker is replaced (returns a big scan's memory)
RETRY_WORKERS = 1  # retries run one at a time, so a retry pool that breaks names its cause

T = TypeVar("T")


class PoolError(Exception):
    """The pool could not compute the result (a worker died or was killed)."""


class _Broken(Exception):
    """The pool a call was in broke; the call may not be the cause (internal)."""


class _Lane:
    """One ``ProcessPoolExecutor`` at a time, dropped (once) when it breaks."""

    def __init__(
        self, name: str, workers: int, max_tasks: int, on_kill: Callable[[list[int]], None]
    ) -> None:
        self.name = name
        self.workers = workers
        self.max_tasks = max_tasks
        self.on_kill = on_kill
        self.executor: ProcessPoolExecutor | None = None
        self.in_flight = 0  # calls submitted to the current executor and not yet back

    def _current(self) -> ProcessPoolExecutor:
        if self.executor is None:
            self.executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                max_tasks_per_child=self.max_tasks,
            )
        return self.executor

    def pids(self) -> list[int]:
        if self.executor is None:
            return []
        processes: dict[int, Any] = getattr(self.executor, "_processes", None) or {}
        return sorted(processes)

    async def call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """``fn(*args)`` in a worker; ``_Broken`` if the executor broke under the call."""
        pool = self._current()
        try:
            future = pool.submit(fn, *args)
        except BrokenProcessPool as exc:  # broke before this call got in
            self._drop(pool, "worker_died")
            raise _Broken from exc
        self.in_flight += 1
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool as exc:
            self._drop(pool, "worker_died")
            raise _Broken from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and task is not None and not task.cancelling():
                raise PoolError("scan pool was shut down") from None  # aclose(), not us
            if not future.cancel() and not future.done():  # a worker runs it: stop it
                self._kill(pool)
            raise
        finally:
            if self.executor is pool:
                self.in_flight -= 1

    def _drop(self, pool: ProcessPoolExecutor, reason: str) -> None:
        if self.executor is pool:
            emit("scan.pool_restart", pool=self.name, reason=reason, in_flight=self.in_flight)
            self.executor = None
            self.in_flight = 0
        # Not cancel_futures: a call still queued in it must fail as broken (and be
        # retried), not look cancelled.
        pool.shutdown(wait=False)

    def _kill(self, pool: ProcessPoolExecutor) -> None:
        processes: dict[int, Any] = getattr(pool, "_processes", None) or {}
        self.on_kill(sorted(processes))
        for proc in list(processes.values()):
            with contextlib.suppress(Exception):
                proc.kill()
        self._drop(pool, "timeout")

    def close(self) -> None:
        pool, self.executor = self.executor, None
        self.in_flight = 0
        if pool is not None:
            pool.shutdown(wait=False)

    async def aclose(self) -> None:
        pool, self.executor = self.executor, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


class ScanPool:
    """A lazily started, bounded process pool that fails closed."""

    def __init__(
        self, workers: int = POOL_WORKERS, max_tasks_per_worker: int = MAX_TASKS_PER_WORKER
    ) -> None:
        self.workers = workers
        self.max_tasks = max_tasks_per_worker
        self.killed: list[int] = []  # workers killed by the last cancelled call
        self._main = _Lane("scan", workers, max_tasks_per_worker, self._record_kill)
        self._retry = _Lane("retry", RETRY_WORKERS, max_tasks_per_worker, self._record_kill)
        self._retry_turn = asyncio.Lock()  # one retry in the retry pool at a time
        self._retrying = 0  # calls waiting for their retry or running it

    def _record_kill(self, pids: list[int]) -> None:
        self.killed = pids

    @property
    def in_flight(self) -> int:
        """Calls submitted to the current pool and not yet back (retries not counted)."""
        return self._main.in_flight

    def pids(self) -> list[int]:
        """Process ids of the current workers (for ``mailwarden status`` and tests)."""
        return self._main.pids()

    def retry_pids(self) -> list[int]:
        """Process id of the retry pool's worker while one runs (for tests)."""
        return self._retry.pids()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self._main.call(fn, args)
        except _Broken:
            pass  # a pool-mate may have broken it: one more try, alone
        self._retrying += 1
        try:
            async with self._retry_turn:
                try:
                    return await self._retry.call(fn, args)
                except _Broken as exc:
                    raise PoolError("scan worker process died, also on its retry alone") from exc
        finally:
            self._retrying -= 1
            if not self._retrying:
                self._retry.close()

    async def aclose(self) -> None:
        await self._main.aclose()
        await self._retry.aclose()

"""Group commit of spool directories, and the file-system calls it needs.

``GroupCommit(path, run, do_jobs, fsync)``: ``await commit(job)`` returns once ``job`` (or
None: only a directory fsync is wanted) is done and an fsync of the directory that
*started* after the call has completed, so every rename or unlink done in the directory
before the call is durable. Calls that arrive while a batch is on disk form the next
batch: one call of ``do_jobs`` in the thread pool does all its jobs, then the directory is
fsync'd once. With ``prepare``, the batch's jobs are first done on the event loop by
``prepare(jobs)``, which returns what is left for the thread pool (the fsyncs; None: nothing,
and no thread hop). A job reports its own failure in ``error``; a failed directory fsync
fails the whole batch.

``rename_noreplace`` (renameat2 ``RENAME_NOREPLACE``, with a fallback), ``start_writeback``
(sync_file_range ``SYNC_FILE_RANGE_WRITE``: the fsyncs of a batch then share one journal
commit), ``fsync_dir``, ``RemoveJob``.

Public names: ``GroupCommit``, ``Job``, ``RemoveJob``, ``fsync_dir``, ``rename_noreplace``,
``start_writeback``.
Security: touches only the paths the spool passes in (built from validated queue ids);
calls two libc functions through ctypes with fixed argument types.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar


class Job(Protocol):
    """What a batch job reports: the error that made it fail, if any."""

    error: BaseException | None


J = TypeVar("J", bound=Job)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _libc_function(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1  # renameat2(2) flag: fail with EEXIST instead of replacing
_SYNC_FILE_RANGE_WRITE = 2  # sync_file_range(2) flag: start writeback, do not wait
_renameat2 = _libc_function("renameat2")
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    _renameat2.argtypes += [ctypes.c_uint]
    _renameat2.restype = ctypes.c_int
_sync_file_range = _libc_function("sync_file_range")
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int


def rename_noreplace(src: str, dst: str) -> None:
    """Atomic rename that never replaces ``dst`` (``FileExistsError`` if it exists): one
    system call with renameat2, else a check and a plain rename."""
    global _renameat2
    if _renameat2 is not None:
        flags = _RENAME_NOREPLACE
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: the file system lacks the flag
            raise OSError(err, os.strerror(err), dst)
        _renameat2 = None
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages without waiting, so that the fsyncs of a batch
    that follow find their data on its way and share one journal commit. Best effort."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


@dataclass(slots=True)
class RemoveJob:
    """One message file to unlink in a batch (``found`` is False if it was not there)."""

    path: str
    found: bool = False
    error: BaseException | None = None


class GroupCommit(Generic[J]):
    """Group commit for one state directory.

    ``await commit(job)`` returns once ``job`` (a message file to write or to remove, or
    None) is done and an fsync of the directory that *started* after the call has
    completed, so every rename or unlink done in the directory before the call is durable.
    Calls that arrive while a batch is on disk form the next batch: one thread-pool call
    does all its jobs and then fsyncs the directory once.
    """

    def __init__(
        self,
        path: Path,
        run: Callable[[Callable[[], None]], Any],
        write: Callable[[list[J]], None] | None,
        fsync: bool,
        *,
        prepare: Callable[[list[J]], Callable[[], None] | None] | None = None,
    ) -> None:
        self._path = path
        self._run = run
        self._write = write
        self._fsync = fsync
        self._prepare = prepare
        self._waiters: list[tuple[J | None, asyncio.Future[None]]] = []
        self._running = False
        self._task: asyncio.Task[None] | None = None  # keeps the drain task referenced

    async def commit(self, job: J | None = None) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append((job, fut))
        if not self._running:
            self._running = True
            self._task = loop.create_task(self._drain())
        await fut

    def _batch(self, jobs: list[J]) -> None:
        if jobs and self._write is not None:
            self._write(jobs)
        if self._fsync:
            fsync_dir(self._path)

    def _blocking(self, jobs: list[J]) -> Callable[[], None] | None:
        """What the batch leaves to the thread pool (``prepare`` did the rest here)."""
        if self._prepare is None:
            return functools.partial(self._batch, jobs)
        blocking = self._prepare(jobs)
        if not self._fsync:
            return blocking
        if blocking is None:
            return functools.partial(fsync_dir, self._path)

        def both() -> None:
            blocking()
            fsync_dir(self._path)

        return both

    async def _drain(self) -> None:
        try:
            while self._waiters:
                batch, self._waiters = self._waiters, []
                jobs = [job for job, _ in batch if job is not None]
                try:
                    blocking = self._blocking(jobs)
                    if blocking is not None:
                        await self._run(blocking)
                except Exception as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for job, fut in batch:
                    if fut.done():
                        continue
                    if job is not None and job.error is not None:
                        fut.set_exception(job.error)
                    else:
                        fut.set_result(None)
        finally:
            self._running = False

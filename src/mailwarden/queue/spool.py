"""The durable spool: one file per message, states as directories, fsync before ``250``.

Layout of one shard (a worker process owns one shard; ``root`` holds all of them)::

    root/<shard>/incoming/QID.tmp   being written (never read; removed at startup)
    root/<shard>/active/QID         ready for delivery, or being delivered
    root/<shard>/deferred/QID       waiting for a retry; the file's mtime is the due time
    root/<shard>/hold/QID           held by the operator; never delivered until released
    root/<shard>/corrupt/QID        unparsable; kept for the operator, never delivered
    root/<shard>/done/QID.done      journal: JSON lines, per-recipient final results,
                                    attempt count, delay warning sent (see ``queue.journal``)
    root/<shard>/flush              trigger file: ``mailwarden queue flush`` creates it

A message file is ``MWQ1 <json length> <data length> <crc32 of data>\\n``, the envelope
(``EnvelopeSnapshot.to_json``) as JSON, ``\\n``, then the raw message bytes.

``enqueue`` writes ``incoming/QID.tmp``, fsyncs it, renames it into ``active/`` and fsyncs
the directory; it returns only then (the SMTP edge sends ``250`` after it). Enqueues are
group-committed per directory: the enqueues that arrive while a batch is on disk form the
next batch, which one thread-pool call writes (all files, writeback started for all, then
one fsync each, so the filesystem journal commits them together), renames (no-replace:
a queue id is never overwritten) and covers with one directory fsync. Completions
(``complete``) are group-committed the same way by a committer of their own (unlinks, one
directory fsync), so a finished delivery is recorded without waiting behind writes.

Fresh messages: while a consumer is registered (``on_enqueue``, the scheduler), the
envelope and bytes of each new message stay in memory (``fresh``/``fresh_data``, at most
``FRESH_CACHE_BYTES`` in all, oldest evicted first, dropped with ``drop_fresh`` when the
first attempt ends), so that attempt reads nothing back from disk. The bytes stay in the
cache (not in the attempt) until a delivery slot takes them, so mail waiting for a slot
never holds more than the cap. The file stays the only durable copy; an evicted message
is read from it.

Public names: ``Spool``, ``QueueState``, ``SpooledMessage``, ``MessageSink``,
``SPOOL_IO_THREADS``, ``FRESH_CACHE_BYTES``, ``valid_queue_id``, ``shard_name``,
``envelope_json``.
Security: stores untrusted message bytes verbatim and never interprets them; queue ids are
checked against a strict pattern before they become file names (no path traversal); spool
files are created mode 0600; unparsable files are moved to ``corrupt/``, never executed or
trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mailwarden.core.events import emit
from mailwarden.core.types import EnvelopeSnapshot
from mailwarden.errors import QueueError, SpoolCorrupt
from mailwarden.queue.commit import (
    GroupCommit,
    RemoveJob,
    fsync_dir,
    rename_noreplace,
    start_writeback,
)
from mailwarden.queue.journal import Journal, parse_journal

SPOOL_IO_THREADS = 4  # parallel file writers; more threads thrash the GIL (32: ~330 msg/s, 4: ~440)
FRESH_CACHE_BYTES = 64 * 1024 * 1024  # message bytes kept in memory for the first attempt
MAGIC = b"MWQ1"  # first bytes of every message file (format version 1)
MAX_HEADER_LINE = 64  # bytes of the first line: magic and three numbers
MAX_ENVELOPE_JSON = 8 * 1024 * 1024  # an envelope larger than this is corrupt
FILE_MODE = 0o600  # spool files hold private mail
DIR_MODE = 0o700
FLUSH_TRIGGER = "flush"  # file name of the flush trigger in a shard directory

_ENVELOPE_FIELDS = tuple(f.name for f in fields(EnvelopeSnapshot))
_QID = re.compile(r"^[0-9A-Za-z]{6,64}$")
_SHARD = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_T = TypeVar("_T")


class QueueState(StrEnum):
    """The directory a message file is in."""

    INCOMING = "incoming"
    ACTIVE = "active"
    DEFERRED = "deferred"
    HOLD = "hold"
    CORRUPT = "corrupt"


# States a queued message can be found in (incoming files are not messages yet).
QUEUED_STATES = (QueueState.ACTIVE, QueueState.DEFERRED, QueueState.HOLD)


class MessageSink(Protocol):
    """What the SMTP edge hands accepted mail to."""

    async def enqueue(self, snapshot: EnvelopeSnapshot, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    """A message file's envelope and its journal (the message bytes are read separately)."""

    snapshot: EnvelopeSnapshot
    state: QueueState
    path: Path
    data_offset: int
    data_length: int
    data_crc: int
    journal: Journal
    mtime: float
    # False when it is known that no journal file exists (nothing to remove on completion).
    has_journal: bool = True

    @property
    def pending(self) -> tuple[str, ...]:
        """Recipients with no final result yet (order of the envelope)."""
        done = self.journal.final
        return tuple(r for r in self.snapshot.recipients if r not in done)


def valid_queue_id(qid: str) -> bool:
    """True if ``qid`` is safe to use as a spool file name."""
    return bool(_QID.match(qid))


def shard_name(index: int) -> str:
    """The shard owned by worker ``index``: ``w0``, ``w1``, ..."""
    return f"w{index}"


def envelope_json(snapshot: EnvelopeSnapshot) -> bytes:
    """``snapshot.to_json()`` as compact JSON, without ``dataclasses.asdict`` (which
    deep-copies every field and was a fifth of the enqueue CPU). Every field is a scalar,
    a tuple of strings (JSON array) or a ``StrEnum`` (JSON string of its value)."""
    obj = {name: getattr(snapshot, name) for name in _ENVELOPE_FIELDS}
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(slots=True)
class _Write:
    """One message file to write in a batch (``error`` is set if it failed)."""

    snapshot: EnvelopeSnapshot
    data: bytes
    tmp: str
    final: str
    data_offset: int = 0
    data_crc: int = 0
    fd: int = -1
    created: bool = False  # the temp file exists and is ours to remove on failure
    error: BaseException | None = None


_Job = _Write | RemoveJob  # what the spool's group committers do


class Spool:
    """One shard of the durable spool (see the module docstring for the layout)."""

    def __init__(
        self,
        root: Path | str,
        shard: str = "w0",
        *,
        fsync: bool = True,
        io_threads: int = SPOOL_IO_THREADS,
        fresh_cache_bytes: int = FRESH_CACHE_BYTES,
    ) -> None:
        if not _SHARD.match(shard):
            raise QueueError(f"invalid spool shard name {shard!r}")
        self.root = Path(root)
        self.shard = shard
        self.path = self.root / shard
        self.fsync = fsync
        # Called with the queue id after a message is durably in active/ (the scheduler).
        # While it is set, new messages are also kept in memory for ``take_fresh``.
        self.on_enqueue: Callable[[str], None] | None = None
        self.fresh_cache_bytes = fresh_cache_bytes
        for state in QueueState:
            (self.path / state.value).mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        (self.path / "done").mkdir(exist_ok=True, mode=DIR_MODE)
        self._io_threads = io_threads
        self._executor: ThreadPoolExecutor | None = None
        self._committers: dict[tuple[int, QueueState, bool], GroupCommit[_Job]] = {}
        self._incoming = str(self.path / QueueState.INCOMING.value)
        self._active = str(self.path / QueueState.ACTIVE.value)
        self._fresh: OrderedDict[str, tuple[SpooledMessage, bytes]] = OrderedDict()
        self._fresh_bytes = 0

    # Paths ---------------------------------------------------------------------------
    def dir(self, state: QueueState) -> Path:
        return self.path / state.value

    def file(self, qid: str, state: QueueState) -> Path:
        self._check_id(qid)
        return self.path / state.value / qid

    def journal_path(self, qid: str) -> Path:
        self._check_id(qid)
        return self.path / "done" / f"{qid}.done"

    @property
    def flush_trigger(self) -> Path:
        return self.path / FLUSH_TRIGGER

    @staticmethod
    def _check_id(qid: str) -> None:
        if not valid_queue_id(qid):
            raise QueueError(f"invalid queue id {qid!r}")

    # Thread pool -----------------------------------------------------------------------
    async def run(self, func: Callable[[], _T]) -> _T:
        """Run blocking file I/O in the spool's thread pool."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._io_threads, thread_name_prefix="spool")
        return await asyncio.get_running_loop().run_in_executor(self._executor, func)

    def _committer(self, state: QueueState, removals: bool = False) -> GroupCommit[_Job]:
        """The group committer of a directory; completions (``removals``) have their own,
        so that an unlink never waits behind a batch of writes (a delivered message is
        recorded as soon as possible: a crash before it means a duplicate delivery)."""
        key = (id(asyncio.get_running_loop()), state, removals)
        committer = self._committers.get(key)
        if committer is None:
            committer = GroupCommit(self.dir(state), self.run, self._write_batch, self.fsync)
            self._committers[key] = committer
        return committer

    async def sync_dir(self, state: QueueState) -> None:
        """Group-committed fsync of one state directory (no-op with ``fsync=False``)."""
        if not self.fsync:
            return
        await self._committer(state).commit(None)

    def close(self) -> None:
        """Release the thread pool (waits for running writes)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # Enqueue ---------------------------------------------------------------------------
    async def enqueue(self, snapshot: EnvelopeSnapshot, data: bytes) -> None:
        """Store a message durably in ``active/``; return only when it is on disk."""
        qid = snapshot.queue_id
        self._check_id(qid)
        if not snapshot.recipients:
            raise QueueError(f"{qid}: a message without recipients cannot be queued")
        job = _Write(snapshot, data, f"{self._incoming}/{qid}.tmp", f"{self._active}/{qid}")
        await self._committer(QueueState.ACTIVE).commit(job)
        emit(
            "queue.enqueued",
            queue_id=qid,
            message_id=snapshot.message_id,
            sender=snapshot.mail_from,
            recipients=len(snapshot.recipients),
            size=len(data),
            client=snapshot.client_ip,
            session=snapshot.session_id,
            bounce=snapshot.is_bounce or None,
            shard=self.shard,
        )
        if self.on_enqueue is not None:
            self._keep_fresh(job)
            self.on_enqueue(qid)

    def _write_batch(self, batch: list[_Job]) -> None:
        """Do the jobs of a batch (in the thread pool): unlink the files to remove; write,
        fsync and rename the files to write. A job that fails gets ``error`` (a failed
        write leaves no file); the others are unaffected."""
        jobs: list[_Write] = []
        for item in batch:
            if isinstance(item, _Write):
                jobs.append(item)
                continue
            try:
                os.unlink(item.path)
                item.found = True
            except FileNotFoundError:
                item.found = False
            except Exception as exc:
                item.error = exc
        for job in jobs:
            snapshot = job.snapshot
            try:
                envelope = envelope_json(snapshot)
                job.data_crc = zlib.crc32(job.data)
                head = b"%s %d %d %d\n" % (MAGIC, len(envelope), len(job.data), job.data_crc)
                job.data_offset = len(head) + len(envelope) + 1
                job.fd = os.open(
                    job.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE
                )
                job.created = True
                view = memoryview(b"".join((head, envelope, b"\n", job.data)))
                while view:
                    written = os.write(job.fd, view)
                    view = view[written:]
                if self.fsync and len(jobs) > 1:
                    start_writeback(job.fd)
            except Exception as exc:
                self._fail(job, exc)
        for job in jobs:
            if job.error is not None:
                continue
            try:
                if self.fsync:
                    os.fsync(job.fd)
                os.close(job.fd)
                job.fd = -1
                rename_noreplace(job.tmp, job.final)
                job.created = False
            except FileExistsError:
                self._fail(job, QueueError(f"{job.snapshot.queue_id}: queue id already in use"))
            except Exception as exc:
                self._fail(job, exc)

    @staticmethod
    def _fail(job: _Write, exc: BaseException) -> None:
        job.error = exc
        if job.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(job.fd)
            job.fd = -1
        if job.created:
            with contextlib.suppress(OSError):
                os.unlink(job.tmp)
            job.created = False

    # Fresh messages ----------------------------------------------------------------------
    def _keep_fresh(self, job: _Write) -> None:
        size = len(job.data)
        if size > self.fresh_cache_bytes:
            return
        msg = SpooledMessage(
            snapshot=job.snapshot,
            state=QueueState.ACTIVE,
            path=Path(job.final),
            data_offset=job.data_offset,
            data_length=size,
            data_crc=job.data_crc,
            journal=Journal(),
            mtime=job.snapshot.received_at,
            has_journal=False,
        )
        self._fresh[job.snapshot.queue_id] = (msg, job.data)
        self._fresh_bytes += size
        while self._fresh_bytes > self.fresh_cache_bytes:
            _, (old, _) = self._fresh.popitem(last=False)
            self._fresh_bytes -= old.data_length

    def fresh(self, qid: str) -> SpooledMessage | None:
        """The envelope of a message just enqueued, as ``load`` would return it (empty
        journal, none on disk); None if it was evicted or never kept."""
        entry = self._fresh.get(qid)
        return entry[0] if entry is not None else None

    def fresh_data(self, qid: str) -> bytes | None:
        """The bytes of a message just enqueued; None if evicted (read the file)."""
        entry = self._fresh.get(qid)
        return entry[1] if entry is not None else None

    def drop_fresh(self, qid: str) -> None:
        """Forget the in-memory copy of a message (its first attempt is over)."""
        entry = self._fresh.pop(qid, None)
        if entry is not None:
            self._fresh_bytes -= entry[0].data_length

    def forget_fresh(self) -> None:
        """Drop every in-memory copy (the consumer stopped)."""
        self._fresh.clear()
        self._fresh_bytes = 0

    # Reading ---------------------------------------------------------------------------
    def ids(self, state: QueueState) -> list[str]:
        """Queue ids in one state directory, oldest id first."""
        try:
            names = os.listdir(self.dir(state))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if valid_queue_id(n))

    def locate(self, qid: str) -> QueueState | None:
        """Which state directory holds ``qid`` (None if it is not in this shard)."""
        for state in (*QUEUED_STATES, QueueState.CORRUPT):
            if self.file(qid, state).exists():
                return state
        return None

    def load(self, qid: str, state: QueueState) -> SpooledMessage:
        """Read a message's envelope and journal (not its bytes).

        Raises ``FileNotFoundError`` if it is gone, ``SpoolCorrupt`` if it cannot be parsed.
        """
        path = self.file(qid, state)
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            line = fh.readline(MAX_HEADER_LINE)
            parts = line.split()
            if len(parts) != 4 or parts[0] != MAGIC or not line.endswith(b"\n"):
                raise SpoolCorrupt(f"{qid}: bad spool file header")
            try:
                env_len, data_len, crc = (int(p) for p in parts[1:])
            except ValueError as exc:
                raise SpoolCorrupt(f"{qid}: bad spool file header") from exc
            if not 0 < env_len <= MAX_ENVELOPE_JSON or data_len < 0:
                raise SpoolCorrupt(f"{qid}: bad spool file header lengths")
            offset = len(line) + env_len + 1
            if st.st_size != offset + data_len:
                raise SpoolCorrupt(f"{qid}: spool file is truncated or has trailing bytes")
            raw = fh.read(env_len + 1)
        try:
            snapshot = EnvelopeSnapshot.from_json(json.loads(raw[:-1]))
        except (ValueError, KeyError, TypeError) as exc:
            raise SpoolCorrupt(f"{qid}: unreadable envelope: {exc}") from exc
        if snapshot.queue_id != qid or raw[-1:] != b"\n":
            raise SpoolCorrupt(f"{qid}: envelope does not match the file name")
        journal, has_journal = self._journal(qid)
        return SpooledMessage(
            snapshot=snapshot,
            state=state,
            path=path,
            data_offset=offset,
            data_length=data_len,
            data_crc=crc,
            journal=journal,
            mtime=st.st_mtime,
            has_journal=has_journal,
        )

    def still_active(self, msg: SpooledMessage) -> bool:
        """True if the message file is still in ``active/`` (not held, deleted or moved).
        A ``stat`` of a name just written (its directory entry is cached): cheap enough to
        call on the event loop instead of a thread hop."""
        try:
            os.stat(f"{self._active}/{msg.snapshot.queue_id}")
        except FileNotFoundError:
            return False
        return True

    def read_data(self, msg: SpooledMessage) -> bytes:
        """The message bytes of a loaded message, checked against the stored CRC."""
        with open(msg.path, "rb") as fh:
            fh.seek(msg.data_offset)
            data = fh.read(msg.data_length)
        if len(data) != msg.data_length or zlib.crc32(data) != msg.data_crc:
            raise SpoolCorrupt(f"{msg.snapshot.queue_id}: message data fails its checksum")
        return data

    def read_head(self, msg: SpooledMessage, limit: int) -> bytes:
        """The first ``limit`` bytes of the message (for the headers quoted in a DSN)."""
        with open(msg.path, "rb") as fh:
            fh.seek(msg.data_offset)
            return fh.read(min(limit, msg.data_length))

    def read_journal(self, qid: str) -> Journal:
        return self._journal(qid)[0]

    def _journal(self, qid: str) -> tuple[Journal, bool]:
        try:
            with open(self.journal_path(qid), "rb") as fh:
                return parse_journal(fh.read()), True
        except FileNotFoundError:
            return Journal(), False

    # Changing state --------------------------------------------------------------------
    def append_journal(self, qid: str, records: Iterable[dict[str, Any]], *, sync: bool) -> None:
        """Append JSON-line records to a message's journal (fsync'd if ``sync``)."""
        blob = b"".join(
            json.dumps(r, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
            for r in records
        )
        if not blob:
            return
        path = self.journal_path(qid)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
        try:
            os.write(fd, blob)  # one write: a crash leaves a whole record or a torn last line
            if sync and self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def move(
        self, qid: str, src: QueueState, dst: QueueState, *, mtime: float | None = None
    ) -> bool:
        """Rename a message between states; False if it is no longer in ``src``."""
        target = self.file(qid, dst)
        try:
            os.rename(self.file(qid, src), target)
        except FileNotFoundError:
            return False
        if mtime is not None:
            with contextlib.suppress(FileNotFoundError):
                os.utime(target, (mtime, mtime))
        return True

    def remove(self, qid: str, state: QueueState) -> bool:
        """Delete a message file and then its journal; False if it was not in ``state``.

        The caller makes the removal durable with ``sync_dir(state)`` (or ``fsync_dir``)
        before it relies on it; the journal is removed last so that a crash in between
        never makes a delivered recipient look pending.
        """
        try:
            os.unlink(self.file(qid, state))
        except FileNotFoundError:
            return False
        return True

    async def complete(self, qid: str, *, has_journal: bool = True) -> bool:
        """Remove a message whose every recipient has a final result, durably: unlink its
        file from ``active/``, wait for a group-committed fsync of the directory, then drop
        its journal (unless ``has_journal=False``: known not to exist). False (nothing
        done) if it is no longer in ``active/``.

        The unlink and the directory fsync are group-committed with other completions and
        enqueues (one thread-pool call per batch): a blocking unlink never stalls the loop.
        """
        self._check_id(qid)
        job = RemoveJob(f"{self._active}/{qid}")
        await self._committer(QueueState.ACTIVE, removals=True).commit(job)
        if not job.found:
            return False
        if has_journal:
            await self.run(lambda: self.drop_journal(qid))
        return True

    def drop_journal(self, qid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.journal_path(qid))

    def fsync_dir(self, state: QueueState) -> None:
        """Synchronous directory fsync (for the management commands)."""
        if self.fsync:
            fsync_dir(self.dir(state))

    def mark_corrupt(self, qid: str, state: QueueState, reason: str) -> None:
        """Move an unparsable file to ``corrupt/`` and say so in an event."""
        moved = self.move(qid, state, QueueState.CORRUPT)
        emit(
            "queue.corrupt",
            queue_id=qid,
            state=state.value,
            reason=reason,
            shard=self.shard,
            moved=moved,
        )

    # Startup ---------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Clean up after a crash: remove half-written incoming files and journals of
        messages that no longer exist. Returns the ids in ``active/`` and ``deferred/``."""
        for name in os.listdir(self.dir(QueueState.INCOMING)):
            with contextlib.suppress(OSError):
                os.unlink(self.dir(QueueState.INCOMING) / name)
        present = {n for s in (*QUEUED_STATES, QueueState.CORRUPT) for n in self.ids(s)}
        for name in os.listdir(self.path / "done"):
            qid = name.removesuffix(".done")
            if qid not in present:
                with contextlib.suppress(OSError):
                    os.unlink(self.path / "done" / name)
        return self.ids(QueueState.ACTIVE) + self.ids(QueueState.DEFERRED)

    @staticmethod
    def shards(root: Path | str) -> list[str]:
        """Names of the shards that exist under ``root``."""
        try:
            return sorted(e.name for e in os.scandir(root) if e.is_dir() and _SHARD.match(e.name))
        except FileNotFoundError:
            return []

    @staticmethod
    def adopt_orphans(root: Path | str, workers: int, *, fsync: bool = True) -> list[str]:
        """Move every message of shards not owned by a worker ``w0..w<workers-1>`` into
        ``w0`` (the worker count shrank). Call before the workers start. Returns the ids."""
        live = {shard_name(i) for i in range(max(workers, 1))}
        target = Spool(root, shard_name(0), fsync=fsync)
        moved: list[str] = []
        for shard in Spool.shards(root):
            if shard in live:
                continue
            moved += target.adopt(Spool(root, shard, fsync=fsync))
        return moved

    def adopt(self, other: Spool) -> list[str]:
        """Move all messages (with their journals) of ``other`` into this shard."""
        moved: list[str] = []
        for state in (*QUEUED_STATES, QueueState.CORRUPT):
            for qid in other.ids(state):
                if self.locate(qid) is not None:
                    continue  # already adopted (a crash in a previous run)
                journal = other.journal_path(qid)
                if journal.exists():
                    os.rename(journal, self.journal_path(qid))
                if other.move_to(qid, state, self, state):
                    moved.append(qid)
        # Journals whose message was adopted before a crash.
        for name in os.listdir(other.path / "done"):
            qid = name.removesuffix(".done")
            if valid_queue_id(qid) and self.locate(qid) is not None:
                os.rename(other.path / "done" / name, self.journal_path(qid))
        if self.fsync:
            for state in (*QUEUED_STATES, QueueState.CORRUPT):
                fsync_dir(self.dir(state))
            fsync_dir(self.path / "done")
        if moved:
            emit("queue.adopted", shard=self.shard, from_shard=other.shard, count=len(moved))
        return moved

    def move_to(self, qid: str, state: QueueState, other: Spool, dst: QueueState) -> bool:
        """Rename a message file into another shard (same file system)."""
        try:
            os.rename(self.file(qid, state), other.file(qid, dst))
        except FileNotFoundError:
            return False
        return True

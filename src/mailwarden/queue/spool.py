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
    root/<shard>/log/               segment log of fresh mail (``queue.segment``)

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

Segment log (``segment_log=True``, the gateway's default): a fresh message of at most
``MAX_LOG_MESSAGE`` bytes is appended to the shard's current segment instead (one writev
and one fdatasync per batch, see ``queue.segment``) and is "active" while it is live
there: ``fresh`` always returns its envelope (never evicted; ``path`` is the segment
file), ``complete`` appends its id to the segment's ``.done`` file, ``defer`` materialises
it into ``deferred/`` first. ``recover`` turns the segments of an earlier process into
files in ``active/``; ``log_messages`` and ``take_from_log`` are the operator's view.

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
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from mailwarden.queue.msgfile import (
    MAX_HEADER_LINE,
    encode,
    parse_envelope,
    parse_header,
)
from mailwarden.queue.msgfile import envelope_json as envelope_json
from mailwarden.queue.segment import (
    LOG_DIR,
    MAX_LOG_MESSAGE,
    RETIRE_IDLE_BYTES,
    SEGMENT_BYTES,
    TAKEN,
    LogSeal,
    LogWrite,
    SegmentLog,
    claim_winner,
    done_seqs,
    marker_name,
    read_claims,
    scan_segment,
    segment_seqs,
    seq_name,
    sync_fds,
)

SPOOL_IO_THREADS = 4  # parallel file writers; more threads thrash the GIL (32: ~330 msg/s, 4: ~440)
FRESH_CACHE_BYTES = 64 * 1024 * 1024  # message bytes kept in memory for the first attempt
FILE_MODE = 0o600  # spool files hold private mail
DIR_MODE = 0o700
FLUSH_TRIGGER = "flush"  # file name of the flush trigger in a shard directory
# Longest a segment's completion (.done) line waits for its fdatasync: after a power loss
# (never after a killed process) a delivery of the last DONE_SYNC_DELAY may happen again.
DONE_SYNC_DELAY = 1.0

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
    prefix: bytes | None = None  # the bytes before ``data`` when already encoded
    mtime: float | None = None  # set on the file before it is renamed into place


_Job = _Write | RemoveJob  # what the spool's group committers do


class _Gone(Exception):
    """The segment of a message went away while the operator was taking it."""


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
        segment_log: bool = False,
        segment_bytes: int = SEGMENT_BYTES,
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
        self._log_committers: dict[tuple[int, QueueState, str], GroupCommit[Any]] = {}
        self._incoming = str(self.path / QueueState.INCOMING.value)
        self._active = str(self.path / QueueState.ACTIVE.value)
        self._fresh: OrderedDict[str, tuple[SpooledMessage, bytes]] = OrderedDict()
        self._fresh_bytes = 0
        # Segment log (fast path): live messages (never evicted) and their segments.
        self._log = (
            SegmentLog(self.path / LOG_DIR, fsync=fsync, segment_bytes=segment_bytes)
            if segment_log
            else None
        )
        self._live: dict[str, SpooledMessage] = {}
        self._live_seq: dict[str, int] = {}
        self._seg_live: dict[int, set[str]] = {}
        self._seg_seen: dict[int, int] = {}  # records of a segment acknowledged or failed
        self._retiring: set[int] = set()
        self._seg_taken: dict[int, set[str]] = {}  # let go for the operator, unconfirmed
        self._sealing = False
        self._done_sync: asyncio.TimerHandle | None = None
        self._bg: set[asyncio.Task[None]] = set()

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
        if self._done_sync is not None:
            self._done_sync.cancel()
            self._done_sync = None
        if self._log is not None:
            if self.fsync:
                sync_fds(self._log.dirty_done_fds())
            self._log.close()

    # Enqueue ---------------------------------------------------------------------------
    async def enqueue(self, snapshot: EnvelopeSnapshot, data: bytes) -> None:
        """Store a message durably in ``active/``; return only when it is on disk."""
        qid = snapshot.queue_id
        self._check_id(qid)
        if not snapshot.recipients:
            raise QueueError(f"{qid}: a message without recipients cannot be queued")
        if self._log is not None and len(data) <= MAX_LOG_MESSAGE:
            msg = await self._log_append(snapshot, data)
        else:
            job = _Write(snapshot, data, f"{self._incoming}/{qid}.tmp", f"{self._active}/{qid}")
            await self._committer(QueueState.ACTIVE).commit(job)
            msg = SpooledMessage(
                snapshot=snapshot,
                state=QueueState.ACTIVE,
                path=Path(job.final),
                data_offset=job.data_offset,
                data_length=len(data),
                data_crc=job.data_crc,
                journal=Journal(),
                mtime=snapshot.received_at,
                has_journal=False,
            )
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
            self._keep_fresh(msg, data)
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
            try:
                if job.prefix is None:
                    job.prefix, job.data_crc = encode(job.snapshot, job.data)
                job.data_offset = len(job.prefix)
                job.fd = os.open(
                    job.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE
                )
                job.created = True
                view = memoryview(b"".join((job.prefix, job.data)))
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
                if job.mtime is not None:
                    os.utime(job.fd, (job.mtime, job.mtime))
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

    # Segment log ---------------------------------------------------------------------------
    def _log_committer(self) -> GroupCommit[Any]:
        """The group committer of the segment log's appends. They do their own
        fdatasync; no directory fsync per batch."""
        assert self._log is not None
        key = (id(asyncio.get_running_loop()), QueueState.ACTIVE, "log")
        committer = self._log_committers.get(key)
        if committer is None:
            committer = GroupCommit(self._log.dir, self.run, None, False, prepare=self._log_prepare)
            self._log_committers[key] = committer
        return committer

    def _log_prepare(self, jobs: list[Any]) -> Callable[[], None] | None:
        """Append a batch on the event loop; the thread pool only syncs it."""
        assert self._log is not None
        sync = self._log.append(jobs)
        return None if sync is None else sync.run

    async def _log_append(self, snapshot: EnvelopeSnapshot, data: bytes) -> SpooledMessage:
        """Append a message to the current segment; return once it is fdatasync'd."""
        assert self._log is not None
        qid = snapshot.queue_id
        if qid in self._live:
            raise QueueError(f"{qid}: queue id already in use")
        job = LogWrite(snapshot, data)
        try:
            await self._log_committer().commit(job)
        except BaseException:
            if job.seq:
                self._seg_seen[job.seq] = self._seg_seen.get(job.seq, 0) + 1
            self._check_retire()
            raise
        msg = SpooledMessage(
            snapshot=snapshot,
            state=QueueState.ACTIVE,
            path=self._log.path(job.seq),
            data_offset=job.data_offset,
            data_length=len(data),
            data_crc=job.data_crc,
            journal=Journal(),
            mtime=snapshot.received_at,
            has_journal=False,
        )
        # Live before it counts as seen: a sealed segment is never retired under it.
        self._live[qid] = msg
        self._live_seq[qid] = job.seq
        self._seg_live.setdefault(job.seq, set()).add(qid)
        self._seg_seen[job.seq] = self._seg_seen.get(job.seq, 0) + 1
        self._check_retire()
        return msg

    def in_log(self, qid: str) -> bool:
        """True if ``qid`` is live in this process's segment log."""
        return qid in self._live_seq

    def log_ids(self) -> list[str]:
        """Ids of the messages live in this process's segment log."""
        return list(self._live)

    async def _log_done(self, qid: str) -> bool:
        """Record that a live message left its segment; False if the operator took it.
        The ``.done`` line is written at once and synced within ``DONE_SYNC_DELAY``."""
        assert self._log is not None
        won = self._log.mark_done(self._live_seq[qid], qid)
        if self.fsync and self._done_sync is None:
            loop = asyncio.get_running_loop()
            self._done_sync = loop.call_later(DONE_SYNC_DELAY, self._sync_done)
        self._drop_live(qid, claimed=won)
        return won

    def _sync_done(self) -> None:
        self._done_sync = None
        if self._log is not None:
            fds = self._log.dirty_done_fds()
            if fds:
                self._background(self.run(lambda: sync_fds(fds)))

    def forget_taken(self, qid: str) -> None:
        """Drop a live message the operator is taking (its ``.done`` line is theirs)."""
        if qid in self._live_seq:
            self._drop_live(qid, claimed=False)

    def _drop_live(self, qid: str, *, claimed: bool = True) -> None:
        """Forget a live message. ``claimed=False``: the operator's marker made us let go;
        its segment is then only retired once the ``.done`` file shows the operator's
        claim (an operator command that failed half-way must not lose the message)."""
        self._live.pop(qid, None)
        seq = self._live_seq.pop(qid)
        if not claimed:
            self._seg_taken.setdefault(seq, set()).add(qid)
        live = self._seg_live.get(seq)
        if live is not None:
            live.discard(qid)
            if not live:
                del self._seg_live[seq]
        log = self._log
        if (
            log is not None
            and seq == log.current
            and seq not in self._seg_live
            and log.current_size >= RETIRE_IDLE_BYTES
        ):
            self._background(self.retire_idle())
        self._check_retire()

    def _check_retire(self, *, recheck: bool = False) -> None:
        """Retire every sealed segment whose records were all acknowledged and left.
        A segment with messages the operator is taking is checked only with ``recheck``
        (the scheduler's tick), as that reads its ``.done`` file."""
        log = self._log
        if log is None:
            return
        for seq, count in list(log.final.items()):
            if (
                seq not in self._retiring
                and seq not in self._seg_live
                and self._seg_seen.get(seq, 0) >= count
                and (recheck or seq not in self._seg_taken)
            ):
                self._retiring.add(seq)
                self._background(self._retire(seq))

    async def _retire(self, seq: int) -> None:
        assert self._log is not None
        log = self._log
        try:
            taken = self._seg_taken.get(seq)
            if taken:
                claims = await self.run(lambda: read_claims(log.done_path(seq)))
                if not taken <= claims.keys():
                    return  # an operator command is still at work (or failed): wait
            await self.run(lambda: log.retire(seq))
            self._seg_seen.pop(seq, None)
            self._seg_taken.pop(seq, None)
        except OSError as exc:
            emit("queue.error", shard=self.shard, error=f"retiring segment {seq}: {exc}")
        finally:
            self._retiring.discard(seq)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def retire_idle(self) -> None:
        """Seal and retire the current segment if no message in it is live (the
        scheduler's tick calls this, so delivered mail does not linger on disk)."""
        log = self._log
        if log is None or self._sealing:
            return
        seq = log.current
        if not seq or seq in self._seg_live:
            self._check_retire(recheck=True)
            return
        self._sealing = True
        try:
            await self._log_committer().commit(LogSeal(seq))
        finally:
            self._sealing = False
        self._check_retire(recheck=True)

    async def defer(self, qid: str, due: float) -> bool:
        """Move an active message to ``deferred/``, due at ``due``; False if it is no
        longer active. A message live in the segment log is materialised: written as a
        spool file into ``deferred/`` (fsync, rename, directory fsync) and only then
        marked done in its segment."""
        msg = self._live.get(qid)
        if msg is None:
            return await self.run(
                lambda: self.move(qid, QueueState.ACTIVE, QueueState.DEFERRED, mtime=due)
            )
        return await self._materialise(msg, QueueState.DEFERRED, due)

    async def _materialise(self, msg: SpooledMessage, state: QueueState, due: float) -> bool:
        assert self._log is not None
        log, qid = self._log, msg.snapshot.queue_id
        if log.taken(self._live_seq[qid], qid):
            self._drop_live(qid, claimed=False)
            return False
        data = self.fresh_data(qid)
        if data is None:
            data = await self.run(lambda: self.read_data(msg))
        job = _Write(msg.snapshot, data, f"{self._incoming}/{qid}.tmp", str(self.file(qid, state)))
        job.mtime = due
        await self._committer(state).commit(job)
        if await self._log_done(qid):
            return True
        # The operator took it meanwhile (their copy is in hold/ or deleted): drop ours.
        await self.run(lambda: self.remove(qid, state))
        await self.sync_dir(state)
        return False

    # Fresh messages ----------------------------------------------------------------------
    def _keep_fresh(self, msg: SpooledMessage, data: bytes) -> None:
        size = len(data)
        if size > self.fresh_cache_bytes:
            return
        self._fresh[msg.snapshot.queue_id] = (msg, data)
        self._fresh_bytes += size
        while self._fresh_bytes > self.fresh_cache_bytes:
            _, (old, _) = self._fresh.popitem(last=False)
            self._fresh_bytes -= old.data_length

    def fresh(self, qid: str) -> SpooledMessage | None:
        """The envelope of a message just enqueued, as ``load`` would return it (empty
        journal, none on disk); None if it was evicted or never kept. A message that is
        live in the segment log is always returned (its envelope is never evicted; its
        ``path`` is the segment file, so ``read_data`` works once the bytes are)."""
        entry = self._fresh.get(qid)
        if entry is not None:
            return entry[0]
        return self._live.get(qid)

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
        """Which state directory holds ``qid`` (None if it is not in this shard); a message
        live in this process's segment log is ``ACTIVE``."""
        if qid in self._live:
            return QueueState.ACTIVE
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
            env_len, data_len, crc = parse_header(qid, line)
            offset = len(line) + env_len + 1
            if st.st_size != offset + data_len:
                raise SpoolCorrupt(f"{qid}: spool file is truncated or has trailing bytes")
            raw = fh.read(env_len + 1)
        snapshot = parse_envelope(qid, raw)
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
        call on the event loop instead of a thread hop. A message live in the segment log
        is active until the operator's marker for it appears (``log/taken/``)."""
        qid = msg.snapshot.queue_id
        seq = self._live_seq.get(qid)
        if seq is not None and self._log is not None:
            return not self._log.taken(seq, qid)
        try:
            os.stat(f"{self._active}/{qid}")
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
        if qid in self._live_seq:
            won = await self._log_done(qid)
            if won and has_journal:
                await self.run(lambda: self.drop_journal(qid))
            return won
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
        """Clean up after a crash: remove half-written incoming files, materialise the
        segment log (``recover_log``) and remove journals of messages that no longer
        exist. Returns the ids in ``active/`` and ``deferred/``."""
        for name in os.listdir(self.dir(QueueState.INCOMING)):
            with contextlib.suppress(OSError):
                os.unlink(self.dir(QueueState.INCOMING) / name)
        self.recover_log()
        self._resolve_twins()
        present = {n for s in (*QUEUED_STATES, QueueState.CORRUPT) for n in self.ids(s)}
        for name in os.listdir(self.path / "done"):
            qid = name.removesuffix(".done")
            if qid not in present:
                with contextlib.suppress(OSError):
                    os.unlink(self.path / "done" / name)
        return self.ids(QueueState.ACTIVE) + self.ids(QueueState.DEFERRED)

    def _resolve_twins(self) -> None:
        """A message in ``hold/`` and also in ``active/`` or ``deferred/``: a crash fell
        between the scheduler materialising its copy and the claim in the segment's
        ``.done`` file that would have removed one of the two, while the operator held
        the message. The copies hold the same bytes and share one journal; the held one
        is kept (never delivered twice, never lost: the operator can release it)."""
        held = set(self.ids(QueueState.HOLD))
        for state in (QueueState.ACTIVE, QueueState.DEFERRED):
            twins = held.intersection(self.ids(state))
            for qid in sorted(twins):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.file(qid, state))
                emit("queue.duplicate_removed", queue_id=qid, state=state.value, kept="hold")
            if twins:
                self.fsync_dir(state)

    def recover_log(self) -> list[str]:
        """Materialise every segment not written by this instance (a previous process's):
        each complete, valid record without a ``.done`` line becomes a file in
        ``active/`` (skipped if a file with its id exists: an earlier, interrupted
        recovery), ``active/`` is fsync'd, then the segment is deleted. A torn tail was
        never acknowledged and is dropped; a segment damaged before its end is kept in
        ``corrupt/`` (``queue.corrupt``) after its readable records were materialised.
        Works with the segment log switched off too. Returns the ids materialised."""
        logdir = self.path / LOG_DIR
        if not logdir.is_dir():
            return []
        own = self._log.own if self._log is not None else set()
        present = {n for s in (*QUEUED_STATES, QueueState.CORRUPT) for n in self.ids(s)}
        out: list[str] = []
        for seq in segment_seqs(logdir):
            if seq in own:
                continue
            seg = logdir / f"{seq_name(seq)}.seg"
            raw = seg.read_bytes()
            scan = scan_segment(raw)
            claims = read_claims(logdir / f"{seq_name(seq)}.done")
            todo = [
                (r.qid, raw[r.offset : r.offset + r.length])
                for r in scan.records
                if r.qid not in claims and r.qid not in present
            ]
            written = self._write_files(todo, QueueState.ACTIVE)
            present.update(written)
            out += written
            if scan.corrupt:
                name = f"SEG{seq_name(seq)}"
                os.rename(seg, self.dir(QueueState.CORRUPT) / name)
                self.fsync_dir(QueueState.CORRUPT)
                emit(
                    "queue.corrupt",
                    queue_id=name,
                    state=LOG_DIR,
                    reason=scan.corrupt,
                    shard=self.shard,
                    moved=True,
                )
            self._drop_segment(logdir, seq)
        for seq in done_seqs(logdir):  # done files whose segment went before a crash
            if seq not in own and not (logdir / f"{seq_name(seq)}.seg").exists():
                self._drop_segment(logdir, seq)
        return out

    def _drop_segment(self, logdir: Path, seq: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(logdir / f"{seq_name(seq)}.seg")
        if self.fsync:
            fsync_dir(logdir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(logdir / f"{seq_name(seq)}.done")
        prefix = seq_name(seq) + "-"
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(logdir / "taken"):
                if name.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(logdir / "taken" / name)

    def _write_files(self, items: list[tuple[str, bytes]], state: QueueState) -> list[str]:
        """Write whole message files into ``state`` (synchronously): temp files, fsync,
        no-replace renames, one directory fsync. An id already in use is skipped.
        Returns the ids written."""
        done: list[str] = []
        pending: list[tuple[str, str, int]] = []
        try:
            for qid, blob in items:
                self._check_id(qid)
                tmp = f"{self._incoming}/{qid}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
                pending.append((qid, tmp, fd))
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync and len(items) > 1:
                    start_writeback(fd)
            closed: list[tuple[str, str, int]] = []
            while pending:
                entry = pending[0]
                if self.fsync:
                    os.fsync(entry[2])
                pending.pop(0)
                closed.append(entry)
                os.close(entry[2])
            for qid, tmp, _ in closed:
                try:
                    rename_noreplace(tmp, str(self.file(qid, state)))
                    done.append(qid)
                except FileExistsError:
                    os.unlink(tmp)
        finally:
            for _, tmp, fd in pending:
                with contextlib.suppress(OSError):
                    os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        if done:
            self.fsync_dir(state)
        return done

    # Segment log, seen from another process (the operator commands) ----------------------
    def log_messages(self) -> list[SpooledMessage]:
        """The messages live in this shard's segment files, read from disk (for
        ``mailwarden queue list``, run while the gateway runs): valid records without a
        ``.done`` line, whose id is in no state directory. State ``ACTIVE``."""
        logdir = self.path / LOG_DIR
        present = {n for s in (*QUEUED_STATES, QueueState.CORRUPT) for n in self.ids(s)}
        out: list[SpooledMessage] = []
        for seq in segment_seqs(logdir):
            seg = logdir / f"{seq_name(seq)}.seg"
            try:
                raw = seg.read_bytes()
                st = os.stat(seg)
            except FileNotFoundError:
                continue  # retired meanwhile
            claims = read_claims(logdir / f"{seq_name(seq)}.done")
            for r in scan_segment(raw).records:
                if r.qid in claims or r.qid in present:
                    continue
                journal, has_journal = self._journal(r.qid)
                out.append(
                    SpooledMessage(
                        snapshot=r.parsed.snapshot,
                        state=QueueState.ACTIVE,
                        path=seg,
                        data_offset=r.offset + r.parsed.data_offset,
                        data_length=r.parsed.data_length,
                        data_crc=r.parsed.data_crc,
                        journal=journal,
                        mtime=st.st_mtime,
                        has_journal=has_journal,
                    )
                )
        return out

    def find_in_log(self, qid: str) -> SpooledMessage | None:
        """``qid`` if it is live in one of this shard's segment files (from disk)."""
        for msg in self.log_messages():
            if msg.snapshot.queue_id == qid:
                return msg
        return None

    def take_from_log(self, qid: str, *, to_hold: bool) -> bool:
        """The operator takes a message live in a segment: create its marker (a running
        scheduler stops before the next delivery of it), write it into ``hold/`` (if
        ``to_hold``), then append ``QID taken`` to the segment's ``.done`` file. The
        first ``.done`` line for the id decides: if the scheduler's came first (it
        delivered or deferred the message meanwhile), the hold copy is removed again and
        False is returned (look for the message in the state directories again)."""
        self._check_id(qid)
        msg = self.find_in_log(qid)
        if msg is None:
            return False
        logdir = self.path / LOG_DIR
        seq = int(msg.path.name.removesuffix(".seg"))
        marker = logdir / "taken" / marker_name(seq, qid)
        (logdir / "taken").mkdir(exist_ok=True, mode=DIR_MODE)
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
        except FileExistsError:
            return False  # another operator command is taking it
        held = False
        try:
            if to_hold:
                data = self.read_data(msg)
                prefix, _ = encode(msg.snapshot, data)
                held = bool(self._write_files([(qid, prefix + data)], QueueState.HOLD))
                if not held:
                    raise QueueError(f"{qid}: already in hold/")
            done = logdir / f"{seq_name(seq)}.done"
            try:
                fd = os.open(done, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            except FileNotFoundError:  # the segment was retired: the message left
                fd = -1
            try:
                if fd < 0:
                    raise _Gone
                os.write(fd, b"\n%s %s\n" % (qid.encode("ascii"), TAKEN))
                if self.fsync:
                    os.fdatasync(fd)
            finally:
                if fd >= 0:
                    os.close(fd)
            if claim_winner(done, qid) == TAKEN:
                return True
        except _Gone:
            pass
        except BaseException:
            if held:
                self.remove(qid, QueueState.HOLD)
                self.fsync_dir(QueueState.HOLD)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker)
            raise
        if held:  # the scheduler was first: it owns the message
            self.remove(qid, QueueState.HOLD)
            self.fsync_dir(QueueState.HOLD)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)
        return False

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
        """Move all messages (with their journals) of ``other`` into this shard (its
        segment log is materialised first)."""
        other.recover_log()
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

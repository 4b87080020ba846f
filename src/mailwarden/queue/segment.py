"""Segment log: the spool's fast path for freshly accepted messages.

Layout inside a shard directory::

    log/<seq>.seg           append-only records of accepted messages (``seq``: 16 digits)
    log/<seq>.done          append-only lines ``QID\\n`` (or ``QID taken\\n``): messages
                            that left the segment (delivered, materialised, taken)
    log/taken/<seq>-<QID>   the operator is taking a live message out (hold/delete)

A record is ``MWR1 <QID> <length> <crc32 of the prefix>\\n`` followed by exactly the
bytes of a per-file spool message (``queue.msgfile``: header line, envelope, ``\\n``,
data), so materialising a record into a spool file is a plain write of those bytes. The
prefix CRC covers the header line and the envelope, the data CRC inside the header the
data: a record is valid only when both match.

Writing, one batch at a time (the spool's group committer): ``SegmentLog.append`` runs on
the event loop and appends the records of a batch with ``os.writev`` (at most ``IOV_MAX``
buffers per call; a page-cache write); the ``LogSync`` it returns runs in the spool's
thread pool and covers them with one ``fdatasync`` (after an ``fsync`` of ``log/`` when
the batch created a segment and its ``.done``). Only that call leaves the event loop: a
thread that also encoded and wrote the records had to win the GIL back from the loop at
every step (measured: about 20 futex calls per batch). A record is acknowledged only after
its sync. A segment is sealed when the next record would take it past ``SEGMENT_BYTES``,
or after a failed sync. Completions
(``SegmentLog.mark_done``) append their ids to the segment's ``.done`` file with one
``write`` on the event loop; the spool ``fdatasync``s the written ``.done`` files at most
``DONE_SYNC_DELAY`` later (one thread-pool call for all of them). A completion needs no
``fdatasync`` of its own: a killed process loses nothing that ``write`` returned (the page
cache survives it), and a power loss can only make a delivery of the last moments happen
again, never lose a message (Postfix does not sync its queue file's removal either). A
sealed segment whose every message left is retired (``retire``: the ``.seg`` is unlinked
and ``log/`` fsync'd before the ``.done`` goes).

Who owns a live message is decided by the first ``.done`` line naming it: the scheduler
(plain line: delivered or materialised into a spool file) or the operator (``taken``:
moved to ``hold/`` or deleted). The operator creates its marker first, the scheduler
checks the marker before it appends (and yields) and again after its append (then the
``.done`` file decides); see ``claim_winner``.

Public names: ``SegmentLog``, ``LogWrite``, ``LogSeal``, ``LogSync``, ``Record``, ``sync_fds``,
``ScanResult``, ``scan_segment``, ``read_claims``, ``claim_winner``, ``segment_seqs``,
``seq_name``, ``marker_name``, ``SEGMENT_BYTES``, ``MAX_LOG_MESSAGE``,
``RETIRE_IDLE_BYTES``, ``LOG_DIR``, ``TAKEN_DIR``, ``TAKEN``.
Security: message bytes are untrusted and stored verbatim, never interpreted. Everything
read back from ``log/`` (at recovery and by the operator commands) is untrusted and
possibly torn by a crash: lengths are bounded, both CRCs checked, queue ids validated
before they become file names; a damaged segment is never trusted, only kept for the
operator.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from mailwarden.core.types import EnvelopeSnapshot
from mailwarden.errors import SpoolCorrupt
from mailwarden.queue.commit import fsync_dir
from mailwarden.queue.msgfile import Parsed, encode, parse_message

SEGMENT_BYTES = 32 * 1024 * 1024  # a segment is sealed when it would grow past this
MAX_LOG_MESSAGE = 4 * 1024 * 1024  # larger messages use the per-file spool path
RETIRE_IDLE_BYTES = 1024 * 1024  # an idle current segment this large is retired at once
RECORD_MAGIC = b"MWR1"
MAX_RECORD_HEADER = 128  # bytes of a record header line
LOG_DIR = "log"
TAKEN_DIR = "taken"
TAKEN = b"taken"  # second word of an operator's ``.done`` line
FILE_MODE = 0o600
DIR_MODE = 0o700
try:
    IOV_MAX = max(16, int(os.sysconf("SC_IOV_MAX")))
except (ValueError, OSError):  # pragma: no cover - every Linux has it
    IOV_MAX = 1024

_QID = re.compile(rb"^[0-9A-Za-z]{6,64}$")
_SEG = re.compile(r"^([0-9]{16})\.seg$")
_DONE = re.compile(r"^([0-9]{16})\.done$")


def seq_name(seq: int) -> str:
    return f"{seq:016d}"


def marker_name(seq: int, qid: str) -> str:
    return f"{seq_name(seq)}-{qid}"


def segment_seqs(logdir: Path) -> list[int]:
    """Sequence numbers of the ``.seg`` files in ``logdir``, oldest first."""
    try:
        names = os.listdir(logdir)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _SEG.match(n)))


def done_seqs(logdir: Path) -> list[int]:
    """Sequence numbers of the ``.done`` files in ``logdir``."""
    try:
        names = os.listdir(logdir)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _DONE.match(n)))


# Segment contents -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Record:
    """One valid record of a segment file."""

    qid: str
    offset: int  # where the message bytes (``MWQ1 ...``) start in the segment
    length: int  # length of the message bytes
    parsed: Parsed  # envelope; data offset relative to ``offset``


@dataclass(slots=True)
class ScanResult:
    """The valid records of a segment, and what ended the scan early (if anything)."""

    records: list[Record]
    torn: bool = False  # an incomplete tail (never acknowledged): dropped
    corrupt: str = ""  # a damaged record before the end: the segment is kept


def _header(raw: bytes, pos: int) -> tuple[str, int, int, int] | None:
    """Parse the record header at ``pos``: (qid, start of the message, length, crc)."""
    nl = raw.find(b"\n", pos, pos + MAX_RECORD_HEADER)
    if nl < 0:
        return None
    parts = raw[pos:nl].split(b" ")
    if len(parts) != 4 or parts[0] != RECORD_MAGIC or not _QID.match(parts[1]):
        return None
    if not (parts[2].isdigit() and parts[3].isdigit()):
        return None
    length, crc = int(parts[2]), int(parts[3])
    if length <= 0:
        return None
    return parts[1].decode("ascii"), nl + 1, length, crc


def scan_segment(raw: bytes) -> ScanResult:
    """Every valid record of a segment's bytes, in order.

    A bad record followed by nothing but zero bytes (pages of an append that were never
    written) is a torn append that was never acknowledged (``torn``). A damaged record followed by a
    well-framed one is skipped and the scan goes on; any other damage ends the scan (what
    follows cannot be framed). Either sets ``corrupt``: the segment is kept."""
    out = ScanResult([])
    pos, size = 0, len(raw)
    while pos < size:
        head = _header(raw, pos)
        end = -1
        reason = "unreadable record header"
        if head is not None:
            qid, start, length, crc = head
            end = start + length
            if end <= size:
                try:
                    parsed = parse_message(qid, memoryview(raw)[start:end])
                    if zlib.crc32(memoryview(raw)[start : start + parsed.data_offset]) != crc:
                        raise SpoolCorrupt(f"{qid}: record header fails its checksum")
                except SpoolCorrupt as exc:
                    reason = str(exc)
                    if end < size and _header(raw, end) is not None:
                        # Damaged but framed, and a record follows: skip just this one.
                        out.corrupt = out.corrupt or f"record at offset {pos}: {reason}"
                        pos = end
                        continue
                else:
                    out.records.append(Record(qid, start, length, parsed))
                    pos = end
                    continue
        rest = raw[pos:]
        after = raw[end:] if head is not None else rest  # only zeros after it: the tail
        if not after.strip(b"\0") or (
            head is None and len(rest) < MAX_RECORD_HEADER and b"\n" not in rest
        ):
            out.torn = True
        else:
            out.corrupt = out.corrupt or f"record at offset {pos}: {reason}"
        break
    return out


def read_claims(done_path: Path) -> dict[str, bytes]:
    """The first ``.done`` line of each queue id: ``b""`` (scheduler) or ``TAKEN``.
    A last line without its newline was never synced and is ignored."""
    try:
        raw = done_path.read_bytes()
    except FileNotFoundError:
        return {}
    lines = raw.split(b"\n")
    claims: dict[str, bytes] = {}
    for line in lines[:-1]:
        words = line.split()
        if not words or not _QID.match(words[0]):
            continue
        claims.setdefault(words[0].decode("ascii"), words[1] if len(words) > 1 else b"")
    return claims


def claim_winner(done_path: Path, qid: str) -> bytes | None:
    """Who took ``qid`` first: ``b""`` the scheduler, ``TAKEN`` the operator, None nobody."""
    return read_claims(done_path).get(qid)


def _write_all(fd: int, blob: bytes) -> None:
    view = memoryview(blob)
    while view:
        view = view[os.write(fd, view) :]


def _writev_all(fd: int, bufs: list[bytes | memoryview]) -> None:
    """Write all buffers in order, at most ``IOV_MAX`` per call, resuming partial writes."""
    pending = bufs
    while pending:
        chunk = pending[:IOV_MAX]
        n = os.writev(fd, chunk)
        if n <= 0 and any(len(b) for b in chunk):
            raise OSError("writev wrote nothing")
        k = 0
        while k < len(chunk) and n >= len(chunk[k]):
            n -= len(chunk[k])
            k += 1
        rest = pending[k:]
        if n:
            rest[0] = memoryview(rest[0])[n:]
        pending = rest


def sync_fds(fds: list[int]) -> None:
    """``fdatasync`` each descriptor (thread pool). One that a retirement closed
    meanwhile fails quietly: a retired segment's ``.done`` lines no longer matter."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.fdatasync(fd)


# Batch jobs --------------------------------------------------------------------------------
@dataclass(slots=True)
class LogWrite:
    """Append one message; ``seq``/``data_offset`` say where it went (``seq`` 0: nowhere)."""

    snapshot: EnvelopeSnapshot
    data: bytes
    seq: int = 0
    data_offset: int = 0
    data_crc: int = 0
    error: BaseException | None = None


@dataclass(slots=True)
class LogSeal:
    """Seal segment ``seq`` if it is still the current one (it went idle)."""

    seq: int
    error: BaseException | None = None


class LogSync:
    """The durable half of one ``SegmentLog.append``: ``run()`` (thread pool) fsyncs
    ``log/`` if a segment was created, then ``fdatasync``s each appended group's segment,
    then closes the descriptors of segments sealed in the batch. The thread does nothing
    else: every Python step it takes has to win the GIL back from the event loop.

    A failed fdatasync fails its group's jobs; their records are cut off again
    (``ftruncate`` and another fdatasync) and the next ``append`` seals the segment (after a
    failed fsync the file's state is unknown; nothing more is appended to it)."""

    __slots__ = ("close", "dir", "groups", "log")

    def __init__(self, log: SegmentLog) -> None:
        self.log = log
        self.dir = False
        self.groups: list[tuple[int, list[LogWrite], int]] = []  # (fd, jobs, start offset)
        self.close: list[int] = []

    def add(self, fd: int, group: list[LogWrite], start: int) -> None:
        if group:
            self.groups.append((fd, group, start))

    def run(self) -> None:
        error: BaseException | None = None
        if self.dir:
            try:
                fsync_dir(self.log.dir)
            except Exception as exc:
                error = exc
        cut: set[int] = set()  # descriptors already cut back (to their earliest failed record)
        for fd, group, start in self.groups:
            if error is None:
                try:
                    os.fdatasync(fd)
                    continue
                except Exception as exc:
                    error = exc
            # This group and every later one fail: a later group on the same segment
            # sits behind the failed records and goes with them.
            for job in group:
                job.error = error
            self.log._sync_failed = True
            if fd not in cut:
                cut.add(fd)
                with contextlib.suppress(OSError):  # best effort: the segment is sealed
                    os.ftruncate(fd, start)
                    os.fdatasync(fd)
        for fd in self.close:
            with contextlib.suppress(OSError):
                os.close(fd)


class SegmentLog:
    """The writer side of one shard's ``log/`` directory (one instance per process).

    ``append`` and ``mark_done`` run on the event loop, the ``LogSync`` that ``append``
    returns in the spool's thread pool (serialised by the group committer: the loop does
    not append again until it is done). ``own`` (segments this instance created, never
    recovered by it), ``final`` (sealed segment -> number of records assigned to it) and
    ``done_fds`` are shared with the event loop, which only reads them or removes retired
    entries."""

    def __init__(self, logdir: Path, *, fsync: bool, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.dir = logdir
        self.taken_dir = logdir / TAKEN_DIR
        self.taken_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        self._taken = str(self.taken_dir)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.own: set[int] = set()
        self.final: dict[int, int] = {}
        self.done_fds: dict[int, int] = {}
        self._dirty: set[int] = set()  # segments with .done lines not yet synced
        self._dir_dirty = False  # a segment was created since log/ was last fsync'd
        self._sync_failed = False  # set by a failed LogSync; the next append seals
        self._fd = -1
        self._seq = 0
        self._last = 0
        self._size = 0
        self._count = 0

    def path(self, seq: int) -> Path:
        return self.dir / f"{seq_name(seq)}.seg"

    def done_path(self, seq: int) -> Path:
        return self.dir / f"{seq_name(seq)}.done"

    @property
    def current(self) -> int:
        """The segment being appended to (0: none open)."""
        return self._seq if self._fd >= 0 else 0

    @property
    def current_size(self) -> int:
        return self._size if self._fd >= 0 else 0

    def taken(self, seq: int, qid: str) -> bool:
        """True if the operator's marker for ``qid`` exists (one ``access`` call, no
        exception when it does not: this runs on the event loop before every delivery and
        around every completion)."""
        return os.access(f"{self._taken}/{seq:016d}-{qid}", os.F_OK)

    def _taken_names(self) -> set[str]:
        try:
            return set(os.listdir(self.taken_dir))
        except FileNotFoundError:
            return set()

    # Writer (event loop; LogSync in the thread pool) ----------------------------------
    def _open(self) -> None:
        """Create the next segment and its ``.done`` (event loop: two ``open`` calls). Their
        names are made durable by the ``fsync`` of ``log/`` that the first batch's
        ``LogSync`` does before any fdatasync, so before any record in them is
        acknowledged."""
        seq = max(time.time_ns() // 1000, self._last + 1)
        path, done = self.path(seq), self.done_path(seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            dfd = os.open(done, flags, FILE_MODE)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._fd, self._seq, self._last, self._size, self._count = fd, seq, seq, 0, 0
        self._dir_dirty = True
        self.own.add(seq)
        self.done_fds[seq] = dfd

    def _seal(self, sync: LogSync | None = None) -> None:
        """Stop appending to the current segment; its descriptor is closed now, or by
        ``sync`` once its pending records are on disk."""
        if self._fd < 0:
            return
        if sync is not None and self.fsync:
            sync.close.append(self._fd)
        else:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1
        self.final[self._seq] = self._count

    def _write(self, group: list[LogWrite], bufs: list[bytes | memoryview], start: int) -> bool:
        """Append a group's records to the current segment (event loop, page cache); on a
        failure the group fails and the segment is cut back to ``start``, or sealed."""
        if not group:
            return True
        try:
            _writev_all(self._fd, bufs)
            return True
        except Exception as exc:
            for job in group:
                job.error = exc
            try:  # take the failed records out again; if that fails, seal the segment
                os.ftruncate(self._fd, start)
                self._size = start
            except OSError:
                self._seal()
            return False

    def append(self, jobs: list[LogWrite | LogSeal]) -> LogSync | None:
        """Append the records of a batch on the event loop (see the module docstring) and
        return the ``LogSync`` that makes them durable (None: nothing to sync). A job's
        failure goes into its ``error`` (a job with ``seq`` set counts towards its segment
        either way); the jobs of a sync that fails get its error then."""
        if self._sync_failed:  # the last sync failed: never append behind a failed fsync
            self._sync_failed = False
            self._seal()
        sync = LogSync(self)
        group: list[LogWrite] = []
        bufs: list[bytes | memoryview] = []
        start = 0
        for job in jobs:
            if isinstance(job, LogSeal):
                if self._write(group, bufs, start):
                    sync.add(self._fd, group, start)
                group, bufs = [], []
                if job.seq == self.current:
                    self._seal(sync)
                continue
            try:
                prefix, crc = encode(job.snapshot, job.data)
                length = len(prefix) + len(job.data)
                header = b"%s %s %d %d\n" % (
                    RECORD_MAGIC,
                    job.snapshot.queue_id.encode("ascii"),
                    length,
                    zlib.crc32(prefix),
                )
                size = len(header) + length
                if self._fd < 0 or (self._size > 0 and self._size + size > self.segment_bytes):
                    if self._write(group, bufs, start):
                        sync.add(self._fd, group, start)
                    group, bufs = [], []
                    self._seal(sync)
                    self._open()
            except Exception as exc:
                job.error = exc
                continue
            if not group:
                start = self._size
            job.seq = self._seq
            job.data_offset = self._size + len(header) + len(prefix)
            job.data_crc = crc
            self._size += size
            self._count += 1
            group.append(job)
            bufs += (header, prefix, job.data)
        if self._write(group, bufs, start):
            sync.add(self._fd, group, start)
        if not self.fsync:
            return None
        sync.dir = self._dir_dirty
        self._dir_dirty = False
        return sync if sync.groups or sync.close or sync.dir else None

    def mark_done(self, seq: int, qid: str) -> bool:
        """Append ``qid`` to segment ``seq``'s ``.done`` file; False (nothing written) if
        the operator is taking it. Runs on the event loop: an ``access``, one short
        append ``write`` (page cache), an ``access`` -- no thread hop. The line is not
        synced here: ``dirty_done_fds`` hands it to a later, shared ``fdatasync``."""
        if self.taken(seq, qid):
            return False  # the operator got there first: yield
        _write_all(self.done_fds[seq], qid.encode("ascii") + b"\n")
        self._dirty.add(seq)
        if self.taken(seq, qid):  # a race: the first line decides
            return claim_winner(self.done_path(seq), qid) == b""
        return True

    def dirty_done_fds(self) -> list[int]:
        """The ``.done`` descriptors written since the last call (event loop side); pass
        them to ``sync_fds`` in the thread pool."""
        seqs, self._dirty = self._dirty, set()
        return [fd for seq in seqs if (fd := self.done_fds.get(seq, -1)) >= 0]

    def retire(self, seq: int) -> None:
        """Delete a sealed segment none of whose messages is live any more."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(seq))
        if self.fsync:
            fsync_dir(self.dir)  # the records are gone before their done lines go
        fd = self.done_fds.pop(seq, -1)
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.done_path(seq))
        prefix = seq_name(seq) + "-"
        for name in self._taken_names():
            if name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.taken_dir / name)
        self.final.pop(seq, None)
        self.own.discard(seq)

    def close(self) -> None:
        """Close every file descriptor (the segments stay for the next recovery)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        for fd in self.done_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.done_fds.clear()

"""The quarantine: messages a verdict held, stored durably, never delivered, released by hand.

Layout under ``state_dir/quarantine``::

    incoming/QID.tmp   being written (removed at startup)
    messages/QID       ``MWQR1 <meta length> <data length> <crc32>\\n``, the metadata JSON
                       (index entry + queue envelope), ``\\n``, the message bytes exactly as
                       they would have been queued before scanning (client's bytes plus our
                       ``Received:``; no scan headers)
    index.sqlite3      ``quarantine.index`` (WAL), rebuilt from the files when rows are missing

``Quarantine.hold(snapshot, data, verdict)`` writes the file (temp file, fsync, rename,
directory fsync -- the spool's durability contract: the client's ``250 2.7.0`` is sent after
it), then indexes it. ``release`` hands the original bytes back to the spool under the same
queue id (they skip scanning: the release is the decision that overrides the verdict) and
records who released it; virus entries need ``force``. ``delete`` and ``expire`` remove
files and rows. Every change is an event: ``quarantine.held``, ``quarantine.released``,
``quarantine.deleted``, ``quarantine.expired``, ``quarantine.recovered``.

Public names: ``Quarantine``, ``QuarantineError``, ``UnknownQuarantineId``,
``ReleaseProtected``, ``AlreadyReleased``, ``Held``, ``kind_of``.
Security: stores hostile message bytes verbatim (mode 0600 files, 0700 directories), never
parses or executes them here; queue ids are validated before they become file names;
release is an operator action and is logged with the operator's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailwarden.config import QuarantineConfig
from mailwarden.core.events import emit
from mailwarden.core.types import EnvelopeSnapshot
from mailwarden.errors import MailwardenError
from mailwarden.quarantine.index import HELD, SPAM, VIRUS, Entry, QuarantineIndex
from mailwarden.queue.spool import QueueState, Spool

if TYPE_CHECKING:
    from mailwarden.scan.verdict import Verdict

MAGIC = b"MWQR1"  # first bytes of a quarantine file (format version 1)
MAX_META = 8 * 1024 * 1024  # metadata JSON larger than this is corrupt
FILE_MODE = 0o600
DIR_MODE = 0o700
_QID = re.compile(r"^[0-9A-Za-z]{6,64}$")


class QuarantineError(MailwardenError):
    """A quarantine operation failed (unreadable file, spool refused the release, ...)."""


class UnknownQuarantineId(QuarantineError):
    """No quarantined message with this queue id."""


class ReleaseProtected(QuarantineError):
    """A virus-quarantined message may only be released with ``force`` (admin only)."""


class AlreadyReleased(QuarantineError):
    """The message was released before; it is no longer held."""


@dataclass(frozen=True, slots=True)
class Held:
    """A quarantined message with its bytes (for show and release)."""

    entry: Entry
    envelope: EnvelopeSnapshot
    data: bytes


def kind_of(verdict: Verdict) -> str:
    """VIRUS when any scanner found malware (release-protected), else SPAM."""
    return VIRUS if any(s.name.endswith("_VIRUS") for s in verdict.symbols) else SPAM


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Quarantine:
    """The quarantine directory and its index (one per process; safe across processes)."""

    def __init__(
        self, root: Path | str, settings: QuarantineConfig | None = None, *, fsync: bool = True
    ) -> None:
        self.root = Path(root)
        self.settings = settings or QuarantineConfig()
        self.fsync = fsync
        for sub in ("incoming", "messages"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        self.index = QuarantineIndex(self.root / "index.sqlite3")

    def close(self) -> None:
        self.index.close()

    # Paths -------------------------------------------------------------------------------
    def file(self, qid: str) -> Path:
        if not _QID.match(qid):
            raise UnknownQuarantineId(f"invalid queue id {qid!r}")
        return self.root / "messages" / qid

    # Holding -----------------------------------------------------------------------------
    def entry_for(self, snap: EnvelopeSnapshot, verdict: Verdict, size: int) -> Entry:
        kind = kind_of(verdict)
        keep = self.settings.virus_retention if kind == VIRUS else self.settings.spam_retention
        now = time.time()
        return Entry(
            queue_id=snap.queue_id,
            kind=kind,
            direction=snap.direction.value,
            sender=snap.mail_from,
            recipients=tuple(snap.recipients),
            action=verdict.action.value,
            score=round(verdict.score, 3),
            symbols=tuple((s.name, s.score, s.detail) for s in verdict.symbols),
            reason=verdict.reason,
            control=verdict.control.value if verdict.control else None,
            size=size,
            message_id=snap.message_id,
            client_ip=snap.client_ip,
            received_at=snap.received_at,
            expires_at=now + keep,
        )

    async def hold(self, snap: EnvelopeSnapshot, data: bytes, verdict: Verdict) -> Entry:
        """Store ``data`` durably and index it; return only when it is on disk."""
        entry = self.entry_for(snap, verdict, len(data))
        await asyncio.to_thread(self.store, entry, snap, data)
        emit(
            "quarantine.held",
            queue_id=entry.queue_id,
            kind=entry.kind,
            direction=entry.direction,
            sender=entry.sender,
            recipients=list(entry.recipients),
            score=entry.score,
            symbols=[s[0] for s in entry.symbols],
            reason=entry.reason,
            control=entry.control,
            size=entry.size,
            expires_at=round(entry.expires_at, 3),
        )
        return entry

    def store(self, entry: Entry, snap: EnvelopeSnapshot, data: bytes) -> None:
        """Write the message file (fsync'd, atomic) and its index row (blocking)."""
        qid = entry.queue_id
        final = self.file(qid)
        if final.exists():
            raise QuarantineError(f"{qid}: already in the quarantine")
        meta = json.dumps(
            {"entry": entry.to_json(), "envelope": snap.to_json()}, separators=(",", ":")
        ).encode("utf-8")
        head = b"%s %d %d %d\n" % (MAGIC, len(meta), len(data), zlib.crc32(data))
        tmp = self.root / "incoming" / f"{qid}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            for chunk in (head, meta, b"\n", data):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, final)
        if self.fsync:
            _fsync_dir(final.parent)
        self.index.add(entry)

    # Reading -----------------------------------------------------------------------------
    def entry(self, qid: str) -> Entry:
        self.file(qid)  # validates the id
        found = self.index.get(qid)
        if found is None:
            raise UnknownQuarantineId(f"{qid}: no such message in the quarantine")
        return found

    def entries(self, *, status: str | None = None) -> list[Entry]:
        return self.index.entries(status=status)

    def read(self, qid: str) -> Held:
        """The entry, envelope and bytes of a held message."""
        entry = self.entry(qid)
        try:
            return self._read_file(self.file(qid), entry)
        except FileNotFoundError as exc:
            raise QuarantineError(
                f"{qid}: the message bytes are gone (status {entry.status})"
            ) from exc

    def _read_file(self, path: Path, entry: Entry | None = None) -> Held:
        with open(path, "rb") as fh:
            first = fh.readline(64)
            parts = first.split()
            if len(parts) != 4 or parts[0] != MAGIC or not all(p.isdigit() for p in parts[1:]):
                raise QuarantineError(f"{path.name}: not a quarantine file")
            mlen, dlen, crc = (int(p) for p in parts[1:])
            if mlen > MAX_META:
                raise QuarantineError(f"{path.name}: metadata too large")
            meta: dict[str, Any] = json.loads(fh.read(mlen))
            if fh.read(1) != b"\n":
                raise QuarantineError(f"{path.name}: truncated")
            data = fh.read(dlen + 1)
        if len(data) != dlen or zlib.crc32(data) != crc:
            raise QuarantineError(f"{path.name}: message bytes damaged (length or CRC)")
        return Held(
            entry or Entry.from_json(meta["entry"]),
            EnvelopeSnapshot.from_json(meta["envelope"]),
            data,
        )

    # Operator actions --------------------------------------------------------------------
    async def release(self, qid: str, spool: Spool, *, by: str, force: bool = False) -> Entry:
        """Queue the original bytes to their recipients (same queue id); mark released.

        Raises ``UnknownQuarantineId``, ``AlreadyReleased``, ``ReleaseProtected`` (a virus
        without ``force``) or ``QuarantineError``. A running scheduler picks the message up
        at its next deferred scan (the shard's flush trigger makes that within a second).
        """
        entry = self.entry(qid)
        if entry.status != HELD:
            raise AlreadyReleased(
                f"{qid}: already released by {entry.released_by or '?'}"
                f" at {_when(entry.released_at)}"
            )
        if entry.kind == VIRUS and not force:
            raise ReleaseProtected(
                f"{qid}: held as a virus ({entry.reason}); releasing it is for administrators "
                "only: use --force if you are sure"
            )
        held = self.read(qid)
        try:
            await spool.enqueue(held.envelope, held.data)
        except (MailwardenError, OSError) as exc:
            raise QuarantineError(f"{qid}: the spool refused the message: {exc}") from exc
        now = time.time()
        # Hand it to the running scheduler of that shard: due now, plus the flush trigger.
        await asyncio.to_thread(self._wake_scheduler, spool, qid, now)
        self.index.mark_released(qid, by, now)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file(qid))
        emit(
            "quarantine.released",
            queue_id=qid,
            by=by,
            kind=entry.kind,
            forced=force,
            direction=entry.direction,
            recipients=list(entry.recipients),
            reason=entry.reason,
            control=entry.control,
            shard=spool.shard,
        )
        return self.entry(qid)

    @staticmethod
    def _wake_scheduler(spool: Spool, qid: str, now: float) -> None:
        spool.move(qid, QueueState.ACTIVE, QueueState.DEFERRED, mtime=now)
        spool.flush_trigger.touch()

    def delete(self, qid: str, *, by: str) -> Entry:
        """Remove a message and its row for good."""
        entry = self.entry(qid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file(qid))
        self.index.remove(qid)
        emit("quarantine.deleted", queue_id=qid, by=by, kind=entry.kind, status=entry.status)
        return entry

    def expire(self, now: float | None = None) -> list[str]:
        """Remove every entry past its expiry time; return their queue ids."""
        now = time.time() if now is None else now
        done = []
        for qid in self.index.expired(now):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.file(qid))
            if self.index.remove(qid):
                done.append(qid)
                emit("quarantine.expired", queue_id=qid)
        return done

    async def maintain(self, interval: float) -> None:
        """Run in every worker: ``recover`` and ``expire`` now, then ``expire`` every
        ``interval`` seconds until cancelled (errors are events, never fatal)."""
        first = True
        while True:
            try:
                if first:
                    await asyncio.to_thread(self.recover)
                await asyncio.to_thread(self.expire)
            except (OSError, QuarantineError, sqlite3.Error) as exc:
                emit("quarantine.error", error=f"maintenance: {exc}")
            first = False
            await asyncio.sleep(interval)

    def recover(self) -> int:
        """Startup: drop partial writes, index files missing from the index, forget held rows
        whose file is gone. Returns how many rows were repaired."""
        for tmp in (self.root / "incoming").glob("*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        known = {e.queue_id: e for e in self.index.entries()}
        repaired = 0
        on_disk = set()
        for path in (self.root / "messages").iterdir():
            if not _QID.match(path.name):
                continue
            on_disk.add(path.name)
            if path.name in known:
                continue
            try:
                held = self._read_file(path)
            except (QuarantineError, OSError, ValueError, KeyError) as exc:
                emit("quarantine.error", queue_id=path.name, error=str(exc))
                continue
            self.index.add(held.entry)
            repaired += 1
        for qid, entry in known.items():
            if entry.status == HELD and qid not in on_disk:
                self.index.remove(qid)
                repaired += 1
        if repaired:
            emit("quarantine.recovered", repaired=repaired)
        return repaired


def _when(ts: float | None) -> str:
    if ts is None:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))

"""Queue management across all shards: list, show, hold, release, delete, flush.

These work on the spool files while the gateway runs (files are the interface, as with
``postsuper``): a running scheduler skips a message that left ``active/``, never delivers
from ``hold/``, and answers the ``flush`` trigger file of its shard within
``scheduler.TRIGGER_POLL`` seconds. Messages live in a shard's segment log (``log/``, the
fast path for fresh mail) are listed as ``active``; hold and delete take them out through
``Spool.take_from_log`` (marker, hold copy, ``.done`` line; the scheduler yields).
``flush`` also sets every deferred file's due time to now, so mail is retried at the next
scan even by a scheduler that starts later.

Public names: ``QueueEntry``, ``UnknownQueueId``, ``list_queue``, ``show``, ``hold``,
``release``, ``delete``, ``delete_all``, ``flush``.
Security: operator-only (the spool is mode 0700); queue ids from the command line are
validated before they become paths; ``show`` returns untrusted headers for display only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mailwarden.core.events import emit
from mailwarden.errors import QueueError, SpoolCorrupt
from mailwarden.queue.dsn import extract_headers
from mailwarden.queue.spool import (
    QUEUED_STATES,
    QueueState,
    Spool,
    SpooledMessage,
    valid_queue_id,
)

MOVE_RETRIES = 3  # a message may move between active/ and deferred/ while we look
SHOW_HEADER_BYTES = 64 * 1024  # header bytes ``show`` reads from a message


class UnknownQueueId(QueueError):
    """No message with this queue id in any shard."""


@dataclass(slots=True)
class QueueEntry:
    """One queued message as the operator sees it."""

    queue_id: str
    shard: str
    state: str
    size: int
    arrival: float
    sender: str
    recipients: list[str]
    pending: list[str]
    attempts: int = 0
    next_retry: float | None = None
    message_id: str = ""
    errors: dict[str, str] = field(default_factory=dict)  # recipient -> last deferral
    corrupt: str = ""  # why the file could not be read (state "corrupt")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _spools(root: Path) -> Iterator[Spool]:
    for shard in Spool.shards(root):
        yield Spool(root, shard)


def _entry(spool: Spool, qid: str, state: QueueState) -> QueueEntry | None:
    try:
        msg = spool.load(qid, state)
    except FileNotFoundError:
        return None
    except SpoolCorrupt as exc:
        try:
            st = spool.file(qid, state).stat()
        except FileNotFoundError:
            return None
        return QueueEntry(
            qid, spool.shard, state.value, st.st_size, st.st_mtime, "", [], [], corrupt=str(exc)
        )
    return _entry_of(spool, msg)


def _entry_of(spool: Spool, msg: SpooledMessage) -> QueueEntry:
    state, qid = msg.state, msg.snapshot.queue_id
    snap = msg.snapshot
    return QueueEntry(
        queue_id=qid,
        shard=spool.shard,
        state=state.value,
        size=msg.data_length,
        arrival=snap.received_at,
        sender=snap.mail_from,
        recipients=list(snap.recipients),
        pending=list(msg.pending),
        attempts=msg.journal.attempts,
        next_retry=msg.mtime if state is QueueState.DEFERRED else None,
        message_id=snap.message_id,
        errors={
            r: f"{rec.code} {rec.enhanced} {rec.text}"
            for r, rec in msg.journal.last_deferred.items()
            if r in msg.pending
        },
    )


def list_queue(root: Path) -> list[QueueEntry]:
    """Every message in every shard (including corrupt files), oldest first."""
    out = []
    for spool in _spools(root):
        for state in (*QUEUED_STATES, QueueState.CORRUPT):
            for qid in spool.ids(state):
                entry = _entry(spool, qid, state)
                if entry is not None:
                    out.append(entry)
        out += [_entry_of(spool, msg) for msg in spool.log_messages()]
    out.sort(key=lambda e: (e.arrival, e.queue_id))
    return out


def _find(root: Path, qid: str) -> tuple[Spool, QueueState | None]:
    """The shard and state of ``qid``; state None: live in the shard's segment log."""
    if not valid_queue_id(qid):
        raise UnknownQueueId(f"invalid queue id {qid!r}")
    spools = list(_spools(root))
    for spool in spools:
        state = spool.locate(qid)
        if state is not None:
            return spool, state
    for spool in spools:
        if spool.find_in_log(qid) is not None:
            return spool, None
    raise UnknownQueueId(f"no message {qid} in the queue")


def _present(spool: Spool, qid: str) -> bool:
    return spool.locate(qid) is not None or spool.find_in_log(qid) is not None


def show(root: Path, qid: str) -> dict[str, Any]:
    """The entry of ``qid`` with its envelope, journal and message headers."""
    spool, state = _find(root, qid)
    logged = spool.find_in_log(qid) if state is None else None
    if logged is not None:
        entry: QueueEntry | None = _entry_of(spool, logged)
    else:
        entry = _entry(spool, qid, state or QueueState.ACTIVE)
    if entry is None:
        raise UnknownQueueId(f"message {qid} left the queue")
    out = entry.to_json()
    if entry.corrupt:
        return out
    try:
        msg = logged or spool.load(qid, state or QueueState.ACTIVE)
        out["envelope"] = msg.snapshot.to_json()
        out["headers"] = extract_headers(spool.read_head(msg, SHOW_HEADER_BYTES)).decode(
            "utf-8", "replace"
        )
        out["results"] = {
            r: {
                "status": rec.status.value,
                "reply": f"{rec.code} {rec.enhanced} {rec.text}",
                "remote_host": rec.remote_host,
                "at": rec.at,
            }
            for r, rec in msg.journal.final.items()
        }
    except FileNotFoundError as exc:
        raise UnknownQueueId(f"message {qid} left the queue") from exc
    return out


def _move(
    root: Path,
    qid: str,
    sources: tuple[QueueState, ...],
    dst: QueueState,
    mtime: float | None = None,
) -> bool:
    """Move ``qid`` from whichever of ``sources`` holds it; False if it is in none."""
    spool, _ = _find(root, qid)
    for _ in range(MOVE_RETRIES):
        for src in sources:
            if spool.move(qid, src, dst, mtime=mtime):
                spool.fsync_dir(dst)
                return True
        if dst is QueueState.HOLD and spool.take_from_log(qid, to_hold=True):
            return True
        if not _present(spool, qid):
            break
    return False


def hold(root: Path, ids: Iterable[str]) -> list[str]:
    """Put messages on hold; returns those held. Unknown ids raise ``UnknownQueueId``."""
    done = []
    for qid in ids:
        if _move(root, qid, (QueueState.ACTIVE, QueueState.DEFERRED), QueueState.HOLD):
            emit("queue.held", queue_id=qid, by="operator")
            done.append(qid)
    return done


def release(root: Path, ids: Iterable[str]) -> list[str]:
    """Release held messages to ``deferred/``, due now; returns those released."""
    done = []
    for qid in ids:
        if _move(root, qid, (QueueState.HOLD,), QueueState.DEFERRED, mtime=time.time()):
            emit("queue.released", queue_id=qid, by="operator")
            done.append(qid)
    return done


def _delete_one(spool: Spool, qid: str) -> bool:
    for _ in range(MOVE_RETRIES):
        for state in (*QUEUED_STATES, QueueState.CORRUPT):
            if spool.remove(qid, state):
                spool.fsync_dir(state)
                spool.drop_journal(qid)
                emit("queue.removed", queue_id=qid, by="operator", state=state.value)
                return True
        if spool.take_from_log(qid, to_hold=False):
            spool.drop_journal(qid)
            emit("queue.removed", queue_id=qid, by="operator", state=QueueState.ACTIVE.value)
            return True
        if not _present(spool, qid):
            break
    return False


def delete(root: Path, ids: Iterable[str]) -> list[str]:
    """Delete messages (any state); returns those deleted."""
    done = []
    for qid in ids:
        spool, _ = _find(root, qid)
        if _delete_one(spool, qid):
            done.append(qid)
    return done


def delete_all(root: Path) -> list[str]:
    """Delete every message of every shard (``postsuper -d ALL``)."""
    done = []
    for spool in _spools(root):
        for state in (*QUEUED_STATES, QueueState.CORRUPT):
            for qid in spool.ids(state):
                if _delete_one(spool, qid):
                    done.append(qid)
        for msg in spool.log_messages():
            if _delete_one(spool, msg.snapshot.queue_id):
                done.append(msg.snapshot.queue_id)
    return done


def flush(root: Path) -> int:
    """Make all deferred mail due now and tell running schedulers; returns the count."""
    now = time.time()
    count = 0
    for spool in _spools(root):
        for qid in spool.ids(QueueState.DEFERRED):
            try:
                os.utime(spool.file(qid, QueueState.DEFERRED), (now, now))
                count += 1
            except FileNotFoundError:
                continue
        spool.flush_trigger.touch()
    emit("queue.flush", by="operator", deferred=count)
    return count

"""The delivery scheduler of one spool shard: attempts, retries, expiry, DSNs.

``Scheduler(cfg, spool, router)``; ``await start()`` recovers the shard (everything in
``active/`` is attempted, ``deferred/`` when due) and registers itself as the spool's
``on_enqueue`` callback, so a new message is attempted at once; ``notify(qid)`` does the
same by hand. ``await stop()`` stops taking work, lets running deliveries finish for
``limits.shutdown_grace`` seconds and cancels the rest (their messages stay in ``active/``
and are attempted again after a restart).

Each attempt splits the pending recipients by ``router.destination`` and into items of at
most ``queue.max_recipients_per_delivery``; items run under two limits,
``queue.destination_concurrency`` per destination and ``queue.delivery_concurrency`` in
total. Per-recipient results are journaled (fsync) before they are relied on; a bounce DSN
is enqueued before the bounced recipients are journaled, so a crash can repeat a DSN but
never lose one. A message with recipients left is moved to ``deferred/`` with its due time
as the file's mtime (one live in the spool's segment log is materialised there:
``Spool.defer``); every ``queue.scan_interval`` due files go back to ``active/``. The tick
also retires an idle segment (``Spool.retire_idle``).

A message just enqueued is attempted from the spool's in-memory copy (``Spool.fresh``:
no file or journal is read back; its bytes are taken when a delivery slot is held); a
message recovered at startup, deferred, released or evicted from that cache is read from
its file. Completion is ``Spool.complete`` (group-committed unlink and directory fsync)
before ``queue.removed`` is emitted.

Operator actions work through files: a message moved to ``hold/`` or deleted (or, in the
segment log, marked in ``log/taken/``) is skipped
(an item already handed to a transport finishes); ``mailwarden queue flush`` creates the
shard's ``flush`` trigger file, which the scheduler checks every ``TRIGGER_POLL`` seconds
and answers by retrying all deferred mail now.

Public names: ``Scheduler``, ``RouterLike``, ``MAX_ACTIVE_MESSAGES``, ``TRIGGER_POLL``.
Security: delivers untrusted messages through the router; remote replies only go into
events (escaped there) and DSNs (sanitised by ``queue.dsn``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from mailwarden.config import Config
from mailwarden.core.events import emit
from mailwarden.core.types import DeliveryStatus, RecipientResult
from mailwarden.delivery.base import DeliveryItem
from mailwarden.errors import SpoolCorrupt
from mailwarden.queue import retry
from mailwarden.queue.dsn import (
    MAX_RETURNED_HEADERS,
    DsnAction,
    DsnRecipient,
    build_dsn,
    extract_headers,
)
from mailwarden.queue.journal import attempt_record, rcpt_record, warned_record
from mailwarden.queue.spool import QueueState, Spool, SpooledMessage

MAX_ACTIVE_MESSAGES = 10_000  # messages attempted at once (Postfix qmgr_message_active_limit)
TRIGGER_POLL = 1.0  # seconds between checks of the flush trigger file
LOCAL_ERROR = (451, "4.3.0")  # reply used when a transport raised or returned too little


class RouterLike(Protocol):
    """What the scheduler needs of ``delivery.router.Router``."""

    def destination(self, recipient: str) -> str: ...

    async def deliver(self, item: DeliveryItem) -> list[RecipientResult]: ...


class _DestinationLimits:
    """Per-destination semaphores, dropped when unused (destinations are unbounded)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._sems: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, destination: str) -> AsyncIterator[None]:
        sem, users = self._sems.get(destination, (asyncio.Semaphore(self._limit), 0))
        self._sems[destination] = (sem, users + 1)
        try:
            async with sem:
                yield
        finally:
            sem, users = self._sems[destination]
            if users <= 1:
                del self._sems[destination]
            else:
                self._sems[destination] = (sem, users - 1)


class Scheduler:
    """Delivers the messages of one spool shard (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        router: RouterLike,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.qcfg = cfg.queue
        self.spool = spool
        self.router = router
        self.clock = clock
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._tracked: set[str] = set()  # ids queued in _ready or being attempted
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._slots = asyncio.Semaphore(MAX_ACTIVE_MESSAGES)
        self._total = asyncio.Semaphore(self.qcfg.delivery_concurrency)
        self._dest = _DestinationLimits(self.qcfg.destination_concurrency)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._running = False

    # Lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Recover the shard and start delivering."""
        ids = await self.spool.run(self.spool.recover)
        active = await self.spool.run(lambda: self.spool.ids(QueueState.ACTIVE))
        active += self.spool.log_ids()  # enqueued by this process before the start
        self._running = True
        self.spool.on_enqueue = self.notify
        for qid in active:
            self.notify(qid)
        self._loops = [
            asyncio.create_task(self._dispatch(), name="queue-dispatch"),
            asyncio.create_task(self._tick(), name="queue-tick"),
        ]
        await self.scan()
        emit("queue.started", shard=self.spool.shard, recovered=len(ids))

    async def stop(self) -> None:
        """Stop; in-flight deliveries get ``limits.shutdown_grace`` seconds to finish."""
        if not self._running:
            return
        self._running = False
        if self.spool.on_enqueue == self.notify:
            self.spool.on_enqueue = None
            self.spool.forget_fresh()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._tasks:
            _, pending = await asyncio.wait(
                set(self._tasks), timeout=self.cfg.limits.shutdown_grace
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        emit("queue.stopped", shard=self.spool.shard)

    def notify(self, queue_id: str) -> None:
        """Attempt ``queue_id`` (a message in ``active/``) as soon as possible."""
        if not self._running or queue_id in self._tracked:
            return
        self._tracked.add(queue_id)
        self._idle.clear()
        self._ready.put_nowait(queue_id)

    def wake(self) -> None:
        """Scan ``deferred/`` now instead of at the next ``scan_interval``."""
        self._wake.set()

    async def wait_idle(self) -> None:
        """Return when nothing is queued for an attempt or being attempted."""
        await self._idle.wait()

    # Loops -----------------------------------------------------------------------------
    async def _dispatch(self) -> None:
        while True:
            qid = await self._ready.get()
            await self._slots.acquire()
            task = asyncio.create_task(self._attempt_guarded(qid))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _tick(self) -> None:
        poll = min(TRIGGER_POLL, self.qcfg.scan_interval)
        next_scan = time.monotonic() + self.qcfg.scan_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll)
            forced = self._wake.is_set()
            self._wake.clear()
            flush = await self.spool.run(self._take_flush_trigger)
            try:
                await self.spool.retire_idle()
            except OSError as exc:
                emit("queue.error", shard=self.spool.shard, error=f"segment log: {exc}")
            if flush or forced or time.monotonic() >= next_scan:
                next_scan = time.monotonic() + self.qcfg.scan_interval
                try:
                    await self.scan(everything=flush)
                except OSError as exc:
                    emit("queue.error", shard=self.spool.shard, error=f"scan: {exc}")

    def _take_flush_trigger(self) -> bool:
        try:
            os.unlink(self.spool.flush_trigger)
        except FileNotFoundError:
            return False
        return True

    async def scan(self, *, everything: bool = False) -> int:
        """Move due (or, with ``everything``, all) deferred mail to ``active/`` and attempt
        it; returns how many messages were moved."""
        now = self.clock()

        def due_ids() -> list[str]:
            out = []
            for qid in self.spool.ids(QueueState.DEFERRED):
                try:
                    mtime = self.spool.file(qid, QueueState.DEFERRED).stat().st_mtime
                except FileNotFoundError:
                    continue
                if (everything or mtime <= now) and self.spool.move(
                    qid, QueueState.DEFERRED, QueueState.ACTIVE
                ):
                    out.append(qid)
            return out

        moved = await self.spool.run(due_ids)
        for qid in moved:
            self.notify(qid)
        return len(moved)

    # One attempt of one message -----------------------------------------------------------
    async def _attempt_guarded(self, qid: str) -> None:
        try:
            await self._attempt(qid)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            emit("queue.error", queue_id=qid, shard=self.spool.shard, error=repr(exc))
            due = self.clock() + self.qcfg.min_backoff
            with contextlib.suppress(Exception):
                await self.spool.defer(qid, due)
        finally:
            self.spool.drop_fresh(qid)
            self._slots.release()
            self._tracked.discard(qid)
            if not self._tracked:
                self._idle.set()

    async def _attempt(self, qid: str) -> None:
        spool = self.spool
        msg = spool.fresh(qid)  # just enqueued: the envelope (and bytes) are in memory
        if msg is None:
            try:
                msg = await spool.run(lambda: spool.load(qid, QueueState.ACTIVE))
            except FileNotFoundError:
                return  # held, deleted or moved by the operator
            except SpoolCorrupt as exc:
                reason = str(exc)
                await spool.run(lambda: spool.mark_corrupt(qid, QueueState.ACTIVE, reason))
                return
        journaled = msg.has_journal
        pending = msg.pending
        if not pending:
            await self._finish(msg, [], journaled)
            return
        attempt = msg.journal.attempts + 1
        groups = self._split(pending)
        outstanding = len(groups)
        results: list[RecipientResult] = []
        unjournaled: list[RecipientResult] = []
        skipped = False

        async def run_group(destination: str, recipients: tuple[str, ...]) -> None:
            nonlocal outstanding, skipped, journaled
            got = await self._deliver(msg, destination, recipients, attempt)
            outstanding -= 1
            if got is None:
                skipped = True
                return
            results.extend(got)
            delivered = [r for r in got if r.status is DeliveryStatus.DELIVERED]
            if outstanding > 0 and delivered:  # make them durable now: others are in flight
                at = self.clock()
                records = [rcpt_record(r, at) for r in delivered]
                journaled = True
                await spool.run(lambda: spool.append_journal(qid, records, sync=True))
            else:
                unjournaled.extend(delivered)

        if len(groups) == 1:  # the common case: no task per group
            await run_group(*groups[0])
        else:
            await asyncio.gather(*(run_group(d, rs) for d, rs in groups))
        bounced = [r for r in results if r.status is DeliveryStatus.BOUNCED]
        deferred = [r for r in results if r.status is DeliveryStatus.DEFERRED]
        now = self.clock()
        if skipped:  # the operator took the message away: record what happened, stop here
            if bounced:
                await self._bounce(msg, bounced, [], attempt)
            records = [rcpt_record(r, now) for r in unjournaled + bounced + deferred]
            await spool.run(lambda: spool.append_journal(qid, records, sync=True))
            spool.forget_taken(qid)
            return
        expire = bool(deferred) and retry.expired(self.qcfg, msg.snapshot.received_at, now)
        failed: list[RecipientResult] = []
        if bounced or expire:
            failed = await self._bounce(msg, bounced, deferred if expire else [], attempt)
        if not deferred or expire:
            await self._finish(msg, unjournaled + failed, journaled)
            return
        records = [rcpt_record(r, now) for r in unjournaled + bounced + deferred]
        records.append(attempt_record(attempt, now))
        await spool.run(
            lambda: spool.append_journal(qid, records, sync=bool(unjournaled or bounced))
        )
        if retry.warning_due(self.qcfg, msg.snapshot.received_at, now, msg.journal.warned):
            await self._send_dsn(msg, deferred, "delayed")
            await spool.run(lambda: spool.append_journal(qid, [warned_record(now)], sync=True))
            emit(
                "queue.delay_warning",
                queue_id=qid,
                message_id=msg.snapshot.message_id,
                recipients=[r.recipient for r in deferred],
                sender=msg.snapshot.mail_from,
            )
        due = now + retry.backoff(self.qcfg, attempt)
        await spool.defer(qid, due)  # a segment-log message is materialised into deferred/
        emit(
            "queue.deferred",
            queue_id=qid,
            message_id=msg.snapshot.message_id,
            attempt=attempt,
            recipients=[r.recipient for r in deferred],
            next_retry=due,
            reason=deferred[0].text,
        )

    def _split(self, pending: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
        by_dest: dict[str, list[str]] = {}
        for rcpt in pending:
            by_dest.setdefault(self.router.destination(rcpt), []).append(rcpt)
        size = self.qcfg.max_recipients_per_delivery
        return [
            (dest, tuple(rcpts[i : i + size]))
            for dest, rcpts in by_dest.items()
            for i in range(0, len(rcpts), size)
        ]

    async def _deliver(
        self, msg: SpooledMessage, destination: str, recipients: tuple[str, ...], attempt: int
    ) -> list[RecipientResult] | None:
        """One item; None if the message left ``active/`` before it could be sent."""
        spool, snap = self.spool, msg.snapshot
        async with self._dest.hold(destination), self._total:
            fresh = spool.fresh_data(snap.queue_id)
            if (fresh is not None or spool.in_log(snap.queue_id)) and not spool.still_active(msg):
                return None  # in memory or in a segment: only check that it is still active
            if fresh is not None:
                data = fresh
            else:
                try:  # also tells whether it is still in active/
                    data = await spool.run(lambda: spool.read_data(msg))
                except FileNotFoundError:
                    return None
            item = DeliveryItem(
                queue_id=snap.queue_id,
                mail_from=snap.mail_from,
                recipients=recipients,
                destination=destination,
                message=data,
                snapshot=snap,
            )
            started = self.clock()
            try:
                results = await self.router.deliver(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                results = []
                error = f"local error in transport: {exc!r}"
            else:
                error = "transport returned no result for this recipient"
            del data, item
        results = _complete(recipients, results, error)
        now = self.clock()
        for r in results:
            emit(
                "delivery.result",
                queue_id=snap.queue_id,
                message_id=snap.message_id,
                sender=snap.mail_from,
                recipient=r.recipient,
                status=r.status.value,
                reply=f"{r.code} {r.enhanced} {r.text}",
                code=r.code,
                enhanced=r.enhanced,
                text=r.text,
                remote_host=r.remote_host,
                destination=destination,
                tls_version=r.tls.version if r.tls else None,
                tls_cipher=r.tls.cipher if r.tls else None,
                attempt=attempt,
                delay=round(now - snap.received_at, 3),
                duration=round(now - started, 3),
            )
        return results

    async def _finish(
        self, msg: SpooledMessage, final: list[RecipientResult], journaled: bool
    ) -> None:
        """Every recipient has a final result: remove the message durably."""
        spool, qid = self.spool, msg.snapshot.queue_id
        if await spool.complete(qid, has_journal=journaled):
            emit("queue.removed", queue_id=qid, message_id=msg.snapshot.message_id)
        elif final:  # moved to hold meanwhile: remember the results so a release is safe
            at = self.clock()
            records = [rcpt_record(r, at) for r in final]
            await spool.run(lambda: spool.append_journal(qid, records, sync=True))

    async def _bounce(
        self,
        msg: SpooledMessage,
        bounced: list[RecipientResult],
        expired: list[RecipientResult],
        attempt: int,
    ) -> list[RecipientResult]:
        """Send one DSN for bounced and expired recipients; return them all as bounced."""
        snap = msg.snapshot
        failed = list(bounced)
        for r in expired:
            last = r.enhanced if r.enhanced.startswith("4.") else "4.4.7"
            failed.append(
                RecipientResult(
                    r.recipient,
                    DeliveryStatus.BOUNCED,
                    r.code,
                    "5" + last[1:],
                    f"message expired after {self.qcfg.max_lifetime:.0f}s in the queue; "
                    f"last error: {r.text}",
                    r.remote_host,
                )
            )
        dsn_id = await self._send_dsn(msg, failed, "failed")
        if bounced:
            emit(
                "queue.bounced",
                queue_id=snap.queue_id,
                message_id=snap.message_id,
                sender=snap.mail_from,
                recipients=[r.recipient for r in bounced],
                attempt=attempt,
                dsn_queue_id=dsn_id,
            )
        if expired:
            emit(
                "queue.expired",
                queue_id=snap.queue_id,
                message_id=snap.message_id,
                sender=snap.mail_from,
                recipients=[r.recipient for r in expired],
                attempt=attempt,
                dsn_queue_id=dsn_id,
            )
        return failed

    async def _send_dsn(
        self, msg: SpooledMessage, results: list[RecipientResult], action: DsnAction
    ) -> str | None:
        """Enqueue a DSN (durably); returns its queue id, None when none may be sent."""
        snap = msg.snapshot
        if not snap.mail_from or snap.is_bounce:
            return None
        fresh = self.spool.fresh_data(snap.queue_id)
        if fresh is not None:
            head = fresh[:MAX_RETURNED_HEADERS]
        else:
            try:
                head = await self.spool.run(lambda: self.spool.read_head(msg, MAX_RETURNED_HEADERS))
            except FileNotFoundError:
                head = b""
        now = self.clock()
        recipients = [
            DsnRecipient(r.recipient, r.enhanced, r.code, r.text, r.remote_host) for r in results
        ]
        built = build_dsn(
            self.cfg,
            snap,
            extract_headers(head),
            recipients,
            action,
            now,
            retry_until=snap.received_at + self.qcfg.max_lifetime,
        )
        if built is None:
            return None
        dsn_snapshot, data = built
        await self.spool.enqueue(dsn_snapshot, data)
        return dsn_snapshot.queue_id


def _complete(
    recipients: tuple[str, ...], results: list[RecipientResult], error: str
) -> list[RecipientResult]:
    """Exactly one result per recipient: missing ones are deferred with a local error."""
    by_rcpt = {r.recipient: r for r in results}
    code, enhanced = LOCAL_ERROR
    return [
        by_rcpt.get(rcpt) or RecipientResult(rcpt, DeliveryStatus.DEFERRED, code, enhanced, error)
        for rcpt in recipients
    ]

"""Segment log (fast path for fresh mail): group-committed appends, recovery (torn tails,
done lines, damaged records, interrupted recoveries), materialisation on deferral,
retirement of segments, and the operator taking a live message (marker, hold copy).

Real files in a temporary spool; ``ScriptedRouter`` as the transport."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from mailwarden.config import default_config
from mailwarden.core.events import MemorySink, set_sink
from mailwarden.core.types import DeliveryStatus
from mailwarden.queue import spool as spool_mod
from mailwarden.queue.scheduler import Scheduler
from mailwarden.queue.segment import (
    LOG_DIR,
    marker_name,
    read_claims,
    scan_segment,
    segment_seqs,
)
from mailwarden.queue.spool import QueueState, Spool
from tests.queue.helpers import ScriptedRouter, make_message, make_snapshot

D = DeliveryStatus


@pytest.fixture(autouse=True)
def events() -> MemorySink:
    sink = MemorySink()
    set_sink(sink)
    return sink


def log_spool(root: Path, **kwargs: Any) -> Spool:
    return Spool(root, "w0", segment_log=True, **kwargs)


def segments(root: Path) -> list[Path]:
    logdir = root / "w0" / LOG_DIR
    return [logdir / f"{seq:016d}.seg" for seq in segment_seqs(logdir)]


def body(qid: str) -> bytes:
    return make_message(subject=qid, body=f"body of {qid}\r\n" * 50)


async def fill(spool: Spool, n: int) -> list[str]:
    snaps = [make_snapshot(("a@example.edu", "b@example.edu")) for _ in range(n)]
    await asyncio.gather(*(spool.enqueue(s, body(s.queue_id)) for s in snaps))
    return [s.queue_id for s in snaps]


def recovered(root: Path) -> Spool:
    spool = Spool(root, "w0")
    spool.recover()
    return spool


def check_intact(spool: Spool, ids: list[str]) -> None:
    for qid in ids:
        msg = spool.load(qid, QueueState.ACTIVE)
        assert spool.read_data(msg) == body(qid)
        assert msg.pending == ("a@example.edu", "b@example.edu")


Factory = Callable[..., Any]


@pytest_asyncio.fixture
async def start(tmp_path: Path) -> AsyncIterator[Factory]:
    made: list[tuple[Scheduler, Spool]] = []

    async def factory(router: ScriptedRouter, **kwargs: Any) -> tuple[Scheduler, Spool]:
        queue = kwargs.pop("queue", {})
        spool = log_spool(tmp_path / "spool", **kwargs)
        cfg = default_config(queue={"scan_interval": 3600, **queue})
        sched = Scheduler(cfg, spool, router)
        await sched.start()
        made.append((sched, spool))
        return sched, spool

    yield factory
    for sched, spool in made:
        await sched.stop()
        spool.close()


async def settle(sched: Scheduler) -> None:
    for _ in range(3):
        await sched.wait_idle()
        await asyncio.sleep(0.01)


# Appends and recovery ------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_batch_append_then_recover_materialises_every_message(tmp_path: Path) -> None:
    spool = log_spool(tmp_path)
    ids = await fill(spool, 40)
    assert spool.ids(QueueState.ACTIVE) == []  # nothing in per-file form
    [seg] = segments(tmp_path)
    assert [r.qid for r in scan_segment(seg.read_bytes()).records] == ids
    assert all(spool.locate(q) is QueueState.ACTIVE for q in ids)
    spool.close()
    again = recovered(tmp_path)
    assert sorted(again.ids(QueueState.ACTIVE)) == sorted(ids)
    check_intact(again, ids)
    assert segments(tmp_path) == []
    assert [p.name for p in (tmp_path / "w0" / LOG_DIR).iterdir()] == ["taken"]
    assert os.listdir(again.dir(QueueState.INCOMING)) == []


@pytest.mark.asyncio
async def test_records_are_written_on_the_loop_and_only_synced_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, bool]] = []  # (call, on the event loop's thread)
    real_writev, real_sync = os.writev, os.fdatasync

    def writev(fd: int, bufs: Any) -> int:
        calls.append(("writev", threading.current_thread() is threading.main_thread()))
        return real_writev(fd, bufs)

    def fdatasync(fd: int) -> None:
        calls.append(("fdatasync", threading.current_thread() is threading.main_thread()))
        real_sync(fd)

    monkeypatch.setattr(os, "writev", writev)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    spool = log_spool(tmp_path)
    ids = await fill(spool, 8)
    spool.close()
    assert ("writev", True) in calls and ("fdatasync", False) in calls
    assert ("writev", False) not in calls  # the thread pool does no append ...
    assert ("fdatasync", True) not in calls  # ... and the loop never waits for the disk
    check_intact(recovered(tmp_path), ids)


class SyncFault:
    """A fake for a fault the real disk will not produce on demand: ``fdatasync`` of a
    ``.seg`` file fails with EIO while ``failing`` is set (other files sync normally)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.failing = False
        self.failed = 0
        self._real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", self)

    def __call__(self, fd: int) -> None:
        if self.failing and os.readlink(f"/proc/self/fd/{fd}").endswith(".seg"):
            self.failed += 1
            raise OSError(errno.EIO, "injected: fdatasync failed")
        self._real(fd)


@pytest.mark.asyncio
async def test_a_failed_sync_fails_its_batch_cuts_it_off_and_seals_the_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault = SyncFault(monkeypatch)
    spool = log_spool(tmp_path)
    before = await fill(spool, 3)
    [first] = segments(tmp_path)
    size = first.stat().st_size
    fault.failing = True
    snaps = [make_snapshot(("a@example.edu", "b@example.edu")) for _ in range(4)]
    results = await asyncio.gather(
        *(spool.enqueue(s, body(s.queue_id)) for s in snaps), return_exceptions=True
    )
    fault.failing = False
    assert fault.failed >= 1
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results)
    # The refused messages' records are gone again; the acknowledged ones are untouched.
    assert first.stat().st_size == size
    assert [r.qid for r in scan_segment(first.read_bytes()).records] == before
    assert all(spool.locate(s.queue_id) is None for s in snaps)
    # Nothing more goes into a segment whose sync failed: the next message opens another.
    after = await fill(spool, 2)
    assert len(segments(tmp_path)) == 2
    assert [r.qid for r in scan_segment(segments(tmp_path)[1].read_bytes()).records] == after
    spool.close()
    again = recovered(tmp_path)
    assert sorted(again.ids(QueueState.ACTIVE)) == sorted(before + after)
    check_intact(again, before + after)


@pytest.mark.asyncio
async def test_torn_tail_is_dropped_quietly(tmp_path: Path, events: MemorySink) -> None:
    spool = log_spool(tmp_path)
    ids = await fill(spool, 3)
    spool.close()
    [seg] = segments(tmp_path)
    size = seg.stat().st_size
    os.truncate(seg, size - 7)  # the last record lost its end: never acknowledged
    with open(seg, "ab") as fh:
        fh.write(b"\0" * 4096)  # and the file grew by a page that was never written
    again = recovered(tmp_path)
    assert sorted(again.ids(QueueState.ACTIVE)) == sorted(ids[:2])
    check_intact(again, ids[:2])
    assert again.ids(QueueState.CORRUPT) == []
    assert not [e for e in events.events if e.name == "queue.corrupt"]


@pytest.mark.asyncio
async def test_damaged_record_keeps_the_segment_for_the_operator(
    tmp_path: Path, events: MemorySink
) -> None:
    spool = log_spool(tmp_path)
    ids = await fill(spool, 3)
    first = spool.fresh(ids[0]) or spool.load(ids[0], QueueState.ACTIVE)
    spool.close()
    [seg] = segments(tmp_path)
    raw = bytearray(seg.read_bytes())
    raw[first.data_offset + 5] ^= 0x20  # one flipped bit in the first message's data
    seg.write_bytes(bytes(raw))
    again = recovered(tmp_path)
    assert sorted(again.ids(QueueState.ACTIVE)) == sorted(ids[1:])
    check_intact(again, ids[1:])
    [kept] = again.ids(QueueState.CORRUPT)
    assert (again.dir(QueueState.CORRUPT) / kept).read_bytes() == bytes(raw)
    [event] = [e for e in events.events if e.name == "queue.corrupt"]
    assert "checksum" in event.fields["reason"]
    assert segments(tmp_path) == []


@pytest.mark.asyncio
async def test_done_lines_are_respected(tmp_path: Path) -> None:
    spool = log_spool(tmp_path)
    ids = await fill(spool, 4)
    assert await spool.complete(ids[1], has_journal=False)
    assert spool.locate(ids[1]) is None
    spool.close()
    again = recovered(tmp_path)
    assert sorted(again.ids(QueueState.ACTIVE)) == sorted(ids[:1] + ids[2:])


@pytest.mark.asyncio
async def test_done_lines_are_written_at_once_and_synced_together_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:  # records which descriptors got an fdatasync, then does it
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(spool_mod, "DONE_SYNC_DELAY", 0.05)
    spool = log_spool(tmp_path)
    ids = await fill(spool, 3)
    monkeypatch.setattr(os, "fdatasync", spy)
    for qid in ids[:2]:
        assert await spool.complete(qid, has_journal=False)
    # Visible to another process (the operator's commands, a recovery) right away ...
    done = segments(tmp_path)[0].with_suffix(".done")
    assert set(read_claims(done)) == set(ids[:2])
    assert synced == []  # ... but not synced one by one
    done_fd = spool._log.done_fds[spool._live_seq[ids[2]]]  # type: ignore[union-attr]
    for _ in range(200):
        if synced:
            break
        await asyncio.sleep(0.01)
    assert synced == [done_fd]  # both lines, one fdatasync
    assert await spool.complete(ids[2], has_journal=False)
    spool.close()  # a clean stop syncs what is still pending
    assert synced == [done_fd, done_fd]
    assert recovered(tmp_path).ids(QueueState.ACTIVE) == []


@pytest.mark.asyncio
async def test_recovery_is_idempotent_after_a_crash_in_the_middle(tmp_path: Path) -> None:
    spool = log_spool(tmp_path)
    ids = await fill(spool, 3)
    msg = spool.fresh(ids[0])
    assert msg is not None
    spool.close()
    # A previous recovery wrote the first message and died before it deleted the segment.
    [seg] = segments(tmp_path)
    rec = scan_segment(seg.read_bytes()).records[0]
    earlier = tmp_path / "w0" / "active" / ids[0]
    earlier.write_bytes(seg.read_bytes()[rec.offset : rec.offset + rec.length])
    inode = earlier.stat().st_ino
    again = recovered(tmp_path)
    assert sorted(again.ids(QueueState.ACTIVE)) == sorted(ids)
    assert earlier.stat().st_ino == inode  # not written twice
    check_intact(again, ids)
    # A recovery that died after deleting the segment but before its .done file.
    done = seg.with_suffix(".done")
    done.write_bytes(b"")
    recovered(tmp_path)
    assert not done.exists()


@pytest.mark.asyncio
async def test_recovery_leaves_this_processes_own_segment_alone(tmp_path: Path) -> None:
    spool = log_spool(tmp_path)
    ids = await fill(spool, 2)
    spool.recover()
    assert spool.ids(QueueState.ACTIVE) == []
    assert len(segments(tmp_path)) == 1
    assert set(spool.log_ids()) == set(ids)
    spool.close()


@pytest.mark.asyncio
async def test_large_messages_use_the_per_file_path(tmp_path: Path) -> None:
    spool = log_spool(tmp_path)
    snap = make_snapshot()
    big = b"Subject: big\r\n\r\n" + b"x" * (5 * 1024 * 1024)
    await spool.enqueue(snap, big)
    assert spool.ids(QueueState.ACTIVE) == [snap.queue_id]
    assert not spool.in_log(snap.queue_id)
    spool.close()


# With a scheduler ----------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_delivered_messages_leave_nothing_behind(start: Factory) -> None:
    router = ScriptedRouter()
    sched, spool = await start(router)
    ids = await fill(spool, 20)
    await settle(sched)
    assert sorted(router.delivered()) == sorted(["a@example.edu", "b@example.edu"] * 20)
    assert all(spool.locate(q) is None for q in ids)
    await spool.retire_idle()  # what the scheduler's tick does
    await asyncio.sleep(0.05)
    assert segments(spool.root) == []


@pytest.mark.asyncio
async def test_sealed_segments_are_retired(start: Factory) -> None:
    router = ScriptedRouter()
    sched, spool = await start(router, segment_bytes=4096)  # about one message each
    ids = await fill(spool, 8)
    assert len(segments(spool.root)) >= 4
    await settle(sched)
    await asyncio.sleep(0.05)
    assert len(segments(spool.root)) <= 1  # only the current one may remain
    assert len(router.calls) == 8 and all(spool.locate(q) is None for q in ids)


@pytest.mark.asyncio
async def test_deferral_materialises_into_deferred(start: Factory) -> None:
    router = ScriptedRouter(
        script=lambda rcpt, n: D.DELIVERED if rcpt.startswith("a@") else D.DEFERRED
    )
    sched, spool = await start(router, queue={"min_backoff": 600})
    [qid] = await fill(spool, 1)
    await settle(sched)
    assert spool.locate(qid) is QueueState.DEFERRED
    assert not spool.in_log(qid)
    msg = spool.load(qid, QueueState.DEFERRED)
    assert spool.read_data(msg) == body(qid)
    assert msg.pending == ("b@example.edu",)
    assert msg.journal.attempts == 1
    assert msg.mtime > msg.snapshot.received_at + 500  # the due time
    await spool.retire_idle()
    await asyncio.sleep(0.05)
    assert segments(spool.root) == []
    # A restart does not bring it back from the (retired) segment.
    sched2 = Scheduler(
        default_config(queue={"scan_interval": 3600}), Spool(spool.root, "w0"), ScriptedRouter()
    )
    ids = sched2.spool.recover()
    assert ids == [qid]


@pytest.mark.asyncio
async def test_evicted_message_is_delivered_from_its_segment(start: Factory) -> None:
    router = ScriptedRouter()
    first, second = make_snapshot(), make_snapshot()
    b1, b2 = body("first"), body("second")
    sched, spool = await start(router, fresh_cache_bytes=len(b1) + len(b2) - 1)
    await asyncio.gather(spool.enqueue(first, b1), spool.enqueue(second, b2))
    assert spool.fresh_data(first.queue_id) is None  # evicted...
    assert spool.fresh(first.queue_id) is not None  # ...but its envelope is not
    await settle(sched)
    assert {c.queue_id: c.message for c in router.calls} == {
        first.queue_id: b1,
        second.queue_id: b2,
    }
    assert spool.locate(first.queue_id) is None and spool.ids(QueueState.ACTIVE) == []


@pytest.mark.asyncio
async def test_operator_takes_a_live_message_to_hold(start: Factory) -> None:
    gate = asyncio.Event()
    router = ScriptedRouter(gate=gate)
    sched, spool = await start(router, queue={"destination_concurrency": 1})
    busy, held = make_snapshot(), make_snapshot()
    await spool.enqueue(busy, body("busy"))
    while not router.calls:
        await asyncio.sleep(0.001)
    await spool.enqueue(held, body("held"))  # waits for the destination slot
    # The operator command runs in another process; here in a thread of its own.
    other = Spool(spool.root, "w0")
    listed = {m.snapshot.queue_id for m in other.log_messages()}
    assert listed == {busy.queue_id, held.queue_id}
    assert await asyncio.to_thread(other.take_from_log, held.queue_id, to_hold=True)
    assert other.locate(held.queue_id) is QueueState.HOLD
    gate.set()
    await settle(sched)
    assert [c.queue_id for c in router.calls] == [busy.queue_id]
    assert not spool.in_log(held.queue_id)
    msg = spool.load(held.queue_id, QueueState.HOLD)
    assert spool.read_data(msg) == body("held")
    assert {m.snapshot.queue_id for m in other.log_messages()} == set()
    # The segment's .done names the held message as taken by the operator.
    spool.close()
    again = recovered(spool.root)
    assert again.ids(QueueState.ACTIVE) == []
    assert again.locate(held.queue_id) is QueueState.HOLD


@pytest.mark.asyncio
async def test_taken_during_delivery_keeps_results_for_the_release(start: Factory) -> None:
    gate = asyncio.Event()
    router = ScriptedRouter(gate=gate)
    sched, spool = await start(router)
    snap = make_snapshot(("a@example.edu",))
    await spool.enqueue(snap, body("x"))
    while not router.calls:
        await asyncio.sleep(0.001)
    other = Spool(spool.root, "w0")
    assert await asyncio.to_thread(other.take_from_log, snap.queue_id, to_hold=True)
    gate.set()  # the delivery that was already under way succeeds
    await settle(sched)
    msg = spool.load(snap.queue_id, QueueState.HOLD)
    assert msg.pending == ()  # a release will not send it again
    assert not spool.in_log(snap.queue_id)


@pytest.mark.asyncio
async def test_marker_makes_the_scheduler_yield_and_delete_works(start: Factory) -> None:
    gate = asyncio.Event()
    router = ScriptedRouter(gate=gate)
    sched, spool = await start(router, queue={"destination_concurrency": 1})
    busy, gone = make_snapshot(), make_snapshot()
    await spool.enqueue(busy, body("busy"))
    while not router.calls:
        await asyncio.sleep(0.001)
    await spool.enqueue(gone, body("gone"))
    other = Spool(spool.root, "w0")
    assert await asyncio.to_thread(other.take_from_log, gone.queue_id, to_hold=False)
    seq = spool._live_seq[gone.queue_id]
    assert (spool.root / "w0" / LOG_DIR / "taken" / marker_name(seq, gone.queue_id)).exists()
    gate.set()
    await settle(sched)
    assert [c.queue_id for c in router.calls] == [busy.queue_id]
    assert other.locate(gone.queue_id) is None and other.find_in_log(gone.queue_id) is None


@pytest.mark.asyncio
async def test_completion_yields_to_an_operator_marker(tmp_path: Path) -> None:
    spool = log_spool(tmp_path)
    [qid] = await fill(spool, 1)
    seq = spool._live_seq[qid]
    (tmp_path / "w0" / LOG_DIR / "taken" / marker_name(seq, qid)).touch()
    assert not await spool.complete(qid)  # the operator is taking it: not ours to finish
    assert not spool.in_log(qid)
    spool.close()


@pytest.mark.asyncio
async def test_operator_loses_to_an_earlier_completion(tmp_path: Path) -> None:
    spool = log_spool(tmp_path)
    [qid] = await fill(spool, 1)
    other = Spool(tmp_path, "w0")
    msg = other.find_in_log(qid)
    assert msg is not None
    assert await spool.complete(qid, has_journal=False)
    assert not other.take_from_log(qid, to_hold=True)  # gone: nothing written to hold/
    assert other.ids(QueueState.HOLD) == []
    spool.close()


@pytest.mark.asyncio
async def test_crash_between_deferral_copy_and_claim_keeps_only_the_held_copy(
    tmp_path: Path, events: MemorySink
) -> None:
    """The operator took a live message to hold/ while the scheduler, past its marker
    check, wrote its deferred/ copy, and the gateway died before the scheduler's .done
    line (which would have removed that copy): on restart only the held copy is left,
    with the original bytes."""
    spool = log_spool(tmp_path)
    [qid, other_id] = await fill(spool, 2)
    msg = spool.fresh(qid)
    assert msg is not None
    data = spool.read_data(msg)
    # The scheduler has checked for an operator marker (none yet) and is about to write
    # its deferred/ copy; the operator takes the message to hold/ meanwhile...
    operator = Spool(tmp_path, "w0")
    assert await asyncio.to_thread(operator.take_from_log, qid, to_hold=True)
    # ...then the scheduler's copy lands (the first half of Spool._materialise).
    target = str(spool.file(qid, QueueState.DEFERRED))
    job = spool_mod._Write(msg.snapshot, data, f"{spool._incoming}/{qid}.tmp", target)
    await spool._committer(QueueState.DEFERRED).commit(job)
    assert (tmp_path / "w0" / "deferred" / qid).exists()  # both copies exist: the crash
    spool.close()  # SIGKILL stand-in: nothing more of the deferral runs
    events.events.clear()
    again = recovered(tmp_path)
    assert again.ids(QueueState.DEFERRED) == [] and again.ids(QueueState.HOLD) == [qid]
    assert again.read_data(again.load(qid, QueueState.HOLD)) == body(qid)
    assert again.ids(QueueState.ACTIVE) == [other_id]  # the untouched one comes back
    dup = [e for e in events.events if e.name == "queue.duplicate_removed"]
    assert [(e.fields["queue_id"], e.fields["state"]) for e in dup] == [(qid, "deferred")]


@pytest.mark.asyncio
async def test_orphan_shard_segments_are_adopted(tmp_path: Path) -> None:
    orphan = Spool(tmp_path, "w3", segment_log=True)
    snaps = [make_snapshot(("a@example.edu", "b@example.edu")) for _ in range(3)]
    await asyncio.gather(*(orphan.enqueue(s, body(s.queue_id)) for s in snaps))
    orphan.close()
    moved = Spool.adopt_orphans(tmp_path, 1)
    ids = [s.queue_id for s in snaps]
    assert sorted(moved) == sorted(ids)
    w0 = Spool(tmp_path, "w0")
    check_intact(w0, ids)
    assert not list((tmp_path / "w3" / LOG_DIR).glob("*.seg"))


@pytest.mark.asyncio
async def test_operator_failing_half_way_loses_nothing(start: Factory, tmp_path: Path) -> None:
    gate = asyncio.Event()
    router = ScriptedRouter(gate=gate)
    sched, spool = await start(router, segment_bytes=4096, queue={"destination_concurrency": 1})
    busy, victim = make_snapshot(), make_snapshot()
    await spool.enqueue(busy, body("busy"))
    while not router.calls:
        await asyncio.sleep(0.001)
    await spool.enqueue(victim, body("victim"))
    seq = spool._live_seq[victim.queue_id]
    # An operator command created its marker and died before the hold copy and the
    # .done line: the scheduler lets go of the message, but must not delete its bytes.
    (spool.root / "w0" / LOG_DIR / "taken" / marker_name(seq, victim.queue_id)).touch()
    gate.set()
    await settle(sched)
    assert [c.queue_id for c in router.calls] == [busy.queue_id]
    await fill(spool, 2)  # seals the victim's segment
    await settle(sched)
    for _ in range(3):
        await spool.retire_idle()
        await asyncio.sleep(0.05)
    assert spool._log is not None and seq in spool._log.final  # sealed, all acknowledged
    assert spool.root / "w0" / LOG_DIR / f"{seq:016d}.seg" in segments(spool.root)
    await sched.stop()
    spool.close()
    again = recovered(spool.root)
    assert again.ids(QueueState.ACTIVE) == [victim.queue_id]
    assert again.read_data(again.load(victim.queue_id, QueueState.ACTIVE)) == body("victim")


@pytest.mark.asyncio
async def test_big_batches_are_written_in_iov_max_chunks(tmp_path: Path) -> None:
    from mailwarden.queue.segment import IOV_MAX

    spool = log_spool(tmp_path)
    n = IOV_MAX  # three buffers per record: the second batch needs several writev calls
    snaps = [make_snapshot(("a@example.edu", "b@example.edu")) for _ in range(n)]
    await asyncio.gather(*(spool.enqueue(s, body(s.queue_id)) for s in snaps))
    spool.close()
    again = recovered(tmp_path)
    check_intact(again, [s.queue_id for s in snaps])


@pytest.mark.asyncio
async def test_the_tick_retires_an_idle_segment(start: Factory) -> None:
    router = ScriptedRouter()
    sched, spool = await start(router)
    await fill(spool, 3)
    await settle(sched)
    assert len(segments(spool.root)) == 1  # small and idle: left to the tick
    for _ in range(40):
        if not segments(spool.root):
            break
        await asyncio.sleep(0.1)
    assert segments(spool.root) == []

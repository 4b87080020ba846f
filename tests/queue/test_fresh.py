"""Fresh-message fast path: a message just enqueued is delivered from memory (no spool
file is read back), an evicted one from disk; batched writes and completions keep every
guarantee of the slow path (hold before the attempt, no-replace queue ids)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from mailwarden.config import default_config
from mailwarden.core.events import MemorySink, set_sink
from mailwarden.errors import QueueError
from mailwarden.queue.scheduler import Scheduler
from mailwarden.queue.spool import QueueState, Spool
from tests.queue.helpers import ScriptedRouter, make_message, make_snapshot

READERS = ("load", "read_data", "read_head", "read_journal")


def count_reads(spool: Spool) -> Counter[str]:
    """Wrap the spool's read methods; the counter says how often each was called."""
    calls: Counter[str] = Counter()
    for name in READERS:
        original = getattr(spool, name)

        def wrapper(*args: Any, _name: str = name, _orig: Any = original) -> Any:
            calls[_name] += 1
            return _orig(*args)

        setattr(spool, name, wrapper)
    return calls


@pytest.fixture(autouse=True)
def events() -> MemorySink:
    sink = MemorySink()
    set_sink(sink)
    return sink


Factory = Callable[..., Any]


@pytest_asyncio.fixture
async def start(tmp_path: Path) -> AsyncIterator[Factory]:
    made: list[tuple[Scheduler, Spool]] = []

    async def factory(
        router: ScriptedRouter, cache: int | None = None, **queue: Any
    ) -> tuple[Scheduler, Spool]:
        kwargs = {} if cache is None else {"fresh_cache_bytes": cache}
        spool = Spool(tmp_path / "spool", "w0", **kwargs)
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
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_fresh_message_is_delivered_without_reading_the_spool(
    start: Factory, events: MemorySink
) -> None:
    router = ScriptedRouter()
    sched, spool = await start(router)
    reads = count_reads(spool)
    snaps = [make_snapshot(("a@example.edu", "b@other.test")) for _ in range(5)]
    await asyncio.gather(*(spool.enqueue(s, make_message(s.queue_id)) for s in snaps))
    await settle(sched)
    assert sum(reads.values()) == 0, reads
    assert sorted(router.delivered()) == sorted(["a@example.edu", "b@other.test"] * 5)
    for s in snaps:
        sent = [c.message for c in router.calls if c.queue_id == s.queue_id]
        assert sent == [make_message(s.queue_id)] * 2
        assert spool.locate(s.queue_id) is None
    removed = {e.fields["queue_id"] for e in events.events if e.name == "queue.removed"}
    assert removed == {s.queue_id for s in snaps}
    assert all(spool.fresh(s.queue_id) is None for s in snaps)  # dropped after the attempt


@pytest.mark.asyncio
async def test_evicted_fresh_message_is_delivered_from_disk(start: Factory) -> None:
    router = ScriptedRouter()
    first, second = make_snapshot(), make_snapshot()
    body1, body2 = make_message("first"), make_message("second")
    # Room for one message: the second enqueue (same batch) evicts the first.
    sched, spool = await start(router, cache=len(body1) + len(body2) - 1)
    reads = count_reads(spool)
    await asyncio.gather(spool.enqueue(first, body1), spool.enqueue(second, body2))
    await settle(sched)
    assert reads["load"] == 1 and reads["read_data"] == 1, reads
    assert {c.queue_id: c.message for c in router.calls} == {
        first.queue_id: body1,
        second.queue_id: body2,
    }
    assert spool.ids(QueueState.ACTIVE) == []


@pytest.mark.asyncio
async def test_mail_waiting_for_a_slot_stays_within_the_cache_cap(start: Factory) -> None:
    gate = asyncio.Event()
    router = ScriptedRouter(gate=gate)
    body = make_message()
    cap = 2 * len(body)
    sched, spool = await start(router, cache=cap, destination_concurrency=1)
    reads = count_reads(spool)
    snaps = [make_snapshot() for _ in range(6)]
    for s in snaps:
        await spool.enqueue(s, body)
        assert sum(len(d) for s2 in snaps if (d := spool.fresh_data(s2.queue_id))) <= cap
    for _ in range(10):
        await asyncio.sleep(0)
    gate.set()
    await settle(sched)
    assert sorted(c.queue_id for c in router.calls) == sorted(s.queue_id for s in snaps)
    assert all(c.message == body for c in router.calls)
    assert reads["read_data"] >= 3  # evicted while waiting: read back from the file
    assert spool.ids(QueueState.ACTIVE) == []


@pytest.mark.asyncio
async def test_message_too_large_for_the_cache_is_read_from_disk(start: Factory) -> None:
    router = ScriptedRouter()
    sched, spool = await start(router, cache=10)
    reads = count_reads(spool)
    snap = make_snapshot()
    await spool.enqueue(snap, make_message())
    await settle(sched)
    assert reads["load"] == 1 and reads["read_data"] == 1
    assert [c.message for c in router.calls] == [make_message()]


@pytest.mark.asyncio
async def test_fresh_message_held_before_its_attempt_is_not_delivered(start: Factory) -> None:
    gate = asyncio.Event()
    router = ScriptedRouter(gate=gate)
    sched, spool = await start(router, destination_concurrency=1)
    busy, held = make_snapshot(), make_snapshot()
    await spool.enqueue(busy, make_message())
    while not router.calls:
        await asyncio.sleep(0.001)
    await spool.enqueue(held, make_message())  # taken from memory, waits for the slot
    for _ in range(10):
        await asyncio.sleep(0)
    assert spool.fresh_data(held.queue_id) == make_message()  # waits in the cache
    spool.move(held.queue_id, QueueState.ACTIVE, QueueState.HOLD)
    gate.set()
    await settle(sched)
    assert [c.queue_id for c in router.calls] == [busy.queue_id]
    assert spool.locate(held.queue_id) is QueueState.HOLD
    assert spool.locate(busy.queue_id) is None


@pytest.mark.asyncio
async def test_fresh_copies_only_while_a_scheduler_runs(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "w0")
    snap = make_snapshot()
    await spool.enqueue(snap, make_message())  # no consumer registered: nothing kept
    assert spool.fresh(snap.queue_id) is None
    sched = Scheduler(default_config(), spool, ScriptedRouter())
    await sched.start()
    other = make_snapshot()
    await spool.enqueue(other, make_message())
    await sched.stop()  # before the dispatcher ran: the copy is dropped, the file stays
    assert spool.fresh(other.queue_id) is None
    assert spool.locate(other.queue_id) is QueueState.ACTIVE
    spool.close()


@pytest.mark.asyncio
async def test_queue_id_is_never_overwritten_and_batch_mates_survive(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "w0")
    snap = make_snapshot()
    await spool.enqueue(snap, make_message("original"))
    others = [make_snapshot() for _ in range(3)]
    results = await asyncio.gather(
        spool.enqueue(snap, make_message("impostor")),
        *(spool.enqueue(s, make_message(s.queue_id)) for s in others),
        return_exceptions=True,
    )
    assert isinstance(results[0], QueueError) and "already in use" in str(results[0])
    assert results[1:] == [None, None, None]
    msg = spool.load(snap.queue_id, QueueState.ACTIVE)
    assert spool.read_data(msg) == make_message("original")
    for s in others:
        assert spool.read_data(spool.load(s.queue_id, QueueState.ACTIVE)) == make_message(
            s.queue_id
        )
    assert list((tmp_path / "w0" / "incoming").iterdir()) == []
    spool.close()


@pytest.mark.asyncio
async def test_complete_removes_once_and_skips_a_held_message(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "w0")
    done, held = make_snapshot(), make_snapshot()
    for s in (done, held):
        await spool.enqueue(s, make_message())
    spool.append_journal(done.queue_id, [{"k": "attempt", "n": 1, "at": 0.0}], sync=True)
    spool.move(held.queue_id, QueueState.ACTIVE, QueueState.HOLD)
    assert await spool.complete(done.queue_id)
    assert not spool.journal_path(done.queue_id).exists()
    assert not await spool.complete(done.queue_id)
    assert not await spool.complete(held.queue_id, has_journal=False)
    assert spool.locate(held.queue_id) is QueueState.HOLD
    spool.close()

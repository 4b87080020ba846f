"""Scheduler: delivery, per-recipient status across restarts, retries, expiry, DSNs, limits.

Uses ``ScriptedRouter`` (a scripted transport double) and a fake clock; real spool files.
"""

from __future__ import annotations

import asyncio
import email
from collections.abc import AsyncIterator, Callable
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from mailwarden.config import Config, default_config
from mailwarden.core.events import MemorySink, set_sink
from mailwarden.core.types import DeliveryStatus
from mailwarden.queue.scheduler import Scheduler
from mailwarden.queue.spool import QueueState, Spool
from tests.queue.helpers import ScriptedRouter, make_message, make_snapshot

D = DeliveryStatus


class FakeClock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def config(**queue: Any) -> Config:
    base = {
        "min_backoff": 60,
        "max_backoff": 600,
        "scan_interval": 3600,  # the tests call scan() themselves
        "max_lifetime": 3 * 3600,
        "delay_warning": 0,
    }
    base.update(queue)
    return default_config(queue=base, gateway={"hostname": "gw.example.edu"})


class Harness:
    def __init__(self, root: Path, cfg: Config, router: ScriptedRouter, clock: FakeClock) -> None:
        self.root, self.cfg, self.router, self.clock = root, cfg, router, clock
        self.spool = Spool(root, "w0")
        self.sched = Scheduler(cfg, self.spool, router, clock=clock)

    async def restart(self) -> None:
        await self.sched.stop()
        self.spool.close()
        self.spool = Spool(self.root, "w0")
        self.sched = Scheduler(self.cfg, self.spool, self.router, clock=self.clock)
        await self.sched.start()

    async def settle(self) -> None:
        for _ in range(3):
            await self.sched.wait_idle()
            await asyncio.sleep(0)

    async def retry_after(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await self.sched.scan()
        await self.settle()

    def state(self, qid: str) -> QueueState | None:
        return self.spool.locate(qid)

    def dsns(self) -> list[Message]:
        return [
            email.message_from_bytes(item.message)
            for item in self.router.calls
            if item.snapshot.is_bounce and item.snapshot.client_helo == "gw.example.edu"
        ]


@pytest.fixture
def events() -> MemorySink:
    sink = MemorySink()
    set_sink(sink)
    return sink


@pytest_asyncio.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Harness] = []

    async def factory(router: ScriptedRouter | None = None, **queue: Any) -> Harness:
        h = Harness(tmp_path / "spool", config(**queue), router or ScriptedRouter(), FakeClock())
        await h.sched.start()
        made.append(h)
        return h

    yield factory
    for h in made:
        await h.sched.stop()
        h.spool.close()


def names(events: MemorySink, name: str) -> list[dict[str, Any]]:
    return [dict(e.fields) for e in events.events if e.name == name]


@pytest.mark.asyncio
async def test_new_message_is_delivered_at_once(make: Any, events: MemorySink) -> None:
    h = await make()
    snap = make_snapshot(("a@example.edu", "b@example.edu", "c@other.test"))
    await h.spool.enqueue(snap, make_message())
    await h.settle()
    assert sorted(h.router.delivered()) == ["a@example.edu", "b@example.edu", "c@other.test"]
    assert len(h.router.calls) == 2  # split by destination
    assert {c.destination for c in h.router.calls} == {"dest:example.edu", "dest:other.test"}
    assert h.router.calls[0].message == make_message()
    assert h.state(snap.queue_id) is None
    assert not h.spool.journal_path(snap.queue_id).exists()
    results = names(events, "delivery.result")
    assert len(results) == 3 and all(r["status"] == "delivered" for r in results)
    assert results[0]["attempt"] == 1 and results[0]["remote_host"] == "mx.test[127.0.0.1]"
    assert names(events, "queue.removed")[0]["queue_id"] == snap.queue_id


@pytest.mark.asyncio
async def test_items_respect_max_recipients_per_delivery(make: Any) -> None:
    h = await make(max_recipients_per_delivery=2)
    rcpts = [f"u{i}@example.edu" for i in range(5)]
    await h.spool.enqueue(make_snapshot(rcpts), make_message())
    await h.settle()
    assert sorted(len(c.recipients) for c in h.router.calls) == [1, 2, 2]
    assert sorted(h.router.delivered()) == sorted(rcpts)


@pytest.mark.asyncio
async def test_defer_three_times_then_succeed_with_backoff(make: Any, events: MemorySink) -> None:
    router = ScriptedRouter(script=lambda rcpt, n: D.DEFERRED if n <= 3 else D.DELIVERED)
    h = await make(router)
    snap = make_snapshot()
    await h.spool.enqueue(snap, make_message())
    await h.settle()
    waits = []
    for _ in range(3):
        assert h.state(snap.queue_id) is QueueState.DEFERRED
        due = h.spool.file(snap.queue_id, QueueState.DEFERRED).stat().st_mtime
        waits.append(round(due - h.clock.now))
        # Not due yet: a scan just before the due time does nothing.
        await h.retry_after(due - h.clock.now - 1)
        assert h.state(snap.queue_id) is QueueState.DEFERRED
        await h.retry_after(1)
    assert waits == [60, 120, 240]
    assert h.state(snap.queue_id) is None
    assert h.router.delivered() == [snap.recipients[0]]
    assert [d["attempt"] for d in names(events, "queue.deferred")] == [1, 2, 3]


def test_backoff_is_capped() -> None:
    from mailwarden.queue.retry import backoff

    cfg = config().queue
    assert [backoff(cfg, n) for n in range(1, 7)] == [60, 120, 240, 480, 600, 600]


@pytest.mark.asyncio
async def test_delivered_recipients_are_not_retried_after_restart(make: Any) -> None:
    router = ScriptedRouter(
        script=lambda rcpt, n: D.DELIVERED if rcpt.startswith("a") else D.DEFERRED
    )
    h = await make(router)
    snap = make_snapshot(("a@example.edu", "b@example.edu", "c@other.test"))
    await h.spool.enqueue(snap, make_message())
    await h.settle()
    assert h.state(snap.queue_id) is QueueState.DEFERRED
    journal = h.spool.read_journal(snap.queue_id)
    assert set(journal.final) == {"a@example.edu"} and journal.attempts == 1
    router.script = lambda rcpt, n: D.DELIVERED
    await h.restart()
    await h.retry_after(3600)
    assert sorted(router.delivered()) == ["a@example.edu", "b@example.edu", "c@other.test"]
    assert h.state(snap.queue_id) is None


@pytest.mark.asyncio
async def test_restart_recovers_active_and_deferred(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root, "w0")
    active = make_snapshot()
    await spool.enqueue(active, make_message())  # no scheduler: stays in active/
    deferred = make_snapshot()
    await spool.enqueue(deferred, make_message())
    spool.move(deferred.queue_id, QueueState.ACTIVE, QueueState.DEFERRED, mtime=1.0)
    spool.close()
    router = ScriptedRouter()
    spool2 = Spool(root, "w0")
    sched = Scheduler(config(), spool2, router)
    await sched.start()
    await sched.wait_idle()
    await sched.stop()
    spool2.close()
    assert sorted(router.delivered()) == ["alice@example.edu"] * 2
    assert spool2.ids(QueueState.ACTIVE) == spool2.ids(QueueState.DEFERRED) == []


@pytest.mark.asyncio
async def test_permanent_failure_sends_one_dsn(make: Any, events: MemorySink) -> None:
    router = ScriptedRouter(
        script=lambda rcpt, n: D.BOUNCED if rcpt.startswith("x") else D.DELIVERED
    )
    h = await make(router)
    snap = make_snapshot(("x1@example.edu", "ok@example.edu", "x2@example.edu"))
    await h.spool.enqueue(snap, make_message(subject="the original"))
    await h.settle()
    assert h.state(snap.queue_id) is None
    dsns = h.dsns()
    assert len(dsns) == 1
    dsn = dsns[0]
    dsn_item = next(c for c in router.calls if c.snapshot.is_bounce)
    assert dsn_item.mail_from == "" and dsn_item.recipients == (snap.mail_from,)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["From"] == "Mail Delivery System <MAILER-DAEMON@gw.example.edu>"
    assert dsn["Auto-Submitted"] == "auto-replied"
    parts = dsn.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    per_message, *per_rcpt = parts[1].get_payload()
    assert per_message["Reporting-MTA"] == "dns; gw.example.edu"
    assert per_message["Arrival-Date"]
    assert [b["Final-Recipient"] for b in per_rcpt] == [
        "rfc822; x1@example.edu",
        "rfc822; x2@example.edu",
    ]
    assert {b["Action"] for b in per_rcpt} == {"failed"}
    assert {b["Status"] for b in per_rcpt} == {"5.1.1"}
    assert per_rcpt[0]["Remote-MTA"] == "dns; mx.test"
    assert per_rcpt[0]["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert "Subject: the original" in parts[2].get_payload()
    bounced = names(events, "queue.bounced")
    assert bounced[0]["recipients"] == ["x1@example.edu", "x2@example.edu"]


@pytest.mark.asyncio
async def test_no_dsn_to_null_sender_and_no_dsn_about_a_dsn(make: Any) -> None:
    router = ScriptedRouter(script=lambda rcpt, n: D.BOUNCED)
    h = await make(router)
    null = make_snapshot(mail_from="")
    bounce = make_snapshot(mail_from="someone@example.org", is_bounce=True)
    await h.spool.enqueue(null, make_message())
    await h.spool.enqueue(bounce, make_message())
    await h.settle()
    assert h.dsns() == []
    assert len(router.calls) == 2
    assert h.state(null.queue_id) is None and h.state(bounce.queue_id) is None


@pytest.mark.asyncio
async def test_a_bouncing_dsn_is_not_bounced_again(make: Any) -> None:
    router = ScriptedRouter(script=lambda rcpt, n: D.BOUNCED)
    h = await make(router)
    await h.spool.enqueue(make_snapshot(), make_message())
    await h.settle()
    # The original bounced -> one DSN, which bounces too -> no DSN about it.
    assert len(router.calls) == 2 and len(h.dsns()) == 1


@pytest.mark.asyncio
async def test_expiry_returns_message_with_last_error(make: Any, events: MemorySink) -> None:
    router = ScriptedRouter(
        script=lambda rcpt, n: D.DEFERRED if rcpt.startswith("slow") else D.DELIVERED
    )
    h = await make(router, max_lifetime=1000, min_backoff=300, max_backoff=300)
    snap = make_snapshot(("slow@example.edu", "fast@example.edu"), received_at=h.clock.now)
    await h.spool.enqueue(snap, make_message())
    await h.settle()
    await h.retry_after(300)
    await h.retry_after(300)
    assert h.state(snap.queue_id) is QueueState.DEFERRED and h.dsns() == []
    await h.retry_after(400)  # age 1000: the attempt fails, the message expires
    assert h.state(snap.queue_id) is None
    dsns = h.dsns()
    assert len(dsns) == 1
    blocks = dsns[0].get_payload()[1].get_payload()[1:]
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; slow@example.edu"]
    assert blocks[0]["Action"] == "failed"
    assert blocks[0]["Status"] == "5.4.1"
    assert (
        "451 5.4.1 try again later" in blocks[0]["Diagnostic-Code"]
        or "try again later" in (blocks[0]["Diagnostic-Code"])
    )
    assert names(events, "queue.expired")[0]["recipients"] == ["slow@example.edu"]
    assert router.delivered().count("fast@example.edu") == 1


@pytest.mark.asyncio
async def test_delay_warning_is_sent_once(make: Any, events: MemorySink) -> None:
    router = ScriptedRouter(
        script=lambda rcpt, n: D.DELIVERED if rcpt == "sender@example.org" else D.DEFERRED
    )
    h = await make(router, delay_warning=500, min_backoff=300, max_backoff=300)
    snap = make_snapshot(received_at=h.clock.now)
    await h.spool.enqueue(snap, make_message())
    await h.settle()
    assert h.dsns() == []
    for _ in range(4):
        await h.retry_after(300)
    dsns = h.dsns()
    assert len(dsns) == 1
    assert dsns[0]["Subject"] == "Delayed Mail (still being retried)"
    block = dsns[0].get_payload()[1].get_payload()[1]
    assert block["Action"] == "delayed" and block["Status"] == "4.4.1"
    assert block["Will-Retry-Until"]
    assert len(names(events, "queue.delay_warning")) == 1
    await h.restart()
    await h.retry_after(300)
    assert len(h.dsns()) == 1  # still once, across a restart
    assert h.state(snap.queue_id) is QueueState.DEFERRED


async def _fill_gated(h: Harness, domains: list[str], per_domain: int) -> None:
    assert h.router.gate is not None
    for i in range(per_domain):
        for dom in domains:
            await h.spool.enqueue(make_snapshot((f"u{i}@{dom}",)), make_message())
    for _ in range(50):
        await asyncio.sleep(0.005)  # let every attempt reach the limits
    h.router.gate.set()
    await h.settle()
    assert len(h.router.delivered()) == per_domain * len(domains)


@pytest.mark.asyncio
async def test_destination_concurrency_limit(make: Any) -> None:
    router = ScriptedRouter(gate=asyncio.Event())
    h = await make(router, destination_concurrency=3, delivery_concurrency=100)
    await _fill_gated(h, ["one.test", "two.test", "three.test"], 8)
    assert router.peak == {"dest:one.test": 3, "dest:two.test": 3, "dest:three.test": 3}


@pytest.mark.asyncio
async def test_total_concurrency_limit(make: Any) -> None:
    router = ScriptedRouter(gate=asyncio.Event())
    h = await make(router, destination_concurrency=10, delivery_concurrency=5)
    await _fill_gated(h, ["one.test", "two.test"], 8)
    assert router.peak_total == 5


@pytest.mark.asyncio
async def test_hold_stops_delivery_and_release_resumes(make: Any) -> None:
    router = ScriptedRouter(script=lambda rcpt, n: D.DEFERRED if n == 1 else D.DELIVERED)
    h = await make(router)
    snap = make_snapshot()
    await h.spool.enqueue(snap, make_message())
    await h.settle()
    h.spool.move(snap.queue_id, QueueState.DEFERRED, QueueState.HOLD)
    await h.retry_after(10_000)
    assert h.state(snap.queue_id) is QueueState.HOLD and len(router.calls) == 1
    h.spool.move(snap.queue_id, QueueState.HOLD, QueueState.DEFERRED, mtime=h.clock.now)
    await h.retry_after(0)
    assert h.state(snap.queue_id) is None and router.delivered() == [snap.recipients[0]]


@pytest.mark.asyncio
async def test_message_held_while_in_flight_keeps_its_results(make: Any) -> None:
    gate = asyncio.Event()
    router = ScriptedRouter(gate=gate)
    h = await make(router)
    snap = make_snapshot()
    await h.spool.enqueue(snap, make_message())
    while not router.calls:
        await asyncio.sleep(0.001)
    h.spool.move(snap.queue_id, QueueState.ACTIVE, QueueState.HOLD)
    gate.set()
    await h.settle()
    assert h.state(snap.queue_id) is QueueState.HOLD
    assert set(h.spool.read_journal(snap.queue_id).final) == {snap.recipients[0]}
    # Released later: nothing left to deliver, it is just removed.
    h.spool.move(snap.queue_id, QueueState.HOLD, QueueState.DEFERRED, mtime=h.clock.now)
    await h.retry_after(0)
    assert h.state(snap.queue_id) is None and len(router.calls) == 1


@pytest.mark.asyncio
async def test_corrupt_file_is_moved_aside(make: Any, events: MemorySink) -> None:
    h = await make()
    bad = h.spool.dir(QueueState.DEFERRED) / "CORRUPT0001"
    bad.write_bytes(b"MWQ1 garbage\n")
    await h.retry_after(1)
    assert h.state("CORRUPT0001") is QueueState.CORRUPT
    assert names(events, "queue.corrupt")[0]["queue_id"] == "CORRUPT0001"
    await h.spool.enqueue(make_snapshot(), make_message())  # still delivering
    await h.settle()
    assert len(h.router.delivered()) == 1


@pytest.mark.asyncio
async def test_transport_exception_defers(make: Any) -> None:
    class Broken(ScriptedRouter):
        async def deliver(self, item: Any) -> Any:
            raise RuntimeError("boom")

    h = await make(Broken())
    snap = make_snapshot()
    await h.spool.enqueue(snap, make_message())
    await h.settle()
    assert h.state(snap.queue_id) is QueueState.DEFERRED
    last = h.spool.read_journal(snap.queue_id).last_deferred[snap.recipients[0]]
    assert last.code == 451 and "boom" in last.text


@pytest.mark.asyncio
async def test_flush_trigger_retries_deferred_now(tmp_path: Path) -> None:
    router = ScriptedRouter(script=lambda rcpt, n: D.DEFERRED if n == 1 else D.DELIVERED)
    cfg = config(scan_interval=0.05)
    spool = Spool(tmp_path, "w0")
    sched = Scheduler(cfg, spool, router)
    await sched.start()
    snap = make_snapshot()
    await spool.enqueue(snap, make_message())
    await sched.wait_idle()
    assert spool.locate(snap.queue_id) is QueueState.DEFERRED
    spool.flush_trigger.touch()
    for _ in range(200):
        if spool.locate(snap.queue_id) is None:
            break
        await asyncio.sleep(0.01)
    await sched.stop()
    assert spool.locate(snap.queue_id) is None and not spool.flush_trigger.exists()


@pytest.mark.asyncio
async def test_stop_abandons_in_flight_delivery_for_retry(tmp_path: Path) -> None:
    router = ScriptedRouter(gate=asyncio.Event())
    cfg = default_config(limits={"shutdown_grace": 0.01})
    spool = Spool(tmp_path, "w0")
    sched = Scheduler(cfg, spool, router)
    await sched.start()
    snap = make_snapshot()
    await spool.enqueue(snap, make_message())
    while not router.calls:
        await asyncio.sleep(0.001)
    await sched.stop()
    assert spool.locate(snap.queue_id) is QueueState.ACTIVE  # retried after restart

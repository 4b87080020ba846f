"""Micro benchmark of the queue stage: enqueues/s and CPU per message, real fsync.

Usage: ``.venv/bin/python bench/spool_bench.py [--messages N] [--concurrency C]
[--size BYTES] [--dir DIR] [--no-fsync] [--threads T] [--deliver] [--no-segment-log]``.
Without ``--deliver`` only enqueues are measured; with it a ``Scheduler`` also delivers
every message through a null transport (accepts at once), so the number covers the
spool's whole life cycle of a message: write, hand-over, completion. The segment log (the
gateway's default fast path) is on unless ``--no-segment-log`` (one file per message).
Prints messages per second and the process CPU (user + system, all threads) per message.
Not a test.
Security: writes only under a temporary directory (or ``--dir``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from mailwarden.config import default_config
from mailwarden.core.types import (
    DeliveryStatus,
    Direction,
    EnvelopeSnapshot,
    RecipientResult,
    new_queue_id,
)
from mailwarden.delivery.base import DeliveryItem
from mailwarden.queue.scheduler import Scheduler
from mailwarden.queue.spool import SPOOL_IO_THREADS, Spool


def _snapshot(size: int) -> EnvelopeSnapshot:
    return EnvelopeSnapshot(
        queue_id=new_queue_id(),
        mail_from="sender@example.test",
        recipients=("rcpt@example.edu",),
        received_at=time.time(),
        client_ip="127.0.0.1",
        client_helo="client.example.test",
        direction=Direction.INBOUND,
        message_id="<bench@example.test>",
        size=size,
    )


class NullRouter:
    """Accepts every recipient at once (a transport that costs nothing)."""

    def __init__(self) -> None:
        self.delivered = 0
        self.done = asyncio.Event()
        self.target = 0

    def destination(self, recipient: str) -> str:
        return "null:" + recipient.rpartition("@")[2]

    async def deliver(self, item: DeliveryItem) -> list[RecipientResult]:
        self.delivered += len(item.recipients)
        if self.delivered >= self.target:
            self.done.set()
        return [
            RecipientResult(r, DeliveryStatus.DELIVERED, 250, "2.0.0", "ok")
            for r in item.recipients
        ]


async def _run(
    root: Path,
    messages: int,
    concurrency: int,
    size: int,
    fsync: bool,
    threads: int,
    deliver: bool,
    segment_log: bool,
) -> tuple[float, float]:
    spool = Spool(root, "w0", fsync=fsync, io_threads=threads, segment_log=segment_log)
    router = NullRouter()
    router.target = messages
    scheduler = Scheduler(default_config(), spool, router) if deliver else None
    if scheduler is not None:
        await scheduler.start()
    body = os.urandom(size // 2).hex().encode()[:size]
    todo = iter(range(messages))

    async def worker() -> None:
        for _ in todo:
            await spool.enqueue(_snapshot(size), body)

    cpu0, start = os.times(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if scheduler is not None:
        await router.done.wait()
        await scheduler.wait_idle()
    elapsed = time.perf_counter() - start
    cpu1 = os.times()
    if scheduler is not None:
        await scheduler.stop()
    spool.close()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return messages / elapsed, cpu / messages


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--size", type=int, default=10240)
    ap.add_argument("--dir", default=None, help="spool directory (default: a temp dir)")
    ap.add_argument("--no-fsync", action="store_true")
    ap.add_argument("--threads", type=int, default=SPOOL_IO_THREADS, help="spool I/O threads")
    ap.add_argument("--deliver", action="store_true", help="also deliver (null transport)")
    ap.add_argument("--no-segment-log", action="store_true", help="one file per message")
    args = ap.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="spool-bench-"))
    root = base / "spool"
    try:
        rate, cpu = asyncio.run(
            _run(
                root,
                args.messages,
                args.concurrency,
                args.size,
                not args.no_fsync,
                args.threads,
                args.deliver,
                not args.no_segment_log,
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    what = "enqueued+delivered" if args.deliver else "enqueues"
    print(
        f"spool: {rate:,.0f} {what}/s, CPU {cpu * 1000:.2f} ms/msg ({args.messages} x "
        f"{args.size} B, {args.concurrency} concurrent, {args.threads} threads, "
        f"fsync={'off' if args.no_fsync else 'on'}, "
        f"{'files' if args.no_segment_log else 'segment log'})"
    )


if __name__ == "__main__":
    main()

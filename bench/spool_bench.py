"""Micro benchmark of the spool: enqueues/s with many concurrent enqueuers (real fsync).

Usage: ``.venv/bin/python bench/spool_bench.py [--messages N] [--concurrency C]
[--size BYTES] [--dir DIR] [--no-fsync]``. Prints enqueues per second. Not a test.
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

from mailwarden.core.types import Direction, EnvelopeSnapshot, new_queue_id
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


async def _run(
    root: Path, messages: int, concurrency: int, size: int, fsync: bool, threads: int
) -> float:
    spool = Spool(root, "w0", fsync=fsync, io_threads=threads)
    body = os.urandom(size // 2).hex().encode()[:size]
    todo = iter(range(messages))

    async def worker() -> None:
        for _ in todo:
            await spool.enqueue(_snapshot(size), body)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    spool.close()
    return messages / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--size", type=int, default=10240)
    ap.add_argument("--dir", default=None, help="spool directory (default: a temp dir)")
    ap.add_argument("--no-fsync", action="store_true")
    ap.add_argument("--threads", type=int, default=SPOOL_IO_THREADS, help="spool I/O threads")
    args = ap.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="spool-bench-"))
    root = base / "spool"
    try:
        rate = asyncio.run(
            _run(root, args.messages, args.concurrency, args.size, not args.no_fsync, args.threads)
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    print(
        f"spool: {rate:,.0f} enqueues/s ({args.messages} x {args.size} B, "
        f"{args.concurrency} concurrent, {args.threads} threads, "
        f"fsync={'off' if args.no_fsync else 'on'})"
    )


if __name__ == "__main__":
    main()

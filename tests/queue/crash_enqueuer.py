"""Subprocess for the SIGKILL test: enqueue forever, ledger each id after enqueue returns.

Usage: python -m tests.queue.crash_enqueuer SPOOL_ROOT LEDGER [segment]
(``segment``: with the segment log, the fast path of the gateway).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from pathlib import Path

from mailwarden.queue.spool import Spool
from tests.queue.helpers import make_snapshot

CONCURRENCY = 20


def body_for(qid: str) -> bytes:
    """A deterministic body the test can verify (size varies with the id)."""
    seed = hashlib.sha256(qid.encode()).hexdigest().encode()
    return b"Subject: crash test\r\n\r\n" + seed * (20 + seed[0] % 300) + b"\r\n"


async def main(root: Path, ledger: Path, segment_log: bool) -> None:
    spool = Spool(root, "w0", segment_log=segment_log)
    fd = os.open(ledger, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    async def loop() -> None:
        while True:
            snap = make_snapshot(("a@example.edu", "b@example.edu"))
            await spool.enqueue(snap, body_for(snap.queue_id))
            os.write(fd, snap.queue_id.encode() + b"\n")  # after enqueue returned ("250")

    await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:] == ["segment"]))

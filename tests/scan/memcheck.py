"""Run one built-in scan in a fresh interpreter and print the peak memory growth (KiB).

``python -m tests.scan.memcheck FILE`` reads the message from FILE, records ``ru_maxrss``,
scans with ``scan_message`` (the built-in scanner's whole code path) and prints a JSON line
``{"growth_kib": N, "symbols": [...]}``. A fresh process makes ``ru_maxrss`` (a high-water
mark) mean "this scan" and nothing the test process did before.

``--pool`` scans through ``BuiltinScanner.scan`` instead, which sends a message this large
to its process pool: ``growth_kib`` is then this (the gateway's) process and
``worker_kib`` the peak RSS of the pool's worker processes (reaped after the pool shuts
down, so ``RUSAGE_CHILDREN`` holds their high-water mark).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from pathlib import Path

from mailwarden.core.types import Symbol
from mailwarden.scan import BuiltinScanner, ScanInput
from mailwarden.scan.builtin import scan_message


async def _pool_scan(raw: bytes) -> tuple[list[Symbol], int, int]:
    scanner = BuiltinScanner(pool_workers=1)
    await scanner.pool.run(scan_message, b"Subject: warm-up\r\n\r\nx\r\n")  # start the worker
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    symbols = await scanner.scan(ScanInput(raw=raw))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    await scanner.aclose()
    return symbols, after - before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def main() -> None:
    raw = Path(sys.argv[1]).read_bytes()
    out: dict[str, object] = {"size": len(raw)}
    if "--pool" in sys.argv[2:]:
        symbols, growth, worker = asyncio.run(_pool_scan(raw))
        out["worker_kib"] = worker
    else:
        scan_message(b"Subject: warm-up\r\n\r\nx\r\n")  # imports and caches, not the message
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        symbols = scan_message(raw)
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    out["growth_kib"] = growth
    out["symbols"] = [[s.name, s.detail] for s in symbols]
    print(json.dumps(out))


if __name__ == "__main__":
    main()

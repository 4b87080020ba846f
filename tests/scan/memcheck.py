"""Run one built-in scan in a fresh interpreter and print the peak memory growth (KiB).

``python -m tests.scan.memcheck FILE`` reads the message from FILE, records ``ru_maxrss``,
scans with ``scan_message`` (the built-in scanner's whole code path) and prints a JSON line
``{"growth_kib": N, "symbols": [...]}``. A fresh process makes ``ru_maxrss`` (a high-water
mark) mean "this scan" and nothing the test process did before.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from mailwarden.scan.builtin import scan_message


def main() -> None:
    raw = Path(sys.argv[1]).read_bytes()
    scan_message(b"Subject: warm-up\r\n\r\nx\r\n")  # imports and caches, not the message
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    symbols = scan_message(raw)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "growth_kib": after - before,
                "size": len(raw),
                "symbols": [[s.name, s.detail] for s in symbols],
            }
        )
    )


if __name__ == "__main__":
    main()

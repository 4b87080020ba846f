"""A writer process for tests/store/test_concurrency.py (``python -m tests.store.writer``).

Arguments: URL STATE_DIR TAG N READY_FILE GO_FILE. Imports everything, touches READY_FILE,
waits for GO_FILE, then opens the store (so several writers create the schema at the same
instant), and makes N rounds of: one block (addresses shared with the other writers, a
growing ``until``) and one user (a login of its own). Prints ``done`` at the end; any error
is a traceback and a non-zero exit.

Security: test data only; talks to the database given on the command line.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mailwarden import store
from mailwarden.config import default_config
from mailwarden.store.blocks import add_block
from mailwarden.store.users import add_user

ADDRESSES = 20  # distinct client addresses the writers share
UNTIL_BASE = 4_000_000_000.0  # far in the future
WAIT = 60.0  # seconds to wait for the go signal


def until_for(tag_index: int, i: int) -> float:
    return UNTIL_BASE + i * 10 + tag_index


def main(argv: list[str]) -> int:
    url, state_dir, tag, n, ready, go = argv
    tag_index = int(tag.removeprefix("w"))
    Path(ready).touch()
    end = time.monotonic() + WAIT
    while not Path(go).exists():
        if time.monotonic() > end:
            print("no go signal", file=sys.stderr)
            return 2
        time.sleep(0.005)
    cfg = default_config(gateway={"state_dir": state_dir}, database={"url": url})
    db = store.open(cfg)
    try:
        for i in range(int(n)):
            add_block(db, f"192.0.2.{i % ADDRESSES}", f"{tag} {i}", until_for(tag_index, i))
            add_user(db, f"{tag}-{i}", "$argon2id$test", [f"{tag}-{i}@example.edu"])
    finally:
        db.close()
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

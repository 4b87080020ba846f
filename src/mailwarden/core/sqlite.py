"""Opening SQLite databases that several worker processes share.

``enable_wal(conn, busy_ms)`` sets the busy timeout first, then switches the database to
WAL. The switch needs an exclusive lock and SQLite may answer it with SQLITE_BUSY without
calling the busy handler, so two workers opening a fresh database at the same instant
used to crash one of them ("database is locked"); here the switch is retried until the
busy timeout is spent. WAL is a property of the file: once one process has set it, every
other opener only reads the mode.

Public names: ``enable_wal``.
Security: none (local files the gateway owns).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

RETRY_PAUSE = 0.02  # seconds between attempts to switch the journal mode


def _busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def enable_wal(conn: Any, busy_ms: int) -> None:
    """Set ``busy_timeout`` and WAL mode on a DB-API sqlite3 connection, tolerating races."""
    cur = conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        deadline = time.monotonic() + busy_ms / 1000
        while True:
            try:
                mode = cur.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() == "wal":
                    return
                cur.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(RETRY_PAUSE)
    finally:
        cur.close()

"""Several worker processes opening one fresh SQLite database at the same instant.

Before ``enable_wal`` retried the WAL switch, about half of such rounds crashed one opener
with "database is locked" (seen as a worker dying at gateway start).
"""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path
from typing import Any

from mailwarden.core.sqlite import enable_wal

OPENERS = 6
ROUNDS = 10


def _open_raw(path: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        enable_wal(conn, 5000)
        conn.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
        conn.close()
        results.put("ok")
    except Exception as exc:
        results.put(repr(exc))


def _open_quarantine(path: str, barrier: Any, results: Any) -> None:
    from mailwarden.quarantine.index import QuarantineIndex

    barrier.wait()
    try:
        QuarantineIndex(path)
        results.put("ok")
    except Exception as exc:
        results.put(repr(exc))


def _race(target: Any, tmp_path: Path) -> list[str]:
    ctx = mp.get_context("fork")
    outcomes: list[str] = []
    for i in range(ROUNDS):
        path = str(tmp_path / f"round{i}.db")
        barrier, results = ctx.Barrier(OPENERS), ctx.Queue()
        procs = [ctx.Process(target=target, args=(path, barrier, results)) for _ in range(OPENERS)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes.extend(results.get(timeout=10) for _ in procs)
    return outcomes


def test_concurrent_openers_all_get_wal(tmp_path: Path) -> None:
    outcomes = _race(_open_raw, tmp_path)
    assert outcomes == ["ok"] * OPENERS * ROUNDS
    mode = sqlite3.connect(tmp_path / "round0.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_quarantine_index_opened_by_every_worker_at_once(tmp_path: Path) -> None:
    assert _race(_open_quarantine, tmp_path) == ["ok"] * OPENERS * ROUNDS

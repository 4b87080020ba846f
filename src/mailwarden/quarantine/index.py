"""The quarantine index: one row per held message, in SQLite (WAL mode).

``QuarantineIndex(path)`` keeps one connection (serialised by a lock, usable from worker
threads); every operation is one method: ``add``, ``get``, ``list``, ``mark_released``,
``remove``, ``expired``, ``ids``. Rows are ``Entry`` values. The index is rebuilt from the
message files when a row is missing (``quarantine.store``), so it is a fast view, not the
only copy of the facts. The data-store issue moves this class onto SQLAlchemy/PostgreSQL;
callers only see the methods.

Public names: ``Entry``, ``QuarantineIndex``, ``HELD``, ``RELEASED``, ``VIRUS``, ``SPAM``.
Security: stores untrusted envelope values (addresses, symbol details) as bound SQL
parameters only, never formatted into SQL; the database file is created mode 0600.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mailwarden.core.sqlite import enable_wal

HELD = "held"  # stored, never delivered
RELEASED = "released"  # handed to the spool by an operator
VIRUS = "virus"  # held for malware: release-protected
SPAM = "spam"  # held for score or a forced rule
BUSY_TIMEOUT_MS = 10_000  # wait for another process's write transaction this long
FILE_MODE = 0o600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS quarantine (
    queue_id     TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    direction    TEXT NOT NULL,
    sender       TEXT NOT NULL,
    recipients   TEXT NOT NULL,
    action       TEXT NOT NULL,
    score        REAL NOT NULL,
    symbols      TEXT NOT NULL,
    reason       TEXT NOT NULL,
    control      TEXT,
    size         INTEGER NOT NULL,
    message_id   TEXT NOT NULL,
    client_ip    TEXT NOT NULL,
    received_at  REAL NOT NULL,
    expires_at   REAL NOT NULL,
    status       TEXT NOT NULL,
    released_by  TEXT,
    released_at  REAL
);
CREATE INDEX IF NOT EXISTS quarantine_expires ON quarantine (expires_at);
CREATE INDEX IF NOT EXISTS quarantine_received ON quarantine (received_at);
"""
_COLUMNS = (
    "queue_id, kind, direction, sender, recipients, action, score, symbols, reason, control, "
    "size, message_id, client_ip, received_at, expires_at, status, released_by, released_at"
)
_INSERT = (  # constant text: only the values are parameters
    f"INSERT OR REPLACE INTO quarantine ({_COLUMNS}) "  # noqa: S608
    f"VALUES ({', '.join('?' for _ in _COLUMNS.split(', '))})"
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One quarantined message as the index knows it (no message bytes)."""

    queue_id: str
    kind: str  # VIRUS or SPAM
    direction: str  # "inbound" / "outbound"
    sender: str
    recipients: tuple[str, ...]
    action: str  # the verdict action that held it ("quarantine")
    score: float
    symbols: tuple[tuple[str, float, str], ...]  # (name, score, detail)
    reason: str
    control: str | None
    size: int
    message_id: str
    client_ip: str
    received_at: float
    expires_at: float
    status: str = HELD
    released_by: str | None = None
    released_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra", None)
        data["recipients"] = list(self.recipients)
        data["symbols"] = [{"name": n, "score": s, "detail": d} for n, s, d in self.symbols]
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> Entry:
        return Entry(
            queue_id=str(data["queue_id"]),
            kind=str(data["kind"]),
            direction=str(data["direction"]),
            sender=str(data["sender"]),
            recipients=tuple(str(r) for r in data["recipients"]),
            action=str(data["action"]),
            score=float(data["score"]),
            symbols=tuple(
                (str(s["name"]), float(s["score"]), str(s["detail"])) for s in data["symbols"]
            ),
            reason=str(data["reason"]),
            control=None if data.get("control") is None else str(data["control"]),
            size=int(data["size"]),
            message_id=str(data["message_id"]),
            client_ip=str(data["client_ip"]),
            received_at=float(data["received_at"]),
            expires_at=float(data["expires_at"]),
            status=str(data.get("status", HELD)),
            released_by=data.get("released_by"),
            released_at=data.get("released_at"),
        )

    def _row(self) -> tuple[Any, ...]:
        return (
            self.queue_id,
            self.kind,
            self.direction,
            self.sender,
            json.dumps(list(self.recipients)),
            self.action,
            self.score,
            json.dumps([list(s) for s in self.symbols]),
            self.reason,
            self.control,
            self.size,
            self.message_id,
            self.client_ip,
            self.received_at,
            self.expires_at,
            self.status,
            self.released_by,
            self.released_at,
        )


def _entry(row: sqlite3.Row) -> Entry:
    return Entry(
        queue_id=row["queue_id"],
        kind=row["kind"],
        direction=row["direction"],
        sender=row["sender"],
        recipients=tuple(json.loads(row["recipients"])),
        action=row["action"],
        score=float(row["score"]),
        symbols=tuple((str(n), float(s), str(d)) for n, s, d in json.loads(row["symbols"])),
        reason=row["reason"],
        control=row["control"],
        size=int(row["size"]),
        message_id=row["message_id"],
        client_ip=row["client_ip"],
        received_at=float(row["received_at"]),
        expires_at=float(row["expires_at"]),
        status=row["status"],
        released_by=row["released_by"],
        released_at=row["released_at"],
    )


class QuarantineIndex:
    """The SQLite index of the quarantine (WAL, synchronous=FULL, one row per message)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            check_same_thread=False,
            isolation_level=None,
        )
        self._db.row_factory = sqlite3.Row
        enable_wal(self._db, BUSY_TIMEOUT_MS)
        self._db.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._db.executescript(_SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # One method per operation ------------------------------------------------------------
    def add(self, entry: Entry) -> None:
        """Insert (or replace, when re-indexing) the row of ``entry``."""
        with self._tx() as db:
            db.execute(_INSERT, entry._row())

    def get(self, queue_id: str) -> Entry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM quarantine WHERE queue_id = ?", (queue_id,)
            ).fetchone()
        return None if row is None else _entry(row)

    def entries(self, *, status: str | None = None, limit: int | None = None) -> list[Entry]:
        """Entries, newest first; optionally only one status, at most ``limit``."""
        sql = "SELECT * FROM quarantine"
        args: list[Any] = []
        if status is not None:
            sql += " WHERE status = ?"
            args.append(status)
        sql += " ORDER BY received_at DESC, queue_id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_entry(r) for r in rows]

    def mark_released(self, queue_id: str, by: str, at: float) -> bool:
        """Set a held entry to released; False if it is not held (or unknown)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE quarantine SET status = ?, released_by = ?, released_at = ? "
                "WHERE queue_id = ? AND status = ?",
                (RELEASED, by, at, queue_id, HELD),
            )
            return cur.rowcount == 1

    def remove(self, queue_id: str) -> bool:
        with self._tx() as db:
            return (
                db.execute("DELETE FROM quarantine WHERE queue_id = ?", (queue_id,)).rowcount == 1
            )

    def expired(self, now: float) -> list[str]:
        """Queue ids whose expiry time has passed."""
        with self._lock:
            rows = self._db.execute(
                "SELECT queue_id FROM quarantine WHERE expires_at <= ? ORDER BY expires_at",
                (now,),
            ).fetchall()
        return [r["queue_id"] for r in rows]

    def ids(self) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT queue_id FROM quarantine").fetchall()
        return {r["queue_id"] for r in rows}

    def counts(self) -> dict[str, int]:
        """Number of held entries per kind (for ``mailwarden status``)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, COUNT(*) AS n FROM quarantine WHERE status = ? GROUP BY kind",
                (HELD,),
            ).fetchall()
        return {r["kind"]: int(r["n"]) for r in rows}

"""A cache of idle SMTP/LMTP connections, keyed by endpoint (Postfix's connection cache).

``ConnectionPool.take(key)`` hands out an idle connection (or ``None``), ``put(key, conn)``
parks one after a clean transaction, unless it has been used ``max_reuse`` times; a parked
connection is closed after ``idle_reuse`` seconds; ``close()`` says QUIT to all.

Public names: ``ConnectionPool``, ``PoolKey``.
Security: a key includes the TLS policy and the name the certificate was checked against,
so a connection set up under a weaker policy is never reused for a stricter destination.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from mailwarden.delivery.smtp_conn import SMTPConnection

# (kind, ip-or-path, port, tls policy, verified name, helo name)
PoolKey = tuple[str, str, int, str, str, str]
MAX_IDLE_PER_KEY = 32  # idle connections kept per endpoint; more are closed at once
QUIT_TIMEOUT = 2.0  # seconds to wait for a polite QUIT when closing a cached connection


class ConnectionPool:
    """Idle connections per endpoint, closed after ``idle`` seconds."""

    def __init__(self, *, enabled: bool, max_reuse: int, idle: float) -> None:
        self.enabled = enabled
        self.max_reuse = max_reuse
        self.idle = idle
        self._idle: dict[PoolKey, list[SMTPConnection]] = defaultdict(list)
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def take(self, key: PoolKey) -> SMTPConnection | None:
        """An idle, still usable connection for ``key`` (most recently used first)."""
        conns = self._idle.get(key)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            self._cancel_timer(conn)
            if conn.broken or conn.closing or now - conn.last_used > self.idle:
                self._close_later(conn)
                continue
            conn.reused = True
            return conn
        return None

    def put(self, key: PoolKey, conn: SMTPConnection) -> None:
        """Park ``conn`` for reuse, or close it when reuse is off or exhausted."""
        if (
            not self.enabled
            or conn.broken
            or conn.closing
            or conn.uses >= self.max_reuse
            or len(self._idle[key]) >= MAX_IDLE_PER_KEY
        ):
            self._close_later(conn)
            return
        conn.last_used = time.monotonic()
        self._idle[key].append(conn)
        loop = asyncio.get_running_loop()
        self._timers[id(conn)] = loop.call_later(self.idle, self._expire, key, conn)

    def discard(self, conn: SMTPConnection) -> None:
        """Close a connection that must not be reused."""
        self._close_later(conn)

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def _expire(self, key: PoolKey, conn: SMTPConnection) -> None:
        self._timers.pop(id(conn), None)
        conns = self._idle.get(key)
        if conns and conn in conns:
            conns.remove(conn)
            self._close_later(conn)

    def _cancel_timer(self, conn: SMTPConnection) -> None:
        timer = self._timers.pop(id(conn), None)
        if timer is not None:
            timer.cancel()

    def _close_later(self, conn: SMTPConnection) -> None:
        task = asyncio.get_running_loop().create_task(conn.quit(QUIT_TIMEOUT))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """QUIT every idle connection and wait for the closes in flight."""
        for conns in self._idle.values():
            for conn in conns:
                self._cancel_timer(conn)
                self._close_later(conn)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

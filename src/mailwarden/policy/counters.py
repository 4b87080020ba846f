"""Windowed counters for the harvest defence and rate limits, behind one interface.

``CounterStore``: ``await incr(key, window, amount=1) -> int`` adds to a counter that lives
``window`` seconds from its first increment (a fixed window, like Redis ``INCR`` +
``EXPIRE NX``) and returns the new value; ``await get(key)``; ``await delete(key)``.
Backends: ``MemoryCounters`` (one process; the embedded default: no I/O, so a check never
waits) and ``RedisCounters`` (redis.asyncio; several gateway nodes and worker processes
share the counts). ``make_counters(cfg)`` picks one from ``[policy] counters``.

Public names: ``CounterStore``, ``MemoryCounters``, ``RedisCounters``, ``make_counters``,
``KEY_PREFIX``, ``in_task``.
Security: keys embed client addresses and logins (bounded, no spaces); Redis errors
propagate so the policy engine turns them into a TEMPFAIL (fail closed), never an accept.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from mailwarden.config import Config

T = TypeVar("T")
KEY_PREFIX = "mw:"  # every Redis key we write starts with this
MAX_MEMORY_KEYS = 200_000  # counters kept in process before expired ones are swept
SWEEP_EVERY = 4096  # increments between opportunistic sweeps of expired counters


async def in_task(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` inside a task. The SMTP edge runs policy checks eagerly, outside any
    task (``smtp.aio``); libraries that need one (``asyncio.timeout``, redis-py) get it here.
    The check is resumed by the edge when the task is done."""
    if asyncio.current_task() is not None:
        return await coro
    return await asyncio.get_running_loop().create_task(coro)


class CounterStore(Protocol):
    async def incr(self, key: str, window: float, amount: int = 1) -> int: ...

    async def get(self, key: str) -> int: ...

    async def delete(self, key: str) -> None: ...

    async def close(self) -> None: ...


class MemoryCounters:
    """In-process counters (per worker process)."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[int, float]] = {}
        self._ops = 0

    async def incr(self, key: str, window: float, amount: int = 1) -> int:
        now = time.monotonic()
        value, expires = self._data.get(key, (0, 0.0))
        if expires <= now:
            value, expires = 0, now + window
        value += amount
        self._data[key] = (value, expires)
        self._ops += 1
        if self._ops >= SWEEP_EVERY or len(self._data) > MAX_MEMORY_KEYS:
            self._sweep(now)
        return value

    async def get(self, key: str) -> int:
        value, expires = self._data.get(key, (0, 0.0))
        return value if expires > time.monotonic() else 0

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def close(self) -> None:
        self._data.clear()

    def _sweep(self, now: float) -> None:
        self._ops = 0
        for k in [k for k, (_, exp) in self._data.items() if exp <= now]:
            del self._data[k]
        if len(self._data) > MAX_MEMORY_KEYS:  # under attack by many addresses: forget all
            self._data.clear()


class RedisCounters:
    """Counters in Redis, shared by every gateway process that uses the same server."""

    def __init__(self, client: Redis) -> None:
        self.client = client

    @staticmethod
    def from_url(url: str, timeout: float) -> RedisCounters:
        from redis.asyncio import Redis

        return RedisCounters(
            Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True
            )
        )

    async def incr(self, key: str, window: float, amount: int = 1) -> int:
        return await in_task(self._incr(key, window, amount))

    async def _incr(self, key: str, window: float, amount: int) -> int:
        k = KEY_PREFIX + key
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.incrby(k, amount)
            pipe.expire(k, max(1, math.ceil(window)), nx=True)
            value, _ = await pipe.execute()
        return int(value)

    async def get(self, key: str) -> int:
        return await in_task(self._get(key))

    async def _get(self, key: str) -> int:
        value = await self.client.get(KEY_PREFIX + key)
        return int(value) if value is not None else 0

    async def delete(self, key: str) -> None:
        await in_task(self._delete(key))

    async def _delete(self, key: str) -> None:
        await self.client.delete(KEY_PREFIX + key)

    async def close(self) -> None:
        await self.client.aclose()


def make_counters(cfg: Config) -> CounterStore:
    p = cfg.policy
    if p.counters == "redis":
        return RedisCounters.from_url(p.redis_url, p.redis_timeout)
    return MemoryCounters()

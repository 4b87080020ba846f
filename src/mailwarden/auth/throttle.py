"""Failed-authentication throttling: sliding-window counters per client address and login.

``WindowCounter`` is the counter interface (``add`` an event and get the count in the
window, or just ``count``); ``MemoryWindowCounter`` is the in-process backend (an exact
sliding window, per worker process). ``SharedCounters`` adapts the policy stage's
``CounterStore`` (``incr``/``get``, a fixed window from the first failure; Redis when
``[policy] counters = "redis"``) so that every worker and gateway node shares the counts.

``AuthThrottle.check(client, login)`` says whether an AUTH attempt may be checked at all:
``ALLOW``, ``TEMPFAIL`` (past a soft limit: 454 4.7.0 without asking the backend) or
``DISCONNECT`` (client past the hard limit: 421). ``failed(client, login)`` records a
failure and says whether the client has now reached the hard limit.

Public names: ``WindowCounter``, ``MemoryWindowCounter``, ``ThrottleVerdict``,
``AuthThrottle``, ``SharedCounters``, ``MAX_KEYS``, ``MAX_EVENTS_PER_KEY``.
Security: keys come from untrusted input (a login, a client address); memory is bounded by
``MAX_KEYS`` keys of at most ``MAX_EVENTS_PER_KEY`` timestamps each.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

from mailwarden.auth.base import normalise_login
from mailwarden.auth.settings import AuthSettings

# Keys kept by the in-process counter; past this, expired keys are dropped, then the oldest.
MAX_KEYS = 100_000
# Timestamps kept per key (every configured limit is at most 1000).
MAX_EVENTS_PER_KEY = 1024


class WindowCounter(Protocol):
    """Counts events per key in a sliding time window."""

    async def add(self, key: str, window: float) -> int:
        """Record one event for ``key`` now; return the events in the last ``window`` s."""
        ...

    async def count(self, key: str, window: float) -> int:
        """The events recorded for ``key`` in the last ``window`` seconds."""
        ...


class MemoryWindowCounter:
    """In-process sliding-window counter (one per worker process)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._events: dict[str, deque[float]] = {}

    def _prune(self, key: str, window: float, now: float) -> deque[float] | None:
        q = self._events.get(key)
        if q is None:
            return None
        limit = now - window
        while q and q[0] <= limit:
            q.popleft()
        if not q:
            del self._events[key]
            return None
        return q

    async def add(self, key: str, window: float) -> int:
        now = self._clock()
        q = self._prune(key, window, now)
        if q is None:
            if len(self._events) >= MAX_KEYS:
                self._evict(window, now)
            q = self._events[key] = deque(maxlen=MAX_EVENTS_PER_KEY)
        q.append(now)
        return len(q)

    async def count(self, key: str, window: float) -> int:
        q = self._prune(key, window, self._clock())
        return 0 if q is None else len(q)

    def _evict(self, window: float, now: float) -> None:
        for key in list(self._events):
            self._prune(key, window, now)
        while len(self._events) >= MAX_KEYS:
            del self._events[next(iter(self._events))]  # the oldest key inserted

    def __len__(self) -> int:
        return len(self._events)


class _FixedWindowCounters(Protocol):
    """The part of ``policy.counters.CounterStore`` used here."""

    async def incr(self, key: str, window: float, amount: int = 1) -> int: ...

    async def get(self, key: str) -> int: ...


class SharedCounters:
    """A ``WindowCounter`` over the policy's ``CounterStore`` (fixed windows, shared)."""

    def __init__(self, store: _FixedWindowCounters) -> None:
        self.store = store

    async def add(self, key: str, window: float) -> int:
        return await self.store.incr(key, window)

    async def count(self, key: str, window: float) -> int:
        return await self.store.get(key)


class ThrottleVerdict(StrEnum):
    ALLOW = "allow"
    TEMPFAIL = "tempfail"
    DISCONNECT = "disconnect"


class AuthThrottle:
    """The per-address and per-login failure limits of ``[auth]``."""

    def __init__(self, settings: AuthSettings, counter: WindowCounter | None = None) -> None:
        self.settings = settings
        self.counter: WindowCounter = counter if counter is not None else MemoryWindowCounter()

    @staticmethod
    def _client_key(client: str) -> str:
        return f"auth-fail:client:{client}"

    @staticmethod
    def _account_key(login: str) -> str:
        return f"auth-fail:login:{normalise_login(login)}"

    async def check(self, client: str, login: str | None) -> ThrottleVerdict:
        """May an attempt from ``client`` (for ``login``, once known) be checked?"""
        s = self.settings
        window = s.failure_window
        failures = await self.counter.count(self._client_key(client), window)
        if failures >= s.client_hard_limit:
            return ThrottleVerdict.DISCONNECT
        if failures >= s.client_soft_limit:
            return ThrottleVerdict.TEMPFAIL
        account = self._account_key(login) if login is not None else None
        if account is not None and await self.counter.count(account, window) >= (
            s.account_soft_limit
        ):
            return ThrottleVerdict.TEMPFAIL
        return ThrottleVerdict.ALLOW

    async def refused(self, client: str) -> bool:
        """Count an attempt refused by a soft limit against the client; True at the hard
        limit (so a client that keeps trying is disconnected, not answered forever)."""
        s = self.settings
        return await self.counter.add(self._client_key(client), s.failure_window) >= (
            s.client_hard_limit
        )

    async def failed(self, client: str, login: str) -> bool:
        """Record a failed attempt; True if the client has now reached the hard limit."""
        s = self.settings
        await self.counter.add(self._account_key(login), s.failure_window)
        return await self.counter.add(self._client_key(client), s.failure_window) >= (
            s.client_hard_limit
        )

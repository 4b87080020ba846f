"""The policy's shared state: client classifier, caches of the database, counters.

``PolicyState(cfg)`` works without a database (config senders, in-memory blocks: what the
in-process test harness uses). ``await state.start()`` opens the data store
(``store.open``), loads registered senders, blocks and the sender-login map into memory,
and starts a task that re-reads them every ``registry_refresh`` seconds when the
database's change serials moved (``mailwarden senders add`` in another process shows up
within that time). New blocks are written to the database on its thread pool; the event
loop never waits on the database or (with the memory backend) on counters.

While the database is down (a PostgreSQL restart, say) or does not answer a call within
``[database] call_timeout`` (``StoreTimeout``: a stalled server) the caches stay as they
were: relay decisions keep being made from them and each failed refresh is a
``policy.refresh_error`` event. A block that could not be written then
(``policy.store_error``) stays in force in this worker and is written after the next
successful refresh, so the other workers and nodes get it too.

A database that cannot be reached when the worker starts (``StoreUnavailable``: PostgreSQL
refusing, timing out, full) does not stop it: ``start`` returns with ``unavailable`` set,
and a background task retries the open and the first load, after ``RETRY_FIRST`` seconds
and then twice as long each time up to ``RETRY_MAX``. Until that first load succeeds every
check that needs the database answers a tempfail (``policy.relay``; the ``database``
recipient directory is ``451`` until it is loaded), blocks are not known (nobody is
blocked) and new ones wait in memory to be written. From the first successful load on the
state is the one a normal start gives. An outage (at start, or a failed refresh later) is
one ``policy.store_unavailable`` event with the redacted error, its end one
``policy.store_recovered``.

``start(wait=SECONDS)`` does not wait longer than that for the first open (a server that
drops packets holds it for the whole connect timeout): past it the state starts
``unavailable`` exactly as above (event with ``pending`` true) while that first attempt
goes on in the background; its success is the recovery, its failure the first retry's
cue. Once started that way, an error that would have stopped the start (an unknown
database, say) is an outage that is retried too, each try a ``policy.config_error`` event
with the reason. The store is opened on a detached thread (``store.reach.run_detached``):
``close`` never waits for a connect in progress.

Public names: ``PolicyState``, ``backoff``, ``RETRY_FIRST``, ``RETRY_MAX``.
Security: loads operator data; a registered sender outside the campus networks (SU-3) is
ignored with a ``policy.config_error`` event instead of being trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from mailwarden.core.controls import Control
from mailwarden.core.events import emit
from mailwarden.errors import StoreError, StoreUnavailable
from mailwarden.policy.clients import Classifier, SenderRegistry, config_senders
from mailwarden.policy.counters import CounterStore, make_counters
from mailwarden.policy.harvest import BlockList, HarvestGuard
from mailwarden.policy.networks import campus_networks
from mailwarden.policy.ratelimit import RateLimiter
from mailwarden.policy.recipients import RecipientValidator
from mailwarden.store.blocks import active_blocks, add_block
from mailwarden.store.db import error_reason, open_store, store_label
from mailwarden.store.reach import run_detached
from mailwarden.store.schema import BLOCKS_SERIAL, SENDERS_SERIAL, USERS_SERIAL, meta
from mailwarden.store.senders import RegisteredSender, list_senders
from mailwarden.store.users import sender_login_map

if TYPE_CHECKING:
    from mailwarden.config import Config
    from mailwarden.store.db import Store

RETRY_FIRST = 1.0  # seconds before the first retry of a database that was unreachable
RETRY_MAX = 30.0  # the retry delay doubles up to this


def backoff(first: float = RETRY_FIRST, cap: float = RETRY_MAX) -> Iterator[float]:
    """The waits between retries: ``first``, doubling, then ``cap`` for ever."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


class PolicyState:
    def __init__(self, cfg: Config, counters: CounterStore | None = None) -> None:
        self.cfg = cfg
        self.campus = campus_networks(cfg)
        self.registry = SenderRegistry(config_senders(cfg))
        self.classifier = Classifier(self.campus, self.registry)
        self.counters = counters or make_counters(cfg)
        self.blocks = BlockList()
        self.harvest = HarvestGuard(cfg.policy, self.counters, self.blocks)
        self.rates = RateLimiter(cfg.policy, self.counters)
        self.recipients = RecipientValidator(cfg)
        self.sender_logins: dict[str, frozenset[str]] = {}
        self.store: Store | None = None
        self._serials: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._unsaved: dict[str, tuple[str, float]] = {}  # blocks to write when the db is back
        # The database has never been loaded (unreachable since start): checks that need it
        # tempfail instead of deciding from empty caches.
        self.unavailable = False
        self._outage = False  # a policy.store_unavailable event is out, no recovery yet
        self.retry_first = RETRY_FIRST  # backoff of the retries while unavailable
        self.retry_max = RETRY_MAX

    # -- life cycle -----------------------------------------------------------------------
    async def start(self, store: Store | None = None, *, wait: float | None = None) -> None:
        """Open the store (unless given) and load the caches; start the refresher.

        Raises ``StoreError`` for a database that cannot be used at all; one that cannot be
        reached right now leaves the state ``unavailable`` and retrying in the background.
        ``wait``: return after at most that many seconds, ``unavailable`` if the first
        open has not answered by then (it goes on in the background)."""
        self.store = store
        self.blocks.on_block = self._persist_block
        loop = asyncio.get_running_loop()
        self.unavailable = True
        first = loop.create_task(self._load())
        if wait is not None:
            await asyncio.wait({first}, timeout=wait)
            if not first.done():
                when = f"within {wait:g} s" if wait else "yet"
                self._down(
                    f"no answer from {store_label(self.cfg)} {when} (still connecting)",
                    pending=True,
                )
                self._task = loop.create_task(self._reconnect(first))
                return
        if await first:
            self.unavailable = False
            self._task = loop.create_task(self._refresher())
        else:
            self._task = loop.create_task(self._reconnect())

    async def _load(self) -> bool:
        """Open the store if needed and load every cache; False if the server is unreachable."""
        try:
            if self.store is None:
                cfg = self.cfg
                self.store = await run_detached(lambda: open_store(cfg), lambda s: s.close())
            await self.refresh(force=True)
        except StoreUnavailable as exc:  # its text is already redacted
            self._down(str(exc))
            return False
        except OperationalError as exc:  # opened, but the first load failed: retry it too
            self._down(error_reason(self.cfg.database, exc))
            return False
        return True

    def _down(self, error: str, *, pending: bool = False) -> None:
        if not self._outage:
            self._outage = True
            emit(
                "policy.store_unavailable",
                error=error,
                since_start=self.unavailable,
                pending=pending,
            )

    def _up(self) -> None:
        if self._outage:
            self._outage = False
            emit("policy.store_recovered", was_never_loaded=self.unavailable)

    async def _settle(self, attempt: Awaitable[bool]) -> bool:
        """The outcome of a load in the background: an unusable database is an outage too
        (the gateway is serving already; the operator may still create it), reported with
        its reason at each try (``policy.config_error``)."""
        try:
            return await attempt
        except StoreError as exc:  # not StoreUnavailable (``_load``); already redacted
            self._down(str(exc))
            emit("policy.config_error", error=str(exc))
            return False

    async def _reconnect(self, first: asyncio.Task[bool] | None = None) -> None:
        """Await the first load still in progress (if any), else retry it with a doubling
        delay until it succeeds; then refresh as usual."""
        if first is None or not await self._settle(first):
            for delay in backoff(self.retry_first, self.retry_max):
                await asyncio.sleep(delay)
                if await self._settle(self._load()):
                    break
        self._up()
        self.unavailable = False
        await self._refresher()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self.counters.close()
        self.recipients.close()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
            self.store = None

    async def _refresher(self) -> None:
        interval = self.cfg.policy.registry_refresh
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception as exc:  # keep the old caches; try again next time
                emit("policy.refresh_error", error=type(exc).__name__)
                if isinstance(exc, OperationalError):
                    self._down(error_reason(self.cfg.database, exc))
                elif isinstance(exc, StoreUnavailable):  # StoreTimeout: already redacted
                    self._down(str(exc))
            else:
                self._up()

    # -- caches -----------------------------------------------------------------------------
    async def refresh(self, *, force: bool = False) -> None:
        store = self.store
        if store is None:
            return
        serials = await store.call(self._read_serials, store)
        changed = {k for k, v in serials.items() if force or self._serials.get(k) != v}
        if SENDERS_SERIAL in changed:
            self._load_senders(await store.call(list_senders, store))
        if BLOCKS_SERIAL in changed:
            self.blocks.replace(await store.call(active_blocks, store))
        if USERS_SERIAL in changed:
            logins = await store.call(sender_login_map, store)
            self.sender_logins = logins
            self.recipients.database.replace(a for addrs in logins.values() for a in addrs)
        self._serials = serials
        unsaved, self._unsaved = self._unsaved, {}
        for ip, (reason, until) in unsaved.items():  # the database answers again
            self._persist_block(ip, reason, until)

    @staticmethod
    def _read_serials(store: Store) -> dict[str, int]:
        keys = (SENDERS_SERIAL, BLOCKS_SERIAL, USERS_SERIAL)
        with store.engine.connect() as conn:
            rows = conn.execute(select(meta.c.key, meta.c.value).where(meta.c.key.in_(keys)))
            return {k: int(v) for k, v in rows}

    def _load_senders(self, senders: list[RegisteredSender]) -> None:
        good = []
        for s in senders:
            if self.campus.covers(s.network):
                good.append(s)
            else:
                emit(
                    "policy.config_error",
                    error=f"registered sender {s.network} ({s.name}) is outside the campus "
                    f"networks {self.campus}: ignored",
                    control=Control.SU_3,
                )
        self.registry.replace_dynamic(good)

    def _persist_block(self, ip: str, reason: str, until: float) -> None:
        store = self.store
        if store is None:
            if self.unavailable:  # written by the first successful load
                old = self._unsaved.get(ip)
                self._unsaved[ip] = (reason, max(until, old[1] if old else until))
            return

        async def write() -> None:
            try:
                await store.call(add_block, store, ip, reason, until)
                self.blocks.persisted(ip)
            except Exception as exc:
                emit("policy.store_error", op="add_block", client=ip, error=type(exc).__name__)
                old = self._unsaved.get(ip)
                self._unsaved[ip] = (reason, max(until, old[1] if old else until))

        task = asyncio.get_running_loop().create_task(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

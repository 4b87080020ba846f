"""The policy's database caches on PostgreSQL when the database goes away and comes back:
decisions keep being made from the caches while it is down (a registered server still
relays, a new block still holds), the failed refresh raises (the refresher turns it into a
``policy.refresh_error`` event), and once the database answers again the next refresh
loads what changed meanwhile and writes the block that could not be written."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from mailwarden import store
from mailwarden.config import default_config
from mailwarden.core.events import MemorySink, get_sink, set_sink
from mailwarden.core.types import Session
from mailwarden.policy.clients import ClientKind
from mailwarden.policy.networks import campus_networks
from mailwarden.policy.state import PolicyState
from mailwarden.store.blocks import list_blocks
from mailwarden.store.senders import add_sender
from tests.support.postgres import PgDatabase

LAB = "127.0.0.70"
LAB2 = "127.0.0.71"
HARVESTER = "192.0.2.66"


def _session(ip: str) -> Session:
    return Session(ip, 1, "127.0.0.1", 25, "smtp")


@pytest.mark.asyncio
async def test_caches_survive_the_database_going_away(
    tmp_path: Path, pg_database: PgDatabase
) -> None:
    pg_database.reset()
    cfg = default_config(
        gateway={"state_dir": str(tmp_path)},
        database={"url": pg_database.url},
        policy={"campus_networks": ["127.0.0.1/32", "127.0.0.64/26"]},
    )
    admin = store.open(cfg)  # what `mailwarden senders add` would use
    campus = campus_networks(cfg).networks
    add_sender(admin, LAB, name="lab", domains=["lab.example.edu"], campus=campus)
    state = PolicyState(cfg)
    sink, previous = MemorySink(), get_sink()
    set_sink(sink)
    try:
        await state.start()
        assert state.classifier.classify(_session(LAB)).kind is ClientKind.REGISTERED

        pg_database.refuse_connections()
        try:
            with pytest.raises(OperationalError):
                await state.refresh()
            # The caches are untouched: the lab server is still registered.
            assert state.classifier.classify(_session(LAB)).kind is ClientKind.REGISTERED
            # A block decided now holds here although it cannot be written.
            state.blocks.add(HARVESTER, "harvest", time.time() + 600)
            await _settle(state)
            assert state.blocks.blocked_until(HARVESTER) is not None
            errors = [e.fields for e in sink.events if e.name == "policy.store_error"]
            assert errors and errors[0]["client"] == HARVESTER
        finally:
            pg_database.allow_connections()

        add_sender(admin, LAB2, name="lab2", domains=["lab.example.edu"], campus=campus)
        await state.refresh()
        assert state.classifier.classify(_session(LAB2)).kind is ClientKind.REGISTERED
        await _settle(state)
        # The block reached the database: every other worker and node will load it.
        assert [b.address for b in list_blocks(admin)] == [HARVESTER]
        assert state.blocks.blocked_until(HARVESTER) is not None
    finally:
        await state.close()
        admin.close()
        set_sink(previous)


async def _settle(state: PolicyState) -> None:
    """Wait for the block writes the state has started (they run on the db threads)."""
    if state._writes:
        await asyncio.gather(*list(state._writes), return_exceptions=True)

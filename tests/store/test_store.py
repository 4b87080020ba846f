"""The data store on SQLite: schema creation (WAL), senders with the SU-3 check, blocks,
the sender-login map, change serials, and calls off the event loop."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sqlite3
import time
from pathlib import Path

import pytest

from mailwarden import store
from mailwarden.config import default_config
from mailwarden.errors import StoreError
from mailwarden.store.blocks import active_blocks, add_block, list_blocks, remove_block
from mailwarden.store.schema import BLOCKS_SERIAL, SENDERS_SERIAL, users
from mailwarden.store.senders import add_sender, list_senders, remove_sender
from mailwarden.store.users import sender_addresses, sender_login_map

CAMPUS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]


@pytest.fixture
def db(tmp_path: Path) -> store.Store:
    s = store.open(default_config(gateway={"state_dir": str(tmp_path)}))
    yield s
    s.close()


def test_sqlite_file_is_private_in_wal_mode_with_a_schema_version(
    db: store.Store, tmp_path: Path
) -> None:
    path = tmp_path / "mailwarden.db"
    assert path.exists() and (os.stat(path).st_mode & 0o077) == 0
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"meta", "senders", "users", "blocks"} <= tables
        version = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        assert version == (str(store.SCHEMA_VERSION),)
    finally:
        con.close()
    # Opening again (another process, a restart) keeps the data.
    again = store.open(default_config(gateway={"state_dir": str(tmp_path)}))
    again.close()


def test_newer_schema_is_refused(db: store.Store, tmp_path: Path) -> None:
    con = sqlite3.connect(tmp_path / "mailwarden.db")
    con.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="newer"):
        store.open(default_config(gateway={"state_dir": str(tmp_path)}))


def test_senders_add_list_remove(db: store.Store) -> None:
    before = db.serial(SENDERS_SERIAL)
    s = add_sender(
        db, "10.1.2.3", name="chem", domains=["Chem.Example.EDU."], campus=CAMPUS, added_by="alice"
    )
    assert str(s.network) == "10.1.2.3/32" and s.domains == ("chem.example.edu",)
    add_sender(db, "2001:db8:5::/48", name="phys", domains=["phys.example.edu"], campus=CAMPUS)
    assert db.serial(SENDERS_SERIAL) == before + 2
    listed = list_senders(db)
    assert [str(x.network) for x in listed] == ["10.1.2.3/32", "2001:db8:5::/48"]
    assert listed[0].added_by == "alice" and listed[0].added_at > 0
    with pytest.raises(StoreError, match="already registered"):
        add_sender(db, "10.1.2.3/32", name="x", domains=["a.example"], campus=CAMPUS)
    assert remove_sender(db, "10.1.2.3")
    assert not remove_sender(db, "10.1.2.3")
    assert [str(x.network) for x in list_senders(db)] == ["2001:db8:5::/48"]


@pytest.mark.parametrize("network", ["192.0.2.7", "10.0.0.0/7", "2001:db9::1", "127.0.0.1"])
def test_sender_outside_campus_is_refused_su3(db: store.Store, network: str) -> None:
    with pytest.raises(StoreError, match=r"not inside the campus networks.*SU-3"):
        add_sender(db, network, name="x", domains=["a.example"], campus=CAMPUS)
    assert list_senders(db) == []


@pytest.mark.parametrize(
    ("network", "domains", "match"),
    [
        ("10.1.2.300", ["a.example"], "not an IP"),
        ("10.1.2.3/24", ["a.example"], "not an IP"),
        ("10.1.2.3", [], "at least one domain"),
        ("10.1.2.3", ["bad domain"], "not a domain"),
    ],
)
def test_sender_input_is_validated(
    db: store.Store, network: str, domains: list[str], match: str
) -> None:
    with pytest.raises(StoreError, match=match):
        add_sender(db, network, name="x", domains=domains, campus=CAMPUS)


def test_blocks(db: store.Store) -> None:
    now = time.time()
    before = db.serial(BLOCKS_SERIAL)
    add_block(db, "192.0.2.9", "harvest", now + 60)
    add_block(db, "2001:DB8::0:1", "honeypot", now + 60)
    add_block(db, "192.0.2.10", "old", now - 1)
    assert db.serial(BLOCKS_SERIAL) > before
    assert set(active_blocks(db)) == {"192.0.2.9", "2001:db8::1"}
    assert len(list_blocks(db, include_expired=True)) == 3
    add_block(db, "192.0.2.9", "again", now + 10)  # never shortens a block
    assert active_blocks(db)["192.0.2.9"] == pytest.approx(now + 60)
    assert remove_block(db, "192.0.2.9") and not remove_block(db, "192.0.2.9")
    with pytest.raises(StoreError):
        add_block(db, "not-an-ip", "x", now + 1)


def test_sender_login_map(db: store.Store) -> None:
    with db.engine.begin() as conn:
        conn.execute(
            users.insert(),
            [
                {
                    "login": "alice",
                    "password_hash": "$argon2id$x",
                    "addresses": ["Alice@example.edu"],
                    "disabled": False,
                    "created_at": 0.0,
                    "updated_at": 0.0,
                },
                {
                    "login": "bob",
                    "password_hash": "$argon2id$y",
                    "addresses": ["bob@example.edu"],
                    "disabled": True,
                    "created_at": 0.0,
                    "updated_at": 0.0,
                },
            ],
        )
    assert sender_addresses(db, "alice") == {"alice@example.edu"}
    assert sender_addresses(db, "bob") == frozenset()  # disabled
    assert sender_addresses(db, "carol") == frozenset()
    assert sender_login_map(db) == {"alice": frozenset({"alice@example.edu"})}


def test_calls_run_off_the_event_loop(db: store.Store) -> None:
    import threading

    async def main() -> tuple[str, list[object]]:
        name = await db.call(lambda: threading.current_thread().name)
        return name, await db.call(list_senders, db)

    name, rows = asyncio.run(main())
    assert name.startswith("mw-db") and rows == []


def test_database_url_is_validated_and_password_hidden() -> None:
    from mailwarden.store.settings import DatabaseSettings

    s = DatabaseSettings(url="postgresql+psycopg://mw:s3cret@db.example.edu/mw")
    assert "s3cret" not in s.safe_url and "***" in s.safe_url
    with pytest.raises(ValueError, match="database url"):
        DatabaseSettings(url="mysql://x")

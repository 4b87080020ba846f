"""The data store on SQLite and on PostgreSQL (every test taking ``db`` runs on both, see
``db_url`` in tests/conftest.py): schema creation (WAL on SQLite), senders with the SU-3
check, blocks, users and the sender-login map, change serials, calls off the event loop."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import update

from mailwarden import store
from mailwarden.config import Config, default_config
from mailwarden.errors import StoreError
from mailwarden.store.blocks import (
    active_blocks,
    add_block,
    list_blocks,
    purge_expired,
    remove_block,
)
from mailwarden.store.schema import BLOCKS_SERIAL, SENDERS_SERIAL, USERS_SERIAL, meta, users
from mailwarden.store.senders import add_sender, list_senders, remove_sender
from mailwarden.store.users import (
    UserExists,
    add_user,
    get_user,
    list_users,
    sender_addresses,
    sender_login_map,
    set_disabled,
    set_password_hash,
)

CAMPUS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]


def _config(tmp_path: Path, url: str) -> Config:
    return default_config(gateway={"state_dir": str(tmp_path)}, database={"url": url})


@pytest.fixture
def db(tmp_path: Path, db_url: str) -> store.Store:
    s = store.open(_config(tmp_path, db_url))
    yield s
    s.close()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> store.Store:
    s = store.open(_config(tmp_path, ""))
    yield s
    s.close()


def test_sqlite_file_is_private_in_wal_mode_with_a_schema_version(
    sqlite_db: store.Store, tmp_path: Path
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


def test_reopening_keeps_data_and_schema_version(
    db: store.Store, tmp_path: Path, db_url: str
) -> None:
    add_sender(db, "10.1.2.3", name="chem", domains=["chem.example.edu"], campus=CAMPUS)
    with db.engine.connect() as conn:
        version = conn.execute(meta.select().where(meta.c.key == "schema_version")).first()
    assert version is not None and version.value == str(store.SCHEMA_VERSION)
    assert {"meta", "senders", "users", "blocks"} <= set(
        db.engine.dialect.get_table_names(db.engine.connect())
    )
    again = store.open(_config(tmp_path, db_url))  # another process, a restart
    try:
        assert [str(s.network) for s in list_senders(again)] == ["10.1.2.3/32"]
        assert again.serial(SENDERS_SERIAL) == db.serial(SENDERS_SERIAL) == 1
    finally:
        again.close()


def test_newer_schema_is_refused(db: store.Store, tmp_path: Path, db_url: str) -> None:
    with db.engine.begin() as conn:
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value="999"))
    with pytest.raises(StoreError, match="newer"):
        store.open(_config(tmp_path, db_url))


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
    assert listed[0].added_by == "alice"
    assert listed[0].added_at == s.added_at  # epoch seconds survive the round trip exactly
    assert listed[0].domains == ("chem.example.edu",)  # the JSON column
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


def test_senders_are_listed_in_address_order_not_text_order(db: store.Store) -> None:
    for net in ("2001:db8:5::/48", "10.0.0.100", "10.0.0.9", "10.0.0.0/8", "10.20.0.0/16"):
        add_sender(db, net, name=net, domains=["a.example"], campus=CAMPUS)
    assert [str(x.network) for x in list_senders(db)] == [
        "10.0.0.0/8",
        "10.0.0.9/32",
        "10.0.0.100/32",
        "10.20.0.0/16",
        "2001:db8:5::/48",
    ]


def test_sender_name_longer_than_the_column_is_refused(db: store.Store) -> None:
    with pytest.raises(StoreError, match="at most 200"):
        add_sender(db, "10.1.2.3", name="n" * 201, domains=["a.example"], campus=CAMPUS)
    s = add_sender(
        db, "10.1.2.3", name="n" * 200, domains=["a.example"], campus=CAMPUS, added_by="b" * 300
    )
    assert list_senders(db)[0].name == s.name and len(list_senders(db)[0].added_by) == 200


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
    add_block(db, "192.0.2.9", "longer", now + 120)  # extends
    assert active_blocks(db)["192.0.2.9"] == pytest.approx(now + 120)
    assert [b.reason for b in list_blocks(db) if b.address == "192.0.2.9"] == ["longer"]
    assert remove_block(db, "192.0.2.9") and not remove_block(db, "192.0.2.9")
    with pytest.raises(StoreError):
        add_block(db, "not-an-ip", "x", now + 1)
    assert purge_expired(db) == 1  # 192.0.2.10
    assert [b.address for b in list_blocks(db, include_expired=True)] == ["2001:db8::1"]


def test_blocks_are_listed_in_address_order(db: store.Store) -> None:
    until = time.time() + 60
    for ip in ("::1", "10.0.0.100", "10.0.0.9", "9.9.9.9"):
        add_block(db, ip, "x", until)
    assert [b.address for b in list_blocks(db)] == ["9.9.9.9", "10.0.0.9", "10.0.0.100", "::1"]


def test_users_case_insensitive_logins_and_serial(db: store.Store) -> None:
    before = db.serial(USERS_SERIAL)
    add_user(db, " Zoë@Example.EDU ", "$argon2id$a", ["zoe@example.edu"])
    add_user(db, "bob", "$argon2id$b", ["bob@example.edu", "b@example.edu"])
    with pytest.raises(UserExists):
        add_user(db, "ZOË@example.edu", "$argon2id$c", [])
    row = get_user(db, "ZOË@EXAMPLE.EDU")
    assert row is not None and row.login == "zoë@example.edu"
    assert row.addresses == ("zoe@example.edu",) and not row.disabled
    assert get_user(db, "nobody") is None
    assert set_password_hash(db, "BOB", "$argon2id$new") and not set_password_hash(db, "x", "y")
    assert get_user(db, "bob").password_hash == "$argon2id$new"  # type: ignore[union-attr]
    assert set_disabled(db, "Bob", True)
    assert [u.login for u in list_users(db)] == ["bob", "zoë@example.edu"]
    assert sender_addresses(db, "ZOË@example.edu") == {"zoe@example.edu"}
    assert sender_login_map(db) == {"zoë@example.edu": frozenset({"zoe@example.edu"})}
    assert db.serial(USERS_SERIAL) == before + 4


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
    assert s.safe_url == "postgresql+psycopg://mw:***@db.example.edu/mw"
    assert s.redact("FATAL: password s3cret rejected") == "FATAL: password *** rejected"
    enc = DatabaseSettings(url="postgresql+psycopg://mw:p%40ss%2Fw0rd@db/mw")
    assert enc.safe_url == "postgresql+psycopg://mw:***@db/mw"
    assert enc.redact("p%40ss%2Fw0rd or p@ss/w0rd") == "*** or ***"
    q = DatabaseSettings(url="postgresql+psycopg://mw@/mw?host=/var/run/postgresql&password=zz9")
    assert q.safe_url == "postgresql+psycopg://mw@/mw?host=/var/run/postgresql&password=***"
    assert q.redact("bad zz9") == "bad ***"
    sock = DatabaseSettings(url="postgresql+psycopg://mw@/mw?host=/var/run/postgresql")
    assert sock.safe_url == sock.url  # nothing to hide
    with pytest.raises(ValueError, match="database url"):
        DatabaseSettings(url="mysql://x")
    for bad in (
        "postgresql+psycopg://mw:Secr3t@db:notaport/mw",
        "postgresql+psycopg://mw:Secr@3t@db/mw",  # '@' in a password must be encoded
    ):
        with pytest.raises(ValueError, match="malformed") as info:
            DatabaseSettings(url=bad)
        assert "Secr" not in str(info.value.errors()[0]["msg"])


def test_open_errors_never_show_the_password(tmp_path: Path, pg_database: object) -> None:
    from tests.support.postgres import SOCKET_DIR

    missing = f"postgresql+psycopg://mailwarden_test:Pw-0f-Mine@/no_such_db_mw?host={SOCKET_DIR}"
    with pytest.raises(StoreError) as info:
        store.open(_config(tmp_path, missing))
    text = str(info.value)
    assert "no_such_db_mw" in text and "does not exist" in text
    assert "Pw-0f-Mine" not in text and "mailwarden_test:***@" in text
    # A driver that is not installed: a StoreError naming it, not a traceback with the URL.
    with pytest.raises(StoreError) as info:
        store.open(_config(tmp_path, "postgresql+psycopg2://u:Pw-0f-Mine@db.invalid/x"))
    assert "psycopg2" in str(info.value) and "Pw-0f-Mine" not in str(info.value)

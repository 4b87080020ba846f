"""Two gateway-like processes writing the same database at once, on SQLite and PostgreSQL.

Both open the store at the same instant (on a database without tables: the schema is
created once, neither fails), then each adds blocks for the same 20 addresses and users of
its own. Afterwards: every write is there, each block has the latest ``until`` of all the
writes for its address (the upsert never shortens a block, whatever the interleaving), and
the change serials moved once per write (no increment lost between the two writers, so a
gateway polling them never misses a change)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mailwarden import store
from mailwarden.config import default_config
from mailwarden.store.blocks import list_blocks
from mailwarden.store.schema import BLOCKS_SERIAL, USERS_SERIAL, meta
from mailwarden.store.users import list_users
from tests.store.writer import ADDRESSES, until_for
from tests.support.tmpdirs import poll

ROOT = Path(__file__).resolve().parents[2]
WRITERS = 2
ROUNDS = 60  # blocks and users per writer
DEADLINE = 120.0  # seconds for the writers to finish


def test_two_processes_write_at_once(tmp_path: Path, db_url: str) -> None:
    state = tmp_path / "state"
    go = tmp_path / "go"
    procs = []
    for k in range(WRITERS):
        ready = tmp_path / f"ready{k}"
        procs.append(
            (
                ready,
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.store.writer",
                        db_url,
                        str(state),
                        f"w{k}",
                        str(ROUNDS),
                        str(ready),
                        str(go),
                    ],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        )
    poll(lambda: all(r.exists() for r, _ in procs), DEADLINE, what="the writers to start")
    go.touch()
    for _, p in procs:
        out, err = p.communicate(timeout=DEADLINE)
        assert p.returncode == 0 and out.strip() == "done", err

    db = store.open(default_config(gateway={"state_dir": str(state)}, database={"url": db_url}))
    try:
        users = list_users(db)
        assert len(users) == WRITERS * ROUNDS
        blocks = {b.address: b.until for b in list_blocks(db)}
        expected = {
            f"192.0.2.{a}": max(
                until_for(k, i) for k in range(WRITERS) for i in range(ROUNDS) if i % ADDRESSES == a
            )
            for a in range(ADDRESSES)
        }
        assert blocks == expected
        assert db.serial(BLOCKS_SERIAL) == WRITERS * ROUNDS
        assert db.serial(USERS_SERIAL) == WRITERS * ROUNDS
        with db.engine.connect() as conn:
            versions = conn.execute(meta.select().where(meta.c.key == "schema_version")).all()
        assert len(versions) == 1
    finally:
        db.close()

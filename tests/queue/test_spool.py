"""Spool: durable layout, parsing, corruption handling, crash cleanup, shard adoption."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from mailwarden.core.events import MemorySink, set_sink
from mailwarden.errors import QueueError, SpoolCorrupt
from mailwarden.queue.spool import QueueState, Spool
from tests.queue.helpers import make_message, make_snapshot


@pytest.fixture
def events() -> MemorySink:
    sink = MemorySink()
    set_sink(sink)
    return sink


def test_enqueue_writes_one_durable_file_in_active(tmp_path: Path, events: MemorySink) -> None:
    spool = Spool(tmp_path / "spool", "w0")
    snap = make_snapshot(("a@example.edu", "b@example.edu"))
    data = make_message()
    notified: list[str] = []
    spool.on_enqueue = notified.append
    asyncio.run(spool.enqueue(snap, data))
    path = tmp_path / "spool" / "w0" / "active" / snap.queue_id
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path / "spool" / "w0" / "incoming") == []
    assert path.read_bytes().startswith(b"MWQ1 ")
    msg = spool.load(snap.queue_id, QueueState.ACTIVE)
    assert msg.snapshot == snap
    assert msg.pending == ("a@example.edu", "b@example.edu")
    assert spool.read_data(msg) == data
    assert notified == [snap.queue_id]
    assert [e.name for e in events.events] == ["queue.enqueued"]
    assert events.events[0].fields["queue_id"] == snap.queue_id
    spool.close()


def test_many_concurrent_enqueues(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "w0")
    snaps = [make_snapshot() for _ in range(200)]

    async def run() -> None:
        await asyncio.gather(*(spool.enqueue(s, make_message(s.queue_id)) for s in snaps))

    asyncio.run(run())
    assert sorted(spool.ids(QueueState.ACTIVE)) == sorted(s.queue_id for s in snaps)
    for s in snaps:
        msg = spool.load(s.queue_id, QueueState.ACTIVE)
        assert spool.read_data(msg) == make_message(s.queue_id)
    spool.close()


def test_bad_queue_id_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "w0")
    with pytest.raises(QueueError):
        asyncio.run(spool.enqueue(make_snapshot(queue_id="../../etc"), b"x"))
    with pytest.raises(QueueError):
        Spool(tmp_path, "../x")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b"XXXX" + b[4:],  # bad magic
        lambda b: b[:-3],  # truncated
        lambda b: b + b"extra",  # trailing bytes
        lambda b: b.replace(b'"mail_from"', b'"mail_frXm"'),  # envelope missing a key
    ],
)
def test_corrupt_files_are_detected(tmp_path: Path, mangle: object) -> None:
    spool = Spool(tmp_path, "w0")
    snap = make_snapshot()
    asyncio.run(spool.enqueue(snap, make_message()))
    path = spool.file(snap.queue_id, QueueState.ACTIVE)
    path.write_bytes(mangle(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(SpoolCorrupt):
        spool.read_data(spool.load(snap.queue_id, QueueState.ACTIVE))


def test_data_checksum_is_verified(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "w0")
    snap = make_snapshot()
    asyncio.run(spool.enqueue(snap, make_message()))
    path = spool.file(snap.queue_id, QueueState.ACTIVE)
    raw = bytearray(path.read_bytes())
    raw[-2] ^= 0x01
    path.write_bytes(bytes(raw))
    msg = spool.load(snap.queue_id, QueueState.ACTIVE)
    with pytest.raises(SpoolCorrupt):
        spool.read_data(msg)


def test_mark_corrupt_moves_file_and_emits(tmp_path: Path, events: MemorySink) -> None:
    spool = Spool(tmp_path, "w0")
    (spool.dir(QueueState.ACTIVE) / "BADFILE1").write_bytes(b"garbage")
    spool.mark_corrupt("BADFILE1", QueueState.ACTIVE, "bad header")
    assert (spool.dir(QueueState.CORRUPT) / "BADFILE1").exists()
    assert events.events[-1].name == "queue.corrupt"


def test_recover_removes_incoming_and_orphan_journals(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "w0")
    snap = make_snapshot()
    asyncio.run(spool.enqueue(snap, make_message()))
    (spool.dir(QueueState.INCOMING) / "HALFWRITTEN.tmp").write_bytes(b"MWQ1 1")
    spool.append_journal("ORPHAN123", [{"k": "attempt", "n": 1, "at": 0}], sync=True)
    spool.append_journal(snap.queue_id, [{"k": "attempt", "n": 1, "at": 0}], sync=True)
    again = Spool(tmp_path, "w0")
    assert again.recover() == [snap.queue_id]
    assert os.listdir(again.dir(QueueState.INCOMING)) == []
    assert not again.journal_path("ORPHAN123").exists()
    assert again.read_journal(snap.queue_id).attempts == 1


def test_journal_ignores_torn_last_line(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "w0")
    spool.append_journal(
        "QID000001",
        [
            {
                "k": "rcpt",
                "r": "a@x",
                "s": "delivered",
                "c": 250,
                "e": "2.0.0",
                "t": "ok",
                "h": "h",
                "at": 1.0,
            }
        ],
        sync=True,
    )
    with open(spool.journal_path("QID000001"), "ab") as fh:
        fh.write(b'{"k":"rcpt","r":"b@x","s":"deliv')
    journal = spool.read_journal("QID000001")
    assert set(journal.final) == {"a@x"}


def test_adopt_orphans_moves_shards_of_missing_workers(tmp_path: Path) -> None:
    shards = {name: Spool(tmp_path, name) for name in ("w0", "w1", "w2", "w3")}
    ids: dict[str, str] = {}
    for name, spool in shards.items():
        snap = make_snapshot()
        asyncio.run(spool.enqueue(snap, make_message()))
        ids[name] = snap.queue_id
    held = make_snapshot()
    asyncio.run(shards["w3"].enqueue(held, make_message()))
    shards["w3"].move(held.queue_id, QueueState.ACTIVE, QueueState.HOLD)
    shards["w3"].append_journal(held.queue_id, [{"k": "warned", "at": 1.0}], sync=True)
    moved = Spool.adopt_orphans(tmp_path, 2)
    assert sorted(moved) == sorted([ids["w2"], ids["w3"], held.queue_id])
    w0 = Spool(tmp_path, "w0")
    assert w0.locate(ids["w2"]) is QueueState.ACTIVE
    assert w0.locate(held.queue_id) is QueueState.HOLD
    assert w0.read_journal(held.queue_id).warned
    assert shards["w1"].locate(ids["w1"]) is QueueState.ACTIVE  # live shard untouched
    assert shards["w3"].ids(QueueState.ACTIVE) == []
    assert Spool.adopt_orphans(tmp_path, 2) == []  # idempotent


def test_envelope_json_matches_the_snapshot_to_json() -> None:
    import json
    import time

    from mailwarden.core.types import Direction, EnvelopeSnapshot
    from mailwarden.queue.spool import envelope_json

    snap = EnvelopeSnapshot(
        queue_id="ABCDEF123",
        mail_from="s\u00e9nder@example.org",
        recipients=("a@example.edu", 'b"q@example.edu'),
        received_at=time.time(),
        client_ip="2001:db8::1",
        client_helo="helo\x01",
        direction=Direction.OUTBOUND,
        message_id="<m@x>",
        size=12,
        smtputf8=True,
        body="8BITMIME",
        auth_user="u",
        session_id="s1",
        is_bounce=True,
    )
    assert json.loads(envelope_json(snap)) == snap.to_json()
    assert EnvelopeSnapshot.from_json(json.loads(envelope_json(snap))) == snap
    default = make_snapshot()
    assert json.loads(envelope_json(default)) == default.to_json()

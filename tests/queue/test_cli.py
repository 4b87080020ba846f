"""``mailwarden queue ...`` through the installed command, on a real spool with two shards."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailwarden.queue.spool import QueueState, Spool
from tests.queue.helpers import make_message, make_snapshot

MAILWARDEN = Path(sys.executable).with_name("mailwarden")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    state = tmp_path / "var"
    conf = tmp_path / "mw.toml"
    conf.write_text(f'[gateway]\nstate_dir = "{state}"\n')
    root = state / "spool"
    ids: dict[str, str] = {}
    for shard, name in (("w0", "a"), ("w0", "b"), ("w1", "c")):
        spool = Spool(root, shard)
        snap = make_snapshot((f"{name}@example.edu", f"{name}2@example.edu"))
        asyncio.run(spool.enqueue(snap, make_message(subject=f"msg {name}")))
        spool.close()
        ids[name] = snap.queue_id
    w0 = Spool(root, "w0")
    w0.move(ids["b"], QueueState.ACTIVE, QueueState.DEFERRED, mtime=4_000_000_000)
    return conf, root, ids


def mw(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MAILWARDEN), "queue", *args, "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_list_text_and_json(setup: tuple[Path, Path, dict[str, str]]) -> None:
    conf, _, ids = setup
    out = mw(conf, "list")
    assert out.returncode == 0, out.stderr
    assert f"{ids['a']}*" in out.stdout and f"{ids['c']}*" in out.stdout
    assert "3 Requests." in out.stdout
    out = mw(conf, "list", "--json")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    by_id = {r["queue_id"]: r for r in rows}
    assert set(by_id) == set(ids.values())
    assert by_id[ids["b"]]["state"] == "deferred"
    assert by_id[ids["c"]]["shard"] == "w1"
    assert by_id[ids["a"]]["pending"] == ["a@example.edu", "a2@example.edu"]


def test_show(setup: tuple[Path, Path, dict[str, str]]) -> None:
    conf, _, ids = setup
    out = mw(conf, "show", ids["c"], "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["envelope"]["recipients"] == ["c@example.edu", "c2@example.edu"]
    assert "Subject: msg c" in info["headers"]
    out = mw(conf, "show", ids["c"])
    assert "Subject: msg c" in out.stdout and "c2@example.edu" in out.stdout
    assert mw(conf, "show", "NOSUCHID123").returncode == 3
    assert mw(conf, "show", "../../etc/passwd").returncode == 3


def test_hold_release_delete(setup: tuple[Path, Path, dict[str, str]]) -> None:
    conf, root, ids = setup
    out = mw(conf, "hold", ids["a"], ids["c"])
    assert out.returncode == 0, out.stderr
    assert Spool(root, "w0").locate(ids["a"]) is QueueState.HOLD
    assert Spool(root, "w1").locate(ids["c"]) is QueueState.HOLD
    assert f"{ids['a']}!" in mw(conf, "list").stdout
    assert mw(conf, "release", ids["a"]).returncode == 0
    assert Spool(root, "w0").locate(ids["a"]) is QueueState.DEFERRED
    assert mw(conf, "release", ids["a"]).returncode == 1  # not on hold
    assert mw(conf, "hold", "NOSUCHID123").returncode == 3
    assert mw(conf, "delete", ids["c"]).returncode == 0
    assert Spool(root, "w1").locate(ids["c"]) is None
    assert mw(conf, "delete", ids["c"]).returncode == 3
    assert mw(conf, "delete").returncode == 2
    out = mw(conf, "delete", "--all")
    assert out.returncode == 0 and "2 message(s) deleted" in out.stdout
    assert mw(conf, "list").stdout.strip() == "Mail queue is empty"
    events = (root.parent / "log" / "events.jsonl").read_text().splitlines()
    names = [json.loads(line)["event"] for line in events]
    assert names.count("queue.held") == 2 and names.count("queue.removed") == 3


def test_flush_makes_deferred_due_and_triggers(setup: tuple[Path, Path, dict[str, str]]) -> None:
    conf, root, ids = setup
    w0 = Spool(root, "w0")
    assert w0.file(ids["b"], QueueState.DEFERRED).stat().st_mtime == 4_000_000_000
    out = mw(conf, "flush")
    assert out.returncode == 0 and "1 deferred" in out.stdout
    assert w0.file(ids["b"], QueueState.DEFERRED).stat().st_mtime < 4_000_000_000
    assert w0.flush_trigger.exists() and Spool(root, "w1").flush_trigger.exists()


def test_corrupt_file_listed(setup: tuple[Path, Path, dict[str, str]]) -> None:
    conf, root, _ = setup
    (root / "w0" / "corrupt" / "BROKEN0001").write_bytes(b"junk")
    rows = [json.loads(x) for x in mw(conf, "list", "--json").stdout.splitlines()]
    broken = [r for r in rows if r["queue_id"] == "BROKEN0001"]
    assert broken and broken[0]["state"] == "corrupt" and broken[0]["corrupt"]
    assert mw(conf, "delete", "BROKEN0001").returncode == 0


def test_mailwarden_command_is_installed() -> None:
    assert MAILWARDEN.exists() and os.access(MAILWARDEN, os.X_OK)

"""CLI commands while the PostgreSQL database is down or does not answer.

Every command that opens the store (``senders``, ``blocks``, ``user``; ``status`` probes
it) is run as the operator runs it, a ``mailwarden`` subprocess, against a URL with a
password:

- a port nothing listens on (what a stopped server looks like): exit 1 and exactly one
  line on stderr naming the database with the password as ``***``, no traceback, the
  password nowhere in the output; ``status`` shows the database UNAVAILABLE on one line and
  exits 1;
- a server that does not answer at all (fault injector ``tests.support.pgfault``: accepts
  and never speaks, which a real PostgreSQL cannot be made to do): the command gives up on
  its own (bounded connect timeout) with the same kind of line; the test's subprocess
  timeout only guards against a hang, no duration is asserted;
- a database that goes away while a command has it open: a one-line ``StoreUnavailable``
  (``cli.dbaccess.cli_store``), not a driver traceback.

Untrusted input: none (operator commands; the driver's error texts are checked for the
password).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.pgfault import PgBlackhole
from tests.support.ports import LOOPBACK, free_port
from tests.support.postgres import PgDatabase

from mailwarden.cli.dbaccess import cli_store
from mailwarden.config import default_config
from mailwarden.errors import StoreUnavailable
from mailwarden.store.blocks import list_blocks

SECRET = "Pw-db-down-7741"
USER_PASSWORD = "user-pass-5512"
SUBPROCESS_TIMEOUT = 120  # seconds: only a guard against a hang, never asserted

COMMANDS = [
    ("senders", "list"),
    ("senders", "add", "127.0.0.1", "--name", "lab", "--domain", "example.edu"),
    ("senders", "remove", "127.0.0.1"),
    ("blocks", "list"),
    ("blocks", "remove", "192.0.2.1"),
    ("user", "list"),
    ("user", "add", "alice", "--password-stdin"),
    ("user", "passwd", "alice", "--password-stdin"),
    ("user", "disable", "alice"),
    ("user", "enable", "alice"),
]


def mailwarden(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailwarden", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=SUBPROCESS_TIMEOUT,
    )


def _config(tmp_path: Path, url: str) -> Path:
    p = tmp_path / "mw.toml"
    p.write_text(f'[gateway]\nstate_dir = "{tmp_path / "state"}"\n\n[database]\nurl = "{url}"\n')
    return p


def _one_line_error(r: subprocess.CompletedProcess[str], label: str) -> str:
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert SECRET not in out and "Traceback" not in out
    assert r.stdout == "", out
    lines = r.stderr.splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith(f"mailwarden: cannot reach the database {label}: "), out
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_database_down_is_one_line(tmp_path: Path, command: tuple[str, ...]) -> None:
    port = free_port()  # nothing listens on it: a stopped server
    cfg = _config(tmp_path, f"postgresql+psycopg://mw:{SECRET}@{LOOPBACK}:{port}/mw")
    r = mailwarden(*command, "-c", str(cfg), stdin=USER_PASSWORD + "\n")
    line = _one_line_error(r, f"postgresql+psycopg://mw:***@{LOOPBACK}:{port}/mw")
    assert "Connection refused" in line


def test_status_shows_the_database_down(tmp_path: Path) -> None:
    port = free_port()
    cfg = _config(tmp_path, f"postgresql+psycopg://mw:{SECRET}@{LOOPBACK}:{port}/mw")
    r = mailwarden("status", "-c", str(cfg))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert SECRET not in out and "Traceback" not in out
    db = [line for line in r.stdout.splitlines() if line.lstrip().startswith("database")]
    assert len(db) == 1, out
    assert f"mw:***@{LOOPBACK}:{port}/mw: UNAVAILABLE:" in db[0] and "Connection refused" in db[0]
    # The line after it is the queue's, not a continuation of the driver's message.
    after = r.stdout.splitlines()[r.stdout.splitlines().index(db[0]) + 1]
    assert after.lstrip().startswith("queue"), out


def test_silent_server_gives_up_with_one_line(tmp_path: Path) -> None:
    with PgBlackhole() as hole:
        cfg = _config(tmp_path, hole.url("mw", "mw", SECRET))  # the CLI's own connect timeout
        r = mailwarden("user", "list", "-c", str(cfg))
        assert hole.accepted >= 1  # it did try, and was never answered
    line = _one_line_error(r, f"postgresql+psycopg://mw:***@{LOOPBACK}:{hole.port}/mw")
    assert "timeout" in line


def test_database_lost_during_a_command(tmp_path: Path, pg_database: PgDatabase) -> None:
    pg_database.reset()
    url = pg_database.url.replace(f"//{pg_database.role}@", f"//{pg_database.role}:{SECRET}@")
    cfg = default_config(gateway={"state_dir": str(tmp_path)}, database={"url": url})
    try:
        with pytest.raises(StoreUnavailable) as err, cli_store(cfg) as db:
            pg_database.refuse_connections()  # its sessions end, new ones are refused
            list_blocks(db)
    finally:
        pg_database.allow_connections()
    text = str(err.value)
    assert text.startswith(f"lost the database postgresql+psycopg://{pg_database.role}:***@/")
    assert "not currently accepting connections" in text
    assert "\n" not in text and SECRET not in text

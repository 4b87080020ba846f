"""The database password never reaches the terminal: ``config show`` prints the URL with
``***``, ``config check`` rejects a malformed URL without echoing it, and when the database
cannot be opened (here: a PostgreSQL database that does not exist) ``senders list`` and
``serve`` fail with a message that names the database but not the password."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.postgres import ROLE, SOCKET_DIR

SECRET = "Pw-0f-The-DB"


def mailwarden(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailwarden", *args], capture_output=True, text=True, timeout=60
    )


def _config(tmp_path: Path, url: str) -> Path:
    p = tmp_path / "mw.toml"
    p.write_text(f'[gateway]\nstate_dir = "{tmp_path / "state"}"\n\n[database]\nurl = "{url}"\n')
    return p


def test_config_show_hides_the_password(tmp_path: Path) -> None:
    cfg = _config(tmp_path, f"postgresql+psycopg://mw:{SECRET}@db.example.edu:5433/mw")
    r = mailwarden("config", "show", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout
    assert json.loads(r.stdout)["database"]["url"] == (
        "postgresql+psycopg://mw:***@db.example.edu:5433/mw"
    )


def test_malformed_url_is_not_echoed(tmp_path: Path) -> None:
    cfg = _config(tmp_path, f"postgresql+psycopg://mw:{SECRET}@db.example.edu:port/mw")
    r = mailwarden("config", "check", "-c", str(cfg))
    assert r.returncode == 2
    assert "database.url" in r.stderr and "malformed" in r.stderr
    assert SECRET not in r.stderr + r.stdout


def test_unreachable_database_error_hides_the_password(tmp_path: Path, pg_database: object) -> None:
    url = f"postgresql+psycopg://{ROLE}:{SECRET}@/mw_no_such_db?host={SOCKET_DIR}"
    cfg = _config(tmp_path, url)
    for args in (("senders", "list"), ("serve",)):
        r = mailwarden(*args, "-c", str(cfg))
        out = r.stdout + r.stderr
        assert r.returncode == 1, out
        assert SECRET not in out
        assert f"{ROLE}:***@/mw_no_such_db" in out and "does not exist" in out
        assert "Traceback" not in out

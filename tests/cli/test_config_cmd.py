"""`mailwarden config check|show` through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def mailwarden(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailwarden", *args], capture_output=True, text=True, timeout=60
    )


def test_check_valid_file() -> None:
    r = mailwarden("config", "check", "-c", str(ROOT / "docs" / "mailwarden.example.toml"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(": OK")


def test_check_invalid_file_exit_2_with_lines(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text('[limits]\nmax_recipients = 0\nbogus = "x"\n')
    r = mailwarden("config", "check", "-c", str(p))
    assert r.returncode == 2
    assert f"{p}:2: limits.max_recipients:" in r.stderr
    assert f"{p}:3: limits.bogus: unknown key" in r.stderr
    assert "2 problem(s)" in r.stderr


def test_show_default_is_json() -> None:
    r = mailwarden("config", "show")
    assert r.returncode == 0
    assert json.loads(r.stdout)["gateway"]["hosted_domains"] == ["example.edu"]


def test_help_lists_subcommands() -> None:
    r = mailwarden("--help")
    assert r.returncode == 0
    for cmd in ("serve", "config", "queue"):
        assert cmd in r.stdout

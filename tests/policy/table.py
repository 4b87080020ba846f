"""Reads policy table files (``cases.txt``, ``relay.txt``) and runs one case as a real SMTP
session. Format: ``client helo mail rcpt [params...] -> expected`` (``#`` comments);
``mail`` and ``rcpt`` are sent verbatim after ``MAIL FROM:``/``RCPT TO:``."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from tests.smtp.harness import RawClient


class Case(NamedTuple):
    where: str
    client: str
    helo: str
    mail: str
    rcpt: str
    expected: str


def read_cases(path: Path) -> list[Case]:
    out = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        left, _, expected = line.partition("->")
        fields = left.split()
        assert len(fields) >= 4 and expected.strip(), f"{path.name}:{no}: malformed case"
        rcpt = " ".join(fields[3:])
        out.append(Case(f"{path.name}:{no}", *fields[:3], rcpt, expected.strip()))
    return out


def run_case(port: int, case: Case) -> str:
    """The last reply of the session (it stops at the first reply that is not 2xx)."""
    c = RawClient(port, source=case.client)
    try:
        last = c.cmd(f"EHLO {case.helo}")
        for command in (f"MAIL FROM:{case.mail}", f"RCPT TO:{case.rcpt}"):
            if not last.startswith("2"):
                break
            last = c.cmd(command)
        c.cmd("QUIT")
        return last.splitlines()[-1]
    finally:
        c.close()

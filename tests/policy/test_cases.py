"""Runs ``cases.txt`` (client helo mail rcpt -> expected reply) through real SMTP sessions,
and checks that a failing or slow rule is a tempfail, never an accept."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailwarden.core.types import Action, Decision
from mailwarden.policy.engine import POLICY_ERROR, Policy
from mailwarden.policy.rules import CheckContext, Stage
from tests.smtp.harness import RawClient, Running, make_config

CASES = Path(__file__).with_name("cases.txt")


def _cases() -> list[tuple[int, str, str, str, str, str]]:
    out = []
    for no, line in enumerate(CASES.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        left, _, expected = line.partition("->")
        fields = left.split()
        assert len(fields) == 4 and expected.strip(), f"cases.txt:{no}: malformed case"
        out.append((no, *fields, expected.strip()))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = Running(make_config(tmp_path_factory.mktemp("policy")))
    yield running
    running.stop()


@pytest.mark.parametrize(("no", "client", "helo", "mail", "rcpt", "expected"), _cases())
def test_case(
    server: Running, no: int, client: str, helo: str, mail: str, rcpt: str, expected: str
) -> None:
    c = RawClient(server.port, source=client)
    try:
        last = c.cmd(f"EHLO {helo}")
        for command in (f"MAIL FROM:{mail}", f"RCPT TO:{rcpt}"):
            if not last.startswith("2"):
                break
            last = c.cmd(command)
        last = last.splitlines()[-1]
        assert last.startswith(expected), f"cases.txt:{no}: got {last!r}"
    finally:
        c.close()


def _boom(ctx: CheckContext) -> Decision:
    raise RuntimeError("directory down")


async def _never(ctx: CheckContext) -> Decision:
    await asyncio.sleep(3600)
    return Decision.accept()


def _accept(ctx: CheckContext) -> Decision:
    return Decision.accept()


def test_engine_fails_closed(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)

    async def run(policy: Policy) -> Decision:
        from mailwarden.core.types import Envelope, Session

        s = Session("127.0.0.1", 1, "127.0.0.1", 25, "smtp")
        return await policy.check_rcpt(s, Envelope("a@b.example"), "u@other.example")

    assert asyncio.run(run(Policy(cfg, {Stage.RCPT: [_boom, _accept]}))) == POLICY_ERROR
    slow = Policy(cfg, {Stage.RCPT: [_never, _accept]}, timeout=0.05)
    assert asyncio.run(run(slow)) == POLICY_ERROR
    assert asyncio.run(run(Policy(cfg, {Stage.RCPT: [_accept]}))).action is Action.ACCEPT
    assert asyncio.run(run(Policy(cfg))).action is Action.REJECT


class _BrokenPolicy(Policy):
    async def check_rcpt(self, session, envelope, rcpt):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0)
        raise RuntimeError("policy service crashed")


def test_policy_crash_is_451_over_smtp(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    running = Running(cfg, policy=_BrokenPolicy(cfg))
    try:
        c = RawClient(running.port)
        c.cmd("EHLO client.example")
        c.cmd("MAIL FROM:<a@b.example>")
        assert c.cmd("RCPT TO:<u@example.edu>").startswith("451 4.3.0")
        assert c.cmd("DATA").startswith("554 5.5.1")  # the recipient was not taken
    finally:
        running.stop()

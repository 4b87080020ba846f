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
from tests.policy.table import Case, read_cases, run_case
from tests.smtp.harness import RawClient, Running, make_config

CASES = read_cases(Path(__file__).with_name("cases.txt"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = Running(make_config(tmp_path_factory.mktemp("policy")))
    yield running
    running.stop()


@pytest.mark.parametrize("case", CASES, ids=[c.where for c in CASES])
def test_case(server: Running, case: Case) -> None:
    got = run_case(server.port, case)
    assert got.startswith(case.expected), f"{case.where}: got {got!r}"


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


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("all", {"connect", "mail", "rcpt:hosted", "rcpt:role", "rcpt:relay"}),
        ("notable", {"rcpt:role", "rcpt:relay"}),
        ("refusals", {"rcpt:relay"}),
    ],
)
def test_decision_events_modes(tmp_path: Path, mode: str, expected: set[str]) -> None:
    """``decision_events``: every check, the refusals plus control-bearing accepts (the
    default), or only the refusals."""
    from mailwarden.config import default_config
    from mailwarden.core.events import MemorySink, get_sink, set_sink
    from mailwarden.core.types import Envelope, Session

    cfg = default_config(
        gateway={"hostname": "mx.test.example", "state_dir": str(tmp_path / "var")},
        policy={"decision_events": mode},
    )
    policy = Policy(cfg)
    sink, old = MemorySink(), get_sink()
    set_sink(sink)

    async def run() -> None:
        s = Session("192.0.2.9", 1, "127.0.0.1", 25, "smtp")
        env = Envelope("a@outside.example")
        await policy.check_connect(s)
        await policy.check_mail(s, env, "a@outside.example")
        await policy.check_rcpt(s, env, "user@example.edu")  # hosted: plain accept
        await policy.check_rcpt(s, env, "postmaster")  # role address: accept under CP-R4
        await policy.check_rcpt(s, env, "x@elsewhere.example")  # relay: refused (SU-6)

    try:
        asyncio.run(run())
    finally:
        set_sink(old)
    got = set()
    for e in sink.events:
        if e.name != "policy.decision":
            continue
        stage = e.fields["stage"]
        if stage == "rcpt":
            rcpt = e.fields["recipient"]
            stage += ":" + {"user@example.edu": "hosted", "postmaster": "role"}.get(rcpt, "relay")
        got.add(stage)
    assert got == expected

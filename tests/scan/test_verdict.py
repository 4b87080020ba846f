"""The verdict engine with stand-in scanners: concurrency, fail closed, priorities, scores."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from mailwarden.core.events import MemorySink
from mailwarden.core.types import Direction, Symbol
from mailwarden.scan import Action, ScanInput, ScanSettings, VerdictEngine, scanning_notice
from mailwarden.scan.factory import build_scanners
from mailwarden.scan.settings import ClamavSettings, RspamdSettings, Thresholds
from tests.scan.messages import scan_input


class Fixed:
    """A scanner that returns fixed symbols."""

    def __init__(self, name: str, *symbols: Symbol, timeout: float = 5.0) -> None:
        self.name = name
        self.symbols = list(symbols)
        self.timeout = timeout
        self.calls = 0

    async def scan(self, msg: ScanInput) -> list[Symbol]:
        self.calls += 1
        return list(self.symbols)


class Raises:
    name = "BROKEN"

    async def scan(self, msg: ScanInput) -> list[Symbol]:
        raise RuntimeError("boom")


class Hangs:
    name = "SLOW"
    timeout = 0.2

    async def scan(self, msg: ScanInput) -> list[Symbol]:
        await asyncio.Event().wait()
        return []


class Rendezvous:
    """Two of these only finish if they run at the same time (no wall clock involved)."""

    def __init__(self, name: str, mine: asyncio.Event, other: asyncio.Event) -> None:
        self.name, self.mine, self.other, self.timeout = name, mine, other, 5.0

    async def scan(self, msg: ScanInput) -> list[Symbol]:
        self.mine.set()
        await self.other.wait()
        return [Symbol(f"{self.name}_SEEN", 1.0)]


def judge(engine: VerdictEngine, direction: Direction = Direction.INBOUND):  # type: ignore[no-untyped-def]
    return asyncio.run(engine.judge(scan_input(b"Subject: x\r\n\r\nsecret body\r\n", direction)))


def test_scanners_run_concurrently() -> None:
    async def go() -> list[str]:
        a, b = asyncio.Event(), asyncio.Event()
        engine = VerdictEngine([Rendezvous("A", a, b), Rendezvous("B", b, a)])
        return (await engine.judge(scan_input(b"x"))).symbol_names

    assert sorted(asyncio.run(go())) == ["A_SEEN", "B_SEEN"]


def test_raising_and_hanging_scanners_fail_closed() -> None:
    v = judge(VerdictEngine([Raises(), Hangs(), Fixed("OK")]))
    assert v.action is Action.TEMPFAIL
    assert sorted(v.symbol_names) == ["BROKEN_FAIL", "SLOW_FAIL"]
    assert v.control is not None and v.control.value == "CP-E3"
    assert not v.delivers


def test_non_symbol_result_is_fail() -> None:
    class Garbage:
        name = "JUNK"

        async def scan(self, msg: ScanInput) -> list[Symbol]:
            return ["not a symbol"]  # type: ignore[list-item]

    assert judge(VerdictEngine([Garbage()])).symbol_names == ["JUNK_FAIL"]


def test_priority_fail_over_virus_over_forced_over_score() -> None:
    fail = Symbol("CLAMAV_FAIL", 0, "down")
    virus = Symbol("CLAMAV_VIRUS", 0, "Eicar")
    reject = Symbol("RSPAMD_ACTION_REJECT", 0)
    spam = Symbol("RSPAMD_BAYES_SPAM", 20)
    assert judge(VerdictEngine([Fixed("X", fail, virus, reject, spam)])).action is Action.TEMPFAIL
    assert judge(VerdictEngine([Fixed("X", virus, reject, spam)])).action is Action.QUARANTINE
    assert judge(VerdictEngine([Fixed("X", reject)])).action is Action.REJECT
    assert judge(VerdictEngine([Fixed("X", spam)])).action is Action.REJECT
    bomb = Symbol("ARCHIVE_BOMB", 10)
    assert judge(VerdictEngine([Fixed("X", bomb, reject)])).action is Action.REJECT
    assert judge(VerdictEngine([Fixed("X", bomb)])).action is Action.QUARANTINE


@pytest.mark.parametrize(
    ("score", "inbound", "outbound"),
    [
        (0.0, Action.ACCEPT, Action.ACCEPT),
        (6.0, Action.ADD_HEADER, Action.ADD_HEADER),
        (10.5, Action.TAG_SUBJECT, Action.QUARANTINE),
        (12.0, Action.QUARANTINE, Action.QUARANTINE),
        (15.0, Action.REJECT, Action.REJECT),
        (-3.0, Action.ACCEPT, Action.ACCEPT),
    ],
)
def test_thresholds_per_direction(score: float, inbound: Action, outbound: Action) -> None:
    engine = VerdictEngine([Fixed("X", Symbol("SPAMMY", score))])
    assert judge(engine).action is inbound
    assert judge(engine, Direction.OUTBOUND).action is outbound


def test_score_overrides_and_merge() -> None:
    settings = ScanSettings(scores={"RSPAMD_BAYES_SPAM": 0.0, "ATTACH_EXECUTABLE": 20.0})
    engine = VerdictEngine(
        [
            Fixed("A", Symbol("RSPAMD_BAYES_SPAM", 9.0), Symbol("ATTACH_EXECUTABLE", 1, "a.exe")),
            Fixed("B", Symbol("ATTACH_EXECUTABLE", 2, "b.exe")),
        ],
        settings,
    )
    v = judge(engine)
    by = {s.name: s for s in v.symbols}
    assert by["RSPAMD_BAYES_SPAM"].score == 0.0
    assert (
        by["ATTACH_EXECUTABLE"].score == 20.0 and by["ATTACH_EXECUTABLE"].detail == "a.exe; b.exe"
    )
    assert v.score == 20.0 and v.action is Action.REJECT


def test_tag_subject_and_headers() -> None:
    v = judge(VerdictEngine([Fixed("X", Symbol("SPAMMY", 11.0))]))
    assert v.action is Action.TAG_SUBJECT and v.subject_tag == "[SPAM]"
    h = dict(v.headers)
    assert h["X-Spam-Status"] == "Yes, score=11.00 required=6.00"
    assert h["X-Spam-Score"] == "11.00" and h["X-Spam-Symbols"] == "SPAMMY"


def test_verdict_event_has_no_content(events: MemorySink) -> None:
    judge(VerdictEngine([Fixed("X", Symbol("CLAMAV_VIRUS", 0, "Eicar"))]))
    (event,) = [e for e in events.events if e.name == "scan.verdict"]
    line = json.dumps(event.to_json())
    assert event.fields["action"] == "quarantine" and event.fields["symbols"] == ["CLAMAV_VIRUS"]
    assert "secret body" not in line


def test_settings_validation() -> None:
    with pytest.raises(ValidationError):
        Thresholds(add_header=10, reject=5)
    with pytest.raises(ValidationError):
        ScanSettings(scores={"bad name": 1.0})
    with pytest.raises(ValidationError):
        ScanSettings(unknown=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        RspamdSettings(url="ftp://x")
    s = ScanSettings.model_validate({"clamav": {"socket": "/x", "max_signature_age": "2d"}})
    assert s.clamav.max_signature_age == 172800.0


def test_limited_notice_and_factory() -> None:
    plain = ScanSettings()
    assert scanning_notice(plain) == "virus scanning is limited (built-in signatures only)"
    assert [s.name for s in build_scanners(plain)] == ["BUILTIN"]
    full = ScanSettings(
        clamav=ClamavSettings(socket="/run/clamd.ctl"),
        rspamd=RspamdSettings(url="http://127.0.0.1:11333"),
    )
    assert scanning_notice(full) is None
    assert [s.name for s in build_scanners(full)] == ["CLAMAV", "RSPAMD", "BUILTIN"]

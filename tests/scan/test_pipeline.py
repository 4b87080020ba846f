"""The content hook at the end of DATA (``smtp.content``), one level below the SMTP edge.

Outbound mail is tested here: the embedded policy cannot mark a session outbound through
SMTP yet (issue 3), so the envelope's direction is set as the policy will set it. Outbound
EICAR goes through real clamd; the per-direction thresholds use a scanner with a fixed
score. Header stripping and subject tagging are tested as tables.

Security: clamd listens on a socket in the test's directory only.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mailwarden.config import QuarantineConfig
from mailwarden.core.types import Direction, EnvelopeSnapshot, Symbol
from mailwarden.quarantine.store import Quarantine
from mailwarden.scan import ScanInput, ScanSettings, build_engine
from mailwarden.scan.verdict import VerdictEngine
from mailwarden.smtp.content import ContentFilter, Outcome, strip_untrusted, tag_subject
from tests.scan.messages import RCPT, SENDER, eicar, ham, plain
from tests.support.clamd import Clamd

RECEIVED = b"Received: from client.test by mailwarden.test with ESMTP id QIDTEST001\r\n"


class ListSink:
    def __init__(self) -> None:
        self.queued: list[tuple[EnvelopeSnapshot, bytes]] = []

    async def enqueue(self, snapshot: EnvelopeSnapshot, data: bytes) -> None:
        self.queued.append((snapshot, data))


class FixedScore:
    """A scanner that always finds one symbol with a given score."""

    name = "FIXED"

    def __init__(self, score: float) -> None:
        self.score = score

    async def scan(self, msg: ScanInput) -> list[Symbol]:
        return [Symbol("FIXED_SCORE", self.score, "")]


def _snap(direction: Direction, qid: str = "QIDTEST001") -> EnvelopeSnapshot:
    return EnvelopeSnapshot(
        queue_id=qid,
        mail_from=SENDER,
        recipients=(RCPT,),
        received_at=time.time(),
        client_ip="192.0.2.10",
        client_helo="client.test",
        direction=direction,
        message_id="<m@x>",
        size=0,
    )


def _run(flt: ContentFilter, direction: Direction, msg: bytes) -> tuple[Outcome, ListSink]:
    data = RECEIVED + msg
    end = data.find(b"\r\n\r\n") + 2
    sink = ListSink()
    outcome = asyncio.run(flt.process(sink, _snap(direction), data, len(RECEIVED), end))
    return outcome, sink


def test_outbound_eicar_is_quarantined_under_su5(clamd: Clamd, tmp_path: Path) -> None:
    settings = ScanSettings.model_validate({"clamav": {"socket": clamd.address}})
    q = Quarantine(tmp_path / "q", QuarantineConfig())
    flt = ContentFilter(build_engine(settings), q, "mailwarden.test")
    outcome, sink = _run(flt, Direction.OUTBOUND, plain(eicar(), "outbound virus"))
    assert (outcome.code, outcome.enhanced) == (250, "2.7.0")
    assert "virus found: " in outcome.text and "EICAR-NDB.UNOFFICIAL" in outcome.text
    assert sink.queued == []
    [entry] = q.entries()
    assert entry.direction == "outbound" and entry.kind == "virus" and entry.control == "SU-5"
    held = q.read(entry.queue_id)
    assert held.data == RECEIVED + plain(eicar(), "outbound virus")  # stored as received
    assert entry.expires_at - entry.received_at == pytest.approx(30 * 86400, abs=60)


@pytest.mark.parametrize(
    ("score", "direction", "action", "queued"),
    [
        (11.0, Direction.INBOUND, "tag_subject", True),
        (11.0, Direction.OUTBOUND, "quarantine", False),  # stricter outbound (SU-5 spirit)
        (7.0, Direction.OUTBOUND, "add_header", True),
        (16.0, Direction.OUTBOUND, "reject", False),
        (1.0, Direction.OUTBOUND, "accept", True),
    ],
)
def test_thresholds_per_direction(
    score: float, direction: Direction, action: str, queued: bool, tmp_path: Path
) -> None:
    q = Quarantine(tmp_path / "q")
    flt = ContentFilter(VerdictEngine([FixedScore(score)], ScanSettings()), q, "mailwarden.test")
    outcome, sink = _run(flt, direction, ham())
    assert outcome.verdict is not None and outcome.verdict.action.value == action
    assert bool(sink.queued) is queued
    if action == "tag_subject":
        assert b"Subject: [SPAM] Minutes" in sink.queued[0][1]
    if action == "reject":
        assert outcome.code == 554
    if action == "quarantine":
        [entry] = q.entries()
        assert entry.kind == "spam" and entry.direction == "outbound"
        assert entry.expires_at - entry.received_at == pytest.approx(7 * 86400, abs=60)
    if queued:
        snap, data = sink.queued[0]
        assert data.startswith(RECEIVED + b"X-Spam-Status: ")
        assert snap.size == len(data)


def test_a_pipeline_that_overruns_fails_closed(tmp_path: Path) -> None:
    class Hangs:
        name = "HANGS"
        timeout = 30.0

        async def scan(self, msg: ScanInput) -> list[Symbol]:
            await asyncio.sleep(3600)
            return []

    flt = ContentFilter(VerdictEngine([Hangs()], ScanSettings()), None, "mailwarden.test")
    flt.timeout = 0.05
    outcome, sink = _run(flt, Direction.INBOUND, ham())
    assert (outcome.code, outcome.enhanced) == (451, "4.7.1")
    assert sink.queued == []


@pytest.mark.parametrize(
    ("header", "kept"),
    [
        (b"X-Spam-Status: No\r\nSubject: a\r\n", b"Subject: a\r\n"),
        (b"x-spam-flag: NO\r\n\tfolded\r\nSubject: a\r\n", b"Subject: a\r\n"),
        (b"X-Virus-Scanned: clean\r\nX-Spamming: keep\r\n", b"X-Spamming: keep\r\n"),
        (b"Authentication-Results: MailWarden.Test.; spf=pass\r\n", b""),
        (b"Authentication-Results: (c) mailwarden.test; dkim=pass\r\n", b""),
        # Nested comments and quoted pairs hide nothing (RFC 8601 section 5).
        (b"Authentication-Results: (a (b) c)\r\n\t(d)mailwarden.test; dkim=pass\r\n", b""),
        (b"Authentication-Results: (a \\) b) mailwarden.test; dkim=pass\r\n", b""),
        (b"Authentication-Results: " + b"(" * 40 + b")" * 40 + b" mx.other.org; x\r\n", b""),
        (
            b"Authentication-Results: (a (b) mailwarden.test; spf=pass\r\n",
            b"Authentication-Results: (a (b) mailwarden.test; spf=pass\r\n",
        ),
        (
            b"Authentication-Results: mx.other.org; spf=pass\r\n",
            b"Authentication-Results: mx.other.org; spf=pass\r\n",
        ),
        (
            b"Authentication-Results: mailwarden.test.evil; spf=pass\r\n",
            b"Authentication-Results: mailwarden.test.evil; spf=pass\r\n",
        ),
        (
            b"Subject: X-Spam-Status: inside a value\r\n",
            b"Subject: X-Spam-Status: inside a value\r\n",
        ),
    ],
)
def test_strip_untrusted(header: bytes, kept: bytes) -> None:
    assert strip_untrusted(header, "mailwarden.test") == kept


@pytest.mark.parametrize(
    ("header", "tagged"),
    [
        (b"From: a\r\nSubject: hello\r\n", b"From: a\r\nSubject: [SPAM] hello\r\n"),
        (b"Subject: [SPAM] hello\r\n", b"Subject: [SPAM] hello\r\n"),
        (b"From: a\r\n", b"From: a\r\nSubject: [SPAM]\r\n"),
    ],
)
def test_tag_subject(header: bytes, tagged: bytes) -> None:
    assert tag_subject(header, "[SPAM]") == tagged

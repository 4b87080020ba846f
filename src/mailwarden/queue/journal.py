"""Per-message journal: the append-only ``done/QID.done`` file of one queued message.

One JSON object per line. Kinds (key ``k``):

- ``rcpt``: a result for one recipient: ``r`` recipient, ``s`` status (``delivered``,
  ``bounced`` are final; ``deferred`` only remembers the last diagnostic for a DSN),
  ``c`` reply code, ``e`` enhanced status, ``t`` text, ``h`` remote host, ``at`` time;
- ``attempt``: one delivery attempt of the message ended (``n`` attempt number, ``at``);
- ``warned``: the delay warning DSN was sent (``at``).

Final records are fsync'd before the scheduler relies on them, so a recipient that was
delivered is never delivered again after a crash. A torn last line (crash in the middle of
an append) is ignored.

Public names: ``Journal``, ``RecipientRecord``, ``parse_journal``, ``rcpt_record``,
``attempt_record``, ``warned_record``.
Security: parses files the spool wrote itself; remote reply texts inside are untrusted and
only carried along (into DSNs and events, which escape them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mailwarden.core.types import DeliveryStatus, RecipientResult

FINAL_STATUSES = (DeliveryStatus.DELIVERED, DeliveryStatus.BOUNCED)


@dataclass(frozen=True, slots=True)
class RecipientRecord:
    """The journal's view of one recipient result."""

    recipient: str
    status: DeliveryStatus
    code: int
    enhanced: str
    text: str
    remote_host: str
    at: float


@dataclass(slots=True)
class Journal:
    """Everything a message's journal says."""

    final: dict[str, RecipientRecord] = field(default_factory=dict)
    last_deferred: dict[str, RecipientRecord] = field(default_factory=dict)
    attempts: int = 0
    warned: bool = False


def rcpt_record(result: RecipientResult, at: float) -> dict[str, Any]:
    return {
        "k": "rcpt",
        "r": result.recipient,
        "s": result.status.value,
        "c": result.code,
        "e": result.enhanced,
        "t": result.text,
        "h": result.remote_host,
        "at": at,
    }


def attempt_record(number: int, at: float) -> dict[str, Any]:
    return {"k": "attempt", "n": number, "at": at}


def warned_record(at: float) -> dict[str, Any]:
    return {"k": "warned", "at": at}


def parse_journal(raw: bytes) -> Journal:
    """Parse a journal; unparsable lines (a torn last append) are skipped."""
    journal = Journal()
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            kind = rec["k"]
            if kind == "rcpt":
                item = RecipientRecord(
                    recipient=str(rec["r"]),
                    status=DeliveryStatus(rec["s"]),
                    code=int(rec["c"]),
                    enhanced=str(rec["e"]),
                    text=str(rec["t"]),
                    remote_host=str(rec.get("h", "")),
                    at=float(rec["at"]),
                )
                if item.status in FINAL_STATUSES:
                    journal.final[item.recipient] = item
                else:
                    journal.last_deferred[item.recipient] = item
            elif kind == "attempt":
                journal.attempts = max(journal.attempts, int(rec["n"]))
            elif kind == "warned":
                journal.warned = True
        except (ValueError, KeyError, TypeError):
            continue
    return journal

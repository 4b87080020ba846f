"""The verdict engine: run every scanner concurrently, turn symbols into one decision.

``VerdictEngine(scanners, settings).judge(msg)`` runs all scanners at once
(``asyncio.gather``, each under its own timeout), merges their symbols, applies the
per-symbol score overrides, sums the score and decides an ``Action``. Forced outcomes come
first, in this order:

1. any ``*_FAIL`` symbol (a scanner failed, timed out, answered garbage) -> TEMPFAIL,
   ``451 4.7.1`` (CP-E3: fail closed, never deliver unscanned);
2. any ``*_VIRUS`` symbol -> QUARANTINE (CP-E4 inbound, SU-5 outbound);
3. symbols in ``settings.forced`` (default: ``ARCHIVE_BOMB`` -> quarantine,
   ``RSPAMD_ACTION_REJECT`` -> reject, ``RSPAMD_ACTION_SOFT_REJECT`` -> tempfail); the
   severest wins;
4. otherwise the score against the direction's thresholds.

The result is data: ``Verdict(action, score, symbols, reason, control, headers)``. The
caller prepends ``verdict.headers`` (``render_headers``: the fields scanners put in
``ScanInput.headers`` first, then ``X-Spam-*``) and maps the action to a reply
(``Verdict.reply``). Every verdict emits the event ``scan.verdict`` (queue id, action,
score, symbol names -- never message content).

Public names: ``Action``, ``Verdict``, ``VerdictEngine``, ``render_headers``,
``merge_symbols``.
Security: symbol details quote hostile content (virus and file names); header values are
built from symbol names (``[A-Z0-9_]``) and numbers only, so a message cannot inject
header lines through them. A scanner that raises despite the contract is a ``*_FAIL``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailwarden.core.controls import Control
from mailwarden.core.events import emit
from mailwarden.core.types import Direction, Symbol
from mailwarden.scan.base import ScanInput, Scanner, clean_detail, fail_symbol, is_fail, is_virus
from mailwarden.scan.settings import ScanAction, ScanSettings, Thresholds

Action = ScanAction

MAX_HEADER_SYMBOLS = 50  # symbol names listed in X-Spam-Symbols
_HEADER_NAME_SAFE = re.compile(r"[^A-Z0-9_]")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The scanning decision for one message, as data."""

    action: ScanAction
    score: float
    symbols: tuple[Symbol, ...]
    reason: str
    control: Control | None = None
    headers: tuple[tuple[str, str], ...] = field(default=())
    subject_tag: str = ""  # set when action is TAG_SUBJECT

    @property
    def symbol_names(self) -> list[str]:
        return [s.name for s in self.symbols]

    @property
    def delivers(self) -> bool:
        """True if the message goes on to the queue for delivery."""
        return self.action in (ScanAction.ACCEPT, ScanAction.ADD_HEADER, ScanAction.TAG_SUBJECT)

    def reply(self) -> tuple[int, str, str]:
        """Suggested SMTP reply at end of DATA: (code, enhanced status, text)."""
        if self.action is ScanAction.TEMPFAIL:
            return 451, "4.7.1", "Message could not be scanned, try again later"
        if self.action is ScanAction.REJECT:
            return 554, "5.7.1", f"Message rejected as {self.reason}"
        if self.action is ScanAction.QUARANTINE:
            return 250, "2.7.0", "Message accepted and held in quarantine"
        return 250, "2.0.0", "OK"


def render_headers(headers: Sequence[tuple[str, str]]) -> bytes:
    """Wire form (CRLF) of ``headers``, to prepend to the message."""
    return b"".join(f"{k}: {v}\r\n".encode("ascii", "replace") for k, v in headers)


def merge_symbols(symbols: Sequence[Symbol], overrides: dict[str, float]) -> list[Symbol]:
    """One symbol per name (the highest score; details joined), then score overrides."""
    merged: dict[str, Symbol] = {}
    for s in symbols:
        old = merged.get(s.name)
        if old is None:
            merged[s.name] = s
            continue
        detail = old.detail
        if s.detail and s.detail not in detail:
            detail = clean_detail(f"{detail}; {s.detail}" if detail else s.detail)
        merged[s.name] = Symbol(s.name, max(old.score, s.score), detail)
    out = []
    for s in merged.values():
        if s.name in overrides:
            s = Symbol(s.name, overrides[s.name], s.detail)
        out.append(s)
    return out


class VerdictEngine:
    """Runs the configured scanners and decides (one per process, shared by sessions)."""

    def __init__(self, scanners: Sequence[Scanner], settings: ScanSettings | None = None) -> None:
        self.scanners = list(scanners)
        self.settings = settings or ScanSettings()
        self._timeouts = {s.name: _timeout_of(s, self.settings) for s in self.scanners}

    async def judge(self, msg: ScanInput) -> Verdict:
        """Scan ``msg`` with every scanner concurrently and decide."""
        results = await asyncio.gather(*(self._run(s, msg) for s in self.scanners))
        found = [sym for syms in results for sym in syms]
        verdict = self.decide(found, msg.direction)
        if msg.headers:  # a scanner's own header fields (Authentication-Results) go first
            verdict = dataclasses.replace(verdict, headers=(*msg.headers, *verdict.headers))
        emit(
            "scan.verdict",
            queue_id=msg.queue_id or None,
            direction=msg.direction.value,
            action=verdict.action.value,
            score=round(verdict.score, 2),
            symbols=verdict.symbol_names,
            reason=verdict.reason,
            control=verdict.control.value if verdict.control else None,
        )
        return verdict

    async def _run(self, scanner: Scanner, msg: ScanInput) -> list[Symbol]:
        timeout = self._timeouts[scanner.name]
        try:
            async with asyncio.timeout(timeout):
                symbols = await scanner.scan(msg)
        except TimeoutError:
            return [fail_symbol(scanner.name, f"no answer within {timeout:g} s")]
        except Exception as exc:  # the contract says never raise; fail closed if it does
            return [fail_symbol(scanner.name, f"scanner error: {type(exc).__name__}: {exc}")]
        if not isinstance(symbols, list) or not all(isinstance(s, Symbol) for s in symbols):
            return [fail_symbol(scanner.name, "scanner returned something that is not symbols")]
        return symbols

    def decide(self, found: Sequence[Symbol], direction: Direction) -> Verdict:
        """The decision for a set of symbols (pure: no I/O, no events)."""
        settings = self.settings
        symbols = merge_symbols(found, settings.scores)
        symbols.sort(key=lambda s: (-abs(s.score), s.name))
        score = round(sum(s.score for s in symbols), 3)
        thresholds = settings.inbound if direction is Direction.INBOUND else settings.outbound
        virus_control = Control.CP_E4 if direction is Direction.INBOUND else Control.SU_5

        fails = [s for s in symbols if is_fail(s)]
        viruses = [s for s in symbols if is_virus(s)]
        forced = [(settings.forced[s.name], s) for s in symbols if s.name in settings.forced]
        action: ScanAction
        control: Control | None
        if fails:
            action, control = ScanAction.TEMPFAIL, Control.CP_E3
            reason = "scanner failure: " + ", ".join(f"{s.name} ({s.detail})" for s in fails)
        elif viruses:
            action, control = ScanAction.QUARANTINE, virus_control
            reason = "virus: " + ", ".join(s.detail or s.name for s in viruses)
        elif forced:
            action, sym = max(forced, key=lambda pair: pair[0].severity)
            control = Control.CP_G1
            reason = f"{sym.name}" + (f" ({sym.detail})" if sym.detail else "")
        else:
            action = _by_score(score, thresholds)
            control = Control.CP_G1 if action is not ScanAction.ACCEPT else None
            reason = f"spam (score {score:.2f})" if action is not ScanAction.ACCEPT else "clean"
        headers = self._headers(action, score, symbols, thresholds)
        tag = settings.subject_tag if action is ScanAction.TAG_SUBJECT else ""
        return Verdict(
            action, score, tuple(symbols), clean_detail(reason, 500), control, headers, tag
        )

    def _headers(
        self,
        action: ScanAction,
        score: float,
        symbols: Sequence[Symbol],
        thresholds: Thresholds,
    ) -> tuple[tuple[str, str], ...]:
        required = (
            thresholds.add_header
            if thresholds.add_header is not None
            else (thresholds.reject if thresholds.reject is not None else 0.0)
        )
        spam = action in (
            ScanAction.ADD_HEADER,
            ScanAction.TAG_SUBJECT,
            ScanAction.QUARANTINE,
            ScanAction.REJECT,
        )
        names = [_HEADER_NAME_SAFE.sub("_", s.name) for s in symbols][:MAX_HEADER_SYMBOLS]
        out = [
            (
                "X-Spam-Status",
                f"{'Yes' if spam else 'No'}, score={score:.2f} required={required:.2f}",
            ),
            ("X-Spam-Score", f"{score:.2f}"),
            ("X-Spam-Symbols", ", ".join(names) if names else "none"),
        ]
        scanned_by = [s.name.lower() for s in self.scanners if _is_virus_scanner(s.name)]
        out.append(("X-Virus-Scanned", "mailwarden (" + ", ".join(scanned_by) + ")"))
        return tuple(out)


def _is_virus_scanner(name: str) -> bool:
    return name in ("CLAMAV", "BUILTIN")


def _by_score(score: float, t: Thresholds) -> ScanAction:
    for action, threshold in (
        (ScanAction.REJECT, t.reject),
        (ScanAction.QUARANTINE, t.quarantine),
        (ScanAction.TAG_SUBJECT, t.tag_subject),
        (ScanAction.ADD_HEADER, t.add_header),
    ):
        if threshold is not None and score >= threshold:
            return action
    return ScanAction.ACCEPT


def _timeout_of(scanner: Scanner, settings: ScanSettings) -> float:
    own = getattr(scanner, "timeout", None)
    if isinstance(own, (int, float)) and own > 0:
        return min(float(own), settings.timeout)
    return settings.timeout

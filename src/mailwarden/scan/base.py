"""The scanner interface: what a content scanner gets and what it must give back.

A ``Scanner`` has a ``name`` and one coroutine ``scan(msg) -> list[Symbol]``. It adds
symbols and never raises: a backend that fails, times out or answers garbage yields one
``<NAME>_FAIL`` symbol (``fail_symbol``) with the reason in ``detail``; the verdict engine
turns any ``*_FAIL`` into a tempfail (CP-E3).

Public names: ``ScanInput``, ``Scanner``, ``fail_symbol``, ``is_fail``, ``clean_detail``,
``FAIL_SUFFIX``, ``VIRUS_SUFFIX``.
Security: ``ScanInput.raw`` and every envelope field come from the untrusted client;
scanners treat them as hostile data (no evaluation, bounded work), and ``clean_detail``
strips control characters from anything quoted back into a symbol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from mailwarden.core.types import Direction, EnvelopeSnapshot, Symbol

FAIL_SUFFIX = "_FAIL"  # a scanner could not give a verdict: fail closed
VIRUS_SUFFIX = "_VIRUS"  # a scanner found malware: quarantine
MAX_DETAIL = 200  # characters of a symbol detail (virus names, file names, reasons)


@dataclass(frozen=True, slots=True)
class ScanInput:
    """One message as the scanners see it: wire-format bytes plus envelope facts."""

    raw: bytes  # the message as received (CRLF line ends, dot-unstuffed)
    queue_id: str = ""
    client_ip: str = ""
    helo: str = ""
    sender: str = ""  # "" is the null reverse-path
    recipients: tuple[str, ...] = ()
    direction: Direction = Direction.INBOUND
    auth_user: str | None = None
    # Header fields a scanner asks to prepend when the message is delivered (the
    # ``Authentication-Results`` of ``scan.mailauth``); appended to, never rebound.
    headers: list[tuple[str, str]] = field(default_factory=list, compare=False)

    @staticmethod
    def from_snapshot(raw: bytes, snap: EnvelopeSnapshot) -> ScanInput:
        return ScanInput(
            raw=raw,
            queue_id=snap.queue_id,
            client_ip=snap.client_ip,
            helo=snap.client_helo,
            sender=snap.mail_from,
            recipients=snap.recipients,
            direction=snap.direction,
            auth_user=snap.auth_user,
        )


@runtime_checkable
class Scanner(Protocol):
    """A content scanner backend (one method, like every backend interface here)."""

    name: str  # upper-case, used as the symbol prefix: "CLAMAV", "RSPAMD", "BUILTIN"

    async def scan(self, msg: ScanInput) -> list[Symbol]: ...


def clean_detail(text: str, limit: int = MAX_DETAIL) -> str:
    """``text`` with control characters replaced and cut to ``limit`` characters."""
    if len(text) <= limit and text.isprintable():  # the common case, checked in C
        return text
    out = "".join(c if c.isprintable() else "?" for c in text[: limit + 1])
    return out if len(out) <= limit else out[: limit - 3] + "..."


def fail_symbol(scanner: str, reason: str) -> Symbol:
    """The symbol a scanner adds when it cannot give a verdict."""
    return Symbol(f"{scanner.upper()}{FAIL_SUFFIX}", 0.0, clean_detail(reason))


def is_fail(symbol: Symbol) -> bool:
    return symbol.name.endswith(FAIL_SUFFIX)


def is_virus(symbol: Symbol) -> bool:
    return symbol.name.endswith(VIRUS_SUFFIX)

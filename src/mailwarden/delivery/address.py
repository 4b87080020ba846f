"""Envelope address checks and result helpers shared by every transport.

``unsafe_address(addr)`` tells whether an address carries characters that could inject SMTP
commands or header lines; ``split_envelope(item, remote)`` separates the recipients a
transport may use from those it must refuse (with their BOUNCED results already made);
``result(...)`` / ``results_for(...)`` build ``RecipientResult`` objects; ``domain_of``
returns the lower-cased domain part of an address; ``needs_smtputf8`` says whether an
envelope needs the SMTPUTF8 extension.

Security: this is the gate against command injection (aiosmtplib-class, CVE-2024-27305):
an address with CR, LF, NUL or any other ASCII control character never reaches a wire or a
file. The sender is refused with 5.1.7, recipients with 5.1.3 (RFC 3463).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from mailwarden.core.types import DeliveryStatus, RecipientResult, TLSInfo
from mailwarden.delivery.base import DeliveryItem

# Any ASCII control character (C0 and DEL): CR, LF and NUL are the dangerous ones, the others
# have no business in an address either.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_ADDRESS_LENGTH = 998  # longer than any SMTP command line could carry; refuse outright


def unsafe_address(addr: str) -> bool:
    """True if ``addr`` must never be put on a wire (control characters, absurd length)."""
    return bool(_CONTROL.search(addr)) or len(addr) > MAX_ADDRESS_LENGTH


def domain_of(addr: str) -> str:
    """The lower-cased domain of ``addr`` without a trailing dot ("" when there is none)."""
    _, at, domain = addr.rpartition("@")
    return domain.lower().rstrip(".") if at else ""


def needs_smtputf8(item: DeliveryItem) -> bool:
    """True if the envelope (or the message, as flagged at reception) needs SMTPUTF8."""
    if item.snapshot.smtputf8:
        return True
    return not (item.mail_from.isascii() and all(r.isascii() for r in item.recipients))


def _default_enhanced(code: int) -> str:
    return f"{code // 100}.0.0" if 200 <= code < 600 else "4.0.0"


def status_for(code: int) -> DeliveryStatus:
    """2xx delivered, 5xx bounced, everything else (4xx, nonsense) deferred."""
    if 200 <= code < 300:
        return DeliveryStatus.DELIVERED
    if 500 <= code < 600:
        return DeliveryStatus.BOUNCED
    return DeliveryStatus.DEFERRED


def result(
    recipient: str,
    code: int,
    enhanced: str,
    text: str,
    remote_host: str = "",
    tls: TLSInfo | None = None,
) -> RecipientResult:
    """One result; the status follows from the reply code."""
    return RecipientResult(
        recipient=recipient,
        status=status_for(code),
        code=code,
        enhanced=enhanced or _default_enhanced(code),
        text=text,
        remote_host=remote_host,
        tls=tls,
    )


def results_for(
    recipients: Iterable[str],
    code: int,
    enhanced: str,
    text: str,
    remote_host: str = "",
    tls: TLSInfo | None = None,
) -> list[RecipientResult]:
    """The same result for every recipient."""
    return [result(r, code, enhanced, text, remote_host, tls) for r in recipients]


def split_envelope(
    item: DeliveryItem, remote_host: str = ""
) -> tuple[list[str], list[RecipientResult]]:
    """Return (recipients that are safe to use, BOUNCED results for the others).

    An unsafe sender bounces every recipient: nothing may be sent for this item.
    """
    if unsafe_address(item.mail_from):
        return [], results_for(
            item.recipients,
            553,
            "5.1.7",
            "sender address contains forbidden characters (control characters)",
            remote_host,
        )
    good: list[str] = []
    bad: list[RecipientResult] = []
    for rcpt in item.recipients:
        if unsafe_address(rcpt) or not rcpt:
            bad.append(
                result(
                    rcpt,
                    553,
                    "5.1.3",
                    "recipient address contains forbidden characters (control characters)",
                    remote_host,
                )
            )
        else:
            good.append(rcpt)
    return good, bad

"""SMTP replies: formatting, and the one mapping from policy ``Decision`` to the wire.

``reply_for(decision)`` turns a ``Decision`` into ``(code, enhanced, text)``; this is the only
place that happens. ``format_reply`` renders one (possibly multi-line) reply as bytes.

Public names: ``reply_for``, ``format_reply``, ``clean_text``.
Security: reply text can carry untrusted data (addresses, HELO names via policy reasons);
``clean_text`` removes CR, LF and other control characters so a reply is always one line
per element and can never inject protocol lines.
"""

from __future__ import annotations

import re

from mailwarden.core.types import Action, Decision

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_REPLY_TEXT = 400  # characters of reply text kept (RFC 5321 4.5.3.1.5: 512 per line)

# Default (code, enhanced, text) per action when the decision does not override them.
_DEFAULTS: dict[Action, tuple[int, str, str]] = {
    Action.ACCEPT: (250, "2.0.0", "Ok"),
    Action.CONTINUE: (250, "2.0.0", "Ok"),
    Action.REJECT: (550, "5.7.1", "Rejected by policy"),
    Action.TEMPFAIL: (451, "4.3.0", "Temporary failure, try again later"),
    Action.DISCONNECT: (421, "4.7.0", "Closing connection"),
}


def clean_text(text: str) -> str:
    """Reply text safe for one protocol line: no control characters, bounded length."""
    text = _CONTROL.sub("?", text)
    return text if len(text) <= MAX_REPLY_TEXT else text[:MAX_REPLY_TEXT] + "..."


def reply_for(decision: Decision) -> tuple[int, str, str]:
    """The SMTP reply for a policy decision: ``(code, enhanced status, text)``.

    The text ends with `` (CONTROL-ID)`` when the decision names the control it enforces.
    A code whose class does not match the action is ignored (a REJECT is never a 2xx).
    """
    code, enhanced, text = _DEFAULTS[decision.action]
    if decision.code is not None and str(decision.code)[0] == str(code)[0]:
        code = decision.code
    if decision.enhanced and decision.enhanced[0] == str(code)[0]:
        enhanced = decision.enhanced
    if decision.reason:
        text = decision.reason
    text = clean_text(text)
    if decision.control is not None:
        text = f"{text} ({decision.control.value})"
    return code, enhanced, text


def format_reply(code: int, enhanced: str, text: str | list[str]) -> bytes:
    """Render a reply; a list of texts gives a multi-line reply (``250-...`` then ``250 ...``).

    ``enhanced`` may be empty (greeting, EHLO) to omit the enhanced status code.
    """
    lines = [text] if isinstance(text, str) else text
    prefix = f"{enhanced} " if enhanced else ""
    out = []
    last = len(lines) - 1
    for i, line in enumerate(lines):
        sep = " " if i == last else "-"
        out.append(f"{code}{sep}{prefix}{clean_text(line)}\r\n")
    return "".join(out).encode("utf-8")

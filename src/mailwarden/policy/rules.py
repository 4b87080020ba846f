"""Policy rules: small functions, one decision each, listed in tables per SMTP stage.

A rule takes a ``CheckContext`` and returns a ``Decision``; ``Action.CONTINUE`` means "no
opinion, ask the next rule". A rule may also return an awaitable of a ``Decision`` (for
lookups that wait on I/O). ``DEFAULT_RULES`` maps each stage to its rule list and
``FALLBACK`` gives the decision when every rule said CONTINUE: a recipient no rule accepted
is refused (relay access denied, SU-6); the other stages default to accept.
``DEFAULT_RULES`` is the minimal table (hosted domains only); ``Policy`` runs the full one
from ``policy.relay`` (``policy.engine.default_rules``).

Public names: ``Stage``, ``CheckContext``, ``Rule``, ``RELAY_DENIED``, ``DEFAULT_RULES``,
``FALLBACK``, and the rule functions.
Security: rules read untrusted values (HELO name, addresses, headers) from the context.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

from mailwarden.config import Config
from mailwarden.core.controls import Control
from mailwarden.core.types import Action, Decision, Envelope, Session


class Stage(StrEnum):
    """The SMTP stage a check runs at."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


@dataclass(frozen=True, slots=True)
class CheckContext:
    """Everything a rule may look at. ``value`` is the stage's subject: HELO name, sender,
    recipient (as stored: ``local@domain`` or ``postmaster``) or the raw header section."""

    cfg: Config
    stage: Stage
    session: Session
    envelope: Envelope | None
    value: str | bytes


Rule = Callable[[CheckContext], Decision | Awaitable[Decision]]

RELAY_DENIED = Decision(
    Action.REJECT, "Relay access denied", Control.SU_6, code=554, enhanced="5.7.1"
)
_RCPT_OK = Decision(Action.ACCEPT, "Ok", enhanced="2.1.5")


def accept_bare_postmaster(ctx: CheckContext) -> Decision:
    """RFC 5321 4.5.1: ``<postmaster>`` without a domain is always accepted (CP-R4)."""
    return _RCPT_OK if ctx.value == "postmaster" else Decision.cont()


def accept_hosted_domain(ctx: CheckContext) -> Decision:
    """Recipients in a hosted domain are ours to take."""
    value = ctx.value
    if isinstance(value, str):
        at = value.rfind("@")
        if at >= 0 and ctx.cfg.is_hosted(value[at + 1 :]):
            return _RCPT_OK
    return Decision.cont()


DEFAULT_RULES: dict[Stage, tuple[Rule, ...]] = {
    Stage.CONNECT: (),
    Stage.HELO: (),
    Stage.MAIL: (),
    Stage.RCPT: (accept_bare_postmaster, accept_hosted_domain),
    Stage.DATA: (),
}

FALLBACK: dict[Stage, Decision] = {
    Stage.CONNECT: Decision.accept(),
    Stage.HELO: Decision.accept(),
    Stage.MAIL: Decision.accept(),
    Stage.RCPT: RELAY_DENIED,  # a recipient is refused unless a rule accepts it
    Stage.DATA: Decision.accept(),
}

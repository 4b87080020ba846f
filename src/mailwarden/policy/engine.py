"""The policy engine: runs the rule table of each SMTP stage and answers with a ``Decision``.

The first rule that does not answer CONTINUE decides; if none does, ``rules.FALLBACK``
does (recipients: refused). A rule that raises, returns something that is not a
``Decision``, or takes longer than ``timeout`` seconds gives TEMPFAIL (451 4.3.0), never an
accept (fail closed).

Public names: ``Policy``, ``POLICY_ERROR``.
Security: evaluates untrusted client data through the rules; errors are logged as events
without the data that caused them.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Mapping, Sequence

from mailwarden.config import Config
from mailwarden.core.events import emit
from mailwarden.core.types import Action, Decision, Envelope, Session
from mailwarden.policy.rules import DEFAULT_RULES, FALLBACK, CheckContext, Rule, Stage

RULE_TIMEOUT = 20.0  # seconds one awaitable rule may take before the check tempfails
POLICY_ERROR = Decision(
    Action.TEMPFAIL, "Temporary policy failure, try again later", code=451, enhanced="4.3.0"
)


class Policy:
    """Decides who may send what, stage by stage, from a table of rules."""

    def __init__(
        self,
        cfg: Config,
        rules: Mapping[Stage, Sequence[Rule]] | None = None,
        *,
        timeout: float = RULE_TIMEOUT,
    ) -> None:
        self.cfg = cfg
        table = dict(DEFAULT_RULES)
        if rules is not None:
            table.update({stage: tuple(r) for stage, r in rules.items()})
        self.rules: dict[Stage, tuple[Rule, ...]] = {s: tuple(r) for s, r in table.items()}
        self.timeout = timeout

    async def check_connect(self, session: Session) -> Decision:
        return await self._run(Stage.CONNECT, session, None, session.peer_ip)

    async def check_helo(self, session: Session, name: str) -> Decision:
        return await self._run(Stage.HELO, session, None, name)

    async def check_mail(self, session: Session, envelope: Envelope, sender: str) -> Decision:
        return await self._run(Stage.MAIL, session, envelope, sender)

    async def check_rcpt(self, session: Session, envelope: Envelope, rcpt: str) -> Decision:
        return await self._run(Stage.RCPT, session, envelope, rcpt)

    async def check_data(self, session: Session, envelope: Envelope, headers: bytes) -> Decision:
        """``headers`` is the raw header section of the message (CRLF line ends)."""
        return await self._run(Stage.DATA, session, envelope, headers)

    async def _run(
        self, stage: Stage, session: Session, envelope: Envelope | None, value: str | bytes
    ) -> Decision:
        ctx = CheckContext(self.cfg, stage, session, envelope, value)
        for rule in self.rules.get(stage, ()):
            try:
                result = rule(ctx)
                if inspect.isawaitable(result):
                    async with asyncio.timeout(self.timeout):
                        result = await result
            except Exception as exc:
                emit(
                    "policy.error",
                    session=session.session_id,
                    stage=stage.value,
                    rule=getattr(rule, "__name__", repr(rule)),
                    error=type(exc).__name__,
                )
                return POLICY_ERROR
            if not isinstance(result, Decision):
                emit(
                    "policy.error",
                    session=session.session_id,
                    stage=stage.value,
                    rule=getattr(rule, "__name__", repr(rule)),
                    error="not a Decision",
                )
                return POLICY_ERROR
            if result.action is not Action.CONTINUE:
                return result
        return FALLBACK[stage]

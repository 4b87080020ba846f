"""The policy engine: runs the rule table of each SMTP stage and answers with a ``Decision``.

The first rule that does not answer CONTINUE decides; if none does, ``rules.FALLBACK``
does (recipients: refused). A rule that raises, returns something that is not a
``Decision``, or takes longer than ``timeout`` seconds gives TEMPFAIL (451 4.3.0), never an
accept (fail closed). Decisions are ``policy.decision`` events (stage, action, reply,
control): by default (``[policy] decision_events = "notable"``) every refusal and every
accept that names a control; ``"all"`` adds the plain accepts, ``"refusals"`` drops the
accepts.

The default table is issue 3's (``policy.relay.RelayRules`` over a ``PolicyState``):
blocks and connection rate at connect, sender-login check at MAIL, relay control,
recipient directories and the harvest defence at RCPT, outbound quotas at end of DATA.
``await policy.start()`` connects the data store (registered senders, blocks, users);
without it the policy runs on the configuration alone.

Public names: ``Policy``, ``POLICY_ERROR``, ``CONNECT_ERROR``, ``default_rules``.
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
from mailwarden.policy.relay import RelayRules
from mailwarden.policy.rules import FALLBACK, CheckContext, Rule, Stage
from mailwarden.policy.state import PolicyState
from mailwarden.smtp.reply import reply_for

RULE_TIMEOUT = 20.0  # seconds one awaitable rule may take before the check tempfails
POLICY_ERROR = Decision(
    Action.TEMPFAIL, "Temporary policy failure, try again later", code=451, enhanced="4.3.0"
)
# At connect a failed check closes the session (a greeting can only be 220, 421 or 554).
CONNECT_ERROR = Decision(
    Action.DISCONNECT, "Temporary policy failure, try again later", code=421, enhanced="4.3.0"
)
MAX_REPLY_CACHE = 4096  # rendered replies remembered per decision
_QUIET = (Action.ACCEPT, Action.CONTINUE)


def default_rules(state: PolicyState) -> dict[Stage, tuple[Rule, ...]]:
    relay = RelayRules(state)
    return {
        Stage.CONNECT: (relay.connect,),
        Stage.HELO: (),
        Stage.MAIL: (relay.mail,),
        Stage.RCPT: (relay.rcpt,),
        Stage.DATA: (relay.data,),
    }


class Policy:
    """Decides who may send what, stage by stage, from a table of rules."""

    def __init__(
        self,
        cfg: Config,
        rules: Mapping[Stage, Sequence[Rule]] | None = None,
        *,
        timeout: float = RULE_TIMEOUT,
        state: PolicyState | None = None,
    ) -> None:
        self.cfg = cfg
        self.state = state or PolicyState(cfg)
        table = default_rules(self.state)
        if rules is not None:
            table.update({stage: tuple(r) for stage, r in rules.items()})
        self.rules: dict[Stage, tuple[Rule, ...]] = {s: tuple(r) for s, r in table.items()}
        self.timeout = timeout
        self.all_events = cfg.policy.decision_events == "all"
        self.control_events = cfg.policy.decision_events == "notable"
        self._replies: dict[Decision, str] = {}

    async def start(self, *, wait: float | None = None) -> None:
        """Connect the data store and load its caches (registered senders, blocks, users);
        ``wait``: at most that many seconds (``PolicyState.start``)."""
        await self.state.start(wait=wait)

    async def close(self) -> None:
        await self.state.close()

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
        decision = await self._decide(stage, session, envelope, value)
        if decision is POLICY_ERROR and stage is Stage.CONNECT:
            decision = CONNECT_ERROR
        if (
            self.all_events
            or decision.action not in _QUIET
            or (self.control_events and decision.control is not None)
        ):
            self._event(stage, session, value, decision)
        return decision

    async def _decide(
        self, stage: Stage, session: Session, envelope: Envelope | None, value: str | bytes
    ) -> Decision:
        ctx = CheckContext(self.cfg, stage, session, envelope, value)
        for rule in self.rules.get(stage, ()):
            try:
                result = rule(ctx)
                if inspect.isawaitable(result):
                    if asyncio.current_task() is None:
                        # Run eagerly by the SMTP edge (smtp.aio): no task to time out
                        # here; the edge bounds the whole check (smtp.limits.POLICY_TIMEOUT).
                        result = await result
                    else:
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

    def _event(self, stage: Stage, session: Session, value: str | bytes, d: Decision) -> None:
        reply = self._replies.get(d)
        if reply is None:
            code, enhanced, text = reply_for(d)
            reply = f"{code} {enhanced} {text}"
            if len(self._replies) >= MAX_REPLY_CACHE:
                self._replies.clear()
            self._replies[d] = reply
        emit(
            "policy.decision",
            session=session.session_id,
            client=session.peer_ip,
            stage=stage.value,
            action=d.action.value,
            reply=reply,
            control=d.control,
            sender=value if stage is Stage.MAIL else None,
            recipient=value if stage is Stage.RCPT else None,
        )

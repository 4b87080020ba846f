"""Relay control and sender checks: the rules that decide who may send what where.

``RelayRules(state)`` provides one rule per stage (for ``policy.rules`` tables):

- connect: a blocked address is refused (CP-E2); connection rate per address;
- MAIL: an authenticated user may only use its own addresses (sender-login map);
- RCPT: a hosted-domain recipient is inbound: a local part with ``%``, ``!`` or ``@``
  (percent hack, bang path, quoted ``"a@b"``) is a relay attempt and refused (SU-6); the
  role accounts ``abuse@``/``postmaster@`` are always accepted (CP-R4); otherwise the
  domain's directory decides, and an unknown address is ``550 5.1.1`` via the harvest
  defence. Any other recipient is outbound relaying: allowed only for registered servers,
  authenticated users and (``relay_from_campus``) campus networks; off-campus clients get
  ``554 5.7.1 Relay access denied (SU-6)``, unregistered campus hosts a reply saying how to
  register (SU-1); address literals are never relayed. A registered server may only use
  envelope senders of its registered domains (``553 5.7.1``). An accepted outbound
  recipient counts against the hourly quota and marks the envelope OUTBOUND;
- end of DATA: an outbound message counts against the hourly message quota.

While the database has never been loaded (``PolicyState.unavailable``: it was unreachable
since the worker started) the answers it could change are ``STORE_TEMPFAIL`` (``451
4.3.0``), never a refusal or an accept it might contradict: relaying by a campus host (it
may be a server registered in the database, SU-1), a registered server's envelope sender
outside its configured domains, an authenticated user's sender address. Inbound mail to a
directory that does not need the database, and off-campus relay attempts, are decided as
usual.

A rule answers synchronously when it can (the default configuration never waits on I/O
for a recipient) and returns a coroutine only for real lookups.

Public names: ``RelayRules``, ``RELAY_HACK``, ``RCPT_OK``, ``not_registered``,
``SENDER_NOT_ALLOWED``, ``DIRECTORY_TEMPFAIL``, ``STORE_TEMPFAIL``.
Security: every value is untrusted client input (already syntax-checked by
``smtp.address``); decisions use the socket peer address and the AUTH identity only.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

from mailwarden.core.controls import Control
from mailwarden.core.types import Action, Decision, Direction, Envelope, Session
from mailwarden.policy.clients import Client, ClientKind
from mailwarden.policy.recipients import Lookup, RecipientDirectory
from mailwarden.policy.rules import RELAY_DENIED, CheckContext

if TYPE_CHECKING:
    from mailwarden.policy.state import PolicyState

ROUTING_CHARS = ("%", "!", "@")  # in a local part: an attempt to route through us

RCPT_OK = Decision(Action.ACCEPT, "Ok", enhanced="2.1.5")
RCPT_ROLE_OK = Decision(Action.ACCEPT, "Ok", Control.CP_R4, enhanced="2.1.5")
RCPT_RELAY_OK = Decision(Action.ACCEPT, "Ok", Control.SU_1, enhanced="2.1.5")
RELAY_HACK = Decision(
    Action.REJECT,
    "Relay access denied: routing characters in the local part",
    Control.SU_6,
    code=554,
    enhanced="5.7.1",
)
LITERAL_DENIED = Decision(
    Action.REJECT,
    "Relay access denied: address literals are not relayed",
    Control.SU_6,
    code=554,
    enhanced="5.7.1",
)
SENDER_NOT_ALLOWED = Decision(
    Action.REJECT,
    "Sender address rejected: not a domain this server is registered for",
    Control.SU_1,
    code=553,
    enhanced="5.7.1",
)
SENDER_NOT_OWNED = Decision(
    Action.REJECT,
    "Sender address rejected: not owned by the authenticated user",
    Control.SU_1,
    code=553,
    enhanced="5.7.1",
)
DIRECTORY_TEMPFAIL = Decision(
    Action.TEMPFAIL,
    "Recipient lookup failed, try again later",
    code=451,
    enhanced="4.3.0",
)

STORE_TEMPFAIL = Decision(
    Action.TEMPFAIL,
    "Temporary lookup failure: the sender registry is unavailable, try again later",
    code=451,
    enhanced="4.3.0",
)


def not_registered(ip: str, hint: str) -> Decision:
    """SU-1: what an unregistered campus host is told when it tries to send out."""
    return Decision(
        Action.REJECT,
        f"Relay access denied: {ip} is not a registered mail server; to send mail off "
        f"campus, {hint}",
        Control.SU_1,
        code=554,
        enhanced="5.7.1",
    )


def _domain(address: str) -> str:
    at = address.rfind("@")
    return address[at + 1 :].lower() if at >= 0 else ""


class RelayRules:
    """The policy rules of issue 3, bound to the shared ``PolicyState``."""

    def __init__(self, state: PolicyState) -> None:
        self.state = state
        self.cfg = state.cfg
        self.hosted = frozenset(state.cfg.gateway.hosted_domains)
        self.relay_from_campus = state.cfg.policy.relay_from_campus
        self.hint = state.cfg.policy.register_hint
        self._unregistered: dict[str, Decision] = {}

    # -- connect ------------------------------------------------------------------------
    def connect(self, ctx: CheckContext) -> Decision | Awaitable[Decision]:
        st = self.state
        blocked = st.harvest.check_connect(ctx.session.peer_ip)
        if blocked is not None:
            return blocked
        if not st.cfg.policy.connection_rate:
            return Decision.cont()
        return self._connection_rate(st.classifier.classify(ctx.session))

    async def _connection_rate(self, client: Client) -> Decision:
        return await self.state.rates.connection(client) or Decision.cont()

    # -- MAIL ---------------------------------------------------------------------------
    def mail(self, ctx: CheckContext) -> Decision:
        user = ctx.session.auth_user
        if user is None:
            return Decision.cont()
        sender = str(ctx.value).lower()
        allowed = self.state.sender_logins.get(user, frozenset())
        if sender and (sender in allowed or sender == user.lower()):
            return Decision.cont()
        if sender and self.state.unavailable:  # the sender-login map has not been loaded
            return STORE_TEMPFAIL
        return SENDER_NOT_OWNED

    # -- RCPT ---------------------------------------------------------------------------
    def rcpt(self, ctx: CheckContext) -> Decision | Awaitable[Decision]:
        value = ctx.value
        env = ctx.envelope
        if not isinstance(value, str) or env is None:
            return Decision.cont()
        if value == "postmaster":  # RFC 5321 4.5.1 bare <postmaster>
            return RCPT_ROLE_OK
        at = value.rfind("@")
        local, domain = value[:at], value[at + 1 :].lower()
        if domain in self.hosted:
            return self._inbound(ctx.session, local, value, domain)
        return self._outbound(ctx.session, env, domain)

    def _inbound(
        self, session: Session, local: str, address: str, domain: str
    ) -> Decision | Awaitable[Decision]:
        if any(c in local for c in ROUTING_CHARS):
            return RELAY_HACK
        st = self.state
        if st.harvest.honeypots and st.harvest.is_honeypot(address):
            return st.harvest.invalid(session, st.classifier.classify(session), address)
        if local.lower() in ("abuse", "postmaster"):
            return RCPT_ROLE_OK
        directory = st.recipients.directory_for(domain)
        found = directory.peek(address)
        if found is Lookup.KNOWN:
            return RCPT_OK
        if found is Lookup.TEMPFAIL:
            return DIRECTORY_TEMPFAIL
        return self._lookup(session, directory, address, found)

    async def _lookup(
        self, session: Session, directory: RecipientDirectory, address: str, found: Lookup | None
    ) -> Decision:
        if found is None:
            found = await directory.lookup(address)
        if found is Lookup.KNOWN:
            return RCPT_OK
        if found is Lookup.TEMPFAIL:
            return DIRECTORY_TEMPFAIL
        st = self.state
        return await st.harvest.invalid(session, st.classifier.classify(session), address)

    def _outbound(
        self, session: Session, env: Envelope, domain: str
    ) -> Decision | Awaitable[Decision]:
        if domain.startswith("["):
            return LITERAL_DENIED
        client = self.state.classifier.classify(session)
        kind = client.kind
        if kind is ClientKind.OFF_CAMPUS:
            return RELAY_DENIED
        if kind is ClientKind.CAMPUS and not self.relay_from_campus:
            if self.state.unavailable:  # it may be registered in the database (SU-1)
                return STORE_TEMPFAIL
            refusal = self._unregistered.get(client.ip)
            if refusal is None:
                refusal = not_registered(client.ip, self.hint)
                if len(self._unregistered) < 4096:
                    self._unregistered[client.ip] = refusal
            return refusal
        if kind is ClientKind.REGISTERED:
            assert client.sender is not None
            sender_domain = _domain(env.mail_from)
            if env.mail_from and sender_domain not in client.sender.domains:
                return STORE_TEMPFAIL if self.state.unavailable else SENDER_NOT_ALLOWED
        return self._count_recipient(session, env, client)

    async def _count_recipient(self, session: Session, env: Envelope, client: Client) -> Decision:
        over = await self.state.rates.outbound_recipient(session, client)
        if over is not None:
            return over
        env.direction = Direction.OUTBOUND
        return RCPT_RELAY_OK

    # -- end of DATA --------------------------------------------------------------------
    def data(self, ctx: CheckContext) -> Decision | Awaitable[Decision]:
        env = ctx.envelope
        if env is None or env.direction is not Direction.OUTBOUND:
            return Decision.cont()
        return self._count_message(ctx.session)

    async def _count_message(self, session: Session) -> Decision:
        client = self.state.classifier.classify(session)
        over = await self.state.rates.outbound_message(session, client)
        return over or Decision.cont()

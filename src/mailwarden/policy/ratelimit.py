"""Rate limits (SU-1): connection rate per client address, and outbound messages and
recipients per hour per registered server and per authenticated user.

Concurrent connections per client address are enforced by the SMTP edge
(``[limits] max_connections_per_client``). Here: ``connection_rate`` new connections per
``connection_rate_window`` for clients that are not registered servers (``421 4.7.0`` and
close); ``*_recipients_per_hour`` counted at each accepted outbound RCPT and
``*_messages_per_hour`` at the end of DATA of an outbound message: past the quota,
``451 4.7.1`` (TEMPFAIL: the mail is kept by the sender and arrives once the hour is over
or the operator raised the quota) and one ``policy.rate_alert`` event per window, so a
mass-mailing virus on one campus machine is stopped and reported within minutes.
A limit of 0 disables that limit.

Public names: ``RateLimiter``, ``HOUR``.
Security: counts by socket address, registered network or authenticated login, never by
anything the client claims (HELO, envelope sender).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailwarden.core.controls import Control
from mailwarden.core.events import emit
from mailwarden.core.types import Action, Decision, Session
from mailwarden.policy.clients import Client, ClientKind
from mailwarden.policy.counters import CounterStore

if TYPE_CHECKING:
    from mailwarden.policy.settings import PolicySettings

HOUR = 3600.0

TOO_MANY_CONNECTIONS = Decision(
    Action.DISCONNECT,
    "Too many connections from your address, try again later",
    code=421,
    enhanced="4.7.0",
)


def _over_quota(what: str) -> Decision:
    return Decision(
        Action.TEMPFAIL,
        f"Rate limit exceeded: too many {what} per hour, try again later",
        Control.SU_1,
        code=451,
        enhanced="4.7.1",
    )


MESSAGES_OVER = _over_quota("messages")
RECIPIENTS_OVER = _over_quota("recipients")


class RateLimiter:
    def __init__(self, settings: PolicySettings, counters: CounterStore) -> None:
        self.s = settings
        self.counters = counters

    async def connection(self, client: Client) -> Decision | None:
        limit = self.s.connection_rate
        if not limit or client.kind is ClientKind.REGISTERED:
            return None
        n = await self.counters.incr("conn:" + client.ip, self.s.connection_rate_window)
        return TOO_MANY_CONNECTIONS if n > limit else None

    def _limits(self, client: Client) -> tuple[int, int]:
        if client.kind is ClientKind.AUTHENTICATED:
            return self.s.user_messages_per_hour, self.s.user_recipients_per_hour
        if client.kind is ClientKind.REGISTERED:
            return self.s.sender_messages_per_hour, self.s.sender_recipients_per_hour
        return 0, 0  # campus relaying (relay_from_campus) is limited per address below

    async def outbound_recipient(self, session: Session, client: Client) -> Decision | None:
        _, limit = self._limits(client)
        return await self._count(session, client, "rcpt", "recipients", limit, RECIPIENTS_OVER)

    async def outbound_message(self, session: Session, client: Client) -> Decision | None:
        limit, _ = self._limits(client)
        return await self._count(session, client, "msg", "messages", limit, MESSAGES_OVER)

    async def _count(
        self,
        session: Session,
        client: Client,
        key: str,
        what: str,
        limit: int,
        refusal: Decision,
    ) -> Decision | None:
        if client.kind is ClientKind.CAMPUS:  # relay_from_campus: the sender quota applies
            limit = (
                self.s.sender_messages_per_hour
                if key == "msg"
                else (self.s.sender_recipients_per_hour)
            )
        if not limit:
            return None
        n = await self.counters.incr(f"rate:{key}:{client.rate_key}", HOUR)
        if n <= limit:
            return None
        if n == limit + 1:  # the first refusal of this window raises the alarm once
            emit(
                "policy.rate_alert",
                session=session.session_id,
                client=client.ip,
                who=client.rate_key,
                sender_name=client.sender.name if client.sender else client.user,
                kind=what,
                count=n,
                limit=limit,
                window=HOUR,
                control=Control.SU_1,
            )
        return refusal

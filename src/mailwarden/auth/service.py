"""The AUTH service the SMTP edge calls: throttling, the backend with a deadline, delays.

``AuthService.attempt(client, login, password) -> Attempt`` answers one AUTH exchange:

1. ``AuthThrottle.check``: a client past its hard limit is ``DISCONNECT`` (421); a client or
   login past its soft limit is ``THROTTLED`` (454 4.7.0) without asking the backend;
2. the backend, bounded by ``[auth] timeout``: an error or a timeout is ``TEMPFAIL``
   (454 4.7.0), never a success;
3. a failure is counted per client and per login, answered after ``failure_delay`` seconds,
   and marks the session for disconnection once the client reaches the hard limit.

``build_auth_service(cfg)`` makes the configured backend (``[auth] backend``) and the
failure counters: in process, or the policy stage's shared Redis counters when
``[policy] counters = "redis"``. A counter error is a ``TEMPFAIL`` (fail closed). A
database that cannot be reached at start (``StoreUnavailable``) does not stop the worker:
the backend answers ``TEMPFAIL`` (454) and opens it later (``auth.database``).

Public names: ``Outcome``, ``Attempt``, ``AuthService``, ``build_auth_service``.
Security: the password is handed to the backend and dropped; events carry the escaped login
and the outcome only (``smtp.auth`` is emitted by ``smtp.auth``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from mailwarden.auth.base import Authenticator, AuthResult
from mailwarden.auth.settings import AuthSettings
from mailwarden.auth.throttle import (
    AuthThrottle,
    SharedCounters,
    ThrottleVerdict,
    WindowCounter,
)
from mailwarden.core.events import emit

if TYPE_CHECKING:
    from mailwarden.config import Config


class Outcome(StrEnum):
    OK = "ok"
    INVALID = "invalid"
    TEMPFAIL = "tempfail"  # backend down or too slow
    THROTTLED = "throttled"  # soft limit: not checked
    DISCONNECT = "disconnect"  # hard limit: not checked, 421


@dataclass(frozen=True, slots=True)
class Attempt:
    outcome: Outcome
    disconnect: bool = False  # close the session after the reply (hard limit reached)


class _Closable(Protocol):
    def close(self) -> None: ...


class AuthService:
    """One backend plus the failure throttle, shared by every listener of a worker."""

    def __init__(
        self,
        settings: AuthSettings,
        backend: Authenticator,
        counter: WindowCounter | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.throttle = AuthThrottle(settings, counter)

    @property
    def mechanisms(self) -> tuple[str, ...]:
        return ("PLAIN", "LOGIN")

    async def precheck(self, client: str) -> Attempt | None:
        """Before the exchange starts: refuse a client already past a limit (else None)."""
        verdict = await self.throttle.check(client, None)
        return await self._refusal(client, verdict)

    async def _refusal(self, client: str, verdict: ThrottleVerdict) -> Attempt | None:
        if verdict is ThrottleVerdict.ALLOW:
            return None
        if verdict is ThrottleVerdict.DISCONNECT:
            return Attempt(Outcome.DISCONNECT, disconnect=True)
        hard = await self.throttle.refused(client)
        return Attempt(Outcome.DISCONNECT if hard else Outcome.THROTTLED, disconnect=hard)

    async def attempt(self, client: str, login: str, password: str) -> Attempt:
        refusal = await self._refusal(client, await self.throttle.check(client, login))
        if refusal is not None:
            return refusal
        # A task plus asyncio.wait, not asyncio.timeout: the SMTP edge runs this coroutine's
        # first step eagerly, outside any task (smtp.aio), where asyncio.timeout refuses.
        task = asyncio.ensure_future(self.backend.authenticate(login, password))
        done, _ = await asyncio.wait({task}, timeout=self.settings.timeout)
        if not done:
            task.cancel()
            emit("auth.error", backend=self.backend.name, error="timeout")
            return Attempt(Outcome.TEMPFAIL)
        exc = task.exception()
        if exc is not None:
            emit("auth.error", backend=self.backend.name, error=type(exc).__name__)
            return Attempt(Outcome.TEMPFAIL)
        result = task.result()
        if result is AuthResult.OK:
            return Attempt(Outcome.OK)
        if result is not AuthResult.INVALID:  # TEMPFAIL, or anything unexpected
            return Attempt(Outcome.TEMPFAIL)
        hard = await self.throttle.failed(client, login)
        if self.settings.failure_delay > 0:
            await asyncio.sleep(self.settings.failure_delay)
        return Attempt(Outcome.INVALID, disconnect=hard)

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()


def build_auth_service(
    cfg: Config, counter: WindowCounter | None = None, *, connect: bool = True
) -> AuthService:
    """The configured backend behind an ``AuthService`` (opens the store for 'database').

    ``connect=False``: the caller already knows the database is unreachable; do not wait
    for it here (a connect timeout), open it at a later AUTH instead."""
    settings: AuthSettings = cfg.auth
    backend: Authenticator
    if settings.backend == "ldap":
        from mailwarden.auth.ldap import LdapAuthenticator
        from mailwarden.auth.ldapconn import read_bind_password

        backend = LdapAuthenticator(settings.ldap, read_bind_password(settings.ldap))
    else:
        from mailwarden.auth.database import DatabaseAuthenticator
        from mailwarden.auth.passwords import Hasher
        from mailwarden.errors import StoreUnavailable
        from mailwarden.store import open_store

        store = None
        try:
            if connect:
                store = open_store(cfg)
        except StoreUnavailable:  # the server is down right now: AUTH is 454 until it is back
            store = None
        backend = DatabaseAuthenticator(store, Hasher(settings.argon2), lambda: open_store(cfg))
    if counter is None and cfg.policy.counters == "redis":  # share counts across nodes
        from mailwarden.policy.counters import make_counters

        counter = SharedCounters(make_counters(cfg))
    return AuthService(settings, backend, counter)

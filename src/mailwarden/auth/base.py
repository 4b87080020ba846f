"""The one-method backend interface of SMTP AUTH and the checks every backend shares.

A backend answers ``await authenticate(login, password) -> AuthResult``: ``OK``,
``INVALID`` (wrong password, unknown or disabled user) or ``TEMPFAIL`` (the backend could not
decide: database or directory down, timeout). A backend that raises is treated as
``TEMPFAIL`` by ``auth.service`` — never as a success.

Public names: ``AuthResult``, ``Authenticator``, ``MAX_LOGIN``, ``MAX_PASSWORD``,
``acceptable_credentials``, ``normalise_login``, ``escape_login``.
Security: logins and passwords come from untrusted SMTP clients; ``acceptable_credentials``
refuses empty passwords (an LDAP "unauthenticated bind" would otherwise succeed), control
characters and oversized values before any backend sees them; ``escape_login`` makes a
login safe to put in an event or a terminal.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol

# Longest login accepted (an e-mail address is at most 254 octets; some room for realms).
MAX_LOGIN = 320
# Longest password accepted (argon2 and LDAP accept more; nobody types more than this).
MAX_PASSWORD = 1024


class AuthResult(StrEnum):
    """What a backend decided about one set of credentials."""

    OK = "ok"
    INVALID = "invalid"
    TEMPFAIL = "tempfail"


class Authenticator(Protocol):
    """A password backend: the user database, LDAP, or a test double."""

    name: str

    async def authenticate(self, login: str, password: str) -> AuthResult:
        """Check ``password`` for ``login``; never raise for a wrong password."""
        ...


def normalise_login(login: str) -> str:
    """The form logins are stored and compared in (case-insensitive, no outer blanks)."""
    return login.strip().lower()


def acceptable_credentials(login: str, password: str) -> bool:
    """False for credentials no backend should even be asked about."""
    if not login or not password:
        return False
    if len(login) > MAX_LOGIN or len(password) > MAX_PASSWORD:
        return False
    return login.isprintable() and "\x00" not in password


def escape_login(login: str) -> str:
    """``login`` with non-printable characters as ``\\xNN`` escapes, cut to ``MAX_LOGIN``."""
    out = []
    for ch in login[:MAX_LOGIN]:
        out.append(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii"))
    text = "".join(out)
    return text if len(login) <= MAX_LOGIN else text + "..."

"""The LDAP AUTH backend: search the user's DN, then a simple bind as that DN (ldap3).

``LdapAuthenticator(settings, bind_password)``: for each attempt, connect (``ldaps://`` or
StartTLS unless the directory is on loopback, see ``auth.settings``), bind as the search
account (or anonymously), search ``base`` with ``filter`` where ``{login}`` is replaced by the
login escaped per RFC 4515, require exactly one entry, then bind as that entry's DN with the
user's password on a fresh connection. Runs in a thread (ldap3 is blocking); connect and
every operation have ``timeout`` (connections and the thread pool: ``auth.ldapconn``).
``invalidCredentials`` (or no / several entries) is ``INVALID``; anything else (directory
down, timeout, search account refused) is ``TEMPFAIL``.

Public names: ``LdapAuthenticator``, ``LDAP_THREADS``.
Security: the login is untrusted: it only reaches the directory escaped
(``escape_filter_chars``), and the bind DN is the one the directory returned, never built
from the login. Empty passwords are refused before any bind (an RFC 4513 "unauthenticated
bind" would succeed). Passwords are never logged; errors are reported by type only.
"""

from __future__ import annotations

from ldap3.utils.conv import escape_filter_chars  # type: ignore[import-untyped]

from mailwarden.auth.base import AuthResult, acceptable_credentials
from mailwarden.auth.ldapconn import LDAP_THREADS, LdapClient, LdapTempFail
from mailwarden.auth.settings import LdapSettings
from mailwarden.core.events import emit

__all__ = ["LDAP_THREADS", "LdapAuthenticator"]

_INVALID_CREDENTIALS = 49  # RFC 4511 resultCode invalidCredentials
_NO_SUCH_OBJECT = 32  # the search base does not exist: nobody to authenticate


class LdapAuthenticator:
    """SMTP AUTH by LDAP simple bind."""

    name = "ldap"

    def __init__(self, settings: LdapSettings, bind_password: str = "") -> None:
        self.settings = settings
        self.client = LdapClient(settings, bind_password)

    async def authenticate(self, login: str, password: str) -> AuthResult:
        if not acceptable_credentials(login, password):
            return AuthResult.INVALID
        return await self.client.run(self._check, login, password)

    def _find_dn(self, login: str) -> str | None:
        s = self.settings
        entries = self.client.search(
            s.base,
            s.make_filter(escape_filter_chars(login)),
            size_limit=2,
            ok_codes=(_NO_SUCH_OBJECT,),
        )
        if len(entries) != 1:
            return None  # unknown login, or ambiguous: never guess
        return str(entries[0]["dn"])

    def _check(self, login: str, password: str) -> AuthResult:
        try:
            dn = self._find_dn(login)
            if dn is None:
                return AuthResult.INVALID
            conn = self.client.connection(dn, password)
            try:
                if conn.bind():
                    return AuthResult.OK
                if conn.result.get("result") == _INVALID_CREDENTIALS:
                    return AuthResult.INVALID
                raise LdapTempFail(f"bind: {conn.result.get('description', 'failed')}")
            finally:
                conn.unbind()
        except LdapTempFail as exc:
            emit("auth.error", backend=self.name, error=str(exc))
        except Exception as exc:  # LDAPException, OSError, anything: undecided, never OK
            emit("auth.error", backend=self.name, error=type(exc).__name__)
        return AuthResult.TEMPFAIL

    def close(self) -> None:
        self.client.close()

"""The LDAP AUTH backend: search the user's DN, then a simple bind as that DN (ldap3).

``LdapAuthenticator(settings, bind_password)``: for each attempt, connect (``ldaps://`` or
StartTLS unless the directory is on loopback, see ``auth.settings``), bind as the search
account (or anonymously), search ``base`` with ``filter`` where ``{login}`` is replaced by the
login escaped per RFC 4515, require exactly one entry, then bind as that entry's DN with the
user's password on a fresh connection. Runs in a thread (ldap3 is blocking); connect and
every operation have ``timeout``. ``invalidCredentials`` (or no / several entries) is
``INVALID``; anything else (directory down, timeout, search account refused) is ``TEMPFAIL``.

Public names: ``LdapAuthenticator``, ``LDAP_THREADS``.
Security: the login is untrusted: it only reaches the directory escaped
(``escape_filter_chars``), and the bind DN is the one the directory returned, never built
from the login. Empty passwords are refused before any bind (an RFC 4513 "unauthenticated
bind" would succeed). Passwords are never logged; errors are reported by type only.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from concurrent.futures import ThreadPoolExecutor

import ldap3  # type: ignore[import-untyped]
from ldap3.utils.conv import escape_filter_chars  # type: ignore[import-untyped]

from mailwarden.auth.base import AuthResult, acceptable_credentials
from mailwarden.auth.settings import LdapSettings
from mailwarden.core.events import emit

LDAP_THREADS = 4  # directory round trips at once per process
_INVALID_CREDENTIALS = 49  # RFC 4511 resultCode invalidCredentials


class _TempFail(Exception):
    """The directory could not answer (reason is the exception type or a result name)."""


class LdapAuthenticator:
    """SMTP AUTH by LDAP simple bind."""

    name = "ldap"

    def __init__(self, settings: LdapSettings, bind_password: str = "") -> None:
        self.settings = settings
        self._bind_password = bind_password
        self._pool: ThreadPoolExecutor | None = None
        # ldap3 packs socket timeouts as whole seconds (a float raises struct.error).
        self._seconds = max(1, math.ceil(settings.timeout))
        self._tls = None
        if settings.use_ssl or settings.start_tls:
            self._tls = ldap3.Tls(
                validate=ssl.CERT_REQUIRED,
                ca_certs_file=settings.ca_file or None,
                version=ssl.PROTOCOL_TLS_CLIENT,
            )

    async def authenticate(self, login: str, password: str) -> AuthResult:
        if not acceptable_credentials(login, password):
            return AuthResult.INVALID
        if self._pool is None:
            self._pool = ThreadPoolExecutor(LDAP_THREADS, thread_name_prefix="mw-ldap")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._check, login, password)

    def _connection(self, user: str | None, password: str | None) -> ldap3.Connection:
        # A new Server object each time: ldap3 remembers a failed address for minutes
        # (RESET_AVAILABILITY_TIMEOUT), which would stretch a short outage.
        server = ldap3.Server(
            self.settings.host,
            port=self.settings.port,
            use_ssl=self.settings.use_ssl,
            tls=self._tls,
            get_info=ldap3.NONE,
            connect_timeout=self._seconds,
        )
        conn = ldap3.Connection(
            server,
            user=user,
            password=password,
            authentication=ldap3.SIMPLE if user else ldap3.ANONYMOUS,
            receive_timeout=self._seconds,
            raise_exceptions=False,
            auto_bind=ldap3.AUTO_BIND_NONE,
            read_only=True,
        )
        conn.open()
        if self.settings.start_tls and not conn.start_tls():
            conn.unbind()
            raise _TempFail("StartTLS refused")
        return conn

    def _find_dn(self, login: str) -> str | None:
        s = self.settings
        conn = self._connection(s.bind_dn or None, self._bind_password if s.bind_dn else None)
        try:
            if not conn.bind():
                raise _TempFail(f"search bind: {conn.result.get('description', 'failed')}")
            ok = conn.search(
                s.base,
                s.make_filter(escape_filter_chars(login)),
                search_scope=ldap3.SUBTREE,
                attributes=[],
                size_limit=2,
                time_limit=self._seconds,
            )
            code = conn.result.get("result", 0)
            if not ok and code not in (0, 4, 32):  # success, sizeLimitExceeded, noSuchObject
                raise _TempFail(f"search: {conn.result.get('description', 'failed')}")
            entries = [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
        finally:
            conn.unbind()
        if len(entries) != 1:
            return None  # unknown login, or ambiguous: never guess
        return str(entries[0]["dn"])

    def _check(self, login: str, password: str) -> AuthResult:
        try:
            dn = self._find_dn(login)
            if dn is None:
                return AuthResult.INVALID
            conn = self._connection(dn, password)
            try:
                if conn.bind():
                    return AuthResult.OK
                if conn.result.get("result") == _INVALID_CREDENTIALS:
                    return AuthResult.INVALID
                raise _TempFail(f"bind: {conn.result.get('description', 'failed')}")
            finally:
                conn.unbind()
        except _TempFail as exc:
            emit("auth.error", backend=self.name, error=str(exc))
        except Exception as exc:  # LDAPException, OSError, anything: undecided, never OK
            emit("auth.error", backend=self.name, error=type(exc).__name__)
        return AuthResult.TEMPFAIL

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

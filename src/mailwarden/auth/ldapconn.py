"""Shared LDAP plumbing (ldap3) for the AUTH backend and the recipient directory.

``LdapClient(settings, bind_password)`` holds the ``[auth.ldap]`` connection settings:
``connection(user, password)`` opens one connection (``ldaps://`` or StartTLS as configured,
connect and receive timeouts of ``timeout`` seconds, read-only, no exceptions raised by
ldap3 on LDAP result codes); ``search(base, filter, size_limit)`` binds as the search account
(or anonymously) and returns the ``searchResEntry`` responses; ``run(fn, *args)`` runs a
blocking call on the client's own small thread pool (ldap3 is blocking, the event loop must
never wait on it). ``read_bind_password(settings)`` reads ``bind_password_file``.

Public names: ``LdapClient``, ``LdapTempFail``, ``LDAP_THREADS``, ``read_bind_password``.
Security: callers put untrusted values in a filter only through ``escape_filter_chars``
(``make_filter`` of the settings); the search account's password comes from a file and is
never logged; ``LdapTempFail`` carries a result name or exception type, never a secret.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import ldap3  # type: ignore[import-untyped]

from mailwarden.auth.settings import LdapSettings
from mailwarden.errors import ConfigError

LDAP_THREADS = 4  # directory round trips at once per process and client
_SEARCH_OK = (0, 4)  # success, sizeLimitExceeded (entries up to the limit were returned)

T = TypeVar("T")


class LdapTempFail(Exception):
    """The directory could not answer (reason is the exception type or a result name)."""


def read_bind_password(settings: LdapSettings, key: str = "auth.ldap.bind_password_file") -> str:
    """The search account's password ("" without ``bind_password_file``)."""
    if not settings.bind_password_file:
        return ""
    try:
        return Path(settings.bind_password_file).read_text(encoding="utf-8").strip("\r\n")
    except OSError as exc:
        raise ConfigError(
            f"{key}: cannot read {settings.bind_password_file}: {exc.strerror}"
        ) from exc


class LdapClient:
    """Connections to one directory, and a thread pool to use them from asyncio."""

    def __init__(
        self, settings: LdapSettings, bind_password: str = "", thread_prefix: str = "mw-ldap"
    ) -> None:
        self.settings = settings
        self._bind_password = bind_password
        self._thread_prefix = thread_prefix
        self._pool: ThreadPoolExecutor | None = None
        # ldap3 packs socket timeouts as whole seconds (a float raises struct.error).
        self.seconds = max(1, math.ceil(settings.timeout))
        self._tls = None
        if settings.use_ssl or settings.start_tls:
            self._tls = ldap3.Tls(
                validate=ssl.CERT_REQUIRED,
                ca_certs_file=settings.ca_file or None,
                version=ssl.PROTOCOL_TLS_CLIENT,
            )

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the client's thread pool."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(LDAP_THREADS, thread_name_prefix=self._thread_prefix)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def connection(self, user: str | None, password: str | None) -> ldap3.Connection:
        """An open (not yet bound) connection; StartTLS done when configured."""
        # A new Server object each time: ldap3 remembers a failed address for minutes
        # (RESET_AVAILABILITY_TIMEOUT), which would stretch a short outage.
        server = ldap3.Server(
            self.settings.host,
            port=self.settings.port,
            use_ssl=self.settings.use_ssl,
            tls=self._tls,
            get_info=ldap3.NONE,
            connect_timeout=self.seconds,
        )
        conn = ldap3.Connection(
            server,
            user=user,
            password=password,
            authentication=ldap3.SIMPLE if user else ldap3.ANONYMOUS,
            receive_timeout=self.seconds,
            raise_exceptions=False,
            auto_bind=ldap3.AUTO_BIND_NONE,
            read_only=True,
        )
        conn.open()
        if self.settings.start_tls and not conn.start_tls():
            conn.unbind()
            raise LdapTempFail("StartTLS refused")
        return conn

    def search(
        self, base: str, search_filter: str, size_limit: int, ok_codes: tuple[int, ...] = ()
    ) -> list[dict[str, Any]]:
        """Entries under ``base`` matching ``search_filter`` (no attributes), as the search
        account. Blocking: call it through ``run``. A result code other than success,
        sizeLimitExceeded or one of ``ok_codes`` raises ``LdapTempFail``."""
        s = self.settings
        conn = self.connection(s.bind_dn or None, self._bind_password if s.bind_dn else None)
        try:
            if not conn.bind():
                raise LdapTempFail(f"search bind: {conn.result.get('description', 'failed')}")
            ok = conn.search(
                base,
                search_filter,
                search_scope=ldap3.SUBTREE,
                attributes=[],
                size_limit=size_limit,
                time_limit=self.seconds,
            )
            code = conn.result.get("result", 0)
            if not ok and code not in _SEARCH_OK + ok_codes:
                raise LdapTempFail(f"search: {conn.result.get('description', 'failed')}")
            return [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
        finally:
            conn.unbind()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

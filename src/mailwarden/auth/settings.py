"""Settings of SMTP AUTH, mounted as the ``[auth]`` config section (and ``[auth.ldap]``).

Example (TOML)::

    [auth]
    backend = "ldap"
    client_soft_limit = 10

    [auth.ldap]
    url = "ldaps://ldap.example.edu/"
    base = "ou=people,dc=example,dc=edu"
    filter = "(uid={login})"
    bind_dn = "cn=mailwarden,ou=services,dc=example,dc=edu"
    bind_password_file = "/etc/mailwarden/ldap-password"

AUTH is only ever offered inside TLS on submission listeners; no setting changes that (SU-8).
Every key is documented in ``docs/config.md``.

Public names: ``AuthSettings``, ``LdapSettings``, ``Argon2Settings``, ``check_filter``.
Security: operator-supplied. An LDAP URL that would carry user passwords in clear text over
the network (``ldap://`` to a non-loopback host without ``start_tls``) is refused; the search
account's password is read from a file, never written in the config.
"""

from __future__ import annotations

import ipaddress
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mailwarden.core.durations import Duration

_LOGIN_PLACEHOLDER = "{login}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_filter(v: str, placeholder: str, example: str) -> str:
    """``v`` if it is a parenthesised LDAP filter using ``placeholder`` (and no other braces).

    The placeholder is later replaced by an ``escape_filter_chars``-escaped value only."""
    if v.count(placeholder) < 1:
        raise ValueError(f"ldap filter must contain {placeholder}, e.g. {example}")
    rest = v.replace(placeholder, "")
    if "{" in rest or "}" in rest:
        raise ValueError(f"ldap filter: only the placeholder {placeholder} may use braces")
    if not (v.startswith("(") and v.endswith(")")) or v.count("(") != v.count(")"):
        raise ValueError("ldap filter must be a parenthesised LDAP filter")
    return v


class LdapSettings(_Section):
    """[auth.ldap]: simple bind against a directory (search the DN, then bind as it)."""

    url: str = ""  # ldap://HOST:PORT/ (with start_tls) or ldaps://HOST:PORT/
    start_tls: bool = False  # send StartTLS before any bind
    ca_file: str = ""  # CA bundle that verifies the directory (empty: system CAs)
    base: str = ""  # search base, e.g. ou=people,dc=example,dc=edu
    filter: str = "(uid={login})"  # {login} is replaced by the escaped login
    bind_dn: str = ""  # search account; empty: anonymous search
    bind_password_file: str = ""  # file with the search account's password
    timeout: Duration = 5.0  # connect timeout and per-operation timeout

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
            raise ValueError("ldap url must look like ldap://HOST:PORT/ or ldaps://HOST:PORT/")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"ldap url {v!r}: bad port") from exc
        return v

    @field_validator("filter")
    @classmethod
    def _filter(cls, v: str) -> str:
        return check_filter(v, _LOGIN_PLACEHOLDER, "(uid={login})")

    @model_validator(mode="after")
    def _no_clear_text(self) -> LdapSettings:
        if not self.url:
            return self
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if parts.scheme == "ldap" and not self.start_tls and not _is_loopback(host):
            raise ValueError(
                f"ldap url {self.url!r} would send user passwords in clear text over the "
                "network (SU-8): use ldaps:// or start_tls = true"
            )
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (636 if parts.scheme == "ldaps" else 389)

    @property
    def use_ssl(self) -> bool:
        return urlsplit(self.url).scheme == "ldaps"

    def make_filter(self, escaped_login: str) -> str:
        """The search filter for an already escaped login (``ldap3.utils.conv``)."""
        return self.filter.replace(_LOGIN_PLACEHOLDER, escaped_login)


class Argon2Settings(_Section):
    """[auth.argon2]: parameters of new password hashes (argon2id, RFC 9106).

    A stored hash made with other parameters is re-hashed at the user's next login.
    """

    time_cost: int = Field(default=3, ge=1, le=20)  # iterations
    memory_cost: int = Field(default=65536, ge=8, le=4_194_304)  # KiB
    parallelism: int = Field(default=4, ge=1, le=64)  # lanes


class AuthSettings(_Section):
    """[auth]: SMTP AUTH on submission listeners (always inside TLS, SU-8)."""

    backend: Literal["database", "ldap"] = "database"
    timeout: Duration = 10.0  # a backend slower than this: 454 4.7.0 (never a success)
    failure_window: Duration = 900.0  # sliding window of the failure counters
    # Failures per client address in the window: past the soft limit AUTH answers 454
    # without checking; at the hard limit the session gets 421 and is closed.
    client_soft_limit: int = Field(default=10, ge=1, le=1000)
    client_hard_limit: int = Field(default=30, ge=1, le=1000)
    # Failures per login in the window: past it AUTH for that login answers 454.
    account_soft_limit: int = Field(default=10, ge=1, le=1000)
    # Failed AUTH commands in one session before 421 and disconnect.
    session_max_failures: int = Field(default=3, ge=1, le=100)
    failure_delay: Duration = 1.0  # seconds before each 535 reply (slows guessing)
    argon2: Argon2Settings = Field(default_factory=Argon2Settings)
    ldap: LdapSettings = Field(default_factory=LdapSettings)

    @model_validator(mode="after")
    def _checks(self) -> AuthSettings:
        if self.client_hard_limit < self.client_soft_limit:
            raise ValueError("client_hard_limit must not be below client_soft_limit")
        if self.backend == "ldap" and not (self.ldap.url and self.ldap.base):
            raise ValueError("backend = 'ldap' needs [auth.ldap] url and base")
        if self.failure_delay >= self.timeout:
            raise ValueError("failure_delay must be shorter than timeout")
        return self

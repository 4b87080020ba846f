"""Envelope address parsing per RFC 5321 4.1.2 (with RFC 6531 SMTPUTF8 extensions).

``parse_path`` reads a ``<...>`` reverse- or forward-path at the start of a MAIL/RCPT
argument and returns the ``Address`` and the rest of the line (the ESMTP parameters);
``parse_params`` reads those parameters. Source routes (``<@a,@b:user@dom>``) are accepted
and dropped (RFC 5321 C). The null path ``<>`` is allowed only where the caller says so
(MAIL), as is the bare ``<postmaster>`` (RCPT). Domains are lowercased. Non-ASCII is allowed
only when SMTPUTF8 was requested (then U-label domains are checked with IDNA); otherwise
``NonAsciiAddress`` is raised so the server can answer ``553 5.6.7``.

Public names: ``Address``, ``NonAsciiAddress``, ``parse_path``, ``parse_params``,
``domain_of``.
Security: parses untrusted client input. Refuses CR, LF, NUL and every other control
character, bounds lengths (``smtp.limits``), uses anchored regexes without nested
ambiguous repetition (no catastrophic backtracking).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mailwarden.errors import AddressError
from mailwarden.smtp.limits import MAX_DOMAIN, MAX_LOCAL_PART, MAX_PATH


class NonAsciiAddress(AddressError):
    """A non-ASCII address without SMTPUTF8 (RFC 6531 3.5: 553 5.6.7)."""


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed envelope address. ``local == domain == ""`` is the null path ``<>``;
    ``domain == ""`` with ``local == "postmaster"`` is the bare ``<postmaster>``."""

    local: str
    domain: str

    @property
    def text(self) -> str:
        """The address as stored in the envelope: ``local@domain``, ``""`` or ``postmaster``."""
        if not self.domain:
            return self.local
        return f"{self.local}@{self.domain}"

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain


_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_UTF8 = "\u00a0-\U0010ffff"  # non-ASCII, excluding C1 controls (U+0080..U+009F)
_LDH = "A-Za-z0-9"
_QTEXT = r"\x20\x21\x23-\x5b\x5d-\x7e"  # RFC 5321 qtextSMTP
_QPAIR = r"\\[\x20-\x7e]"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_ROUTE_DOMAIN = r"(?:[A-Za-z0-9.\-]+|\[[\x21-\x5a\x5e-\x7e]+\])"
_ROUTE = rf"(?:@{_ROUTE_DOMAIN}(?:,@{_ROUTE_DOMAIN})*:)?"


def _path_regex(utf8: bool) -> re.Pattern[str]:
    extra = _UTF8 if utf8 else ""
    atom = f"[{_ATEXT}{extra}]+"
    dot_string = rf"{atom}(?:\.{atom})*"
    quoted = rf'"(?:[{_QTEXT}{extra}]|{_QPAIR})*"'
    label = rf"[{_LDH}{extra}](?:[{_LDH}{extra}\-]*[{_LDH}{extra}])?"
    domain = rf"(?:{label}(?:\.{label})*|{_LITERAL})"
    return re.compile(rf"<{_ROUTE}((?:{dot_string}|{quoted}))@({domain})>")


_PATH_ASCII = _path_regex(False)
_PATH_UTF8 = _path_regex(True)
_POSTMASTER = re.compile(r"<postmaster>", re.IGNORECASE)
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9\-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")
# C0 and C1 controls, and the Unicode line and paragraph separators: str.splitlines() and
# other Unicode-aware code break lines there, so an address must never carry them.
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _check_literal(literal: str) -> None:
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError as exc:
        raise AddressError(f"invalid address literal {literal!r}") from exc


def _check_domain(domain: str, utf8: bool) -> str:
    if domain.startswith("["):
        _check_literal(domain)
        return domain.lower()
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("domain too long")
    if any(len(label) > 63 for label in domain.split(".")):
        raise AddressError("domain label too long")
    if utf8 and not domain.isascii():
        try:
            domain.encode("idna")
        except UnicodeError as exc:
            raise AddressError(f"invalid internationalised domain {domain!r}") from exc
    return domain.lower()


def parse_path(
    text: str, *, smtputf8: bool = False, null_ok: bool = False, postmaster_ok: bool = False
) -> tuple[Address, str]:
    """Parse the path at the start of ``text``; return it and the remaining parameter text.

    Raises ``NonAsciiAddress`` for non-ASCII without SMTPUTF8, ``AddressError`` otherwise.
    """
    if _BAD_CHARS.search(text):
        raise AddressError("control character in address")
    if not text.startswith("<"):
        raise AddressError("address must be enclosed in <>")
    if text.startswith("<>"):
        if not null_ok:
            raise AddressError("null address not allowed here")
        addr, end = Address("", ""), 2
    elif postmaster_ok and (m := _POSTMASTER.match(text)):
        addr, end = Address("postmaster", ""), m.end()
    else:
        if not text.isascii() and not smtputf8:
            # The path's own extent (a quoted local part may hold a ">"), else up to the
            # first ">": non-ASCII there needs SMTPUTF8; in the parameters it is an error.
            full = _PATH_UTF8.match(text)
            close = full.end() if full is not None else text.find(">")
            if not text[: close if close > 0 else len(text)].isascii():
                raise NonAsciiAddress("non-ASCII address requires SMTPUTF8")
        pattern = _PATH_UTF8 if smtputf8 else _PATH_ASCII
        m = pattern.match(text)
        if m is None:
            raise AddressError("malformed address")
        if m.end() > MAX_PATH:
            raise AddressError("address too long")
        local, domain = m.group(1), m.group(2)
        if len(local.encode("utf-8")) > MAX_LOCAL_PART:
            raise AddressError("local part too long")
        addr, end = Address(local, _check_domain(domain, smtputf8)), m.end()
    rest = text[end:]
    if rest and not rest.startswith(" "):
        raise AddressError("garbage after address")
    return addr, rest.strip(" ")


def parse_params(text: str) -> dict[str, str]:
    """Parse ESMTP parameters ``KEY[=VALUE] ...`` into an upper-cased dict.

    Raises ``ValueError`` for a malformed or repeated parameter.
    """
    params: dict[str, str] = {}
    for token in text.split(" "):
        if not token:
            continue
        m = _PARAM.fullmatch(token)
        if m is None:
            raise ValueError(f"malformed parameter {token[:40]!r}")
        key = m.group(1).upper()
        if key in params:
            raise ValueError(f"duplicate parameter {key}")
        params[key] = m.group(2) or ""
    return params


def domain_of(address: str) -> str:
    """The domain of a stored envelope address (``""`` for ``<>`` and ``postmaster``)."""
    at = address.rfind("@")
    return address[at + 1 :] if at >= 0 else ""

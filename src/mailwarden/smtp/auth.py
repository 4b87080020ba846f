"""The SMTP AUTH command (RFC 4954) with the PLAIN (RFC 4616) and LOGIN mechanisms.

AUTH exists only on submission listeners and only inside TLS (after STARTTLS or on an
implicit-TLS listener): before TLS it is not advertised and answers ``530 5.7.0`` (SU-8);
on other listeners ``503 5.5.1``. No setting changes that. ``auth_command(proto, arg)`` is the
handler ``smtp.commands`` dispatches to. It supports the initial-response form
(``AUTH PLAIN <b64>``, ``=`` for an empty one) and the ``334`` continuation form; a ``*``
line cancels (``501``); bad base64 is ``501 5.5.2``. While an exchange waits for a
continuation line, ``proto.line_handler`` receives the next line (framed by
``smtp.protocol`` with the ``MAX_AUTH_LINE`` limit of RFC 4954). Credentials go to
``auth.service.AuthService`` (throttling, backend, deadline); its outcome becomes
``235 2.7.0``, ``535 5.7.8``, ``454 4.7.0`` or ``421 4.7.0`` and one ``smtp.auth`` event.

Public names: ``auth_command``, ``MECHANISMS``, ``AUTH_TIMEOUT_MARGIN``.
Security: handles passwords from untrusted clients: never logged, never echoed, never put
in an event or an exception; events carry the login escaped (``auth.base.escape_login``),
the mechanism and the result only. AUTH inside a transaction, twice, or before EHLO is
refused (503).
"""

from __future__ import annotations

import base64
import binascii
from functools import partial
from typing import TYPE_CHECKING, Any

from mailwarden.auth.base import escape_login, normalise_login
from mailwarden.auth.service import Attempt, Outcome
from mailwarden.core.controls import Control
from mailwarden.core.events import emit

if TYPE_CHECKING:
    from mailwarden.smtp.protocol import SmtpProtocol

MECHANISMS = ("PLAIN", "LOGIN")
# Seconds beyond [auth] timeout + failure_delay after which a stuck attempt is a tempfail.
AUTH_TIMEOUT_MARGIN = 5.0
_OK = b"235 2.7.0 Authentication successful\r\n"
_EMPTY_CHALLENGE = b"334 \r\n"
_USERNAME_PROMPT = b"334 VXNlcm5hbWU6\r\n"  # base64 "Username:"
_PASSWORD_PROMPT = b"334 UGFzc3dvcmQ6\r\n"  # base64 "Password:"
_TOO_MANY = "Too many failed authentication attempts"


def _event(p: SmtpProtocol, mechanism: str, result: str, login: str | None = None) -> None:
    s = p.session
    emit(
        "smtp.auth",
        session=s.session_id,
        client=s.peer_ip,
        listener=s.listener,
        user=escape_login(login) if login is not None else None,
        mechanism=mechanism,
        result=result,
    )


def auth_command(p: SmtpProtocol, arg: str) -> None:
    s = p.session
    service = p.srv.auth
    if not p.srv.listener.submission or service is None:
        p.syntax_error("AUTH not enabled", 503, "5.5.1", "Error: authentication not enabled")
        return
    if s.tls is None:
        p.refuse("AUTH", 530, "5.7.0", "Must issue a STARTTLS command first (SU-8)", Control.SU_8)
        return
    if s.helo is None or not s.esmtp:
        p.syntax_error("sequence", 503, "5.5.1", "Error: send EHLO first")
        return
    if s.auth_user is not None:
        p.syntax_error("sequence", 503, "5.5.1", "Error: already authenticated")
        return
    if p.envelope is not None:
        p.syntax_error("sequence", 503, "5.5.1", "Error: AUTH not permitted during a transaction")
        return
    parts = arg.split(" ")
    if not parts[0] or len(parts) > 2:
        p.syntax_error("AUTH syntax", 501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        return
    mechanism = parts[0].upper()
    if mechanism not in MECHANISMS:
        p.syntax_error(
            "AUTH mechanism", 504, "5.5.4", "Error: unsupported authentication mechanism"
        )
        return
    initial = parts[1].encode("ascii", "replace") if len(parts) == 2 else None
    p.run(service.precheck(s.peer_ip), partial(_after_precheck, p, mechanism, initial), None)


def _after_precheck(
    p: SmtpProtocol,
    mechanism: str,
    initial: bytes | None,
    result: Any,
    error: BaseException | None,
) -> None:
    if error is not None:
        _finish(p, mechanism, None, Attempt(Outcome.TEMPFAIL))
        return
    if result is not None:  # a client past a limit: refused before any credentials
        _finish(p, mechanism, None, result)
        return
    if mechanism == "PLAIN":
        if initial is None:
            p.raw_reply(_EMPTY_CHALLENGE)
            p.line_handler = partial(_plain, p, False)
        else:
            _plain(p, True, initial)
    elif initial is None:
        p.raw_reply(_USERNAME_PROMPT)
        p.line_handler = partial(_login_user, p, False)
    else:
        _login_user(p, True, initial)


def _decode(p: SmtpProtocol, mechanism: str, line: bytes, initial: bool) -> bytes | None:
    """The decoded client response, or None after answering a cancel or bad base64."""
    if line == b"*":
        p.refuse("AUTH", 501, "5.7.0", "Authentication cancelled")
        _event(p, mechanism, "cancelled")
        return None
    if initial and line == b"=":  # RFC 4954: "=" is an empty initial response
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        p.refuse("AUTH", 501, "5.5.2", "Cannot decode response")
        _event(p, mechanism, "malformed")
        return None


def _text(p: SmtpProtocol, mechanism: str, data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        p.refuse("AUTH", 501, "5.5.2", "Invalid UTF-8 in authentication data")
        _event(p, mechanism, "malformed")
        return None


def _plain(p: SmtpProtocol, initial: bool, line: bytes) -> None:
    data = _decode(p, "PLAIN", line, initial)
    if data is None:
        return
    fields = data.split(b"\x00")
    if len(fields) != 3:  # RFC 4616: [authzid] NUL authcid NUL passwd
        p.refuse("AUTH", 501, "5.5.2", "Invalid PLAIN response")
        _event(p, "PLAIN", "malformed")
        return
    texts: list[str] = []
    for field in fields:
        text = _text(p, "PLAIN", field)
        if text is None:
            return
        texts.append(text)
    authzid, login, password = texts
    if authzid and normalise_login(authzid) != normalise_login(login):
        # Acting as another identity is not supported: a failed attempt for ``login``
        # (an empty password is refused by every backend without being checked).
        password = ""
    _verify(p, "PLAIN", login, password)


def _login_user(p: SmtpProtocol, initial: bool, line: bytes) -> None:
    data = _decode(p, "LOGIN", line, initial)
    if data is None:
        return
    login = _text(p, "LOGIN", data)
    if login is None:
        return
    p.raw_reply(_PASSWORD_PROMPT)
    p.line_handler = partial(_login_password, p, login)


def _login_password(p: SmtpProtocol, login: str, line: bytes) -> None:
    data = _decode(p, "LOGIN", line, False)
    if data is None:
        return
    password = _text(p, "LOGIN", data)
    if password is None:
        return
    _verify(p, "LOGIN", login, password)


def _verify(p: SmtpProtocol, mechanism: str, login: str, password: str) -> None:
    service = p.srv.auth
    assert service is not None
    settings = service.settings
    deadline = settings.timeout + settings.failure_delay + AUTH_TIMEOUT_MARGIN
    p.run(
        service.attempt(p.session.peer_ip, login, password),
        partial(_after_attempt, p, mechanism, login),
        deadline,
    )


def _after_attempt(
    p: SmtpProtocol, mechanism: str, login: str, result: Any, error: BaseException | None
) -> None:
    if error is not None or not isinstance(result, Attempt):
        result = Attempt(Outcome.TEMPFAIL)
    _finish(p, mechanism, login, result)


def _finish(p: SmtpProtocol, mechanism: str, login: str | None, attempt: Attempt) -> None:
    s = p.session
    outcome = attempt.outcome
    _event(p, mechanism, outcome.value, login)
    if outcome is Outcome.OK and login is not None:
        s.auth_user = normalise_login(login)
        p.raw_reply(_OK)
        return
    if outcome is Outcome.INVALID:
        s.auth_failures += 1
        service = p.srv.auth
        limit = service.settings.session_max_failures if service is not None else 1
        if not attempt.disconnect and s.auth_failures < limit:
            p.refuse("AUTH", 535, "5.7.8", "Authentication credentials invalid")
            return
        outcome = Outcome.DISCONNECT
    if outcome is Outcome.DISCONNECT:
        p.refuse("AUTH", 421, "4.7.0", f"{p.srv.hostname} Error: {_TOO_MANY}")
        p.close_after_reply()
    elif outcome is Outcome.THROTTLED:
        p.refuse("AUTH", 454, "4.7.0", f"{_TOO_MANY}, try again later")
    else:
        p.refuse("AUTH", 454, "4.7.0", "Temporary authentication failure")

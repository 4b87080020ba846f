"""SMTP command handlers (RFC 5321 4.1, RFC 1870, 2920, 3207, 6152, 6531) and the end of
DATA: checks, trace headers, the policy DATA check and the hand-off to the queue.

``dispatch(proto, line, long_line)`` runs one command line (CRLF stripped, framing already
validated by ``smtp.protocol``); ``end_of_data(proto, raw, too_big)`` finishes a message.

Public names: ``dispatch``, ``end_of_data``.
Security: parses untrusted command arguments (addresses via ``smtp.address``, ESMTP
parameters, HELO names); never confirms an address (VRFY 252, EXPN 502); never logs
command arguments of unknown commands (they could be AUTH data) or message bodies.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from mailwarden.core.events import emit
from mailwarden.core.types import (
    Action,
    Decision,
    Envelope,
    EnvelopeSnapshot,
    new_queue_id,
)
from mailwarden.errors import AddressError
from mailwarden.smtp.address import NonAsciiAddress, parse_params, parse_path
from mailwarden.smtp.auth import auth_command
from mailwarden.smtp.headers import (
    HeaderTooLarge,
    add_headers,
    count_received,
    find_message_id,
    header_end,
    received_header,
)
from mailwarden.smtp.limits import FORBIDDEN_VERBS, MAX_HELO
from mailwarden.smtp.message import data_problem, unstuff

if TYPE_CHECKING:
    from mailwarden.smtp.content import Outcome
    from mailwarden.smtp.protocol import SmtpProtocol

_OK = b"250 2.0.0 Ok\r\n"
_MAIL_OK = b"250 2.1.0 Ok\r\n"
_RCPT_OK = b"250 2.1.5 Ok\r\n"
_DATA_GO = b"354 End data with <CR><LF>.<CR><LF>\r\n"
_BYE = b"221 2.0.0 Bye\r\n"
_SMTPUTF8_HINT = re.compile(r" SMTPUTF8(?: |$)", re.IGNORECASE)
_DIGITS = re.compile(r"[0-9]{1,20}")
MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8"})  # RFC 1870, 6152, 6531
HELP_TEXT = "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY STARTTLS"


def _ok(decision: Decision) -> bool:
    return decision.action in (Action.ACCEPT, Action.CONTINUE)


# -- session commands ------------------------------------------------------------------
def _helo(p: SmtpProtocol, arg: str, esmtp: bool) -> None:
    verb = "EHLO" if esmtp else "HELO"
    name = arg.strip(" ")
    if not name or " " in name or len(name) > MAX_HELO or not name.isprintable():
        p.syntax_error("bad HELO", 501, "5.5.4", f"Syntax: {verb} hostname")
        return
    p.check(p.srv.policy.check_helo(p.session, name), partial(_after_helo, p, name, esmtp))


def _after_helo(p: SmtpProtocol, name: str, esmtp: bool, decision: Decision) -> None:
    if not _ok(decision):
        p.reject("EHLO" if esmtp else "HELO", decision)
        return
    p.session.helo = name
    p.session.esmtp = esmtp
    p.envelope = None  # RFC 5321 4.1.4: EHLO/HELO reset the transaction
    if esmtp:
        p.raw_reply(p.srv.ehlo_reply(tls_active=p.session.tls is not None))
    else:
        p.reply(250, "", p.srv.hostname)


def _ehlo(p: SmtpProtocol, arg: str) -> None:
    _helo(p, arg, True)


def _helo_cmd(p: SmtpProtocol, arg: str) -> None:
    _helo(p, arg, False)


def _noop(p: SmtpProtocol, arg: str) -> None:
    p.raw_reply(_OK)


def _rset(p: SmtpProtocol, arg: str) -> None:
    if arg.strip(" "):
        p.syntax_error("RSET args", 501, "5.5.4", "Syntax: RSET")
        return
    p.envelope = None
    p.raw_reply(_OK)


def _quit(p: SmtpProtocol, arg: str) -> None:
    p.raw_reply(_BYE)
    p.close_after_reply()


def _help(p: SmtpProtocol, arg: str) -> None:
    p.reply(214, "2.0.0", HELP_TEXT)


def _vrfy(p: SmtpProtocol, arg: str) -> None:
    if not arg.strip(" "):
        p.syntax_error("VRFY args", 501, "5.5.4", "Syntax: VRFY address")
        return
    p.reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")


def _expn(p: SmtpProtocol, arg: str) -> None:
    p.refuse("EXPN", 502, "5.5.1", "EXPN not supported")


def _starttls(p: SmtpProtocol, arg: str) -> None:
    if p.srv.listener.tls != "starttls" or p.srv.ssl_context is None:
        p.syntax_error("STARTTLS unavailable", 502, "5.5.1", "Error: command not implemented")
    elif p.session.tls is not None:
        p.syntax_error("STARTTLS again", 503, "5.5.1", "Error: TLS already active")
    elif arg.strip(" "):
        p.syntax_error("STARTTLS args", 501, "5.5.4", "Syntax: STARTTLS")
    else:
        p.reply(220, "2.0.0", "Ready to start TLS")
        p.start_tls_after_reply()


# -- the transaction ---------------------------------------------------------------------
def _mail(p: SmtpProtocol, arg: str) -> None:
    s = p.session
    limits = p.srv.cfg.limits
    if s.helo is None:
        p.syntax_error("sequence", 503, "5.5.1", "Error: send HELO/EHLO first")
        return
    if p.envelope is not None:
        p.syntax_error("sequence", 503, "5.5.1", "Error: nested MAIL command")
        return
    if s.transactions >= limits.max_transactions_per_session:
        p.refuse("MAIL", 421, "4.7.0", "Error: too many messages in one session")
        p.close_after_reply()
        return
    if arg[:5].upper() != "FROM:":
        p.syntax_error("MAIL syntax", 501, "5.5.4", "Syntax: MAIL FROM:<address>")
        return
    rest = arg[5:].lstrip(" ")
    utf8 = bool(_SMTPUTF8_HINT.search(rest))
    try:
        addr, ptext = parse_path(rest, smtputf8=utf8, null_ok=True)
        params = parse_params(ptext)
        if ("SMTPUTF8" in params) != utf8:  # the hint came from inside a quoted local part
            utf8 = not utf8
            addr, ptext = parse_path(rest, smtputf8=utf8, null_ok=True)
            params = parse_params(ptext)
    except NonAsciiAddress:
        p.refuse("MAIL", 553, "5.6.7", "Error: non-ASCII address requires SMTPUTF8")
        return
    except AddressError:
        p.refuse("MAIL", 501, "5.1.7", "Error: bad sender address syntax")
        return
    except ValueError:
        p.syntax_error("MAIL params", 501, "5.5.4", "Error: malformed MAIL parameters")
        return
    if params and not s.esmtp:
        p.syntax_error("MAIL params", 555, "5.5.4", "Error: parameters need EHLO")
        return
    unknown = [k for k in params if k not in MAIL_PARAMS]
    if unknown:
        p.syntax_error("MAIL params", 555, "5.5.4", f"Error: unsupported option {unknown[0]}")
        return
    size: int | None = None
    if "SIZE" in params:
        if not _DIGITS.fullmatch(params["SIZE"]):
            p.syntax_error("MAIL params", 501, "5.5.4", "Error: bad SIZE value")
            return
        size = int(params["SIZE"])
        if size > limits.max_message_size:
            p.refuse("MAIL", 552, "5.3.4", "Message size exceeds fixed maximum message size")
            return
    body = params.get("BODY", "7BIT").upper()
    if body not in ("7BIT", "8BITMIME") or (params.get("SMTPUTF8")):
        p.syntax_error("MAIL params", 501, "5.5.4", "Error: bad BODY or SMTPUTF8 value")
        return
    env = Envelope(
        mail_from=addr.text, mail_params=params, smtputf8=utf8, body=body, declared_size=size
    )
    p.check(p.srv.policy.check_mail(s, env, addr.text), partial(_after_mail, p, env))


def _after_mail(p: SmtpProtocol, env: Envelope, decision: Decision) -> None:
    if not _ok(decision):
        p.reject("MAIL", decision)
        return
    p.envelope = env
    p.raw_reply(_MAIL_OK)


def _rcpt(p: SmtpProtocol, arg: str) -> None:
    env = p.envelope
    if env is None:
        p.syntax_error("sequence", 503, "5.5.1", "Error: need MAIL command")
        return
    if arg[:3].upper() != "TO:":
        p.syntax_error("RCPT syntax", 501, "5.5.4", "Syntax: RCPT TO:<address>")
        return
    try:
        addr, ptext = parse_path(arg[3:].lstrip(" "), smtputf8=env.smtputf8, postmaster_ok=True)
        params = parse_params(ptext)
    except NonAsciiAddress:
        p.refuse("RCPT", 553, "5.6.7", "Error: non-ASCII address requires SMTPUTF8")
        return
    except AddressError:
        p.refuse("RCPT", 501, "5.1.3", "Error: bad recipient address syntax")
        return
    except ValueError:
        p.syntax_error("RCPT params", 501, "5.5.4", "Error: malformed RCPT parameters")
        return
    if params:
        p.syntax_error(
            "RCPT params", 555, "5.5.4", f"Error: unsupported option {next(iter(params))}"
        )
        return
    if len(env.rcpt_to) >= p.srv.cfg.limits.max_recipients:
        p.refuse("RCPT", 452, "4.5.3", "Error: too many recipients")
        return
    p.check(
        p.srv.policy.check_rcpt(p.session, env, addr.text), partial(_after_rcpt, p, env, addr.text)
    )


def _after_rcpt(p: SmtpProtocol, env: Envelope, rcpt: str, decision: Decision) -> None:
    if not _ok(decision):
        if decision.action is Action.REJECT:
            p.session.invalid_recipients += 1
        p.reject("RCPT", decision)
        return
    if rcpt not in env.rcpt_to:
        env.rcpt_to.append(rcpt)
    p.raw_reply(_RCPT_OK)


def _data(p: SmtpProtocol, arg: str) -> None:
    if arg.strip(" "):
        p.syntax_error("DATA args", 501, "5.5.4", "Syntax: DATA")
    elif p.envelope is None:
        p.syntax_error("sequence", 503, "5.5.1", "Error: need MAIL command")
    elif not p.envelope.rcpt_to:
        p.syntax_error("sequence", 554, "5.5.1", "Error: no valid recipients")
    else:
        p.raw_reply(_DATA_GO)
        p.start_data()


def end_of_data(p: SmtpProtocol, raw: bytes, too_big: bool) -> None:
    """The message ended: refuse it, or check it and hand it to the queue."""
    env = p.envelope
    p.envelope = None  # the transaction is over whatever happens now
    if env is None:
        return
    limits = p.srv.cfg.limits
    if too_big or len(raw) - 2 > limits.max_message_size:
        p.refuse("DATA", 552, "5.3.4", "Error: message file too big")
        return
    problem = data_problem(raw)
    if problem is not None:
        p.refuse("DATA", *problem)
        return
    msg = unstuff(raw)
    try:
        end = header_end(msg, limits.max_header_size)
    except HeaderTooLarge:
        p.refuse("DATA", 552, "5.3.4", "Error: message header size exceeds limit")
        return
    header = msg[:end]
    if count_received(header) > limits.max_received_headers:
        p.refuse("DATA", 554, "5.4.6", "Too many hops (mail loop)")
        return
    p.check(
        p.srv.policy.check_data(p.session, env, header),
        partial(_after_data_check, p, env, msg, end, header),
    )


def _protocol_name(p: SmtpProtocol, env: Envelope) -> str:
    """RFC 3848 / RFC 6531 "with" keyword."""
    s = p.session
    name = "UTF8SMTP" if env.smtputf8 else ("ESMTP" if s.esmtp else "SMTP")
    if s.tls is not None:
        name += "S"
    if s.auth_user:
        name += "A"
    return name


def _after_data_check(
    p: SmtpProtocol, env: Envelope, msg: bytes, end: int, header: bytes, decision: Decision
) -> None:
    if not _ok(decision):
        p.reject("DATA", decision)
        return
    s = p.session
    hostname = p.srv.hostname
    queue_id = new_queue_id()
    now = time.time()
    message_id = find_message_id(header)
    added: bytes | None = None
    if message_id is None:
        message_id = f"<{queue_id}@{hostname}>"
        added = f"Message-ID: {message_id}\r\n".encode("ascii")
    received = received_header(
        helo=s.helo or s.peer_ip,
        client_ip=s.peer_ip,
        reverse_name=s.reverse_name,
        hostname=hostname,
        protocol=_protocol_name(p, env),
        queue_id=queue_id,
        tls=s.tls,
        recipients=env.rcpt_to,
        ts=now,
    )
    data = add_headers(msg, end, received, added)
    snapshot = EnvelopeSnapshot(
        queue_id=queue_id,
        mail_from=env.mail_from,
        recipients=tuple(env.rcpt_to),
        received_at=now,
        client_ip=s.peer_ip,
        client_helo=s.helo or "",
        direction=env.direction,
        message_id=message_id,
        size=len(data),
        smtputf8=env.smtputf8,
        body=env.body,
        auth_user=s.auth_user,
        session_id=s.session_id,
    )
    content = p.srv.content_filter
    if content is not None:  # issue 4: every message passes the verdict engine first
        top, hdr_end = len(received), len(received) + end + len(added or b"")
        coro = content.process(p.srv.sink, snapshot, data, top, hdr_end)
        p.run(coro, partial(_after_content, p, snapshot), None)
        return
    p.run(p.srv.sink.enqueue(snapshot, data), partial(_after_enqueue, p, snapshot), None)


def _after_content(
    p: SmtpProtocol, snap: EnvelopeSnapshot, outcome: Outcome | None, error: BaseException | None
) -> None:
    if error is not None or outcome is None:
        _after_enqueue(p, snap, None, error or RuntimeError("no outcome"))
    elif not outcome.stored:
        control = outcome.control.value if outcome.control else None
        p.refuse("DATA", outcome.code, outcome.enhanced, outcome.text, control=control)
    else:
        line = f"{outcome.code} {outcome.enhanced} {outcome.text}"
        verdict = outcome.verdict.action.value if outcome.verdict else None
        _after_enqueue(p, outcome.snapshot, None, None, reply=line, verdict=verdict)


def _after_enqueue(
    p: SmtpProtocol,
    snap: EnvelopeSnapshot,
    result: Any,
    error: BaseException | None,
    *,
    reply: str | None = None,
    verdict: str | None = None,
) -> None:
    s = p.session
    if error is not None:
        emit(
            "smtp.queue_error",
            session=s.session_id,
            client=s.peer_ip,
            queue_id=snap.queue_id,
            error=type(error).__name__,
        )
        p.refuse("DATA", 451, "4.3.0", "Error: queue file write error, try again later")
        return
    s.transactions += 1
    p.accepted += 1
    p.raw_reply(f"{reply or f'250 2.0.0 Ok: queued as {snap.queue_id}'}\r\n".encode("ascii"))
    emit(
        "smtp.accept",
        session=s.session_id,
        client=s.peer_ip,
        helo=s.helo,
        queue_id=snap.queue_id,
        message_id=snap.message_id,
        sender=snap.mail_from,
        recipients=list(snap.recipients),
        size=snap.size,
        tls=s.tls.version if s.tls else None,
        verdict=verdict,
    )


# -- dispatch ------------------------------------------------------------------------------
HANDLERS: dict[str, Callable[[SmtpProtocol, str], None]] = {
    "EHLO": _ehlo,
    "HELO": _helo_cmd,
    "MAIL": _mail,
    "RCPT": _rcpt,
    "DATA": _data,
    "RSET": _rset,
    "NOOP": _noop,
    "QUIT": _quit,
    "HELP": _help,
    "VRFY": _vrfy,
    "EXPN": _expn,
    "STARTTLS": _starttls,
    "AUTH": auth_command,  # smtp.auth (RFC 4954; submission listeners, inside TLS only)
}
# May exceed 512 octets: MAIL/RCPT by the ESMTP parameter allowance, AUTH up to
# MAX_AUTH_LINE (smtp.protocol enforces both bounds).
_LONG_OK = frozenset({"MAIL", "RCPT", "AUTH"})


def dispatch(p: SmtpProtocol, line: bytes, long_line: bool) -> None:
    """Run one command line (without CRLF)."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            p.syntax_error("invalid UTF-8", 500, "5.5.2", "Error: invalid UTF-8 in command")
            return
    sp = text.find(" ")
    verb, arg = (text.upper(), "") if sp < 0 else (text[:sp].upper(), text[sp + 1 :])
    handler = HANDLERS.get(verb)
    if handler is None:
        if verb in FORBIDDEN_VERBS:
            p.syntax_error(
                f"forbidden command {verb}", 421, "4.7.0", "Error: this is an SMTP server"
            )
            p.close_after_reply()
        else:
            p.syntax_error("unknown command", 500, "5.5.2", "Error: command not recognized")
        return
    if long_line and verb not in _LONG_OK:
        p.syntax_error("line too long", 500, "5.5.2", "Error: line too long")
        return
    handler(p, arg)

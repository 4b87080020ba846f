"""One ESMTP session as an ``asyncio.Protocol``: framing, DATA, STARTTLS, replies.

Input is parsed in bulk in ``data_received``: command lines are found with ``bytes.find``,
DATA is scanned for ``CRLF.CRLF`` with ``find`` and checked at its end with C-speed bytes
operations (``smtp.message``). Replies are collected and written once per batch of input
(PIPELINING). Policy checks and the queue hand-off run eagerly (``smtp.aio``): a check that
does not wait costs no task; while one waits, input is buffered but not processed.
Command handlers live in ``smtp.commands``.

Public names: ``SmtpProtocol``.
Security: every byte comes from an untrusted peer. Bare CR or LF in a command line gets
``500 5.5.2`` and the connection is closed; NUL is refused; lines are bounded
(``smtp.limits``; AUTH lines by ``MAX_AUTH_LINE``, on submission listeners only); bytes
pipelined behind STARTTLS are discarded before the handshake and
the session state is reset after it (RFC 3207 4.2). Message bodies are never logged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from mailwarden.core.events import emit
from mailwarden.core.events import flush as flush_events
from mailwarden.core.types import Action, Decision, Envelope, Session
from mailwarden.smtp import commands
from mailwarden.smtp.aio import Pending, run_eager
from mailwarden.smtp.limits import (
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    MAX_ESMTP_COMMAND_LINE,
    MAX_PENDING_INPUT,
    POLICY_TIMEOUT,
    TLS_HANDSHAKE_TIMEOUT,
)
from mailwarden.smtp.reply import format_reply, reply_for
from mailwarden.smtp.tls import tls_info

if TYPE_CHECKING:
    from mailwarden.smtp.server import SmtpServer

END_OF_DATA = b"\r\n.\r\n"
POLICY_TEMPFAIL = Decision(
    Action.TEMPFAIL, "Temporary policy failure, try again later", code=451, enhanced="4.3.0"
)
_monotonic = time.monotonic


class SmtpProtocol(asyncio.Protocol):
    """The server side of one SMTP connection."""

    def __init__(self, server: SmtpServer) -> None:
        self.srv = server
        self.transport: asyncio.Transport | None = None
        self.session = Session("", 0, "", 0, server.listener.name)
        self.envelope: Envelope | None = None
        self.last_activity = _monotonic()
        self.in_data = False
        self.busy = False  # waiting on a policy check or the queue
        self.closed = False
        self.errors = 0
        self.accepted = 0
        self.rejected = 0
        self.commands = 0
        self._buf = bytearray()
        self._msg = bytearray()
        self._msg_limit = server.cfg.limits.max_message_size + 16
        self._too_big = False
        self._skip_line = False
        self._skip_cr = False  # the last byte dropped of a skipped line was a CR
        self._close_after = False
        self._tls_pending = False  # 220 sent for STARTTLS, handshake not started yet
        self._tls_starting = False
        self._shutdown = False
        self._paused = False
        self._out: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        # Set by smtp.auth while an AUTH exchange waits for a continuation line.
        self.line_handler: Callable[[bytes], None] | None = None

    # -- connection ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        s = self.session
        s.peer_ip, s.peer_port = str(peer[0]), int(peer[1])
        s.local_ip, s.local_port = str(local[0]), int(local[1])
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            s.tls = tls_info(ssl_object)
        refusal = self.srv.register(self)
        if refusal is not None:
            self.closed = True
            transport.write(format_reply(421, "4.7.0", refusal))
            transport.close()
            emit(
                "smtp.reject",
                session=s.session_id,
                client=s.peer_ip,
                command="CONNECT",
                reply=f"421 4.7.0 {refusal}",
            )
            return
        emit(
            "smtp.connect",
            session=s.session_id,
            client=s.peer_ip,
            port=s.peer_port,
            listener=s.listener,
            tls=s.tls.version if s.tls else None,
        )
        if s.tls is not None:
            emit(
                "smtp.tls",
                session=s.session_id,
                client=s.peer_ip,
                version=s.tls.version,
                cipher=s.tls.cipher,
                bits=s.tls.bits,
            )
        self.check(self.srv.policy.check_connect(s), self._after_connect)
        self._process()

    def _after_connect(self, decision: Decision) -> None:
        if decision.action in (Action.ACCEPT, Action.CONTINUE):
            self._out.append(self.srv.greeting)
            return
        self.reject("CONNECT", decision)
        self._close_after = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.srv.unregister(self):
            s = self.session
            emit(
                "smtp.disconnect",
                session=s.session_id,
                client=s.peer_ip,
                commands=self.commands,
                transactions=s.transactions,
                accepted=self.accepted,
                rejected=self.rejected,
                errors=self.errors,
                seconds=round(time.time() - s.started, 3),
            )

    def pause_writing(self) -> None:  # the client does not read its replies: stop reading
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._resume()

    # -- input -----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.last_activity = _monotonic()
        if self.closed or self._tls_pending or self._tls_starting:
            return  # bytes behind STARTTLS: dropped (CVE-2011-0411 class)
        if self.in_data and not self.busy:
            self._feed(data)
        else:
            self._buf += data
            if self.busy:
                if len(self._buf) > MAX_PENDING_INPUT and not self._paused:
                    self._paused = True
                    assert self.transport is not None
                    self.transport.pause_reading()
                return
        self._process()

    def _feed(self, data: bytes) -> None:
        """Add DATA octets; on ``CRLF.CRLF`` leave DATA mode and hand the message over."""
        msg = self._msg
        start = len(msg) - 4 if len(msg) > 4 else 0
        msg += data
        idx = msg.find(END_OF_DATA, start)
        if idx < 0:
            if len(msg) > self._msg_limit:  # too big: keep reading, remember only the tail
                self._too_big = True
                del msg[:-4]
            return
        raw = bytes(memoryview(msg)[: idx + 2])
        if idx + 5 < len(msg):
            self._buf += memoryview(msg)[idx + 5 :]
        self._msg = bytearray()
        self.in_data = False
        too_big, self._too_big = self._too_big, False
        commands.end_of_data(self, raw, too_big)

    def _process(self) -> None:
        """Run every complete command in the buffer until one has to wait; flush replies."""
        buf = self._buf
        pos = 0
        while not (self.busy or self.closed or self._close_after or self._tls_pending):
            if self.in_data:
                rest = bytes(memoryview(buf)[pos:])
                buf.clear()
                pos = 0
                if rest:
                    self._feed(rest)
                if self.in_data:
                    break
                continue
            idx = buf.find(b"\n", pos)
            if idx < 0:
                pending = len(buf) - pos
                if self._skip_line:  # more of a line already refused as too long: drop it
                    if pending:
                        self._skip_cr = buf[-1] == 0x0D
                        pos = len(buf)
                elif pending > MAX_ESMTP_COMMAND_LINE and pending > self._line_limit(buf, pos):
                    # Refused before its end arrives; its end is still checked (below).
                    self._line_too_long()
                    self._skip_line = True
                    self._skip_cr = buf[-1] == 0x0D
                    pos = len(buf)
                    self._error_limit()
                break
            start, pos = pos, idx + 1
            if self._skip_line:  # the end of a line already refused as too long
                self._skip_line = False
                if not (buf[idx - 1] == 0x0D if idx > start else self._skip_cr):
                    self._bare_lf()
                    break
                continue
            crlf = idx > start and buf[idx - 1] == 0x0D
            size = idx + 1 - start
            if size > MAX_ESMTP_COMMAND_LINE and size > self._line_limit(buf, start):
                # The same replies as when the line is refused before its end arrives.
                self._line_too_long()
                self._error_limit()
                if not crlf and not self._close_after:
                    self._bare_lf()
                    break
                continue
            if not crlf:
                self._bare_lf()
                break
            line = bytes(memoryview(buf)[start : idx - 1])
            if b"\r" in line:
                self._protocol_error("bare CR", 500, "5.5.2", "Error: bare <CR> received")
                self._close_after = True
                break
            elif b"\x00" in line:
                self._protocol_error("NUL", 500, "5.5.2", "Error: NUL character received")
            elif self.line_handler is not None:  # an AUTH continuation line
                handler, self.line_handler = self.line_handler, None
                handler(line)
            else:
                self.commands += 1
                commands.dispatch(self, line, len(line) + 2 > MAX_COMMAND_LINE)
            self._error_limit()
        if self._tls_pending:
            buf.clear()  # every byte pipelined behind STARTTLS is discarded
        elif pos:
            del buf[:pos]
        if not self.busy:
            self._resume()
        self.flush()

    def _bare_lf(self) -> None:
        self._protocol_error("bare LF", 500, "5.5.2", "Error: bare <LF> received")
        self._close_after = True

    def _error_limit(self) -> None:
        """Too many errors in this session: 421 and close after the replies so far."""
        if self.errors > self.srv.cfg.limits.max_errors_per_session and not self._close_after:
            self.reply(421, "4.7.0", f"{self.srv.hostname} Error: too many errors")
            emit(
                "smtp.protocol_error",
                session=self.session.session_id,
                client=self.session.peer_ip,
                error="too many errors",
            )
            self._close_after = True

    def _line_limit(self, buf: bytearray, start: int) -> int:
        """Longest line allowed at ``start``: AUTH lines get RFC 4954's limit."""
        if self.line_handler is not None or (
            self.srv.listener.submission and buf[start : start + 5].upper() == b"AUTH "
        ):
            return MAX_AUTH_LINE
        return MAX_ESMTP_COMMAND_LINE

    def _line_too_long(self) -> None:
        if self.line_handler is not None:  # RFC 4954 4: the exchange fails
            self._protocol_error(
                "AUTH line too long", 500, "5.5.6", "Authentication Exchange line is too long"
            )
        else:
            self._protocol_error("line too long", 500, "5.5.2", "Error: line too long")

    def _resume(self) -> None:
        if self._paused and self.transport is not None and not self.busy and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    # -- output ----------------------------------------------------------------------
    def reply(self, code: int, enhanced: str, text: str | list[str]) -> None:
        self._out.append(format_reply(code, enhanced, text))
        if code >= 400:
            self.errors += 1

    def raw_reply(self, data: bytes) -> None:
        """A pre-rendered success reply (hot path)."""
        self._out.append(data)

    def flush(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        out = self._out
        if out:
            # The event log is written before the client sees the replies it records, so
            # the evidence is never behind the wire (and a crash loses no answered event).
            flush_events()
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self._close_after:
            self.closed = True
            transport.close()
        elif self._tls_pending:
            self._tls_pending = False
            self._tls_starting = True
            transport.pause_reading()
            self._task = asyncio.get_running_loop().create_task(self._starttls())

    def reject(self, command: str, decision: Decision) -> None:
        """Reply with a policy refusal and record it."""
        code, enhanced, text = reply_for(decision)
        self.refuse(command, code, enhanced, text, decision.control)
        if decision.action is Action.DISCONNECT:
            self._close_after = True

    def refuse(
        self, command: str, code: int, enhanced: str, text: str, control: object = None
    ) -> None:
        self.reply(code, enhanced, text)
        self.rejected += 1
        s = self.session
        emit(
            "smtp.reject",
            session=s.session_id,
            client=s.peer_ip,
            helo=s.helo,
            command=command,
            reply=f"{code} {enhanced} {text}",
            control=control,
        )

    def _protocol_error(self, error: str, code: int, enhanced: str, text: str) -> None:
        self.line_handler = None  # a framing error ends an AUTH exchange
        self.reply(code, enhanced, text)
        emit(
            "smtp.protocol_error",
            session=self.session.session_id,
            client=self.session.peer_ip,
            error=error,
            reply=f"{code} {enhanced} {text}",
        )

    def syntax_error(self, error: str, code: int, enhanced: str, text: str) -> None:
        self._protocol_error(error, code, enhanced, text)

    def close_after_reply(self) -> None:
        self._close_after = True

    def start_data(self) -> None:
        self.in_data = True
        self._msg = bytearray(b"\r\n")  # the CRLF that ended "DATA" starts the first line
        self._too_big = False

    def start_tls_after_reply(self) -> None:
        self._tls_pending = True

    # -- asynchronous steps ----------------------------------------------------------
    def run(
        self,
        coro: Coroutine[Any, Any, Any],
        then: Callable[[Any, BaseException | None], None],
        timeout: float | None,
    ) -> None:
        """Run ``coro``; call ``then(result, error)``. While it waits, the session is busy."""
        try:
            result = run_eager(coro)
        except Exception as exc:
            then(None, exc)
            return
        if isinstance(result, Pending):
            self.busy = True
            self._task = asyncio.get_running_loop().create_task(self._finish(result, then, timeout))
        else:
            then(result, None)

    async def _finish(
        self,
        pending: Pending[Any],
        then: Callable[[Any, BaseException | None], None],
        timeout: float | None,
    ) -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            if timeout is None:
                result = await pending
            else:
                async with asyncio.timeout(timeout):
                    result = await pending
        except Exception as exc:
            error = exc
        self.busy = False
        self._task = None
        if self.closed:
            return
        self.last_activity = _monotonic()
        then(result, error)
        if self._shutdown:
            self.reply(421, "4.3.2", "Service shutting down")
            self._close_after = True
        self._process()

    def check(self, coro: Coroutine[Any, Any, Decision], then: Callable[[Decision], None]) -> None:
        """Run a policy check; an error, a timeout or a non-Decision is a TEMPFAIL."""

        def done(result: Any, error: BaseException | None) -> None:
            if error is not None or not isinstance(result, Decision):
                emit(
                    "policy.error",
                    session=self.session.session_id,
                    error=type(error).__name__ if error else "not a Decision",
                )
                result = POLICY_TEMPFAIL
            then(result)

        self.run(coro, done, POLICY_TIMEOUT)

    async def _starttls(self) -> None:
        loop = asyncio.get_running_loop()
        transport = self.transport
        assert transport is not None and self.srv.ssl_context is not None
        s = self.session
        try:
            new = await loop.start_tls(
                transport,
                self,
                self.srv.ssl_context,
                server_side=True,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
            )
        except Exception as exc:
            emit(
                "smtp.protocol_error",
                session=s.session_id,
                client=s.peer_ip,
                error=f"TLS handshake failed: {type(exc).__name__}",
            )
            self.closed = True
            transport.abort()
            return
        finally:
            self._task = None
        if new is None or self.closed:
            return
        self.transport = new
        self._tls_starting = False
        self._buf.clear()
        # RFC 3207 4.2: forget everything learned before TLS; the client starts with EHLO.
        s.helo = None
        s.esmtp = False
        self.envelope = None
        ssl_object = new.get_extra_info("ssl_object")
        if ssl_object is not None:
            s.tls = tls_info(ssl_object)
            emit(
                "smtp.tls",
                session=s.session_id,
                client=s.peer_ip,
                version=s.tls.version,
                cipher=s.tls.cipher,
                bits=s.tls.bits,
            )
        self.last_activity = _monotonic()
        if self._shutdown:
            self.shutdown()

    # -- called by the server --------------------------------------------------------
    def shutdown(self) -> None:
        """Send ``421 4.3.2`` and close; a session waiting on the queue answers first."""
        if self.closed:
            return
        self._shutdown = True
        if self.busy or self._tls_starting:
            return
        self.reply(421, "4.3.2", "Service shutting down")
        self._close_after = True
        self.flush()

    def timed_out(self) -> None:
        if self.closed:
            return
        s = self.session
        emit(
            "smtp.protocol_error",
            session=s.session_id,
            client=s.peer_ip,
            error="timeout",
            in_data=self.in_data,
        )
        self.reply(421, "4.4.2", f"{self.srv.hostname} Error: timeout exceeded")
        self._close_after = True
        self.flush()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

"""The content hook at the end of DATA: every message passes the verdict engine before ``250``.

``ContentFilter(engine, quarantine, hostname)`` is what ``SmtpServer(content_filter=...)``
calls once a message passed the protocol and policy checks. ``process(sink, snapshot, data,
top, header_end)`` scans ``data`` (the client's message with our ``Received:`` on top) and
acts on the verdict:

- ACCEPT / ADD_HEADER / TAG_SUBJECT: the untrusted copies of our headers are removed from
  the client's header section (``X-Spam-*``, ``X-Virus-Scanned``, and
  ``Authentication-Results`` claiming our host name, RFC 8601 section 5), our verdict
  headers go in under our ``Received:`` (``Authentication-Results`` first when mail
  authentication ran), the subject is tagged when asked, an OUTBOUND message is
  DKIM-signed when its From domain has a key (``scan.dkimsign``, the signature on top),
  an INBOUND message gets our ARC set when sealing is on (``scan.arcseal``, on top: after
  every other edit, so what is queued and retried is what was sealed), and the message
  is queued; reply ``250 2.0.0``.
- QUARANTINE: the message as received (no scan headers) goes to the quarantine, never to
  the queue; reply ``250 2.7.0`` naming the queue id (and the virus, when it is one).
- REJECT: ``554 5.7.1``, nothing stored (the client bounces: no backscatter from us).
- TEMPFAIL, a scanner failure, or the whole pipeline taking longer than ``timeout``:
  ``451 4.7.1``, nothing stored (CP-E3: fail closed).

Scanners do their CPU work off the event loop when it is large (``scan.builtin`` moves
messages over 256 KiB to a thread and over 1 MiB to its process pool; clamd and rspamd are
other processes); the header work here reads only the header section.

Public names: ``ContentFilter``, ``Outcome``, ``strip_untrusted``, ``tag_subject``.
Security: ``data`` is hostile. Header edits are linear regexes on the header section only;
the reply text quotes virus names through ``_reply_safe`` (printable ASCII, bounded), never
raw message content. The authserv-id of a client's ``Authentication-Results`` is found past
nested comments and quoted pairs, so a forged one cannot hide behind them; a field with more
than ``MAX_CFWS_STEPS`` of them in front is removed whatever it claims.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailwarden.core.controls import Control
from mailwarden.core.events import emit
from mailwarden.core.types import Direction, EnvelopeSnapshot
from mailwarden.scan.base import ScanInput, is_virus
from mailwarden.scan.settings import ScanAction
from mailwarden.scan.verdict import Verdict, VerdictEngine, render_headers

if TYPE_CHECKING:
    from mailwarden.quarantine.store import Quarantine
    from mailwarden.scan.arcseal import ArcSealer
    from mailwarden.scan.dkimsign import DkimSigner
    from mailwarden.smtp.server import MessageSink

PIPELINE_GRACE = 5.0  # seconds on top of the scan timeout before the whole pipeline gives up
MAX_REPLY_DETAIL = 120  # characters of a verdict detail quoted in an SMTP reply
MAX_CFWS_STEPS = 64  # parentheses/quoted pairs read before a client's A-R authserv-id

# One header field with its folded continuation lines (framing validated before this runs).
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:([^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)")
_CANDIDATE = re.compile(
    rb"^(?:x-spam-|x-virus-scanned|authentication-results|subject)", re.IGNORECASE | re.MULTILINE
)
_AUTHSERV_ID = re.compile(rb"[^\s;()]+")
_COMMENT_STEP = re.compile(rb"\\.|[()]", re.DOTALL)  # a quoted pair or a parenthesis


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the end of DATA answers, and whether the message was stored (queue or
    quarantine: then the transaction counts as accepted)."""

    code: int
    enhanced: str
    text: str
    stored: bool
    snapshot: EnvelopeSnapshot
    verdict: Verdict | None = None
    control: Control | None = None


def _reply_safe(text: str, limit: int = MAX_REPLY_DETAIL) -> str:
    out = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _untrusted(name: bytes, value: bytes, hostname: bytes) -> bool:
    n = name.lower()
    if n.startswith(b"x-spam-") or n == b"x-virus-scanned":
        return True
    if n == b"authentication-results":
        start = _skip_cfws(value)
        if start is None:  # a maze of comments before the authserv-id: drop it to be safe
            return True
        m = _AUTHSERV_ID.match(value, start)
        return m is not None and m.group(0).lower().rstrip(b".") == hostname
    return False


def _skip_cfws(value: bytes) -> int | None:
    """Index of the first byte of ``value`` past white space and (nested) comments (RFC
    5322 CFWS, quoted pairs honoured); ``None`` past ``MAX_CFWS_STEPS`` parentheses and
    quoted pairs (no real authserv-id hides behind that many)."""
    depth = 0
    pos = 0
    for _ in range(MAX_CFWS_STEPS):
        if not depth:
            while value[pos : pos + 1] in (b" ", b"\t", b"\r", b"\n"):
                pos += 1
            if value[pos : pos + 1] != b"(":
                return pos
        m = _COMMENT_STEP.search(value, pos)
        if m is None:  # unterminated comment: nothing follows it
            return len(value)
        token = m.group(0)
        depth += 1 if token == b"(" else -1 if token == b")" else 0
        pos = m.end()
    return None


def strip_untrusted(header: bytes, hostname: str) -> bytes:
    """``header`` (a header section, CRLF lines) without the fields only we may write."""
    if not _CANDIDATE.search(header):
        return header
    host = hostname.lower().rstrip(".").encode("ascii", "replace")
    out: list[bytes] = []
    pos = 0
    for m in _FIELD.finditer(header):
        if _untrusted(m.group(1), m.group(2), host):
            out.append(header[pos : m.start()])
            pos = m.end()
    out.append(header[pos:])
    return b"".join(out)


def tag_subject(header: bytes, tag: str) -> bytes:
    """``header`` with ``tag`` in front of the first Subject (or a new Subject field)."""
    raw_tag = tag.encode("utf-8")
    for m in _FIELD.finditer(header):
        if m.group(1).lower() == b"subject":
            value = m.group(2)
            if value.lstrip().startswith(raw_tag):
                return header
            start = m.start(2)
            return header[:start] + b" " + raw_tag + header[start:]
    return header + b"Subject: " + raw_tag + b"\r\n"


class ContentFilter:
    """Runs the verdict engine at the end of DATA and stores the message accordingly."""

    def __init__(
        self,
        engine: VerdictEngine,
        quarantine: Quarantine | None,
        hostname: str,
        signer: DkimSigner | None = None,
        sealer: ArcSealer | None = None,
    ) -> None:
        self.engine = engine
        self.quarantine = quarantine
        self.hostname = hostname
        self.signer = signer
        self.sealer = sealer
        self.timeout = engine.settings.timeout + PIPELINE_GRACE

    async def close(self) -> None:
        for scanner in self.engine.scanners:
            aclose = getattr(scanner, "aclose", None)
            if aclose is not None:
                await aclose()

    async def judge(self, snap: EnvelopeSnapshot, data: bytes) -> Verdict:
        """The verdict for ``data``; a pipeline that overruns or breaks is a TEMPFAIL."""
        msg = ScanInput.from_snapshot(data, snap)
        # A task of its own: the SMTP edge steps this coroutine eagerly, outside any task,
        # where ``asyncio.timeout`` cannot be used.
        task = asyncio.ensure_future(self.engine.judge(msg))
        done, _ = await asyncio.wait({task}, timeout=self.timeout)
        if not done:
            task.cancel()
            reason = f"scan pipeline took longer than {self.timeout:g} s"
        elif (exc := task.exception()) is not None:  # fail closed, whatever broke
            reason = f"scan pipeline error: {type(exc).__name__}"
        else:
            return task.result()
        emit("scan.error", queue_id=snap.queue_id, error=reason, control=Control.CP_E3.value)
        return Verdict(ScanAction.TEMPFAIL, 0.0, (), reason, Control.CP_E3)

    async def process(
        self, sink: MessageSink, snap: EnvelopeSnapshot, data: bytes, top: int, header_end: int
    ) -> Outcome:
        """Scan and store ``data``; ``data[:top]`` is our ``Received:`` field and
        ``data[top:header_end]`` the client's header section."""
        verdict = await self.judge(snap, data)
        action = verdict.action
        qid = snap.queue_id
        if verdict.delivers:
            header = strip_untrusted(data[top:header_end], self.hostname)
            if action is ScanAction.TAG_SUBJECT and verdict.subject_tag:
                header = tag_subject(header, verdict.subject_tag)
            out = b"".join((data[:top], render_headers(verdict.headers), header, data[header_end:]))
            if self.signer is not None and snap.direction is Direction.OUTBOUND:
                signature = await self.signer.signature(out)
                if signature is not None:
                    out = signature + out
            if self.sealer is not None and snap.direction is Direction.INBOUND:
                arc_set = await self.sealer.seal(out, verdict.symbol_names, qid)
                if arc_set is not None:  # None: unsealed, the event says why
                    out = arc_set + out
            queued = dataclasses.replace(snap, size=len(out))
            await sink.enqueue(queued, out)
            return Outcome(250, "2.0.0", f"Ok: queued as {qid}", True, queued, verdict)
        if action is ScanAction.QUARANTINE and self.quarantine is not None:
            await self.quarantine.hold(snap, data, verdict)
            viruses = [s.detail or s.name for s in verdict.symbols if is_virus(s)]
            if viruses:
                what = _reply_safe("virus found: " + ", ".join(viruses))
            else:
                what = _reply_safe(f"held as {verdict.reason}")
            text = f"Ok: message quarantined as {qid}, it will not be delivered ({what})"
            return Outcome(250, "2.7.0", text, True, snap, verdict, verdict.control)
        if action is ScanAction.REJECT:
            text = f"Message rejected as {_reply_safe(verdict.reason)}"
            return Outcome(554, "5.7.1", text, False, snap, verdict, verdict.control)
        # TEMPFAIL, or QUARANTINE without a quarantine: never deliver unscanned (CP-E3).
        return Outcome(
            451,
            "4.7.1",
            "Message could not be scanned, try again later",
            False,
            snap,
            verdict,
            Control.CP_E3,
        )

"""The delivery router: picks the destination of each recipient and the transport for it.

``Router.destination(recipient)`` returns the grouping key the queue uses: the per-domain
transport string (``maildir``, ``lmtp:127.0.0.1:24``, ``smtp:127.0.0.1:2526``, ``discard``),
``smarthost:HOST:PORT`` when a smarthost is configured, or ``mx:DOMAIN``.
``Router.deliver(item)`` hands the item to the matching transport and always returns exactly
one result per recipient, in order; it never raises (an internal error defers the item).
``Router.close()`` closes cached connections.

Public names: ``Router``.
Security: recipients are untrusted: domains are lower-cased and looked up only in the
configured transport table; addresses with control characters are refused here already
(before any transport sees them, see ``delivery.address``).
"""

from __future__ import annotations

import os

from mailwarden.config import Config, TransportSpec
from mailwarden.core.events import emit
from mailwarden.core.types import RecipientResult
from mailwarden.delivery.address import domain_of, result, results_for, split_envelope
from mailwarden.delivery.base import DeliveryItem, Transport
from mailwarden.delivery.lmtp import LMTPTransport
from mailwarden.delivery.maildir import MaildirTransport
from mailwarden.delivery.mx import MXResolver
from mailwarden.delivery.smtp_client import SMTPTransport


class _Discard:
    """``discard``: accept and drop (for sink domains and tests)."""

    async def deliver(self, item: DeliveryItem) -> list[RecipientResult]:
        good, bad = split_envelope(item, "discard")
        return bad + results_for(good, 250, "2.0.0", "discarded", "discard")


class Router:
    """Chooses and caches transports; the queue's only entry into the delivery stage."""

    def __init__(self, cfg: Config, *, tls_cafile: str | None = None) -> None:
        """``tls_cafile`` replaces the system CA store for the ``verify`` TLS policy."""
        self.cfg = cfg
        self.resolver = MXResolver(cfg.dns)
        self.smtp = SMTPTransport(cfg, self.resolver, cafile=tls_cafile)
        self._lmtp: dict[str, LMTPTransport] = {}
        self._maildir: dict[str, MaildirTransport] = {}
        self._discard = _Discard()

    def destination(self, recipient: str) -> str:
        domain = domain_of(recipient)
        spec = self.cfg.delivery.transport_for(domain) if domain else None
        if spec is not None and spec.kind != "mx":
            return str(spec)
        if spec is None and self.cfg.delivery.smarthost:
            return f"smarthost:{self.cfg.delivery.smarthost}"
        return f"mx:{domain}"

    def _transport(self, destination: str) -> Transport:
        kind = destination.partition(":")[0]
        if kind in ("mx", "smarthost"):
            return self.smtp
        spec = TransportSpec.parse(destination)
        if spec.kind == "smtp":
            return self.smtp
        if spec.kind == "discard":
            return self._discard
        if spec.kind == "lmtp":
            key = str(spec)
            if key not in self._lmtp:
                self._lmtp[key] = LMTPTransport(spec, self.cfg, self.resolver)
            return self._lmtp[key]
        if spec.kind == "maildir":
            root = spec.path or os.fspath(self.cfg.mail_path)
            if root not in self._maildir:
                self._maildir[root] = MaildirTransport(root)
            return self._maildir[root]
        raise ValueError(f"no transport for destination {destination!r}")

    async def deliver(self, item: DeliveryItem) -> list[RecipientResult]:
        good, refused = split_envelope(item)
        if not good:
            return self._complete(item, refused)
        work = _with_recipients(item, good) if refused else item
        try:
            transport = self._transport(item.destination)
            results = await transport.deliver(work)
        except Exception as exc:  # never raise into the scheduler: defer and say why
            emit("delivery.error", queue_id=item.queue_id, destination=item.destination,
                 error=f"{type(exc).__name__}: {exc}")  # fmt: skip
            results = results_for(
                work.recipients, 451, "4.3.0", f"internal delivery error: {type(exc).__name__}"
            )
        return self._complete(item, refused + results)

    @staticmethod
    def _complete(item: DeliveryItem, results: list[RecipientResult]) -> list[RecipientResult]:
        """Exactly one result per recipient of the original item, in its order."""
        by_rcpt: dict[str, RecipientResult] = {}
        for r in results:
            by_rcpt.setdefault(r.recipient, r)
        out = []
        for rcpt in item.recipients:
            found = by_rcpt.get(rcpt)
            if found is None:
                found = result(rcpt, 451, "4.3.0", "transport returned no result")
            out.append(found)
        return out

    async def close(self) -> None:
        await self.smtp.close()
        for lmtp in self._lmtp.values():
            await lmtp.close()


def _with_recipients(item: DeliveryItem, recipients: list[str]) -> DeliveryItem:
    return DeliveryItem(
        queue_id=item.queue_id,
        mail_from=item.mail_from,
        recipients=tuple(recipients),
        destination=item.destination,
        message=item.message,
        snapshot=item.snapshot,
    )

"""ARC sealing of inbound mail (RFC 8617): the gateway adds its own ARC set.

``ArcSealer(settings, dkim, key_root, hostname)`` is built when ``[scan.mailauth]
arc_seal`` is on. ``seal(message, symbols, queue_id)`` returns the three header fields to
prepend (``ARC-Seal``, ``ARC-Message-Signature``, ``ARC-Authentication-Results``, CRLF
lines, newest on top) or ``None``. The content hook calls it once per message at the end
of DATA for INBOUND messages that the verdict delivers, after every header edit (our
``Authentication-Results``, ``X-Spam-*``, the subject tag) and before the message is
queued, so retries send the same sealed bytes.

The set is made by dkimpy's ``ARC.sign`` (rsa-sha256, relaxed/relaxed) as
``d=arc_seal_domain; s=arc_seal_selector`` (default: the ``[dkim]`` selector of that
domain) with the key ``mailwarden dkim keygen`` made (``dkimsign.KeyStore``: 0600, reread
when it changes). The ARC-Message-Signature covers the ``[dkim] headers`` the message has.
The ARC-Authentication-Results carry our own ``Authentication-Results`` (authserv-id =
our host name; dkimpy re-serialises the parsed results, so comments are dropped) and
``cv=`` is our verdict on the incoming chain, read from the mail authentication symbols:
``ARC_NA`` -> ``cv=none`` (i=1), ``ARC_PASS`` -> ``pass``, ``ARC_FAILED`` -> ``fail`` (the
seal then covers only our set, RFC 8617 5.1.2). The seal's ``i=``/``cv=`` are checked
against that before the set is used: a failed chain is never sealed ``cv=pass``.

No set is added (event ``arc.unsealed``, the message goes on unsealed) when: the chain
could not be checked (``ARC_TEMPERROR``); the newest ARC-Seal already says ``cv=fail``
(RFC 8617 5.1.1: sealing stops there); the message has ``MAX_ARC_INSTANCE`` sets already;
not exactly one ``Authentication-Results`` claims our host name; the key is missing or
readable by others (reported once per reason per worker); dkimpy fails. A message that mail
authentication did not check (no ``ARC_*`` symbol: authenticated clients) is not sealed and
not reported. A sealed message is the event ``arc.sealed``.

Public names: ``ArcSealer``, ``MAX_ARC_INSTANCE``.
Security: the message is hostile (its header decides the instance, and its ARC fields are
hashed into our seal); what we vouch for is only our own Authentication-Results, which the
content hook has already stripped of copies claiming our host name (and the count check
here refuses to seal if one survived). The private key is read, never logged. Signing runs
in a thread for large messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import authres
import dkim
from dkim.crypto import parse_pem_private_key
from dkim.util import parse_tag_value

from mailwarden.core.events import emit
from mailwarden.scan.dkimsign import THREAD_THRESHOLD, KeyStore, present_fields
from mailwarden.scan.settings import DkimSettings, MailAuthSettings

MAX_ARC_INSTANCE = 50  # RFC 8617 4.2.1: i= is 1..50; a message with 50 sets is not sealed
MAX_REPORTED = 1024  # distinct key problems reported per worker

_EXPECTED_CV = {"ARC_NA": b"none", "ARC_PASS": b"pass", "ARC_FAILED": b"fail"}

# dkimpy's debug lines quote hostile header values: drop them.
_QUIET = logging.getLogger("mailwarden.scan.arcseal.dkimpy")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


class _Unsealed(Exception):
    """The message is not sealed, for the reason given."""


class ArcSealer:
    """Adds our ARC set to inbound messages (see the module docstring)."""

    def __init__(
        self, settings: MailAuthSettings, dkim_settings: DkimSettings, key_root: Path, hostname: str
    ) -> None:
        self.domain = settings.arc_seal_domain
        self.selector = settings.arc_seal_selector or dkim_settings.selector_for(self.domain)
        self.srv_id = hostname.lower().rstrip(".")
        self.root = key_root
        self._headers = [h.encode("ascii") for h in dkim_settings.headers]
        self._reported: set[str] = set()
        self._store = KeyStore(key_root, lambda _domain, reason: self._key_problem(reason))

    def _key_problem(self, reason: str) -> None:
        if reason not in self._reported and len(self._reported) < MAX_REPORTED:
            self._reported.add(reason)
            emit("arc.unsealed", domain=self.domain, selector=self.selector, reason=reason)

    async def seal(
        self, message: bytes, symbols: Sequence[str], queue_id: str = ""
    ) -> bytes | None:
        """The ARC set to prepend to ``message`` (the message as it will be queued), or
        ``None``; never raises. ``symbols``: the verdict's symbol names."""
        names = set(symbols)
        cv = next((c for name, c in _EXPECTED_CV.items() if name in names), None)
        if cv is None:
            if "ARC_TEMPERROR" in names:
                self._unsealed(queue_id, "the incoming ARC chain could not be checked (DNS)")
            return None  # not checked by mail authentication: nothing to vouch for
        pem = self._store.get(self.domain, self.selector)
        if pem is None:
            path = self.root / self.domain / f"{self.selector}.key"
            self._key_problem(f"no usable key {path} (mailwarden dkim keygen {self.domain})")
            return None
        try:
            if len(message) > THREAD_THRESHOLD:
                arc_set, instance = await asyncio.to_thread(self._seal, message, pem, cv)
            else:
                arc_set, instance = self._seal(message, pem, cv)
        except _Unsealed as exc:
            self._unsealed(queue_id, str(exc))
            return None
        except Exception as exc:  # dkimpy on hostile input, a bad key: never lose the mail
            self._unsealed(queue_id, f"sealing failed: {type(exc).__name__}")
            return None
        emit(
            "arc.sealed",
            queue_id=queue_id or None,
            instance=instance,
            cv=cv.decode(),
            domain=self.domain,
            selector=self.selector,
        )
        return arc_set

    def _unsealed(self, queue_id: str, reason: str) -> None:
        emit("arc.unsealed", queue_id=queue_id or None, domain=self.domain, reason=reason)

    def _seal(self, message: bytes, pem: bytes, cv: bytes) -> tuple[bytes, int]:
        arc = dkim.ARC(message, logger=_QUIET, signature_algorithm=b"rsa-sha256")
        newest, sets = arc.sorted_arc_headers()
        if newest >= MAX_ARC_INSTANCE:
            raise _Unsealed(f"the message has {newest} ARC sets, the most RFC 8617 allows")
        if _newest_seal_cv(sets, newest) == b"fail":
            raise _Unsealed("the incoming chain already ended with cv=fail (RFC 8617 5.1.1)")
        if (newest == 0) != (cv == b"none"):
            raise _Unsealed(f"ARC instance {newest} does not match our result cv={cv.decode()}")
        ours = self._our_results(arc.headers)
        if ours != 1:
            raise _Unsealed(f"{ours} Authentication-Results fields claim {self.srv_id}")
        present = present_fields(message, self._headers)
        include = [h for h in present if h not in arc.should_not_sign]
        try:
            parse_pem_private_key(pem)
        except Exception as exc:  # UnparsableKeyError, binascii.Error, ...
            path = self.root / self.domain / f"{self.selector}.key"
            raise _Unsealed(f"key {path} is not a PEM RSA private key") from exc
        fields: list[bytes] = arc.sign(
            self.selector.encode("ascii"),
            self.domain.encode("ascii"),
            pem,
            self.srv_id.encode("ascii"),
            include_headers=include,
        )
        if len(fields) != 3 or not fields[0].startswith(b"ARC-Seal: "):
            raise _Unsealed("dkimpy made no ARC set")
        tags = parse_tag_value(b" ".join(fields[0][len(b"ARC-Seal: ") :].split()))
        if tags.get(b"cv") != cv or tags.get(b"i") != str(newest + 1).encode("ascii"):
            raise _Unsealed("the seal's cv= or i= does not match our ARC result")
        return b"".join(f if f.endswith(b"\r\n") else f + b"\r\n" for f in fields), newest + 1

    def _our_results(self, headers: Sequence[tuple[bytes, bytes]]) -> int:
        """How many Authentication-Results fields dkimpy would take as ours (it parses
        them the same way to build the ARC-Authentication-Results and cv=)."""
        count = 0
        for name, value in headers:
            if name.lower() != b"authentication-results":
                continue
            text = value.decode("utf-8", "replace").replace("\r\n", " ").strip()
            try:
                parsed = authres.AuthenticationResultsHeader.parse(
                    "Authentication-Results: " + text
                )
            except Exception:  # noqa: S112  (dkimpy skips what does not parse; so do we)
                continue
            if parsed.authserv_id == self.srv_id:
                count += 1
        return count


def _newest_seal_cv(sets: Sequence[tuple[int, tuple[bytes, bytes]]], newest: int) -> bytes:
    """The cv= of the newest ARC-Seal (lower case), b"" when absent or unreadable."""
    for instance, (name, value) in sets:
        if instance == newest and name.lower() == b"arc-seal":
            try:
                return bytes(parse_tag_value(value.strip()).get(b"cv", b"")).lower()
            except Exception:  # malformed: the chain fails, our set says cv=fail
                return b""
    return b""

"""Inbound mail authentication: SPF, DKIM, DMARC and ARC as a scanner.

``MailAuthScanner(settings, hostname, nameservers, dns_timeout)`` is the ``mailauth``
scanner (symbol prefix ``MAILAUTH``). For an inbound message from a client that did not
authenticate it checks, concurrently and off the event loop (a small thread pool):

- SPF (pyspf ``check2``) of the MAIL FROM domain (``postmaster@HELO`` for the null
  sender) for the client address -> ``SPF_PASS``, ``SPF_FAILED``, ``SPF_SOFTFAIL``,
  ``SPF_NEUTRAL``, ``SPF_NONE``, ``SPF_TEMPERROR``, ``SPF_PERMERROR``;
- every DKIM signature (dkimpy, at most ``MAX_DKIM_SIGNATURES``) -> ``DKIM_VALID``,
  ``DKIM_INVALID``, ``DKIM_TEMPERROR`` or ``DKIM_NONE``;
- DMARC (RFC 7489) of the From domain: the record at ``_dmarc.<From domain>``, else at
  the last two labels of it (a simplification of the organisational domain: there is no
  public suffix list here); alignment is *relaxed by suffix*: two domains align when they
  are equal or one is a subdomain of the other (siblings such as ``a.example.org`` and
  ``b.example.org`` do not align here though RFC 7489 would align them -- a false
  failure, never a false pass). Results ``DMARC_PASS``, ``DMARC_FAILED``, ``DMARC_NONE``,
  ``DMARC_TEMPERROR``, ``DMARC_PERMERROR``; a From field that is missing, repeated or
  names several domains is ``DMARC_BAD_FROM``. A failure under ``p=reject`` adds
  ``DMARC_POLICY_REJECT`` (forced REJECT by default), under ``p=quarantine``
  ``DMARC_POLICY_QUARANTINE`` (forced QUARANTINE), when ``dmarc_enforce`` is on; ``pct``
  is honoured by sampling, ``sp`` for subdomains;
- ARC (RFC 8617), when ``arc`` is on: a message without ARC fields is ``ARC_NA``
  (``arc=none``); otherwise the whole chain is validated with dkimpy's ``ARC`` (every
  ARC-Seal, the newest ARC-Message-Signature, the cv= sequence; at most
  ``MAX_ARC_SETS`` sets, keys through the same resolver as DKIM) -> ``ARC_PASS``,
  ``ARC_FAILED`` (broken seal or signature, changed message, a chain that already
  failed, malformed or too many sets, no key) or ``ARC_TEMPERROR`` (DNS timeout or
  SERVFAIL). A valid chain says only that the sealers' domains vouch for the hops, not
  that they are trustworthy: alone it overrides no SPF/DKIM/DMARC result, ``ARC_PASS`` scores
  0 and ``ARC_FAILED`` only a little (never a forced action by default);
- trusted ARC sealers (``arc_trusted_sealers``, RFC 8617 section 7.2.1, a local policy
  override in the sense of RFC 7489 section 6.7): a DMARC failure is excused when the
  chain passed, the newest ARC-Seal's ``d=`` is listed, and that sealer's own
  ARC-Authentication-Results vouch for the From domain (``dmarc=pass`` for it; without a
  dmarc clause, an aligned ``dkim=pass`` or ``spf=pass``): ``DMARC_ARC_OVERRIDE`` replaces
  ``DMARC_POLICY_REJECT``/``_QUARANTINE`` (``DMARC_FAILED`` stays), the dmarc clause gets
  ``reason="policy overridden: trusted ARC sealer D"`` and the event ``dmarc_override``.
  A trusted sealer that itself saw the message fail (a spoof relayed by a trusted list)
  excuses nothing; neither does an untrusted sealer or a broken chain.

No symbol name ends in ``_FAIL``: that suffix means "a scanner failed, fail closed".
A DNS timeout or SERVFAIL is a ``*_TEMPERROR`` symbol (score 0), never a failure, and no
DMARC policy is enforced on a temporary error; the whole check is bounded by
``[scan.mailauth] timeout`` (each query by ``[dns] timeout``). The results go into an
``Authentication-Results`` header (RFC 8601, authserv-id = our host name) that the
content hook prepends to delivered mail, and into the event ``mailauth.result``.

Public names: ``MailAuthScanner``, ``AuthOutcome``, ``DEFAULT_SCORES``,
``MAX_DKIM_SIGNATURES``, ``MAX_ARC_SETS``, ``aligned``, ``parse_dmarc``, ``from_domains``,
``aar_vouches``, ``safe_domain``.
Security: everything here is hostile: the message, its signatures, the envelope, and
the DNS answers of the sender's zones. Work is bounded (signatures, records, time);
values quoted into the header are restricted to a safe character set, so a message can
not inject header lines or results through them. dkimpy's own log lines (which quote
the hostile fields) go to a logger that drops them. Queries only the configured resolvers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any, TypeVar

import authres
import authres.arc
import authres.dmarc
import dkim
import spf

from mailwarden.core.events import emit
from mailwarden.core.types import Direction, Symbol
from mailwarden.scan.authdns import AuthResolver, DNSTempError, install_spf_hook, use_for_spf
from mailwarden.scan.base import ScanInput, clean_detail, fail_symbol
from mailwarden.scan.settings import MailAuthSettings

MAX_DKIM_SIGNATURES = 10  # signatures verified per message; more are ignored
MAX_ARC_SETS = 10  # ARC sets validated per message (each one hashes the body); more = fail
MAX_AUTH_THREADS = 16  # worker threads for the blocking libraries, per process
MIN_DKIM_KEY_BITS = 1024  # RFC 8301: shorter RSA keys are not accepted
ENGINE_GRACE = 2.0  # seconds the verdict engine waits beyond our own budget
MAX_REASON = 80  # characters of a reason quoted into Authentication-Results
DMARC_DNS_LOOKUPS = 2  # _dmarc.<from>, then _dmarc.<last two labels>
MAX_AAR_CHARS = 8192  # a trusted sealer's ARC-Authentication-Results longer than this is ignored

DEFAULT_SCORES: dict[str, float] = {
    "SPF_PASS": -0.5,
    "SPF_FAILED": 3.0,
    "SPF_SOFTFAIL": 1.0,
    "SPF_NEUTRAL": 0.0,
    "SPF_NONE": 0.0,
    "SPF_TEMPERROR": 0.0,
    "SPF_PERMERROR": 0.5,
    "DKIM_VALID": -0.5,
    "DKIM_INVALID": 2.0,
    "DKIM_NONE": 0.0,
    "DKIM_TEMPERROR": 0.0,
    "DMARC_PASS": -1.0,
    "DMARC_FAILED": 3.0,
    "DMARC_NONE": 0.0,
    "DMARC_TEMPERROR": 0.0,
    "DMARC_PERMERROR": 0.5,
    "DMARC_BAD_FROM": 3.0,
    "DMARC_POLICY_REJECT": 5.0,
    "DMARC_POLICY_QUARANTINE": 4.0,
    "DMARC_ARC_OVERRIDE": -3.0,  # a trusted sealer vouches: cancels DMARC_FAILED
    "ARC_PASS": 0.0,  # anyone can seal: an intact chain alone earns no trust
    "ARC_FAILED": 1.0,
    "ARC_NA": 0.0,
    "ARC_TEMPERROR": 0.0,
}
_ARC_SYMBOL = {
    "pass": "ARC_PASS",
    "fail": "ARC_FAILED",
    "none": "ARC_NA",
    "temperror": "ARC_TEMPERROR",
}

_SPF_SYMBOL = {
    "pass": "SPF_PASS",
    "fail": "SPF_FAILED",
    "softfail": "SPF_SOFTFAIL",
    "neutral": "SPF_NEUTRAL",
    "none": "SPF_NONE",
    "temperror": "SPF_TEMPERROR",
    "permerror": "SPF_PERMERROR",
}
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?\.)*[a-z0-9-]{1,63}$")
_ARC_FIELD = re.compile(
    rb"^arc-(?:seal|message-signature|authentication-results)[ \t]*:", re.I | re.M
)
_AAR_INSTANCE = re.compile(r"^\s*i\s*=\s*\d+\s*;")

_DKIM_REASONS: dict[type[Exception], str] = {
    dkim.KeyFormatError: "bad key record",
    dkim.MessageFormatError: "malformed signature",
    dkim.ParameterError: "unsupported signature parameters",
    dkim.UnknownKeyTypeError: "unknown key type",
}

T = TypeVar("T")

# dkimpy logs verification errors with the hostile field values in them; drop them here
# (the outcome carries a fixed reason instead).
_QUIET = logging.getLogger("mailwarden.scan.mailauth.dkimpy")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False

DnsFunc = Callable[..., "bytes | None"]


@dataclass(slots=True)
class DkimResult:
    result: str  # pass, fail, permerror, temperror
    domain: str = ""
    selector: str = ""
    reason: str = ""


@dataclass(slots=True)
class ArcResult:
    result: str  # pass, fail, none, temperror
    reason: str = ""
    domain: str = ""  # d= of the newest ARC-Seal
    selector: str = ""
    sets: int = 0  # the newest instance (i=)
    oldest_pass: int = 0  # RFC 8617 5.2: oldest instance whose AMS verifies, 0 = all do
    aar: str = ""  # the newest ARC-Authentication-Results value (unfolded), when it passed


@dataclass(slots=True)
class AuthOutcome:
    """What the checks found for one message (also the data of the header and event)."""

    spf: str = "none"
    spf_domain: str = ""
    spf_helo: bool = False  # the null sender: SPF checked the HELO identity
    spf_reason: str = ""
    dkim: list[DkimResult] = field(default_factory=list)
    dmarc: str = "none"
    dmarc_policy: str = ""
    from_domain: str = ""
    arc: ArcResult = field(default_factory=lambda: ArcResult("none"))
    client_ip: str = ""
    dmarc_override: str = ""  # the trusted sealer that excused a DMARC failure


def safe_domain(value: str) -> str:
    v = value.strip().lower().rstrip(".")
    return v if _DOMAIN.match(v) else ""


def aligned(a: str, b: str, strict: bool) -> bool:
    """DMARC identifier alignment; relaxed mode simplified to "equal or a subdomain"."""
    if not a or not b:
        return False
    if a == b:
        return True
    return not strict and (a.endswith("." + b) or b.endswith("." + a))


def parse_dmarc(record: bytes) -> dict[str, str] | None:
    """The tags of a DMARC record (``None`` when it is not one)."""
    try:
        text = record.decode("ascii")
    except UnicodeDecodeError:
        return None
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if not sep:
            continue
        tags.setdefault(key.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1" or not text.lstrip().startswith("v"):
        return None
    return tags


def from_domains(header: bytes) -> list[str] | None:
    """The domain of each address of the (single) From field; ``None`` when the From
    field is missing, repeated, or holds an address that has no valid domain."""
    parsed = BytesHeaderParser(policy=compat32).parsebytes(header)
    values = parsed.get_all("From") or []
    if len(values) != 1:
        return None
    addrs = getaddresses([str(values[0])])
    domains = []
    for _, addr in addrs:
        if "@" not in addr:
            return None
        d = safe_domain(addr.rpartition("@")[2])
        if not d:
            return None
        domains.append(d)
    return domains or None


def aar_vouches(aar: str, from_domain: str) -> bool:
    """True if the ARC-Authentication-Results value ``aar`` (``i=N; authserv-id; ...``)
    says the message passed DMARC for ``from_domain`` when that sealer received it: a
    ``dmarc=pass`` for it and no other dmarc result; without any dmarc clause, a
    ``dkim=pass`` or ``spf=pass`` whose domain aligns (relaxed) with it."""
    if not from_domain or len(aar) > MAX_AAR_CHARS:
        return False
    value = _AAR_INSTANCE.sub("", aar, count=1).replace("\r\n", " ")
    try:
        parsed = authres.AuthenticationResultsHeader.parse(
            "Authentication-Results: " + value.strip()
        )
        results = list(parsed.results)
    except Exception:  # hostile text the parser refused (several exception types)
        return False
    dmarc = [r for r in results if getattr(r, "method", "") == "dmarc"]
    if dmarc:
        return all(
            _prop(r, "result") == "pass"
            and safe_domain(_prop(r, "header", "from") or from_domain) == from_domain
            for r in dmarc
        )
    for r in results:
        method = getattr(r, "method", "")
        if _prop(r, "result") != "pass":
            continue
        if method == "dkim":
            domain = _prop(r, "header", "d")
        elif method == "spf":
            domain = _prop(r, "smtp", "mailfrom").rpartition("@")[2]
        else:
            continue
        if aligned(safe_domain(domain), from_domain, strict=False):
            return True
    return False


def _prop(result: Any, ptype: str, name: str = "") -> str:
    """The result (``ptype="result"``) or the ``ptype.name`` property of a parsed clause,
    lower case ("" when absent); the generic parser knows no method-specific names."""
    if ptype == "result":
        return str(getattr(result, "result", "") or "").lower()
    for prop in getattr(result, "properties", None) or ():
        if str(prop.type).lower() == ptype and str(prop.name).lower() == name:
            return str(prop.value or "").lower()
    return ""


def _reason(text: str) -> str:
    out = "".join(c for c in text if 32 <= ord(c) < 127 and c not in '"\\')
    return out[:MAX_REASON]


class MailAuthScanner:
    """SPF, DKIM, DMARC and ARC for inbound mail (see the module docstring)."""

    name = "MAILAUTH"

    def __init__(
        self,
        settings: MailAuthSettings,
        hostname: str,
        nameservers: Sequence[str] = (),
        dns_timeout: float = 5.0,
        scan_timeout: float | None = None,
    ) -> None:
        self.settings = settings
        self.hostname = hostname.lower().rstrip(".")
        budget = settings.timeout
        if scan_timeout is not None:  # finish before the verdict engine gives up on us
            budget = min(budget, max(1.0, scan_timeout - ENGINE_GRACE))
        self.budget = budget
        self.timeout = budget + ENGINE_GRACE  # read by the verdict engine
        self.resolver = AuthResolver(nameservers, dns_timeout)
        self.trusted_sealers = frozenset(settings.arc_trusted_sealers)
        self._pool = ThreadPoolExecutor(MAX_AUTH_THREADS, thread_name_prefix="mailauth")
        install_spf_hook()

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the scanner ---------------------------------------------------------------------
    async def scan(self, msg: ScanInput) -> list[Symbol]:
        if msg.direction is not Direction.INBOUND or msg.auth_user:
            return []
        try:
            outcome = await self.check(msg)
        except Exception as exc:  # a bug, not a DNS problem: fail closed like any scanner
            return [fail_symbol(self.name, f"mail authentication error: {type(exc).__name__}")]
        msg.headers.append(("Authentication-Results", self.header_value(outcome)))
        emit(
            "mailauth.result",
            queue_id=msg.queue_id or None,
            client=msg.client_ip,
            spf=outcome.spf,
            spf_domain=outcome.spf_domain or None,
            dkim=[f"{r.result}:{r.domain}" for r in outcome.dkim] or ["none"],
            dmarc=outcome.dmarc,
            dmarc_policy=outcome.dmarc_policy or None,
            from_domain=outcome.from_domain or None,
            arc=outcome.arc.result if self.settings.arc else None,
            arc_domain=outcome.arc.domain or None,
            dmarc_override=outcome.dmarc_override or None,
        )
        return self.symbols(outcome)

    async def check(self, msg: ScanInput) -> AuthOutcome:
        """Run the checks for ``msg`` within the time budget."""
        end = msg.raw.find(b"\r\n\r\n")
        header = msg.raw if end < 0 else msg.raw[: end + 2]
        out = AuthOutcome(client_ip=msg.client_ip)
        has_arc = self.settings.arc and bool(_ARC_FIELD.search(header))
        froms = from_domains(header)
        out.from_domain = froms[0] if froms and len(set(froms)) == 1 else ""
        helo = safe_domain(msg.helo)
        sender = msg.sender or (f"postmaster@{helo}" if helo else "")
        out.spf_domain = safe_domain(sender.rpartition("@")[2]) if sender else ""
        out.spf_helo = not msg.sender

        deadline = time.monotonic() + self.budget
        spf_job = self._run(self._spf, msg.client_ip, sender, msg.helo, self.budget)
        dkim_job = self._run(self._dkim, msg.raw)
        dmarc_job = self._run(self._dmarc_record, out.from_domain) if out.from_domain else None
        arc_job = self._run(self._arc, msg.raw) if has_arc else None
        jobs = [j for j in (spf_job, dkim_job, dmarc_job, arc_job) if j is not None]
        await asyncio.wait(jobs, timeout=max(0.0, deadline - time.monotonic()))

        out.spf, out.spf_reason = _result(spf_job, ("temperror", "no SPF answer in time"))
        if not sender:
            out.spf, out.spf_reason = "none", "no sender domain"
        out.dkim = _result(dkim_job, [DkimResult("temperror", reason="no DKIM answer in time")])
        if arc_job is not None:
            out.arc = _result(arc_job, ArcResult("temperror", reason="no ARC answer in time"))
        if froms is None or not out.from_domain:
            out.dmarc = "permerror"
            return out
        record: tuple[str, dict[str, str] | None, bool] = (
            _result(dmarc_job, ("temperror", None, False)) if dmarc_job else ("none", None, False)
        )
        self._evaluate_dmarc(out, *record)
        self._trusted_override(out)
        return out

    def _trusted_override(self, out: AuthOutcome) -> None:
        """RFC 8617 7.2.1: a DMARC failure excused by a trusted sealer's valid chain."""
        arc = out.arc
        if (
            out.dmarc == "fail"
            and arc.result == "pass"
            and arc.domain in self.trusted_sealers
            and aar_vouches(arc.aar, out.from_domain)
        ):
            out.dmarc_override = arc.domain

    def _run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- SPF -----------------------------------------------------------------------------
    def _spf(self, ip: str, sender: str, helo: str, budget: float) -> tuple[str, str]:
        if not sender or not ip:
            return "none", ""
        with use_for_spf(self.resolver):
            try:
                result, explanation = spf.check2(i=ip, s=sender, h=helo, querytime=budget)
            except Exception as exc:  # the library's bug is a temporary error, not a verdict
                return "temperror", f"spf: {type(exc).__name__}"
        result = str(result).lower()
        return (result if result in _SPF_SYMBOL else "permerror"), str(explanation)

    # -- DKIM ----------------------------------------------------------------------------
    def _dnsfunc(self, no_key: list[bytes], temp: list[str]) -> DnsFunc:
        """dkimpy's key lookup through our resolver; names without a key go to ``no_key``,
        temporary DNS errors to ``temp`` (and raise ``dkim.DnsTimeoutError``)."""

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
            try:
                records = self.resolver.txt(name.decode("ascii"), timeout)
            except (UnicodeDecodeError, ValueError):
                return None
            except DNSTempError as exc:
                temp.append(str(exc))
                raise dkim.DnsTimeoutError(str(exc)) from exc
            if not records:
                no_key.append(name)
            return records[0] if records else None

        return dnsfunc

    def _dkim(self, raw: bytes) -> list[DkimResult]:
        try:
            d = dkim.DKIM(
                raw, logger=_QUIET, minkey=MIN_DKIM_KEY_BITS, timeout=self.resolver.timeout
            )
        except dkim.DKIMException:
            return [DkimResult("permerror", reason="message format")]
        count = sum(1 for k, _ in d.headers if k.lower() == b"dkim-signature")
        results = []
        no_key: list[bytes] = []
        dnsfunc = self._dnsfunc(no_key, [])
        for idx in range(min(count, MAX_DKIM_SIGNATURES)):
            d.signature_fields = {}
            no_key.clear()
            try:
                ok = d.verify(idx=idx, dnsfunc=dnsfunc)
                if ok:
                    res = DkimResult("pass")
                elif no_key:  # RFC 6376 6.1.2: no key record is a permanent error
                    res = DkimResult("permerror", reason="no key in DNS")
                else:
                    res = DkimResult("fail", reason="bad signature")
            except dkim.DnsTimeoutError as exc:
                res = DkimResult("temperror", reason=str(exc))
            except dkim.ValidationError as exc:
                if str(exc).startswith("body hash mismatch"):  # the message was changed
                    res = DkimResult("fail", reason="body hash mismatch")
                else:
                    res = DkimResult("permerror", reason="invalid signature fields")
            except dkim.DKIMException as exc:  # fixed reasons: never quote the signature
                res = DkimResult("permerror", reason=_DKIM_REASONS.get(type(exc), "bad signature"))
            except Exception as exc:  # hostile input the library did not expect
                res = DkimResult("permerror", reason=f"{type(exc).__name__}")
            tags = d.signature_fields if isinstance(d.signature_fields, dict) else {}
            res.domain = safe_domain(_text(tags.get(b"d", b"")))
            res.selector = safe_domain(_text(tags.get(b"s", b"")))
            results.append(res)
        return results

    # -- ARC -----------------------------------------------------------------------------
    def _arc(self, raw: bytes) -> ArcResult:
        """Validate the ARC chain of ``raw`` (RFC 8617 5.2); called only when it has ARC
        fields. Reasons are fixed texts: dkimpy's messages quote the hostile fields."""
        no_key: list[bytes] = []
        temp: list[str] = []
        try:
            arc = dkim.ARC(
                raw, logger=_QUIET, minkey=MIN_DKIM_KEY_BITS, timeout=self.resolver.timeout
            )
            newest, _ = arc.sorted_arc_headers()
            if newest > MAX_ARC_SETS:
                return ArcResult("fail", f"more than {MAX_ARC_SETS} ARC sets", sets=newest)
            cv, data, _why = arc.verify(dnsfunc=self._dnsfunc(no_key, temp))
        except dkim.DKIMException:
            return ArcResult("fail", "malformed ARC set")
        except Exception as exc:  # hostile input the library did not expect
            return ArcResult("fail", f"malformed ARC set ({type(exc).__name__})")
        out = ArcResult("fail", sets=newest)
        if data and isinstance(data[0], dict):
            out.domain = safe_domain(_text(data[0].get("as-domain", b"")))
            out.selector = safe_domain(_text(data[0].get("as-selector", b"")))
        if cv == dkim.CV_Pass:
            out.result = "pass"
            out.oldest_pass = _oldest_pass(data, newest)
            out.aar = _newest_aar(arc, newest)
        elif cv is None:  # an ARC-Seal says cv=fail: the chain was broken before us
            out.reason = "the chain had already failed (cv=fail)"
        elif cv == dkim.CV_None:  # ARC fields, but none with a usable instance tag
            out.reason = "ARC fields without a valid instance"
        elif len(data) < newest:  # a set was missing or malformed: verification stopped
            out.reason = "malformed or incomplete ARC set"
        elif temp:
            out.result, out.reason = "temperror", "temporary DNS error for an ARC key"
        elif no_key:
            out.reason = "no key in DNS"
        elif data and not data[0].get("ams-valid", False):
            out.reason = f"message signature i={newest} did not verify"
        else:
            broken = [r for r in data if isinstance(r, dict) and not r.get("as-valid", False)]
            if broken:
                out.reason = f"seal i={int(broken[0]['instance'])} did not verify"
            else:
                out.reason = "malformed or inconsistent ARC sets"
        return out

    # -- DMARC ---------------------------------------------------------------------------
    def _dmarc_record(self, domain: str) -> tuple[str, dict[str, str] | None, bool]:
        """("found"|"none"|"temperror", tags, found at the organisational domain)."""
        labels = domain.split(".")
        candidates = [domain]
        if len(labels) > 2:
            candidates.append(".".join(labels[-2:]))
        for i, name in enumerate(candidates[:DMARC_DNS_LOOKUPS]):
            try:
                records = self.resolver.txt(f"_dmarc.{name}.")
            except DNSTempError:
                return "temperror", None, False
            parsed = [t for t in (parse_dmarc(r) for r in records) if t is not None]
            if len(parsed) == 1:
                return "found", parsed[0], i > 0
            if len(parsed) > 1:  # RFC 7489 6.6.3: several records = no policy
                return "none", None, False
        return "none", None, False

    def _evaluate_dmarc(
        self, out: AuthOutcome, state: str, tags: dict[str, str] | None, at_org: bool
    ) -> None:
        if state == "temperror":
            out.dmarc = "temperror"
            return
        if tags is None:
            out.dmarc = "none"
            return
        policy = tags.get("sp", tags.get("p", "")) if at_org else tags.get("p", "")
        policy = policy.lower()
        if policy not in ("none", "quarantine", "reject"):
            out.dmarc = "permerror"
            return
        out.dmarc_policy = policy
        spf_ok = out.spf == "pass" and aligned(
            out.spf_domain, out.from_domain, tags.get("aspf", "r").lower() == "s"
        )
        strict_dkim = tags.get("adkim", "r").lower() == "s"
        dkim_ok = any(
            r.result == "pass" and aligned(r.domain, out.from_domain, strict_dkim) for r in out.dkim
        )
        if spf_ok or dkim_ok:
            out.dmarc = "pass"
        elif out.spf == "temperror" or any(r.result == "temperror" for r in out.dkim):
            out.dmarc = "temperror"  # might have passed: do not apply the policy
        else:
            out.dmarc = "fail"
            pct = _int(tags.get("pct", "100"), 100)
            if pct < 100 and random.randrange(100) >= pct:  # noqa: S311 (sampling, not crypto)
                # RFC 7489 6.6.4: not sampled -> the next milder policy
                out.dmarc_policy = {"reject": "quarantine", "quarantine": "none"}.get(
                    policy, "none"
                )

    # -- results -------------------------------------------------------------------------
    def symbols(self, out: AuthOutcome) -> list[Symbol]:
        syms: list[Symbol] = []

        def add(name: str, detail: str = "") -> None:
            syms.append(Symbol(name, DEFAULT_SCORES.get(name, 0.0), clean_detail(detail)))

        add(_SPF_SYMBOL.get(out.spf, "SPF_PERMERROR"), out.spf_domain)
        if not out.dkim:
            add("DKIM_NONE")
        for r in out.dkim:
            name = {"pass": "DKIM_VALID", "temperror": "DKIM_TEMPERROR"}.get(
                r.result, "DKIM_INVALID"
            )
            add(name, f"{r.domain} {r.reason}".strip())
        if out.dmarc == "pass":
            add("DMARC_PASS", out.from_domain)
        elif out.dmarc == "fail":
            add("DMARC_FAILED", f"{out.from_domain} p={out.dmarc_policy}")
            if out.dmarc_override:  # a trusted sealer vouches: the policy is not applied
                add("DMARC_ARC_OVERRIDE", f"p={out.dmarc_policy} sealed by {out.dmarc_override}")
            elif self.settings.dmarc_enforce and out.dmarc_policy == "reject":
                add("DMARC_POLICY_REJECT", f"DMARC policy of {out.from_domain}")
            elif self.settings.dmarc_enforce and out.dmarc_policy == "quarantine":
                add("DMARC_POLICY_QUARANTINE", f"DMARC policy of {out.from_domain}")
        elif out.dmarc == "temperror":
            add("DMARC_TEMPERROR", out.from_domain)
        elif out.dmarc == "permerror" and not out.from_domain:
            add("DMARC_BAD_FROM", "From field missing, repeated or without a valid domain")
        elif out.dmarc == "permerror":
            add("DMARC_PERMERROR", out.from_domain)
        else:
            add("DMARC_NONE", out.from_domain)
        if self.settings.arc:
            name = _ARC_SYMBOL.get(out.arc.result, "ARC_FAILED")
            add(name, f"{out.arc.domain} {out.arc.reason}".strip())
        return syms

    def header_value(self, out: AuthOutcome) -> str:
        """The ``Authentication-Results`` value (RFC 8601), folded one method per line."""
        results: list[Any] = []
        spf_kw: dict[str, Any] = {"result": out.spf}
        if out.spf_domain:
            spf_kw["smtp_helo" if out.spf_helo else "smtp_mailfrom"] = out.spf_domain
        if out.spf not in ("pass", "none") and out.spf_reason:
            spf_kw["reason"] = _reason(out.spf_reason)
        results.append(authres.SPFAuthenticationResult(**spf_kw))
        if not out.dkim:
            results.append(authres.DKIMAuthenticationResult(result="none"))
        for r in out.dkim:
            kw: dict[str, Any] = {"result": r.result}
            if r.reason and r.result != "pass":
                kw["reason"] = _reason(r.reason)
            if r.domain:
                kw["header_d"] = r.domain
            if r.selector:
                kw["header_s"] = r.selector
            results.append(authres.DKIMAuthenticationResult(**kw))
        dmarc_kw: dict[str, Any] = {"result": out.dmarc}
        if out.from_domain:
            dmarc_kw["header_from"] = out.from_domain
        if out.dmarc_policy:
            dmarc_kw["policy"] = out.dmarc_policy
        if out.dmarc_override:  # RFC 7489 6.7 local policy override, said where it survives
            dmarc_kw["reason"] = _reason(
                f"policy overridden: trusted ARC sealer {out.dmarc_override}"
            )
        results.append(authres.dmarc.DMARCAuthenticationResult(**dmarc_kw))
        if self.settings.arc:
            results.append(self._arc_result(out))
        parts = [self.hostname] + [str(r) for r in results]
        for p in parts:  # belt and braces: every value was filtered above
            if not all(32 <= ord(c) < 127 for c in p):
                raise ValueError("unsafe Authentication-Results value")
        return ";\r\n\t".join(parts)

    @staticmethod
    def _arc_result(out: AuthOutcome) -> Any:
        """The ``arc=`` clause (RFC 8617 section 4.1.1: none, pass or fail)."""
        arc = out.arc
        # No registered temperror for ARC: a chain we could not check is not a pass.
        kw: dict[str, Any] = {"result": "fail" if arc.result == "temperror" else arc.result}
        if arc.reason and arc.result != "pass":
            kw["reason"] = _reason(arc.reason)
        if arc.result != "none" and arc.sets:  # the newest seal, as a comment
            kw["result_comment"] = f"i={arc.sets}" + (f" d={arc.domain}" if arc.domain else "")
        if arc.result == "pass":
            kw["header_oldest_pass"] = str(arc.oldest_pass)
        ip = _safe_ip(out.client_ip)
        if ip and arc.result != "none":
            kw["smtp_remote_ip"] = ip
        return authres.arc.ARCAuthenticationResult(**kw)


def _newest_aar(arc: dkim.ARC, newest: int) -> str:
    """The ARC-Authentication-Results value of instance ``newest`` (relaxed: unfolded)."""
    _, sets = arc.sorted_arc_headers()
    for instance, (name, value) in sets:
        if instance == newest and name.lower() == b"arc-authentication-results":
            return _text(value).strip()
    return ""


def _oldest_pass(data: Sequence[Any], newest: int) -> int:
    """The oldest instance from which on every ARC-Message-Signature verifies (0: all)."""
    oldest = newest
    for r in data:  # newest first
        if not (isinstance(r, dict) and r.get("ams-valid")):
            break
        oldest = int(r["instance"])
    return 0 if oldest <= 1 else oldest


def _safe_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return ""


def _result(fut: asyncio.Future[T] | None, default: T) -> T:
    if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
        return default
    return fut.result()


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value)


def _int(text: str, default: int) -> int:
    try:
        return max(0, min(100, int(text)))
    except ValueError:
        return default

"""Settings of the scanning layer, ready to be mounted as the ``[scan]`` config section.

Every field has a safe default: with no section at all only the built-in scanners run (and
``scan.factory.scanning_notice`` says so). ``ScanSettings`` holds per-direction thresholds
(``inbound``/``outbound``), per-symbol score overrides, forced actions, and one block per
backend (``clamav``, ``rspamd``, ``builtin``).

Example (TOML)::

    [scan]
    timeout = "60s"
    [scan.clamav]
    socket = "/run/clamav/clamd.ctl"       # or "127.0.0.1:3310"
    max_signature_age = "24h"
    [scan.rspamd]
    url = "http://127.0.0.1:11333"
    [scan.inbound]
    add_header = 6.0
    reject = 15.0
    [scan.scores]
    RSPAMD_BAYES_SPAM = 4.0

Public names: ``ScanAction`` (re-exported as ``scan.Action``), ``Thresholds``,
``ClamavSettings``, ``RspamdSettings``, ``BuiltinSettings``, ``MailAuthSettings``,
``ScanSettings``, ``DkimSettings`` (the top-level ``[dkim]`` section: outbound signing).
Security: operator-supplied (trusted) values, validated strictly: unknown keys are errors,
so a misspelt safety setting is never silently ignored.
"""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mailwarden.core.durations import Duration

_SYMBOL_NAME = re.compile(r"^[A-Z0-9_]{1,64}$")
_DKIM_DOMAIN = re.compile(
    r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$"
)
_SELECTOR = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def _domain_names(values: list[str]) -> list[str]:
    """Domain names from the config, normalised (lower case, no final dot) and checked."""
    out = []
    for v in values:
        v = v.strip().lower().rstrip(".")
        if not _DKIM_DOMAIN.match(v):
            raise ValueError(f"not a domain name: {v!r}")
        out.append(v)
    return out


class ScanAction(StrEnum):
    """What the verdict engine decided for a message (ordered from mild to severe)."""

    ACCEPT = "accept"
    ADD_HEADER = "add_header"  # deliver with X-Spam-* headers saying "Yes"
    TAG_SUBJECT = "tag_subject"  # ... and a tag in front of the Subject
    QUARANTINE = "quarantine"  # keep, never deliver (virus, bomb, high score)
    REJECT = "reject"  # 554 5.7.1 at end of DATA
    TEMPFAIL = "tempfail"  # 451 4.7.1: a scanner failed, fail closed

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {a: i for i, a in enumerate(ScanAction)}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Thresholds(_Section):
    """Score thresholds of one direction; ``None`` switches an action off.

    The highest threshold the score reaches wins; they must not decrease in the order
    add_header <= tag_subject <= quarantine <= reject.
    """

    add_header: float | None = 6.0
    tag_subject: float | None = 10.0
    quarantine: float | None = 12.0
    reject: float | None = 15.0

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        last = float("-inf")
        for name in ("add_header", "tag_subject", "quarantine", "reject"):
            value = getattr(self, name)
            if value is None:
                continue
            if value < last:
                raise ValueError(f"{name} = {value} is below a milder action's threshold")
            last = value
        return self


class ClamavSettings(_Section):
    """[scan.clamav]: the clamd backend. Off unless ``socket`` is set."""

    # A Unix socket path ("/run/clamav/clamd.ctl") or "HOST:PORT" (use 127.0.0.1).
    socket: str = ""
    timeout: Duration = 60.0  # one INSTREAM scan, connect to verdict
    connect_timeout: Duration = 5.0
    max_concurrent: int = Field(default=8, ge=1, le=256)  # stay below clamd's MaxThreads
    # Reuse a clamd IDSESSION connection idle up to this long; keep it well below clamd's
    # ReadTimeout (which ends idle sessions; 120 s by default). 0 = a connection per scan.
    session_idle: Duration = Field(default=10.0, le=60.0)
    chunk_size: int = Field(default=65536, ge=1024, le=1 << 22)  # INSTREAM chunk bytes
    # SU-5: alert (event scan.signatures_stale) past alert age; fail closed past max age.
    signature_alert_age: Duration = 86400.0
    max_signature_age: Duration = 86400.0
    version_check_interval: Duration = 300.0  # how often VERSION is asked
    # clamd names starting with these prefixes are heuristics, scored, not forced.
    heuristic_prefixes: list[str] = Field(default_factory=lambda: ["Heuristics."])


class RspamdSettings(_Section):
    """[scan.rspamd]: the rspamd backend. Off unless ``url`` is set."""

    url: str = ""  # e.g. "http://127.0.0.1:11333" (the normal worker, not the controller)
    timeout: Duration = 30.0
    max_connections: int = Field(default=16, ge=1, le=512)
    password: str = ""  # optional "Password" header for the controller worker

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("rspamd url must start with http:// or https://")
        return value.rstrip("/")


class BuiltinSettings(_Section):
    """[scan.builtin]: the embedded scanners (always on as a second line)."""

    enabled: bool = True
    timeout: Duration = 60.0
    # Extra SHA-256 hashes (hex) of known-bad attachments, reported as BUILTIN_VIRUS.
    bad_sha256: list[str] = Field(default_factory=list)

    @field_validator("bad_sha256")
    @classmethod
    def _hex(cls, values: list[str]) -> list[str]:
        out = []
        for v in values:
            v = v.strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", v):
                raise ValueError(f"not a SHA-256 hex digest: {v!r}")
            out.append(v)
        return out


class MailAuthSettings(_Section):
    """[scan.mailauth]: inbound SPF, DKIM, DMARC and ARC, see ``scan.mailauth``.

    Off unless ``enabled = true``: every inbound message then costs DNS queries, so it is
    switched on together with a resolver the operator trusts (``[dns] nameservers``, a
    local validating resolver; the system resolver when that list is empty). Messages of
    authenticated users and outbound messages are never checked.
    """

    enabled: bool = False
    # Upper bound for all checks of one message (each DNS query is also bounded by
    # [dns] timeout); what is unfinished by then is a TEMPERROR, never a failure.
    timeout: Duration = 20.0
    # Honour the sender domain's DMARC policy: p=reject -> 554 (DMARC_POLICY_REJECT),
    # p=quarantine -> quarantine (DMARC_POLICY_QUARANTINE). Off: the DMARC result is
    # only a scored symbol (DMARC_FAILED) and a header.
    dmarc_enforce: bool = True
    # Validate ARC chains (RFC 8617): ARC_PASS / ARC_FAILED / ARC_NA / ARC_TEMPERROR and
    # an arc= clause in Authentication-Results. Scored only, never a forced action.
    arc: bool = True
    # Sealers whose valid chain (arc=pass, newest ARC-Seal d= listed) excuses a DMARC
    # failure when their own ARC-Authentication-Results vouch for the From domain:
    # DMARC_ARC_OVERRIDE instead of DMARC_POLICY_REJECT / _QUARANTINE (RFC 8617 7.2.1).
    arc_trusted_sealers: list[str] = Field(default_factory=list)
    # Add our own ARC set (RFC 8617) to inbound mail that passed the verdict pipeline,
    # signed as arc_seal_domain with the key of `mailwarden dkim keygen` for it
    # (state_dir/dkim/<domain>/<selector>.key); "" selector = the [dkim] selector.
    arc_seal: bool = False
    arc_seal_domain: str = ""
    arc_seal_selector: str = ""

    @field_validator("arc_trusted_sealers")
    @classmethod
    def _sealers(cls, values: list[str]) -> list[str]:
        return _domain_names(values)

    @field_validator("arc_seal_domain")
    @classmethod
    def _seal_domain(cls, value: str) -> str:
        value = value.strip().lower().rstrip(".")
        if value and not _DKIM_DOMAIN.match(value):
            raise ValueError(f"not a domain name: {value!r}")
        return value

    @field_validator("arc_seal_selector")
    @classmethod
    def _seal_selector(cls, value: str) -> str:
        value = value.strip().lower()
        if value and not _SELECTOR.match(value):
            raise ValueError(f"not a DKIM selector (a DNS label): {value!r}")
        return value

    @model_validator(mode="after")
    def _arc_needs(self) -> MailAuthSettings:
        if self.arc_trusted_sealers and not self.arc:
            raise ValueError("arc_trusted_sealers needs arc = true (chains must be validated)")
        if self.arc_seal:
            if not (self.enabled and self.arc):
                raise ValueError(
                    "arc_seal needs enabled = true and arc = true: the seal carries our "
                    "Authentication-Results and its cv= is our ARC result"
                )
            if not self.arc_seal_domain:
                raise ValueError("arc_seal needs arc_seal_domain (the d= of our ARC sets)")
        return self


def _default_forced() -> dict[str, ScanAction]:
    return {
        "ARCHIVE_BOMB": ScanAction.QUARANTINE,
        "RSPAMD_ACTION_REJECT": ScanAction.REJECT,
        "RSPAMD_ACTION_SOFT_REJECT": ScanAction.TEMPFAIL,
        "DMARC_POLICY_REJECT": ScanAction.REJECT,
        "DMARC_POLICY_QUARANTINE": ScanAction.QUARANTINE,
    }


class ScanSettings(_Section):
    """[scan]: thresholds, score overrides, forced actions and the backends."""

    inbound: Thresholds = Field(default_factory=Thresholds)
    outbound: Thresholds = Field(
        default_factory=lambda: Thresholds(
            add_header=6.0, tag_subject=None, quarantine=10.0, reject=15.0
        )
    )
    # Symbol name -> score, replacing the score the scanner gave (e.g. RSPAMD_BAYES_SPAM).
    scores: dict[str, float] = Field(default_factory=dict)
    # Symbol name -> action forced whenever the symbol is present (severest one wins).
    forced: dict[str, ScanAction] = Field(default_factory=_default_forced)
    subject_tag: str = "[SPAM]"
    # Upper bound for the whole pipeline of one message (each backend also has its own).
    timeout: Duration = 90.0
    clamav: ClamavSettings = Field(default_factory=ClamavSettings)
    rspamd: RspamdSettings = Field(default_factory=RspamdSettings)
    builtin: BuiltinSettings = Field(default_factory=BuiltinSettings)
    mailauth: MailAuthSettings = Field(default_factory=MailAuthSettings)

    @field_validator("scores", "forced")
    @classmethod
    def _symbol_names(cls, value: dict[str, object]) -> dict[str, object]:
        for name in value:
            if not _SYMBOL_NAME.match(name):
                raise ValueError(f"not a symbol name (A-Z, 0-9, _): {name!r}")
        return value

    @field_validator("subject_tag")
    @classmethod
    def _tag(cls, value: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in value) or len(value) > 64:
            raise ValueError("subject_tag must be one short line without control characters")
        return value


def _default_signed_headers() -> list[str]:
    return [
        "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
        "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
        "in-reply-to", "references", "list-id", "list-unsubscribe", "list-unsubscribe-post",
    ]  # fmt: skip


class DkimSettings(_Section):
    """[dkim]: DKIM signing of outbound mail (``scan.dkimsign``).

    An outbound message is signed (rsa-sha256, relaxed/relaxed) when its From domain has
    a key at ``state_dir/dkim/<domain>/<selector>.key`` (``mailwarden dkim keygen``) and
    the domain is enabled: every domain with a key when ``domains`` is empty, else only
    those listed.
    """

    sign: bool = True
    selector: str = "mw1"
    domains: list[str] = Field(default_factory=list)  # [] = every domain that has a key
    selectors: dict[str, str] = Field(default_factory=dict)  # domain -> selector override
    headers: list[str] = Field(default_factory=_default_signed_headers)

    @field_validator("selector")
    @classmethod
    def _selector(cls, value: str) -> str:
        value = value.strip().lower()
        if not _SELECTOR.match(value):
            raise ValueError(f"not a DKIM selector (a DNS label): {value!r}")
        return value

    @field_validator("domains")
    @classmethod
    def _domains(cls, values: list[str]) -> list[str]:
        return _domain_names(values)

    @field_validator("selectors")
    @classmethod
    def _selectors(cls, values: dict[str, str]) -> dict[str, str]:
        out = {}
        for d, sel in values.items():
            d = d.strip().lower().rstrip(".")
            sel = sel.strip().lower()
            if not _DKIM_DOMAIN.match(d) or not _SELECTOR.match(sel):
                raise ValueError(f"bad domain/selector pair: {d!r} = {sel!r}")
            out[d] = sel
        return out

    @field_validator("headers")
    @classmethod
    def _headers(cls, values: list[str]) -> list[str]:
        out = [v.strip().lower() for v in values]
        if "from" not in out:
            raise ValueError("the signed headers must include 'from' (RFC 6376 5.4)")
        for v in out:
            if not re.fullmatch(r"[a-z0-9-]{1,64}", v):
                raise ValueError(f"not a header field name: {v!r}")
        return out

    def selector_for(self, domain: str) -> str:
        return self.selectors.get(domain, self.selector)

    def enabled_for(self, domain: str) -> bool:
        return self.sign and (not self.domains or domain in self.domains)

"""Configuration: one TOML file validated with pydantic, or the embedded default.

``load_config(path)`` returns a ``Config``; ``None`` gives the embedded default (demo domain
``example.edu``, listeners on 127.0.0.1:2525/2587/2465, state under ``./var``). Every
problem is reported as ``FILE:LINE: key: message``; unknown keys are errors.

Public names: ``Config`` and its sections, ``TransportSpec``, ``parse_duration``,
``load_config``, ``default_config``, ``check_config`` (``ScanSettings``, the ``[scan]`` section,
lives in ``scan.settings``).
Security: reads an operator-supplied file (trusted for content, but parsed strictly so that a
typo is an error, never a silently ignored safety setting).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mailwarden.auth.settings import AuthSettings
from mailwarden.core.durations import Duration
from mailwarden.core.durations import parse_duration as parse_duration  # re-exported
from mailwarden.errors import ConfigError
from mailwarden.policy.settings import PolicySettings
from mailwarden.scan.settings import DkimSettings, ScanSettings
from mailwarden.store.settings import DatabaseSettings

_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9-]{1,63}$")


def _domain(value: str) -> str:
    v = value.strip().lower().rstrip(".")
    if not _DOMAIN.match(v):
        raise ValueError(f"not a domain name: {value!r}")
    return v


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewayConfig(_Section):
    """[gateway]: identity and process model."""

    hostname: str = "mailwarden.example.edu"
    state_dir: str = "var"
    workers: int = Field(default=1, ge=1, le=64)
    hosted_domains: list[str] = Field(default_factory=lambda: ["example.edu"])
    # Envelope/From address of DSNs; empty means MAILER-DAEMON@hostname.
    bounce_from: str = ""

    @field_validator("hosted_domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        return [_domain(d) for d in v]


class ListenerConfig(_Section):
    """[[listener]]: one socket the gateway accepts SMTP on."""

    name: str
    address: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    tls: Literal["none", "starttls", "implicit"] = "starttls"
    # A submission listener is where authenticated users send (AUTH offered inside TLS).
    submission: bool = False

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError as exc:
            raise ValueError(f"not an IP address: {v!r}") from exc
        return v


class TLSConfig(_Section):
    """[tls]: server certificate. Empty paths: a self-signed pair under state_dir/tls."""

    cert_file: str = ""
    key_file: str = ""
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"


class LimitsConfig(_Section):
    """[limits]: protocol limits of the SMTP edge."""

    max_message_size: int = Field(default=26_214_400, ge=1024)
    max_recipients: int = Field(default=1000, ge=1)
    max_connections: int = Field(default=1000, ge=1)
    max_connections_per_client: int = Field(default=100, ge=1)
    max_received_headers: int = Field(default=50, ge=5)
    max_header_size: int = Field(default=1_048_576, ge=1024)
    max_transactions_per_session: int = Field(default=1000, ge=1)
    max_errors_per_session: int = Field(default=20, ge=1)
    idle_timeout: Duration = 300.0
    data_timeout: Duration = 600.0
    shutdown_grace: Duration = 10.0


class QueueConfig(_Section):
    """[queue]: retry schedule and concurrency."""

    max_lifetime: Duration = 5 * 86400.0
    delay_warning: Duration = 4 * 3600.0  # 0 disables delay warnings
    min_backoff: Duration = 300.0
    max_backoff: Duration = 4000.0
    scan_interval: Duration = 5.0  # how often deferred mail is checked for due retries
    delivery_concurrency: int = Field(default=100, ge=1)
    destination_concurrency: int = Field(default=20, ge=1)
    max_recipients_per_delivery: int = Field(default=50, ge=1)
    segment_log: bool = True  # fresh mail goes to append-only segments (one fdatasync per batch)


TLSPolicy = Literal["none", "may", "encrypt", "verify"]

TransportKind = Literal["smtp", "lmtp", "maildir", "mx", "discard"]
_TRANSPORT = re.compile(r"^(smtp|lmtp|maildir|mx|discard)(?::(.*))?$")


class TransportSpec(BaseModel):
    """A parsed transport, Postfix style: ``smtp:HOST:PORT``, ``lmtp:HOST:PORT``,
    ``lmtp:unix:/path``, ``maildir:DIR`` (default ``state_dir/mail``), ``mx`` or ``discard``."""

    model_config = ConfigDict(frozen=True)
    kind: TransportKind
    host: str = ""
    port: int = 0
    path: str = ""

    @staticmethod
    def parse(text: str) -> TransportSpec:
        """The spec of ``text`` (cached: the router asks for every delivery)."""
        return _parse_transport(text)

    def __str__(self) -> str:
        if self.kind in ("smtp", "lmtp"):
            if self.path:
                return f"{self.kind}:unix:{self.path}"
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"{self.kind}:{host}:{self.port}"
        if self.kind == "maildir":
            return f"maildir:{self.path}" if self.path else "maildir"
        return self.kind


def _transport_text(value: str) -> str:
    TransportSpec.parse(value)
    return value


DomainKey = Annotated[str, AfterValidator(_domain)]
TransportText = Annotated[str, AfterValidator(_transport_text)]


@functools.lru_cache(maxsize=1024)
def _parse_transport(text: str) -> TransportSpec:
    m = _TRANSPORT.match(text.strip())
    if not m:
        raise ValueError(
            f"unknown transport {text!r}: use smtp:HOST:PORT, lmtp:HOST:PORT, "
            "lmtp:unix:PATH, maildir[:DIR], mx or discard"
        )
    kind = cast(TransportKind, m.group(1))
    arg = m.group(2) or ""
    if kind in ("smtp", "lmtp"):
        if kind == "lmtp" and arg.startswith("unix:"):
            return TransportSpec(kind=kind, path=arg[5:])
        hm = re.match(r"^\[?([^\[\]]+?)\]?:(\d{1,5})$", arg)
        if not hm:
            raise ValueError(f"transport {text!r} needs HOST:PORT (IPv6 as [addr]:port)")
        port = int(hm.group(2))
        if not 0 < port < 65536:
            raise ValueError(f"transport {text!r}: port out of range")
        return TransportSpec(kind=kind, host=hm.group(1), port=port)
    if kind == "maildir":
        return TransportSpec(kind=kind, path=arg)
    if arg:
        raise ValueError(f"transport {kind!r} takes no argument")
    return TransportSpec(kind=kind)


class DeliveryConfig(_Section):
    """[delivery]: how queued mail leaves the gateway."""

    # Per-domain transports; domains without one use MX resolution (or the smarthost).
    transports: dict[DomainKey, TransportText] = Field(
        default_factory=lambda: {"example.edu": "maildir"}
    )
    smarthost: str = ""  # "HOST:PORT": send all non-hosted mail there instead of MX
    tls_policy: TLSPolicy = "may"
    tls_policies: dict[DomainKey, TLSPolicy] = Field(default_factory=dict)  # per destination domain
    port: int = Field(default=25, ge=1, le=65535)  # port for MX deliveries
    connect_timeout: Duration = 30.0
    command_timeout: Duration = 300.0
    data_timeout: Duration = 600.0
    connection_reuse: bool = True
    max_reuse: int = Field(default=100, ge=1)  # messages per cached connection
    idle_reuse: Duration = 5.0  # seconds a cached connection is kept idle

    @field_validator("smarthost")
    @classmethod
    def _smarthost(cls, v: str) -> str:
        if v:
            TransportSpec.parse("smtp:" + v)
        return v

    def transport_for(self, domain: str) -> TransportSpec | None:
        spec = self.transports.get(domain.lower())
        return TransportSpec.parse(spec) if spec else None


class DNSConfig(_Section):
    """[dns]: resolvers for MX lookups. Empty list: the system resolver."""

    nameservers: list[str] = Field(default_factory=list)  # "127.0.0.1" or "127.0.0.1:5353"
    timeout: Duration = 5.0

    @field_validator("nameservers")
    @classmethod
    def _ns(cls, v: list[str]) -> list[str]:
        for ns in v:
            host, _, port = ns.rpartition(":") if ns.count(":") == 1 else (ns, "", "")
            try:
                ipaddress.ip_address(host or ns)
            except ValueError as exc:
                raise ValueError(f"nameserver {ns!r} is not IP[:PORT]") from exc
            if port and not port.isdigit():
                raise ValueError(f"nameserver {ns!r}: bad port")
        return v


class QuarantineConfig(_Section):
    """[quarantine]: how long held messages are kept (under state_dir/quarantine)."""

    virus_retention: Duration = 30 * 86400.0  # virus and other malware verdicts
    spam_retention: Duration = 7 * 86400.0  # spam, bombs, everything else held
    expire_interval: Duration = 3600.0  # how often a running gateway removes expired entries
    show_text_limit: int = Field(default=8192, ge=256, le=1_048_576)  # chars per text part


class EventsConfig(_Section):
    """[events]: where structured events go. Empty: state_dir/log/events.jsonl."""

    file: str = ""
    stderr: bool = False


def _default_listeners() -> list[ListenerConfig]:
    return [
        ListenerConfig(name="smtp", port=2525, tls="starttls"),
        ListenerConfig(name="submission", port=2587, tls="starttls", submission=True),
        ListenerConfig(name="smtps", port=2465, tls="implicit", submission=True),
    ]


class Config(_Section):
    """The whole configuration."""

    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    listener: list[ListenerConfig] = Field(default_factory=_default_listeners)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    dns: DNSConfig = Field(default_factory=DNSConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)  # SMTP AUTH (auth.settings)
    scan: ScanSettings = Field(default_factory=ScanSettings)
    quarantine: QuarantineConfig = Field(default_factory=QuarantineConfig)
    dkim: DkimSettings = Field(default_factory=DkimSettings)  # outbound signing (scan.settings)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        names = [li.name for li in self.listener]
        if len(set(names)) != len(names):
            raise ValueError("listener names must be unique")
        socks = [(li.address, li.port) for li in self.listener]
        if len(set(socks)) != len(socks):
            raise ValueError("two listeners use the same address and port")
        for domain in self.gateway.hosted_domains:
            if domain not in self.delivery.transports:
                raise ValueError(
                    f"hosted domain {domain!r} has no entry in [delivery.transports]: its mail "
                    "would be sent to its own MX (this gateway) and loop"
                )
        return self

    # Derived paths -----------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return Path(self.gateway.state_dir)

    @property
    def spool_path(self) -> Path:
        return self.state_path / "spool"

    @property
    def mail_path(self) -> Path:
        return self.state_path / "mail"

    @property
    def quarantine_path(self) -> Path:
        return self.state_path / "quarantine"

    @property
    def dkim_path(self) -> Path:
        return self.state_path / "dkim"

    @property
    def events_path(self) -> Path:
        return (
            Path(self.events.file) if self.events.file else self.state_path / "log" / "events.jsonl"
        )

    @property
    def cert_path(self) -> Path:
        return (
            Path(self.tls.cert_file) if self.tls.cert_file else self.state_path / "tls" / "cert.pem"
        )

    @property
    def key_path(self) -> Path:
        return Path(self.tls.key_file) if self.tls.key_file else self.state_path / "tls" / "key.pem"

    @property
    def bounce_address(self) -> str:
        return self.gateway.bounce_from or f"MAILER-DAEMON@{self.gateway.hostname}"

    def is_hosted(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.gateway.hosted_domains


def default_config(**overrides: Any) -> Config:
    """The embedded default, optionally with top-level sections replaced."""
    return Config.model_validate(overrides)


def _locate(lines: list[str], loc: tuple[int | str, ...]) -> int:
    """Best-effort line number (1-based) of the key at ``loc`` in the TOML source, or 0."""
    table: list[str] = []
    array_index: dict[str, int] = {}
    want = [str(p) for p in loc]
    best = 0
    header = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    keyline = re.compile(r'^\s*("[^"]*"|[A-Za-z0-9_.\-]+)\s*=')
    for no, line in enumerate(lines, 1):
        hm = header.match(line)
        if hm:
            name = hm.group(2).replace('"', "")
            parts = name.split(".")
            if hm.group(1) == "[[":
                idx = array_index.get(name, -1) + 1
                array_index[name] = idx
                parts = [*parts, str(idx)]
            table = parts
            if want[: len(table)] == table and best == 0:
                best = no
            continue
        km = keyline.match(line)
        if km:
            raw = km.group(1)
            key = [raw[1:-1]] if raw.startswith('"') else raw.split(".")
            path = [*table, *key]
            if want[: len(path)] == path or path[: len(want)] == want:
                return no
    return best


def check_config(path: str | os.PathLike[str]) -> tuple[Config | None, list[str]]:
    """Parse and validate ``path``; return the config (or None) and every problem found."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        return None, [f"{p}: cannot read: {exc.strerror}"]
    except UnicodeDecodeError as exc:
        return None, [f"{p}: not UTF-8 text: {exc.reason} at byte {exc.start}"]
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [f"{p}: {exc}"]
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        lines = text.splitlines()
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            key = ".".join(str(x) for x in loc) or "(top level)"
            line = _locate(lines, loc)
            where = f"{p}:{line}" if line else f"{p}"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append(f"{where}: {key}: {msg}")
        return None, problems
    return cfg, []


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load ``path`` (or the embedded default when ``None``); raise ``ConfigError``."""
    if path is None:
        return default_config()
    cfg, problems = check_config(path)
    if cfg is None:
        raise ConfigError(f"invalid configuration in {path}", problems)
    return cfg

"""Settings of the policy stage, mounted as the ``[policy]`` config section.

Example (TOML)::

    [policy]
    campus_networks = ["10.0.0.0/8", "2001:db8:100::/48"]
    relay_from_campus = false
    counters = "redis"
    redis_url = "redis://127.0.0.1:6379/0"
    [policy.senders]                       # registered in config (besides the database)
    "10.1.2.3" = ["chem.example.edu"]      # [] = every hosted domain
    [policy.directory]                     # recipient directory per hosted domain
    "example.edu" = "static"
    "dept.example.edu" = "ldap"            # connection from [auth.ldap], see ldap_*

Public names: ``PolicySettings``, ``DirectoryKind``, ``ADDRESS_PLACEHOLDER``.
Security: operator-supplied values, validated strictly (networks with ``ipaddress``, the LDAP
filter with ``auth.settings.check_filter``); unknown keys are errors.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mailwarden.auth.settings import check_filter
from mailwarden.core.durations import Duration

DirectoryKind = Literal["accept", "static", "database", "callout", "ldap"]
ADDRESS_PLACEHOLDER = "{address}"


def _network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=True))
    except ValueError as exc:
        raise ValueError(f"not an IP network: {text!r} ({exc})") from exc


class PolicySettings(BaseModel):
    """[policy]: who may send what (relay control, recipients, harvest, rate limits)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- networks and senders (SU-1, SU-3, SU-6) --
    campus_networks: list[str] = Field(default_factory=lambda: ["127.0.0.1/32"])
    # Registered senders from config: address/CIDR -> envelope-sender domains ([] = hosted).
    senders: dict[str, list[str]] = Field(default_factory=lambda: {"127.0.0.1": list[str]()})
    relay_from_campus: bool = False  # campus clients may relay out without registration
    registry_refresh: Duration = 10.0  # how often the database registry/blocks are re-read
    register_hint: str = "register it with the mail administrators (mailwarden senders add)"

    # -- recipient validation (CP-R4, no backscatter) --
    default_directory: DirectoryKind = "accept"
    directory: dict[str, DirectoryKind] = Field(default_factory=dict)  # per hosted domain
    recipients: list[str] = Field(default_factory=list)  # the "static" directory
    callout_positive_ttl: Duration = 86400.0
    callout_negative_ttl: Duration = 3600.0
    callout_timeout: Duration = 10.0
    callout_max_concurrent: int = Field(default=10, ge=1)  # probes in flight per process
    callout_max_per_minute: int = Field(default=120, ge=1)  # new probes per minute per process
    callout_sender: str = ""  # MAIL FROM of probes; "" = <>
    # The "ldap" directory: the connection is [auth.ldap] (url, TLS, bind_dn, timeout).
    ldap_base: str = ""  # search base; "" = [auth.ldap] base
    ldap_filter: str = "(|(mail={address})(mailAlternateAddress={address}))"
    ldap_positive_ttl: Duration = 300.0  # an existing address is remembered this long
    ldap_negative_ttl: Duration = 60.0  # an unknown address is remembered this long

    # -- directory-harvest defence (CP-E2) --
    harvest_soft_limit: int = Field(default=5, ge=0)  # invalid RCPTs before the tarpit
    harvest_hard_limit: int = Field(default=15, ge=1)  # invalid RCPTs before 421 + close
    tarpit_delay: Duration = 1.0  # first delay; each further invalid RCPT adds this much
    tarpit_max: Duration = Field(default=15.0, le=15.0)  # below the policy check timeout
    harvest_threshold: int = Field(default=30, ge=1)  # invalid RCPTs per client per window
    harvest_window: Duration = 3600.0
    block_duration: Duration = 3600.0
    block_reply: Literal["421", "554"] = "554"
    honeypots: list[str] = Field(default_factory=list)  # any RCPT to these blocks at once

    # -- events: "all" = one policy.decision per check; "notable" = refusals and accepts that
    # name a control (relay for a registered server or user, role address); "refusals" =
    # only non-accepts. A plain accept is already in smtp.accept. --
    decision_events: Literal["all", "notable", "refusals"] = "notable"

    # -- counters shared by harvest defence and rate limits --
    counters: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout: Duration = 2.0

    # -- rate limits (SU-1: stop a mass-mailing virus within minutes) --
    connection_rate: int = Field(default=600, ge=0)  # new connections per client per window
    connection_rate_window: Duration = 60.0
    sender_messages_per_hour: int = Field(default=2000, ge=0)  # outbound, per registered server
    sender_recipients_per_hour: int = Field(default=10000, ge=0)
    user_messages_per_hour: int = Field(default=200, ge=0)  # outbound, per authenticated user
    user_recipients_per_hour: int = Field(default=1000, ge=0)

    @field_validator("campus_networks")
    @classmethod
    def _campus(cls, v: list[str]) -> list[str]:
        return [_network(n) for n in v]

    @field_validator("senders")
    @classmethod
    def _senders(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        return {_network(k): [d.strip().lower().rstrip(".") for d in ds] for k, ds in v.items()}

    @field_validator("recipients", "honeypots")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        out = []
        for a in v:
            if a.count("@") != 1 or a.startswith("@") or a.endswith("@"):
                raise ValueError(f"not an address: {a!r}")
            out.append(a.strip().lower())
        return out

    @field_validator("ldap_filter")
    @classmethod
    def _ldap_filter(cls, v: str) -> str:
        return check_filter(v, ADDRESS_PLACEHOLDER, "(mail={address})")

    @field_validator("directory")
    @classmethod
    def _directory(cls, v: dict[str, DirectoryKind]) -> dict[str, DirectoryKind]:
        return {k.strip().lower().rstrip("."): kind for k, kind in v.items()}

    @model_validator(mode="after")
    def _checks(self) -> PolicySettings:
        if self.harvest_hard_limit <= self.harvest_soft_limit:
            raise ValueError("harvest_hard_limit must be greater than harvest_soft_limit")
        campus = [ipaddress.ip_network(n) for n in self.campus_networks]
        for net_text in self.senders:
            net = ipaddress.ip_network(net_text)
            if not any(
                c.version == net.version and net.subnet_of(c)  # type: ignore[arg-type]
                for c in campus
            ):
                raise ValueError(f"registered sender {net} is not inside campus_networks (SU-3)")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return self

"""The LDAP recipient directory against a real slapd on loopback: known addresses (``mail``
and ``mailAlternateAddress``) accepted, unknown ones ``550 5.1.1``, filter-injection
addresses match nobody, a stopped directory is ``451`` (never an accept), role accounts are
accepted with an empty directory, answers are cached; then the same through the real
gateway over SMTP.

Security: loopback only; slapd and the gateway are subprocesses started by these tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailwarden.auth.ldapconn import LdapClient
from mailwarden.auth.settings import LdapSettings
from mailwarden.config import default_config
from mailwarden.core.types import Envelope, Session
from mailwarden.errors import ConfigError
from mailwarden.policy.engine import Policy
from mailwarden.policy.recipients import LdapDirectory, Lookup, RecipientValidator
from mailwarden.policy.settings import PolicySettings
from mailwarden.smtp.reply import reply_for
from tests.policy.helpers import session
from tests.support.gateway import Gateway
from tests.support.slapd import PEOPLE, SEARCH_DN, SEARCH_PASSWORD, SUFFIX, Slapd, slapd_available

pytestmark = pytest.mark.skipif(not slapd_available(), reason="slapd is not installed")

DEFAULT_FILTER = PolicySettings().ldap_filter
INJECTIONS = [
    "*)(mail=*@example.edu",  # the brief's classic: (mail=*)(mail=*@example.edu)
    "*@example.edu",  # a valid SMTP local part; unescaped it would match every mailbox
    "*",
    "al*@example.edu",
    "alice@example.edu)(objectClass=*",
    "x)(|(mail=*@example.edu",
    "alice\\@example.edu",
]
# No tarpit or block in these tests: they count replies, not delays.
NO_HARVEST = {"harvest_soft_limit": 100, "harvest_hard_limit": 200, "harvest_threshold": 1000}


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[Slapd]:
    d = Slapd(
        tmp_path / "ldap",
        {"alice": "Alice-pw-1", "bob": "Bob-pw-1"},
        aliases={"alice": ["a.smith@example.edu"]},
    )
    d.start()
    yield d
    d.stop()


def directory(d: Slapd, **kw: Any) -> LdapDirectory:
    settings = LdapSettings(url=d.url, base=PEOPLE, bind_dn=SEARCH_DN, timeout=3.0)
    return LdapDirectory(
        LdapClient(settings, SEARCH_PASSWORD), base=SUFFIX, filter_template=DEFAULT_FILTER, **kw
    )


def test_known_unknown_alternate_address_and_cache(slapd: Slapd) -> None:
    async def main() -> None:
        ld = directory(slapd)
        try:
            assert ld.peek("alice@example.edu") is None
            assert await ld.lookup("alice@example.edu") is Lookup.KNOWN
            assert await ld.lookup("ALICE@Example.EDU") is Lookup.KNOWN  # cached, same key
            assert await ld.lookup("a.smith@example.edu") is Lookup.KNOWN  # mailAlternateAddress
            assert await ld.lookup("carol@example.edu") is Lookup.UNKNOWN
            assert await ld.lookup("carol@example.edu") is Lookup.UNKNOWN
            assert ld.searches == 3  # positive and negative answers were cached
            assert ld.peek("carol@example.edu") is Lookup.UNKNOWN
            # Concurrent lookups of one address share one search.
            got = await asyncio.gather(*(ld.lookup("bob@example.edu") for _ in range(8)))
            assert got == [Lookup.KNOWN] * 8 and ld.searches == 4
        finally:
            ld.close()

    asyncio.run(main())


@pytest.mark.parametrize("address", INJECTIONS)
def test_filter_injection_matches_nobody(slapd: Slapd, address: str) -> None:
    async def main() -> None:
        ld = directory(slapd)
        try:
            built = ld.make_filter(address)
            assert "*" not in built and built.count("(") == DEFAULT_FILTER.count("(")
            assert await ld.lookup(address) is Lookup.UNKNOWN
        finally:
            ld.close()

    asyncio.run(main())


def test_stopped_directory_is_tempfail_and_not_cached(slapd: Slapd) -> None:
    async def main() -> None:
        ld = directory(slapd)
        try:
            assert await ld.lookup("alice@example.edu") is Lookup.KNOWN
            slapd.stop()
            assert await ld.lookup("bob@example.edu") is Lookup.TEMPFAIL
            assert ld.peek("bob@example.edu") is None  # a tempfail is never remembered
            slapd.start()
            assert await ld.lookup("bob@example.edu") is Lookup.KNOWN
        finally:
            ld.close()

    asyncio.run(main())


def test_wrong_search_password_is_tempfail(slapd: Slapd) -> None:
    settings = LdapSettings(url=slapd.url, base=PEOPLE, bind_dn=SEARCH_DN, timeout=3.0)
    ld = LdapDirectory(
        LdapClient(settings, "not-the-password"), base=SUFFIX, filter_template=DEFAULT_FILTER
    )
    try:
        assert asyncio.run(ld.lookup("alice@example.edu")) is Lookup.TEMPFAIL
    finally:
        ld.close()


def _config(tmp_path: Path, d: Slapd, **policy: Any) -> Any:
    secret = tmp_path / "ldap-password"
    secret.write_text(SEARCH_PASSWORD + "\n")
    ldap = {"url": d.url, "base": PEOPLE, "bind_dn": SEARCH_DN, "timeout": "3s"}
    return default_config(
        gateway={"state_dir": str(tmp_path / "var"), "hosted_domains": ["example.edu"]},
        delivery={"transports": {"example.edu": "maildir"}},
        auth={"ldap": ldap | {"bind_password_file": str(secret)}},
        policy={"default_directory": "ldap"} | NO_HARVEST | policy,
    )


async def _rcpt(p: Policy, rcpt: str) -> str:
    s = Session("127.0.0.66", 1, "127.0.0.1", 25, "smtp")
    code, enhanced, _ = reply_for(await p.check_rcpt(s, Envelope("a@outside.example"), rcpt))
    return f"{code} {enhanced}"


def test_policy_replies_and_role_accounts_with_an_empty_directory(tmp_path: Path) -> None:
    empty = Slapd(tmp_path / "empty", {})
    empty.start()

    async def main() -> None:
        p = Policy(_config(tmp_path, empty))
        try:
            assert await _rcpt(p, "alice@example.edu") == "550 5.1.1"
            assert await _rcpt(p, "abuse@example.edu") == "250 2.1.5"  # CP-R4
            assert await _rcpt(p, "Postmaster@example.edu") == "250 2.1.5"
            assert await _rcpt(p, "*)(mail=*@example.edu") == "550 5.1.1"
            empty.stop()
            assert await _rcpt(p, "bob@example.edu") == "451 4.3.0"  # fail closed
            assert await _rcpt(p, "abuse@example.edu") == "250 2.1.5"  # no lookup needed
        finally:
            await p.close()

    try:
        asyncio.run(main())
    finally:
        empty.stop()


def test_config_errors(tmp_path: Path, slapd: Slapd) -> None:
    with pytest.raises(ValueError, match="must contain"):
        PolicySettings(ldap_filter="(mail=alice@example.edu)")
    with pytest.raises(ValueError, match="braces"):
        PolicySettings(ldap_filter="(mail={address}{login})")
    cfg = default_config(
        gateway={"state_dir": str(tmp_path / "var"), "hosted_domains": ["example.edu"]},
        policy={"directory": {"example.edu": "ldap"}},
    )
    with pytest.raises(ConfigError, match=r"needs \[auth.ldap\] url"):
        RecipientValidator(cfg)
    cfg = _config(tmp_path, slapd, ldap_base=SUFFIX)
    v = RecipientValidator(cfg)
    try:
        d = v.directory_for("example.edu")
        assert isinstance(d, LdapDirectory) and d.base == SUFFIX
    finally:
        v.close()


def test_ldap_directory_through_the_gateway(slapd: Slapd, tmp_path: Path) -> None:
    secret = tmp_path / "ldap-password"
    secret.write_text(SEARCH_PASSWORD + "\n")
    auth = {
        "ldap": {
            "url": slapd.url,
            "base": PEOPLE,
            "bind_dn": SEARCH_DN,
            "bind_password_file": str(secret),
            "timeout": "3s",
        }
    }
    policy = {"directory": {"example.edu": "ldap"}} | NO_HARVEST
    gw = Gateway(tmp_path / "gw", extra={"auth": auth, "policy": policy})
    gw.start()
    try:
        c = session(gw.smtp_port, "127.0.0.66")
        assert c.cmd("RCPT TO:<alice@example.edu>").startswith("250 2.1.5")
        assert c.cmd("RCPT TO:<a.smith@example.edu>").startswith("250 2.1.5")
        assert c.cmd("RCPT TO:<nobody@example.edu>").startswith("550 5.1.1")
        assert c.cmd("RCPT TO:<*@example.edu>").startswith("550 5.1.1")
        assert not c.cmd("RCPT TO:<*)(mail=*@example.edu>").startswith("2")
        assert c.cmd("RCPT TO:<postmaster@example.edu>").startswith("250")
        c.close()
        slapd.stop()
        c = session(gw.smtp_port, "127.0.0.66")
        assert c.cmd("RCPT TO:<bob@example.edu>").startswith("451 4.3.0")  # never accepted
        assert c.cmd("RCPT TO:<abuse@example.edu>").startswith("250")
        c.close()
        errors = gw.events("policy.ldap_error")
        assert errors and errors[0]["recipient"] == "bob@example.edu"
        assert SEARCH_PASSWORD not in gw.events_file.read_text(errors="replace")
    finally:
        gw.stop()
        slapd.stop()

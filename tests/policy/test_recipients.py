"""Recipient directories: the verification callout against a scripted SMTP peer on
loopback (cached answers, one probe per address per TTL, coalesced concurrent lookups, a
global probe cap), the static and database directories, role accounts, and the sender
check of authenticated users."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from mailwarden.config import TransportSpec, default_config
from mailwarden.core.types import Action, Envelope, Session
from mailwarden.policy.engine import Policy
from mailwarden.policy.recipients import CalloutDirectory, Lookup

KNOWN = {"alice@dept.example.edu"}


class Peer:
    """A tiny SMTP server that knows ``KNOWN`` and counts RCPT probes."""

    def __init__(self) -> None:
        self.rcpts: list[str] = []
        self.delay = 0.0
        self.server: asyncio.Server | None = None

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 peer.test ESMTP\r\n")
        while line := await r.readline():
            cmd = line.decode().strip()
            up = cmd.upper()
            if up.startswith("EHLO"):
                w.write(b"250 peer.test\r\n")
            elif up.startswith("MAIL"):
                w.write(b"250 2.1.0 Ok\r\n")
            elif up.startswith("RCPT"):
                addr = cmd[cmd.index("<") + 1 : cmd.index(">")]
                self.rcpts.append(addr)
                await asyncio.sleep(self.delay)
                if addr.startswith("busy"):
                    w.write(b"451 4.3.0 try later\r\n")
                elif addr in KNOWN:
                    w.write(b"250 2.1.5 Ok\r\n")
                else:
                    w.write(b"550 5.1.1 no such user\r\n")
            elif up.startswith("QUIT"):
                w.write(b"221 bye\r\n")
                await w.drain()
                break
            else:
                w.write(b"250 Ok\r\n")
            await w.drain()
        w.close()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])


@pytest_asyncio.fixture
async def peer() -> AsyncIterator[tuple[Peer, int]]:
    p = Peer()
    port = await p.start()
    yield p, port
    assert p.server is not None
    p.server.close()


def _callout(port: int, **kw: int) -> CalloutDirectory:
    return CalloutDirectory(
        TransportSpec.parse(f"smtp:127.0.0.1:{port}"), helo="gw.test", timeout=5, **kw
    )


@pytest.mark.asyncio
async def test_callout_caches_and_coalesces(peer: tuple[Peer, int]) -> None:
    p, port = peer
    d = _callout(port)
    assert d.peek("alice@dept.example.edu") is None
    p.delay = 0.2  # lookups below overlap the first probe
    results = await asyncio.gather(*(d.lookup("alice@dept.example.edu") for _ in range(10)))
    assert results == [Lookup.KNOWN] * 10
    assert p.rcpts == ["alice@dept.example.edu"]  # one probe for ten lookups
    assert await d.lookup("ALICE@dept.example.edu") is Lookup.KNOWN
    assert d.peek("alice@dept.example.edu") is Lookup.KNOWN
    assert await d.lookup("nobody@dept.example.edu") is Lookup.UNKNOWN
    assert await d.lookup("nobody@dept.example.edu") is Lookup.UNKNOWN
    assert p.rcpts.count("nobody@dept.example.edu") == 1  # negative answers cached too
    assert await d.lookup("busy@dept.example.edu") is Lookup.TEMPFAIL
    assert await d.lookup("busy@dept.example.edu") is Lookup.TEMPFAIL
    assert p.rcpts.count("busy@dept.example.edu") == 2  # a tempfail is not cached


@pytest.mark.asyncio
async def test_callout_global_cap_stops_probe_amplification(peer: tuple[Peer, int]) -> None:
    p, port = peer
    d = _callout(port, max_per_minute=3)
    got = [await d.lookup(f"u{i}@dept.example.edu") for i in range(10)]
    assert got[:3] == [Lookup.UNKNOWN] * 3
    assert got[3:] == [Lookup.TEMPFAIL] * 7
    assert len(p.rcpts) == 3 and d.probes == 3


@pytest.mark.asyncio
async def test_callout_to_a_dead_server_is_tempfail() -> None:
    from tests.support.ports import free_port

    d = _callout(free_port())
    assert await d.lookup("alice@dept.example.edu") is Lookup.TEMPFAIL


def _policy(tmp_path: Path, url: str = "", **policy: object) -> Policy:
    cfg = default_config(
        gateway={"state_dir": str(tmp_path), "hosted_domains": ["example.edu", "dept.example.edu"]},
        delivery={"transports": {"example.edu": "maildir", "dept.example.edu": "maildir"}},
        policy=policy,
        database={"url": url},
    )
    return Policy(cfg)


async def _rcpt(p: Policy, rcpt: str, ip: str = "127.0.0.66", user: str | None = None) -> str:
    from mailwarden.smtp.reply import reply_for

    s = Session(ip, 1, "127.0.0.1", 25, "smtp", auth_user=user)
    d = await p.check_rcpt(s, Envelope("a@outside.example"), rcpt)
    code, enhanced, _ = reply_for(d)
    return f"{code} {enhanced}"


@pytest.mark.asyncio
async def test_static_directory_and_role_accounts(tmp_path: Path) -> None:
    p = _policy(
        tmp_path, directory={"dept.example.edu": "static"}, recipients=["bob@dept.example.edu"]
    )
    assert await _rcpt(p, "bob@dept.example.edu") == "250 2.1.5"
    assert await _rcpt(p, "BOB@dept.example.edu") == "250 2.1.5"
    assert await _rcpt(p, "carol@dept.example.edu") == "550 5.1.1"
    assert await _rcpt(p, "abuse@dept.example.edu") == "250 2.1.5"  # CP-R4
    assert await _rcpt(p, "Postmaster@dept.example.edu") == "250 2.1.5"
    assert await _rcpt(p, "anyone@example.edu") == "250 2.1.5"  # default: accept


@pytest.mark.asyncio
async def test_database_directory_follows_the_users_table(tmp_path: Path, db_url: str) -> None:
    from mailwarden.store.schema import users

    p = _policy(tmp_path, db_url, default_directory="database", registry_refresh=0.05)
    assert await _rcpt(p, "dana@example.edu") == "451 4.3.0"  # not loaded: never accept
    await p.start()
    try:
        assert await _rcpt(p, "dana@example.edu") == "550 5.1.1"
        store = p.state.store
        assert store is not None
        from mailwarden.store.db import bump_serial
        from mailwarden.store.schema import USERS_SERIAL

        with store.engine.begin() as conn:
            conn.execute(
                users.insert().values(
                    login="dana",
                    password_hash="x",
                    addresses=["dana@example.edu"],
                    disabled=False,
                    created_at=0.0,
                    updated_at=0.0,
                )
            )
            bump_serial(conn, USERS_SERIAL)
        await p.state.refresh()
        assert await _rcpt(p, "dana@example.edu") == "250 2.1.5"
        # The sender-login map: dana may send as dana@example.edu only.
        s = Session("127.0.0.66", 1, "127.0.0.1", 587, "submission", auth_user="dana")
        ok = await p.check_mail(s, Envelope("dana@example.edu"), "dana@example.edu")
        assert ok.action is Action.ACCEPT
        bad = await p.check_mail(s, Envelope("eve@example.edu"), "eve@example.edu")
        assert bad.action is Action.REJECT and bad.code == 553
        null = await p.check_mail(s, Envelope(""), "")
        assert null.action is Action.REJECT
        # An authenticated user may relay out; an anonymous off-campus client may not.
        assert await _rcpt(p, "x@outside.example", user="dana") == "250 2.1.5"
        assert await _rcpt(p, "x@outside.example") == "554 5.7.1"
    finally:
        await p.close()

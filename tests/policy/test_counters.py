"""Counter stores: the in-process backend, and the Redis backend against a real
``redis-server`` (private, loopback, free port): two stores share counts, windows expire;
two gateway processes sharing one Redis block a harvester together."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailwarden.policy.counters import KEY_PREFIX, MemoryCounters, RedisCounters
from tests.policy.helpers import greeting, session
from tests.support.gateway import Gateway
from tests.support.redis import RedisServer, redis_available
from tests.support.tmpdirs import poll


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not redis_available():
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def test_memory_counters_window() -> None:
    async def main() -> None:
        c = MemoryCounters()
        assert [await c.incr("k", 60) for _ in range(3)] == [1, 2, 3]
        assert await c.incr("k", 60, 5) == 8 and await c.get("k") == 8
        assert await c.incr("short", 0.05) == 1
        await asyncio.sleep(0.1)
        assert await c.get("short") == 0 and await c.incr("short", 60) == 1
        await c.delete("k")
        assert await c.get("k") == 0

    asyncio.run(main())


def test_two_redis_stores_share_counts(redis_server: RedisServer) -> None:
    async def main() -> None:
        a = RedisCounters.from_url(redis_server.url, 2.0)
        b = RedisCounters.from_url(redis_server.url, 2.0)
        try:
            assert await a.incr("harvest:192.0.2.1", 60) == 1
            assert await b.incr("harvest:192.0.2.1", 60) == 2
            assert await a.incr("harvest:192.0.2.1", 60, 3) == 5
            assert await b.get("harvest:192.0.2.1") == 5
            assert 0 < await a.client.ttl(KEY_PREFIX + "harvest:192.0.2.1") <= 60
            assert await a.incr("w", 1) == 1
            await asyncio.sleep(1.2)  # the window is over: the key expired in Redis
            assert await b.get("w") == 0
            await b.delete("harvest:192.0.2.1")
            assert await a.get("harvest:192.0.2.1") == 0
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_redis_down_is_a_tempfail_not_an_accept(tmp_path: Path) -> None:
    from tests.support.ports import free_port

    port = free_port()
    policy = {
        "counters": "redis",
        "redis_url": f"redis://127.0.0.1:{port}/0",
        "redis_timeout": 1,
        "default_directory": "static",
    }
    gw = Gateway(tmp_path / "gw", extra={"policy": policy})
    gw.start()
    try:
        # The connection-rate counter cannot be read: 421 at connect.
        assert greeting(gw.smtp_port, "127.0.0.66").startswith("421 4.3.0")
        gw.config["policy"]["connection_rate"] = 0
        gw.write_config()
        gw.restart()
        c = session(gw.smtp_port, "127.0.0.66")
        assert c.cmd("RCPT TO:<postmaster@example.edu>").startswith("250")  # no count needed
        assert c.cmd("RCPT TO:<nobody@example.edu>").startswith("451 4.3.0")
        c.close()
        gw.wait_event(
            lambda e: e.get("event") == "policy.error" and e.get("stage") == "rcpt",
            what="the policy.error of the RCPT check",
        )
    finally:
        gw.stop()


def test_two_gateways_share_harvest_counts(redis_server: RedisServer, tmp_path: Path) -> None:
    policy = {
        "counters": "redis",
        "redis_url": redis_server.url,
        "default_directory": "static",
        "harvest_soft_limit": 10,
        "harvest_hard_limit": 20,
        "harvest_threshold": 6,
        "connection_rate": 0,
    }
    gws: list[Gateway] = []
    try:
        for name in ("node1", "node2"):
            gws.append(Gateway(tmp_path / name, extra={"policy": policy}).start())

        def probe(gw: Gateway, n: int) -> list[str]:
            c = session(gw.smtp_port, "127.0.0.66")
            out = []
            for _ in range(n):
                out.append(c.cmd(f"RCPT TO:<{secrets.token_hex(4)}@example.edu>"))
                if out[-1].startswith("421"):
                    break
            c.close()
            return out

        first = probe(gws[0], 4)
        assert all(r.startswith("550 5.1.1") for r in first), first
        # Node 2 has seen only two invalid recipients itself, but the count is shared.
        replies = probe(gws[1], 4)
        assert [r[:3] for r in replies] == ["550", "421"]
        assert "blocked" in replies[-1]
        assert greeting(gws[1].smtp_port, "127.0.0.66").startswith("554 5.7.1")
        poll(
            lambda: gws[1].cli("blocks", "list", "--json").stdout.strip(),
            30,
            what="the block in node2's database",
        )
    finally:
        for gw in gws:
            gw.stop()


def test_counter_keys_in_redis(redis_server: RedisServer) -> None:
    async def main() -> Any:
        c = RedisCounters.from_url(redis_server.url, 2.0)
        try:
            await c.incr("rate:msg:srv:10.0.0.1/32", 3600)
            return await c.client.keys("*")
        finally:
            await c.close()

    assert asyncio.run(main()) == [KEY_PREFIX + "rate:msg:srv:10.0.0.1/32"]

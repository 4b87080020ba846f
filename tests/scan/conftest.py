"""Fixtures for the scanning tests: real clamd and rspamd, a loopback DNS server, events.

- ``clamd_db`` (session): the project's signature database, built once.
- ``clamd`` (session): a running clamd on that database (Unix socket + 127.0.0.1 TCP).
- ``clamd_factory`` (function): private clamd instances a test may stop and restart.
- ``dns_server`` (session): ``LoopbackDNS`` serving the test zone (PTR/A/MX/SPF for the
  sending host, so ham is not penalised for missing DNS).
- ``rspamd`` (session) / ``rspamd_factory`` (function): real rspamd on loopback.
- ``events``: a ``MemorySink`` that receives every event during the test.

Security: daemons listen on 127.0.0.1 and sockets in the test's directory only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailwarden.core import events as ev
from tests.scan.messages import CLIENT_IP, HELO
from tests.support.clamd import Clamd, build_db, clamd_available
from tests.support.rspamd import LoopbackDNS, Rspamd, rspamd_available

TEST_ZONE = {
    ("10.2.0.192.in-addr.arpa", "PTR"): [f"{HELO}."],
    (HELO, "A"): [CLIENT_IP],
    ("example.org", "MX"): [f"10 {HELO}."],
    ("example.org", "A"): [CLIENT_IP],
    ("example.org", "TXT"): [f'"v=spf1 ip4:{CLIENT_IP} -all"'],
    ("example.edu", "MX"): ["10 mx.example.edu."],
    ("mx.example.edu", "A"): ["192.0.2.25"],
}


@pytest.fixture
def events() -> Iterator[ev.MemorySink]:
    old = ev.get_sink()
    sink = ev.MemorySink()
    ev.set_sink(sink)
    yield sink
    ev.set_sink(old)


@pytest.fixture(scope="session")
def clamd_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not clamd_available():
        pytest.skip("clamd/sigtool not installed (apt install clamav-daemon)")
    return build_db(tmp_path_factory.mktemp("clamdb"), version=4242)


@pytest.fixture(scope="session")
def clamd(tmp_path_factory: pytest.TempPathFactory, clamd_db: Path) -> Iterator[Clamd]:
    d = Clamd(tmp_path_factory.mktemp("clamd"), clamd_db, tcp=True).start()
    yield d
    d.stop()


@pytest.fixture
def clamd_factory(tmp_path: Path) -> Iterator[Callable[..., Clamd]]:
    if not clamd_available():
        pytest.skip("clamd/sigtool not installed (apt install clamav-daemon)")
    made: list[Clamd] = []

    def make(dbdir: Path | None = None, *, start: bool = True, **kw: object) -> Clamd:
        n = len(made) + 1
        db = dbdir or build_db(tmp_path / f"db{n}", version=n)
        c = Clamd(tmp_path / f"c{n}", db, **kw)  # type: ignore[arg-type]
        made.append(c)
        return c.start() if start else c

    yield make
    for c in made:
        c.stop()


@pytest.fixture(scope="session")
def dns_server() -> Iterator[LoopbackDNS]:
    server = LoopbackDNS(TEST_ZONE).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rspamd(tmp_path_factory: pytest.TempPathFactory, dns_server: LoopbackDNS) -> Iterator[Rspamd]:
    if not rspamd_available():
        pytest.skip("rspamd not installed (apt install rspamd)")
    r = Rspamd(tmp_path_factory.mktemp("rspamd"), dns_server.address).start()
    yield r
    r.stop()


@pytest.fixture
def rspamd_factory(tmp_path: Path, dns_server: LoopbackDNS) -> Iterator[Callable[..., Rspamd]]:
    if not rspamd_available():
        pytest.skip("rspamd not installed (apt install rspamd)")
    made: list[Rspamd] = []

    def make(*, start: bool = True) -> Rspamd:
        r = Rspamd(tmp_path / f"r{len(made) + 1}", dns_server.address)
        made.append(r)
        return r.start() if start else r

    yield make
    for r in made:
        r.stop()

"""Shared pytest fixtures: real daemons started per test, stopped in teardown.

- ``dovecot_factory(users)`` -> a started ``DovecotLMTP`` (tests/support/dovecot.py)
- ``postfix_factory.downstream(domains, users, start=True)`` and
  ``postfix_factory.upstream(relay_port)`` -> ``PostfixInstance`` (tests/support/postfix.py)
- ``gateway_factory(**config)`` -> a ``Gateway`` subprocess (tests/support/gateway.py)
- ``pg_database`` -> a fresh PostgreSQL database per test module (tests/support/postgres.py);
  ``db_url`` -> ``[database] url`` once for SQLite, once for PostgreSQL (parametrized)

Hypothesis (the ``test_props_*.py`` property tests) runs under the profile named by
``HYPOTHESIS_PROFILE``, by default the derandomized ``mailwarden`` (tests/support/properties.py).

Each Postfix/Dovecot instance lives in its own ``/tmp/mw-*`` directory, linked from the
test's ``tmp_path`` (``dv1``, ``pf1``, ...) and removed in teardown: daemons running as
``postfix``/``nobody`` cannot rely on reaching ``/tmp/pytest-of-root`` (see tmpdirs.py), and
Unix socket paths must stay under 108 bytes. The gateway (run as the test's user) lives
directly in ``tmp_path/gwN``. Tests that need root-started daemons are skipped
when not run as root or when the Debian package is missing (``make test`` installs them).

Security: every daemon listens on 127.0.0.1 only; teardown stops exactly the processes the
fixtures started.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from mailwarden.core.events import MemorySink, get_sink, set_sink
from tests.support.dovecot import DovecotLMTP, dovecot_available
from tests.support.postfix import PostfixInstance, postfix_available
from tests.support.properties import active_profile, register_profiles
from tests.support.tmpdirs import daemon_workdir, remove_workdir

register_profiles()
settings.load_profile(active_profile())


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (run the suite as root, as `make test` does)")


@pytest.fixture
def sink() -> Iterator[MemorySink]:
    """The test's events in memory (the previous sink comes back afterwards)."""
    previous, memory = get_sink(), MemorySink()
    set_sink(memory)
    yield memory
    set_sink(previous)


@pytest.fixture
def dovecot_factory(tmp_path: Path) -> Iterator[Any]:
    """Start real Dovecot LMTP servers: ``dovecot_factory(["u@dom"], start=True)``."""
    if not dovecot_available():
        pytest.skip("dovecot-lmtpd is not installed (scripts/install-deps.sh installs it)")
    _need_root("Dovecot as nobody")
    made: list[DovecotLMTP] = []
    links: list[Path] = []

    def make(users: list[str], *, port: int | None = None, start: bool = True) -> DovecotLMTP:
        link = tmp_path / f"dv{len(made) + 1}"
        links.append(link)
        d = DovecotLMTP(daemon_workdir(link, "mw-dv-"), users, port=port)
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        d.stop()
    for link in links:
        remove_workdir(link)


class PostfixFactory:
    """Makes private Postfix instances under one test's tmp_path."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.made: list[PostfixInstance] = []

    def _dir(self) -> Path:
        return daemon_workdir(self.base / f"pf{len(self.made) + 1}", "mw-pf-")

    def downstream(
        self,
        domains: list[str],
        users: list[str],
        *,
        port: int | None = None,
        start: bool = True,
        **kw: Any,
    ) -> PostfixInstance:
        p = PostfixInstance(
            self._dir(), "downstream", port=port, domains=domains, users=users, **kw
        )
        self.made.append(p)
        return p.start() if start else p

    def upstream(
        self, relay_port: int, *, port: int | None = None, start: bool = True, **kw: Any
    ) -> PostfixInstance:
        p = PostfixInstance(self._dir(), "upstream", port=port, relay_port=relay_port, **kw)
        self.made.append(p)
        return p.start() if start else p

    def stop_all(self) -> None:
        for p in self.made:
            p.stop()
        for i in range(len(self.made)):
            remove_workdir(self.base / f"pf{i + 1}")


@pytest.fixture
def postfix_factory(tmp_path: Path) -> Iterator[PostfixFactory]:
    if not postfix_available():
        pytest.skip("postfix is not installed (scripts/install-deps.sh installs it)")
    _need_root("a private Postfix instance")
    factory = PostfixFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Any]:
    """Start the real gateway: ``gateway_factory(hosted={"dom": "maildir"}, ...)``.

    Keyword arguments go to ``tests.support.gateway.Gateway``; it is started unless
    ``start=False``. Every gateway made is stopped (SIGTERM, then SIGKILL) in teardown.
    """
    from tests.support.gateway import Gateway

    made: list[Gateway] = []

    def make(*, start: bool = True, **kw: Any) -> Gateway:
        g = Gateway(tmp_path / f"gw{len(made) + 1}", **kw)
        made.append(g)
        return g.start() if start else g

    yield make
    for g in made:
        g.stop()


@pytest.fixture(scope="module")
def pg_database(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh PostgreSQL database for this test module, dropped after it (a ``PgDatabase``
    of tests/support/postgres.py; PostgreSQL not reachable = the test fails)."""
    from tests.support.postgres import PgDatabase

    db = PgDatabase.create(request.module.__name__.rsplit(".", 1)[-1])
    yield db
    db.drop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """``[database] url`` for each backend the store supports: ``""`` (SQLite under the
    config's ``state_dir``) or this module's PostgreSQL database, emptied for the test."""
    if request.param == "sqlite":
        return ""
    pg = request.getfixturevalue("pg_database")
    pg.reset()
    return str(pg.url)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    """Under ``make test`` (MAILWARDEN_REQUIRE_COMPONENTS=1) a skipped test is a failure.

    The fixtures skip when a component (slapd, clamd, rspamd, Postfix, ...) is missing so
    that a developer can run one file without every package; the project's own suite run
    installs them all, so there a skip can only mean a missing piece, never a pass.
    """
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("MAILWARDEN_REQUIRE_COMPONENTS") == "1":
        report.outcome = "failed"
        report.longrepr = f"skipped under make test (a component is missing): {report.longrepr}"

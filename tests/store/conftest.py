"""Fixtures of the store tests that talk to PostgreSQL: ``pg`` (the shared test database,
emptied and accepting connections) and ``path`` (a ``PgBlackhole`` in front of it that
forwards until a test stalls it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.pgfault import PgBlackhole
from tests.support.postgres import PgDatabase


@pytest.fixture
def pg(pg_database: PgDatabase) -> PgDatabase:
    pg_database.allow_connections()
    pg_database.reset()
    return pg_database


@pytest.fixture
def path() -> Iterator[PgBlackhole]:
    with PgBlackhole() as p:
        p.pass_through()
        yield p

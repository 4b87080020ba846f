"""Fresh PostgreSQL databases on the machine's server, for the store tests.

The suite uses the PostgreSQL cluster that ``scripts/ensure-services.sh`` starts (Debian's
``15/main``), over its Unix socket (``SOCKET_DIR``, override with
``MAILWARDEN_TEST_PG_SOCKET``): the tests run in a network namespace of their own where
127.0.0.1:5432 is not the host's server, but the socket is a file and works from there.

``PgDatabase.create(label)`` connects as the superuser (``postgres``, trust over the socket),
makes sure the unprivileged login role ``ROLE`` exists, and creates a database with a unique
name (``mwtest_<label>_<pid>_<random>``) owned by that role; the store connects as ``ROLE``,
so it is tested with the rights a production account has (owner of its database, nothing
more). Then:

- ``url`` the SQLAlchemy URL (``postgresql+psycopg://ROLE@/NAME?host=SOCKET_DIR``);
- ``reset()`` an empty ``public`` schema (a fresh start for the next test of a module);
- ``sessions()`` the backends connected to it, ``terminate()`` ends them all
  (``pg_terminate_backend``: what a server restart does to a client);
- ``refuse_connections()`` / ``allow_connections()`` make the database unreachable and
  reachable again (``ALLOW_CONNECTIONS``, after terminating the sessions): "the database is
  down" for exactly this database, without stopping the server other tests share;
- ``sql(statement)`` runs one statement as the superuser in this database;
- ``drop()`` ``DROP DATABASE ... WITH (FORCE)``.

A server that cannot be reached is a test failure with a message saying how to start it,
never a skip. ``create`` first drops databases left behind by test processes that died
without their teardown (SIGKILL, a timeout): names carry the creator's pid, and only names
whose process no longer exists are dropped.

Security: Unix socket only, nothing goes over TCP; statements are built only from names
this module generated (``_ident`` checks them); drops only ``mwtest_*`` databases whose
creating process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from psycopg import sql as pgsql

SOCKET_DIR = os.environ.get("MAILWARDEN_TEST_PG_SOCKET", "/var/run/postgresql")
SUPERUSER = os.environ.get("MAILWARDEN_TEST_PG_SUPERUSER", "postgres")
ROLE = "mailwarden_test"  # the unprivileged login role the store connects as
CONNECT_TIMEOUT = 10  # seconds for the admin connection
_NAME = re.compile(r"^[a-z0-9_]{1,63}$")
_OURS = re.compile(r"^mwtest_[a-z0-9_]*_(\d+)_[0-9a-f]{6}$")  # group 1: the creator's pid


def _ident(name: str) -> pgsql.Identifier:
    if not _NAME.match(name):
        raise ValueError(f"unexpected identifier {name!r}")
    return pgsql.Identifier(name)


def admin_connect(dbname: str = "postgres") -> psycopg.Connection[Any]:
    """A superuser connection (autocommit) over the Unix socket; fail the test if none."""
    try:
        return psycopg.connect(
            host=SOCKET_DIR,
            user=SUPERUSER,
            dbname=dbname,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
            application_name="mailwarden-tests",
        )
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable over {SOCKET_DIR} as {SUPERUSER!r}: {exc}\n"
            "Start it with `bash scripts/ensure-services.sh` (or `pg_ctlcluster "
            "--skip-systemctl-redirect 15 main start`); `make test` does this.",
            pytrace=False,
        )


def _drop_orphans(conn: psycopg.Connection[Any]) -> None:
    """Drop test databases whose creating process has died (no teardown ran)."""
    rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'mwtest%'")
    for (name,) in rows.fetchall():
        m = _OURS.match(name)
        if m is None or os.path.exists(f"/proc/{m.group(1)}"):
            continue
        with contextlib.suppress(psycopg.Error):  # another process may be dropping it too
            conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(_ident(name)))


def _ensure_role(conn: psycopg.Connection[Any]) -> None:
    exists = "SELECT 1 FROM pg_roles WHERE rolname = %s"
    if conn.execute(exists, (ROLE,)).fetchone():
        return
    # Another test process may create it at the same instant.
    with contextlib.suppress(psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
        conn.execute(
            pgsql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE").format(
                _ident(ROLE)
            )
        )


class PgDatabase:
    """One fresh database on the shared server; see the module docstring."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.role = ROLE

    @classmethod
    def create(cls, label: str) -> PgDatabase:
        slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")[-28:] or "db"
        name = f"mwtest_{slug}_{os.getpid()}_{secrets.token_hex(3)}"
        with admin_connect() as conn:
            _drop_orphans(conn)
            _ensure_role(conn)
            conn.execute(
                pgsql.SQL("CREATE DATABASE {} OWNER {}").format(_ident(name), _ident(ROLE))
            )
        return cls(name)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.role}@/{self.name}?host={SOCKET_DIR}"

    def sql(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser in this database; return its rows."""
        with admin_connect(self.name) as conn:
            cur = conn.execute(statement, params)
            return list(cur.fetchall()) if cur.description else []

    def reset(self) -> None:
        """Drop everything the store created: an empty ``public`` schema, owned by ROLE."""
        self.terminate()
        self.sql("DROP SCHEMA public CASCADE")
        self.sql(f"CREATE SCHEMA public AUTHORIZATION {self.role}")

    def sessions(self, application: str | None = None) -> list[int]:
        """Process ids of the backends connected to this database (but our admin one)."""
        rows = self.sql(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
            " AND (%s::text IS NULL OR application_name = %s)",
            (self.name, application, application),
        )
        return [int(r[0]) for r in rows]

    def terminate(self) -> int:
        """``pg_terminate_backend`` every other session of this database; how many."""
        with admin_connect() as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.name,),
            ).fetchall()
        return sum(1 for r in rows if r[0])

    def refuse_connections(self) -> None:
        """The database is down: no new sessions, the existing ones terminated."""
        with admin_connect() as conn:
            conn.execute(
                pgsql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(_ident(self.name))
            )
        self.terminate()

    def allow_connections(self) -> None:
        with admin_connect() as conn:
            conn.execute(
                pgsql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(_ident(self.name))
            )

    def drop(self) -> None:
        with admin_connect() as conn:
            conn.execute(
                pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(_ident(self.name))
            )

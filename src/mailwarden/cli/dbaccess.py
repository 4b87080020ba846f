"""The data store for one CLI command: a bounded open, and one line when the database fails.

``with cli_store(cfg) as db:`` opens the configured store (``store.open_store``, creating
the schema if needed) with a connect timeout of ``CLI_CONNECT_TIMEOUT`` seconds per server
address (unless the URL sets ``connect_timeout``) and gives the whole open at most
``CLI_OPEN_DEADLINE`` seconds: a database server that drops packets, or a DNS server that
does not answer, cannot hold a command longer. A database that cannot be reached or used,
when it is opened or while the command runs (the server went away, a write timed out),
is a ``StoreUnavailable`` / ``StoreError`` whose message is one line naming the database
(``store.db.store_label``: the password as ``***``) and the driver's first line;
``cli.main`` prints it as ``mailwarden: ...`` and exits 1. Never a traceback. The store is
closed when the block ends.

``probe(cfg)`` is ``store.db.probe_store`` with the same bounds (``mailwarden status``).

Public names: ``cli_store``, ``probe``, ``CLI_CONNECT_TIMEOUT``, ``CLI_OPEN_DEADLINE``.
Security: the driver's error text is untrusted (it may quote the server): it is only shown
through ``store.db.error_reason`` (redacted, first line); the URL only as its label.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from mailwarden.errors import StoreError, StoreUnavailable
from mailwarden.store.db import (
    Store,
    error_reason,
    is_transient,
    open_store,
    probe_store,
    store_label,
)
from mailwarden.store.reach import call_within

if TYPE_CHECKING:
    from mailwarden.config import Config

CLI_CONNECT_TIMEOUT = 5  # seconds per server address (libpq connect_timeout; at least 2)
CLI_OPEN_DEADLINE = 15.0  # seconds for the whole open: name lookup, every address, schema

__all__ = ["CLI_CONNECT_TIMEOUT", "CLI_OPEN_DEADLINE", "cli_store", "probe"]


def _open(cfg: Config) -> Store:
    opener = partial(open_store, cfg, connect_timeout=CLI_CONNECT_TIMEOUT)
    try:
        return call_within(opener, CLI_OPEN_DEADLINE, Store.close)
    except TimeoutError:
        late = f"no answer within {CLI_OPEN_DEADLINE:g} s"
        raise StoreUnavailable(f"cannot reach the database {store_label(cfg)}: {late}") from None


@contextmanager
def cli_store(cfg: Config) -> Iterator[Store]:
    """The open store for a command's block; database failures as one-line store errors."""
    db = _open(cfg)
    try:
        yield db
    except SQLAlchemyError as exc:  # the server went away, a lock or statement timed out
        reason = error_reason(cfg.database, exc)
        if is_transient(exc):
            raise StoreUnavailable(f"lost the database {db.label}: {reason}") from None
        raise StoreError(f"the database {db.label} failed: {reason}") from None
    finally:
        db.close()


def probe(cfg: Config) -> str | None:
    """``None`` when the configured database answers, else the one-line redacted reason."""
    check = partial(probe_store, cfg, connect_timeout=CLI_CONNECT_TIMEOUT)
    try:
        return call_within(check, CLI_OPEN_DEADLINE)
    except TimeoutError:
        return f"no answer within {CLI_OPEN_DEADLINE:g} s"

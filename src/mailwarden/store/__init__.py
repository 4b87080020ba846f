"""Data store: one SQLAlchemy schema on SQLite (WAL, the embedded default) or PostgreSQL.

``open_store(cfg)`` (alias ``open``) creates the tables and returns a ``Store``. Table
helpers live in ``store.senders``, ``store.blocks`` and ``store.users``.

Public names: ``Store``, ``open_store``, ``open``, ``DatabaseSettings``, ``SCHEMA_VERSION``.
Security: holds registered senders, user password hashes and client blocks; the database
file is created mode 0600 under ``state_dir``.
"""

from mailwarden.store.db import SCHEMA_VERSION, Store, open_store
from mailwarden.store.settings import DatabaseSettings

open = open_store  # the documented entry point is ``store.open(cfg)``

__all__ = ["SCHEMA_VERSION", "DatabaseSettings", "Store", "open", "open_store"]

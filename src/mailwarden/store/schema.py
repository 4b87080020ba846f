"""The one database schema (SQLAlchemy Core), shared by SQLite and PostgreSQL.

Times are stored as ``Float`` seconds since the epoch (UTC), portable and cheap to compare.
``meta`` holds the schema version and change serials (``senders_serial``,
``blocks_serial``): writers bump a serial in the same transaction, readers in other
processes (gateway workers) poll it and reload their in-memory caches when it moved.

Public names: ``metadata``, ``meta``, ``senders``, ``users``, ``blocks``, ``SCHEMA_VERSION``,
``SENDERS_SERIAL``, ``BLOCKS_SERIAL``, ``USERS_SERIAL``.
Security: ``users.password_hash`` holds argon2 hashes only, never passwords.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
)

SCHEMA_VERSION = 1  # bump together with a migration step in store.db._migrate
SENDERS_SERIAL = "senders_serial"
BLOCKS_SERIAL = "blocks_serial"
USERS_SERIAL = "users_serial"

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(200), nullable=False),
)

# Registered sending servers (SU-1, SU-3): a network (single address = /32 or /128).
senders = Table(
    "senders",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("network", String(64), nullable=False, unique=True),  # canonical CIDR
    Column("name", String(200), nullable=False, default=""),
    Column("domains", JSON, nullable=False),  # list of domains it may send for
    Column("added_by", String(200), nullable=False, default=""),
    Column("added_at", Float, nullable=False),
)

# SMTP AUTH users (SU-8); filled in by the AUTH module (store.users).
users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("login", String(320), nullable=False, unique=True),
    Column("password_hash", String(512), nullable=False),  # argon2id encoded hash
    Column("addresses", JSON, nullable=False),  # envelope senders the user may use
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# Client addresses blocked by the harvest defence (CP-E2) or an operator.
blocks = Table(
    "blocks",
    metadata,
    Column("address", String(64), primary_key=True),  # canonical IP address text
    Column("reason", String(500), nullable=False, default=""),
    Column("until", Float, nullable=False, index=True),
    Column("created", Float, nullable=False),
)

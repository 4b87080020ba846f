"""SMTP AUTH users (SU-8): the table is ``store.schema.users``.

Blocking functions over an open ``Store`` (the gateway runs them through ``Store.call``,
CLI commands call them directly). Logins are stored normalised (``auth.base.normalise_login``:
lower case, no outer blanks), which is also the form ``Session.auth_user`` takes; every
lookup normalises too, so case-insensitivity never depends on the database's collation or
``lower()`` (SQLite and PostgreSQL disagree on non-ASCII). Every write
bumps the ``users_serial`` change serial in the same transaction. The policy needs only
``sender_addresses``/``sender_login_map``: the envelope senders a login may use (the
sender-login map); a disabled or unknown user may use none.

Public names: ``UserRow``, ``UserExists``, ``get_user``, ``add_user``, ``set_password_hash``,
``set_disabled``, ``list_users``, ``sender_addresses``, ``sender_login_map``.
Security: stores argon2id hashes only, never passwords (``UserRow.to_json`` leaves the hash
out); SQL is built by SQLAlchemy with bound parameters (logins are untrusted when they come
from an SMTP client). A failed write's error names the database and the driver's first line
only (``error_reason``: never the statement or its parameters, which hold the hash).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from mailwarden.auth.base import normalise_login
from mailwarden.errors import StoreError
from mailwarden.store.db import Store, bump_serial, error_reason
from mailwarden.store.schema import USERS_SERIAL, users


class UserExists(StoreError):
    """``user add`` for a login that is already in the table."""


@dataclass(frozen=True, slots=True)
class UserRow:
    login: str
    password_hash: str
    addresses: tuple[str, ...]
    disabled: bool
    created_at: float
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        """Everything but the hash (for ``user list --json``)."""
        return {
            "login": self.login,
            "addresses": list(self.addresses),
            "disabled": self.disabled,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


def _row(r: Any) -> UserRow:
    return UserRow(
        login=str(r.login),
        password_hash=str(r.password_hash),
        addresses=tuple(str(a) for a in (r.addresses or [])),
        disabled=bool(r.disabled),
        created_at=float(r.created_at),
        updated_at=float(r.updated_at),
    )


def get_user(store: Store, login: str) -> UserRow | None:
    """The account of ``login`` or None. Raises ``SQLAlchemyError`` if the database fails."""
    with store.engine.connect() as conn:
        r = conn.execute(select(users).where(users.c.login == normalise_login(login))).first()
    return _row(r) if r is not None else None


def add_user(store: Store, login: str, password_hash: str, addresses: list[str]) -> UserRow:
    now = time.time()
    name = normalise_login(login)
    try:
        with store.engine.begin() as conn:
            conn.execute(
                insert(users).values(
                    login=name,
                    password_hash=password_hash,
                    addresses=list(addresses),
                    disabled=False,
                    created_at=now,
                    updated_at=now,
                )
            )
            bump_serial(conn, USERS_SERIAL)
    except IntegrityError as exc:
        raise UserExists(f"user {name!r} already exists") from exc
    except SQLAlchemyError as exc:
        reason = error_reason(store.settings, exc)  # no SQL, no parameters (the hash)
        raise StoreError(
            f"cannot add user {name!r} to the database {store.label}: {reason}"
        ) from exc
    return UserRow(name, password_hash, tuple(addresses), False, now, now)


def _update(store: Store, login: str, **values: Any) -> bool:
    try:
        with store.engine.begin() as conn:
            res = conn.execute(
                update(users)
                .where(users.c.login == normalise_login(login))
                .values(updated_at=time.time(), **values)
            )
            if res.rowcount:
                bump_serial(conn, USERS_SERIAL)
    except SQLAlchemyError as exc:
        reason = error_reason(store.settings, exc)  # no SQL, no parameters (the hash)
        raise StoreError(
            f"cannot update user {normalise_login(login)!r} in the database {store.label}: {reason}"
        ) from exc
    return bool(res.rowcount)


def set_password_hash(store: Store, login: str, password_hash: str) -> bool:
    """Replace the hash; False if there is no such user."""
    return _update(store, login, password_hash=password_hash)


def set_disabled(store: Store, login: str, disabled: bool) -> bool:
    """Disable or enable an account; False if there is no such user."""
    return _update(store, login, disabled=disabled)


def list_users(store: Store) -> list[UserRow]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(users)).all()
    # Sorted here: ORDER BY would follow the database's collation (differs between servers).
    return sorted((_row(r) for r in rows), key=lambda u: u.login)


def sender_addresses(store: Store, login: str) -> frozenset[str]:
    """Lower-cased envelope senders ``login`` may use (empty if unknown or disabled)."""
    with store.engine.connect() as conn:
        row = conn.execute(
            select(users.c.addresses, users.c.disabled).where(
                users.c.login == normalise_login(login)
            )
        ).first()
    if row is None or row.disabled:
        return frozenset()
    return frozenset(str(a).lower() for a in (row.addresses or ()))


def sender_login_map(store: Store) -> dict[str, frozenset[str]]:
    """login -> allowed envelope senders, for every enabled user (the policy's cache)."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(users.c.login, users.c.addresses).where(users.c.disabled.is_(False))
        ).all()
    return {r.login: frozenset(str(a).lower() for a in (r.addresses or ())) for r in rows}

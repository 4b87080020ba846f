"""SMTP AUTH users (SU-8): the table is ``store.schema.users``.

The AUTH module fills in the user functions (add, set password, disable, verify with
argon2). The policy needs only ``sender_addresses``: the envelope senders a login may use
(the sender-login map); a disabled or unknown user may use none.

Public names: ``sender_addresses``, ``sender_login_map``.
Security: never reads or returns password hashes here.
"""

from __future__ import annotations

from sqlalchemy import select

from mailwarden.store.db import Store
from mailwarden.store.schema import users


def sender_addresses(store: Store, login: str) -> frozenset[str]:
    """Lower-cased envelope senders ``login`` may use (empty if unknown or disabled)."""
    with store.engine.connect() as conn:
        row = conn.execute(
            select(users.c.addresses, users.c.disabled).where(users.c.login == login)
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

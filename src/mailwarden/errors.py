"""The error tree of mailwarden. Every error carries a sentence an operator can act on.

Public names: ``MailwardenError``, ``ConfigError``, ``QueueError``, ``SpoolCorrupt``,
``DeliveryError``, ``AddressError``, ``StoreError``, ``StoreUnavailable``, ``StoreTimeout``.
Security: messages may quote untrusted input; callers print them escaped (``repr``).
"""

from __future__ import annotations


class MailwardenError(Exception):
    """Base of every error mailwarden raises on purpose."""


class ConfigError(MailwardenError):
    """The configuration file is missing, unreadable or invalid.

    ``problems`` lists one line per problem: ``FILE:LINE: key: message``.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []

    def __str__(self) -> str:
        if not self.problems:
            return super().__str__()
        return super().__str__() + "\n" + "\n".join(f"  {p}" for p in self.problems)


class QueueError(MailwardenError):
    """A queue operation failed (unknown queue id, spool not writable, ...)."""


class SpoolCorrupt(QueueError):
    """A spool file cannot be parsed; it is moved to the ``corrupt`` directory."""


class DeliveryError(MailwardenError):
    """A delivery could not even be attempted (bad transport configuration, ...)."""


class AddressError(MailwardenError):
    """An e-mail address is syntactically invalid or carries forbidden characters."""


class StoreError(MailwardenError):
    """The database cannot be opened, or a store operation was refused (bad input)."""


class StoreUnavailable(StoreError):
    """The database server cannot be reached right now (connection refused, timeout, too
    many connections, not accepting connections): worth retrying, unlike a bad URL, a
    missing database or an unusable SQLite path."""


class StoreTimeout(StoreUnavailable):
    """A database call got no answer within its deadline (``[database] call_timeout``): the
    server or the path to it is stalled. Handled like a server that is down (4xx, caches
    kept). On PostgreSQL the call's connection is shut down at the deadline, so its thread
    comes back at once (``store.interrupt``); on SQLite it goes on until the file answers
    (``store.db.Store.call``)."""

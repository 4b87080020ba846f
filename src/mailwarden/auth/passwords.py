"""argon2id password hashing for the user database (argon2-cffi).

``Hasher(settings)`` hashes new passwords with the configured parameters and verifies stored
hashes. ``verify`` answers ``(matches, new_hash)``: ``new_hash`` is set when the password
matched but the stored hash was made with other parameters (re-hash on login). ``dummy_verify``
spends the same work on a fixed hash, so an unknown login costs as much as a wrong password.

Public names: ``Hasher``.
Security: passwords are only passed to argon2; never logged, never kept. Hashing is CPU and
memory heavy (``memory_cost`` KiB each): callers run it in a bounded thread pool.
"""

from __future__ import annotations

import threading

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from mailwarden.auth.settings import Argon2Settings

_DUMMY_PASSWORD = "mailwarden-dummy-password"  # noqa: S105 - hashed once, never accepted


class Hasher:
    """argon2id with the configured parameters."""

    def __init__(self, settings: Argon2Settings) -> None:
        self._ph = PasswordHasher(
            time_cost=settings.time_cost,
            memory_cost=settings.memory_cost,
            parallelism=settings.parallelism,
            type=Type.ID,
        )
        self._dummy: str | None = None
        self._lock = threading.Lock()

    def hash(self, password: str) -> str:
        return self._ph.hash(password)

    def verify(self, stored: str, password: str) -> tuple[bool, str | None]:
        """Check ``password`` against ``stored``; a malformed stored hash never matches."""
        try:
            self._ph.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False, None
        if self._ph.check_needs_rehash(stored):
            return True, self._ph.hash(password)
        return True, None

    def dummy_verify(self, password: str) -> None:
        """Verify against a fixed hash (same cost as a real check); the result is ignored."""
        with self._lock:
            if self._dummy is None:
                self._dummy = self._ph.hash(_DUMMY_PASSWORD)
            dummy = self._dummy
        self.verify(dummy, password)

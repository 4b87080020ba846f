"""Helpers for the AUTH tests: a cheap argon2 profile, a user database in ``tmp_path``, test
doubles of a backend, and base64 AUTH responses.

Security: test credentials only; everything stays in the test's own directory.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

from mailwarden.auth.base import AuthResult
from mailwarden.auth.database import DatabaseAuthenticator
from mailwarden.auth.passwords import Hasher
from mailwarden.auth.service import AuthService
from mailwarden.auth.settings import AuthSettings
from mailwarden.config import Config, default_config
from mailwarden.store import open_store
from mailwarden.store import users as user_table
from mailwarden.store.db import Store

# Cheap parameters so the tests do not spend 64 MiB and 3 passes per check.
FAST_ARGON2 = {"time_cost": 1, "memory_cost": 1024, "parallelism": 1}
# Throttling that never interferes unless a test asks for it.
NO_THROTTLE = {
    "client_soft_limit": 1000,
    "client_hard_limit": 1000,
    "account_soft_limit": 1000,
    "session_max_failures": 100,
    "failure_delay": 0,
}


def auth_settings(**overrides: Any) -> AuthSettings:
    data: dict[str, Any] = {"argon2": FAST_ARGON2} | NO_THROTTLE | overrides
    return AuthSettings.model_validate(data)


def store_config(tmp_path: Path, url: str = "", **auth: Any) -> Config:
    """A config whose store is SQLite under ``tmp_path/var`` or, with ``url``, PostgreSQL."""
    return default_config(
        gateway={"hostname": "mx.test.example", "state_dir": str(tmp_path / "var")},
        auth={"argon2": FAST_ARGON2} | NO_THROTTLE | auth,
        database={"url": url},
    )


def user_store(cfg: Config, users: dict[str, str], disabled: tuple[str, ...] = ()) -> Store:
    """Open the store of ``cfg`` and add ``users`` (login -> password)."""
    store = open_store(cfg)
    hasher = Hasher(cfg.auth.argon2)
    for login, password in users.items():
        user_table.add_user(store, login, hasher.hash(password), [f"{login}@example.edu"])
        if login in disabled:
            user_table.set_disabled(store, login, True)
    return store


def database_service(cfg: Config, store: Store) -> AuthService:
    return AuthService(cfg.auth, DatabaseAuthenticator(store, Hasher(cfg.auth.argon2)))


class DictBackend:
    """Test double: passwords from a dict; can be told to raise or to hang."""

    name = "dict"

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self.calls: list[str] = []
        self.fail: BaseException | None = None
        self.hang = False

    async def authenticate(self, login: str, password: str) -> AuthResult:
        self.calls.append(login)
        if self.fail is not None:
            raise self.fail
        if self.hang:
            await asyncio.sleep(3600)
        if login and self.users.get(login) == password:
            return AuthResult.OK
        return AuthResult.INVALID


def plain(login: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{login}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()

"""Settings of the data store, mounted as the ``[database]`` config section.

Example (TOML)::

    [database]
    url = "postgresql+psycopg://mailwarden:SECRET@db.example.edu/mailwarden"

An empty ``url`` (the default) is SQLite in WAL mode at ``state_dir/mailwarden.db``.

Public names: ``DatabaseSettings``.
Security: operator-supplied; the URL may carry a password, so ``DatabaseSettings.safe_url``
is what gets printed or logged.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailwarden.core.durations import Duration

_URL = re.compile(r"^(sqlite|postgresql)(\+[a-z0-9_]+)?://", re.IGNORECASE)


class DatabaseSettings(BaseModel):
    """[database]: where registered senders, users and blocks live."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # SQLAlchemy URL; "" = sqlite:///STATE_DIR/mailwarden.db (WAL mode).
    url: str = ""
    # How long a writer waits for a lock (SQLite busy_timeout, PostgreSQL lock_timeout).
    busy_timeout: Duration = 5.0
    pool_size: int = Field(default=5, ge=1, le=100)  # PostgreSQL connections per process

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not _URL.match(v):
            raise ValueError(
                "database url must start with sqlite:// or postgresql+DRIVER:// "
                "(e.g. postgresql+psycopg://user:pass@host/db)"
            )
        return v

    @property
    def safe_url(self) -> str:
        """The URL with any password replaced by ``***``."""
        return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", self.url)

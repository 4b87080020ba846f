"""Settings of the data store, mounted as the ``[database]`` config section.

Example (TOML)::

    [database]
    url = "postgresql+psycopg://mailwarden:SECRET@db.example.edu/mailwarden"
    # or over the local Unix socket (peer/trust authentication, no password):
    url = "postgresql+psycopg://mailwarden@/mailwarden?host=/var/run/postgresql"

An empty ``url`` (the default) is SQLite in WAL mode at ``state_dir/mailwarden.db``.
``start_wait`` bounds how long a starting gateway waits for a PostgreSQL server's first
answer before it listens anyway (degraded, still connecting in the background).
``call_timeout`` bounds how long the gateway's event loop waits for one database call (a
server that is connected but does not answer: the caller answers as if it were down);
``open_timeout`` bounds opening a PostgreSQL store (connection, schema creation and check):
a server or path that stops answering then is a server that cannot be reached right now.
``statement_timeout`` is PostgreSQL's, set on every session (0: off).

Public names: ``DatabaseSettings``, ``redact_url``.
Security: operator-supplied; the URL may carry a password (in the user part or as a
``password=`` query parameter), so ``DatabaseSettings.safe_url`` is what gets printed or
logged and ``DatabaseSettings.redact(text)`` scrubs the password out of any message (a
driver's error text included) before it is shown. The URL is parsed when the config is
loaded, so a malformed one is a config error that does not echo it.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from mailwarden.core.durations import Duration

_URL = re.compile(r"^(sqlite|postgresql)(\+[a-z0-9_]+)?://", re.IGNORECASE)
# The user part's password: from the ":" after the user name to the "@" (SQLAlchemy's own
# reading; the validator refuses a second "@" before the host, which would be ambiguous).
_USERINFO = re.compile(r"(://[^:/@?]*:)[^@]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)
HIDDEN = "***"
MIN_CALL_TIMEOUT = 0.01  # seconds; a deadline is required (no "0 = off")
MAX_CALL_TIMEOUT = 600.0
MIN_OPEN_TIMEOUT = 0.1  # seconds; a deadline is required (no "0 = off")
MAX_OPEN_TIMEOUT = 600.0
_DEADLINES = {
    "call_timeout": (MIN_CALL_TIMEOUT, MAX_CALL_TIMEOUT),
    "open_timeout": (MIN_OPEN_TIMEOUT, MAX_OPEN_TIMEOUT),
}
MIN_STATEMENT_TIMEOUT = 0.001  # PostgreSQL counts whole milliseconds
MAX_STATEMENT_TIMEOUT = 86400.0


def redact_url(url: str) -> str:
    """``url`` with the password (user part and ``password=`` parameter) as ``***``."""
    text = _USERINFO.sub(rf"\1{HIDDEN}@", url, count=1)
    return _QUERY_PASSWORD.sub(rf"\1{HIDDEN}", text)


def _passwords(url: str) -> list[str]:
    """Every spelling of the URL's password(s) that could show up in a message."""
    found: list[str] = []
    m = _USERINFO.search(url)
    if m:  # as written (percent-encoded, perhaps)
        found.append(m.group(0)[len(m.group(1)) : -1])
    found += [q.group(0)[len(q.group(1)) :] for q in _QUERY_PASSWORD.finditer(url)]
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        pass
    else:  # as SQLAlchemy hands it to the driver
        if parsed.password:
            found.append(str(parsed.password))
        given = parsed.query.get("password")
        found += [given] if isinstance(given, str) else list(given or ())
    out: list[str] = []
    for p in found:
        for form in (p, unquote(p)):
            if form and form not in out:
                out.append(form)
    return sorted(out, key=len, reverse=True)  # longest first: no partial leftovers


class DatabaseSettings(BaseModel):
    """[database]: where registered senders, users and blocks live."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # SQLAlchemy URL; "" = sqlite:///STATE_DIR/mailwarden.db (WAL mode).
    url: str = ""
    # How long a writer waits for a lock (SQLite busy_timeout, PostgreSQL lock_timeout).
    busy_timeout: Duration = 5.0
    pool_size: int = Field(default=5, ge=1, le=100)  # PostgreSQL connections per process
    # How long `mailwarden serve` waits for a PostgreSQL server's first answer before it
    # listens anyway, degraded (0: never wait; config errors then show up as events).
    start_wait: Duration = Field(default=1.0, le=60.0)
    # How long the gateway waits for one database call before it answers as if the database
    # were down (4xx, caches kept); on PostgreSQL the call's connection is interrupted.
    call_timeout: Duration = 10.0
    # How long opening a PostgreSQL store may take in all (connecting, creating and checking
    # the schema) before it counts as a server that cannot be reached (retried later).
    open_timeout: Duration = 30.0
    # PostgreSQL statement_timeout of every session: the server cancels a statement that
    # runs longer (whole milliseconds; 0: off). The URL's own options= win.
    statement_timeout: Duration = 30.0

    @field_validator("call_timeout", "open_timeout")
    @classmethod
    def _deadline(cls, v: float, info: ValidationInfo) -> float:
        low, high = _DEADLINES[info.field_name or ""]
        if not low <= v <= high:
            raise ValueError(
                f"{info.field_name} must be between {low:g}s and {high:g}s "
                "(the gateway never waits for the database without a deadline)"
            )
        return v

    @field_validator("statement_timeout")
    @classmethod
    def _statement_timeout(cls, v: float) -> float:
        if v and not MIN_STATEMENT_TIMEOUT <= v <= MAX_STATEMENT_TIMEOUT:
            raise ValueError(
                "statement_timeout must be 0 (off) or between "
                f"{MIN_STATEMENT_TIMEOUT:g}s (1 ms) and {MAX_STATEMENT_TIMEOUT:g}s (1 day)"
            )
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v:
            return v
        if not _URL.match(v):
            raise ValueError(
                "database url must start with sqlite:// or postgresql+DRIVER:// "
                "(e.g. postgresql+psycopg://user:pass@host/db)"
            )
        netloc = v.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
        try:
            make_url(v)
            if netloc.count("@") > 1:
                raise ValueError("two @ before the host")
        except (ArgumentError, ValueError):
            # The message must not echo the URL: it may hold a password.
            raise ValueError(
                "database url is malformed (expected postgresql+psycopg://USER:PASSWORD@"
                "HOST[:PORT]/DB or postgresql+psycopg://USER@/DB?host=/SOCKET/DIR; "
                "percent-encode '@', ':' and '/' in the password)"
            ) from None
        return v

    @property
    def is_server(self) -> bool:
        """A database server (PostgreSQL) rather than the embedded SQLite file."""
        return bool(self.url) and not self.url.lower().startswith("sqlite")

    @property
    def safe_url(self) -> str:
        """The URL with any password replaced by ``***``."""
        return redact_url(self.url)

    def redact(self, text: str) -> str:
        """``text`` (an error message, say) with the URL's password replaced by ``***``."""
        for secret in _passwords(self.url):
            text = text.replace(secret, HIDDEN)
        return text

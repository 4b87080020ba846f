"""Opening the data store: engine, schema creation, WAL mode, a thread for blocking calls.

``open_store(cfg)`` builds the engine from ``[database] url`` (empty: SQLite at
``state_dir/mailwarden.db`` in WAL mode), creates the tables if needed, records the schema
version and returns a ``Store``. ``Store.call(fn, *args)`` runs a blocking function on the
store's own small thread pool so the event loop never waits on the database; CLI commands
call the same functions directly.

Public names: ``Store``, ``open_store``, ``SCHEMA_VERSION``.
Security: the SQLite file is created mode 0600; the URL's password is never logged
(``DatabaseSettings.safe_url``). All SQL is built by SQLAlchemy with bound parameters.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, select, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from mailwarden.core.sqlite import enable_wal
from mailwarden.errors import StoreError
from mailwarden.store.schema import (
    BLOCKS_SERIAL,
    SCHEMA_VERSION,
    SENDERS_SERIAL,
    USERS_SERIAL,
    meta,
    metadata,
)
from mailwarden.store.settings import DatabaseSettings

if TYPE_CHECKING:
    from mailwarden.config import Config

T = TypeVar("T")
DB_THREADS = 2  # threads per process for database calls (SQLite has one writer anyway)
DB_FILE = "mailwarden.db"

__all__ = ["SCHEMA_VERSION", "Store", "open_store"]


def _sqlite_pragmas(busy_ms: int) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        enable_wal(dbapi_conn, busy_ms)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; fine for WAL
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return on_connect


class Store:
    """An open database: the engine plus a private thread pool for blocking calls."""

    def __init__(self, engine: Engine, settings: DatabaseSettings, label: str) -> None:
        self.engine = engine
        self.settings = settings
        self.label = label  # printable location (no password)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` (blocking database work) off the event loop."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="mw-db")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, partial(fn, *args, **kwargs))

    def serial(self, key: str) -> int:
        """The change serial ``key`` (0 if never bumped)."""
        with self.engine.connect() as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()
        return int(value) if value is not None else 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.engine.dispose()


def bump_serial(conn: Connection, key: str) -> None:
    """Increment change serial ``key`` inside the caller's transaction."""
    row = conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()
    if row is None:
        conn.execute(meta.insert().values(key=key, value="1"))
    else:
        conn.execute(update(meta).where(meta.c.key == key).values(value=str(int(row) + 1)))


def database_url(settings: DatabaseSettings, state_dir: Path) -> str:
    if settings.url:
        return settings.url
    return f"sqlite:///{(state_dir / DB_FILE).resolve()}"


def _create_sqlite_file(url: str) -> None:
    path = url.removeprefix("sqlite:///")
    if not path or path == ":memory:" or os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)


def make_engine(settings: DatabaseSettings, state_dir: Path) -> Engine:
    url = database_url(settings, state_dir)
    if url.startswith("sqlite"):
        _create_sqlite_file(url)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas(int(settings.busy_timeout * 1000)))
        return engine
    lock_ms = int(settings.busy_timeout * 1000)
    return create_engine(
        url,
        pool_size=settings.pool_size,
        pool_pre_ping=True,
        connect_args={"options": f"-c lock_timeout={lock_ms}"},
    )


def _init_schema(engine: Engine) -> None:
    metadata.create_all(engine, checkfirst=True)
    with engine.begin() as conn:
        current = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
        if current is None:
            conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            for key in (SENDERS_SERIAL, BLOCKS_SERIAL, USERS_SERIAL):
                conn.execute(meta.insert().values(key=key, value="0"))
        elif int(current) > SCHEMA_VERSION:
            raise StoreError(
                f"the database schema is version {current}, newer than this mailwarden "
                f"({SCHEMA_VERSION}): upgrade mailwarden"
            )


def open_store(cfg: Config) -> Store:
    """Open (and create if needed) the configured database; raise ``StoreError``."""
    settings: DatabaseSettings = cfg.database
    engine = make_engine(settings, cfg.state_path)
    label = settings.safe_url or f"sqlite:///{cfg.state_path / DB_FILE}"
    for attempt in range(3):  # several processes may create the schema at once
        try:
            _init_schema(engine)
            break
        except (OperationalError, IntegrityError) as exc:
            if attempt == 2:
                engine.dispose()
                raise StoreError(f"cannot initialise the database {label}: {exc.orig}") from exc
        except SQLAlchemyError as exc:
            engine.dispose()
            raise StoreError(f"cannot open the database {label}: {exc}") from exc
    return Store(engine, settings, label)

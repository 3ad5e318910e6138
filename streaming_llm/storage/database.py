"""The database handle: an async engine in WAL mode with a busy timeout, migrated by Alembic.

The chat path reads through :meth:`Database.read` and writes through :meth:`Database.write`: a
function run on a plain (synchronous) SQLAlchemy connection in a thread — reads on a small pool,
writes on one writer thread, one transaction per call. Through the async engine every statement
is several round trips to aiosqlite's thread (cursor, execute, fetch, close, commit, reset),
each waiting for a turn of a busy event loop, and SQLite's single writer turns those waits into a
queue; in a thread a whole unit of work is one hand-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from ..errors import StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
READERS = 2  # threads for Database.read

ROOT = Path(__file__).resolve().parents[2]


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    ini = ROOT / "alembic.ini"
    cfg = Config(str(ini)) if ini.exists() else Config()
    # Works from an installed package too: the migrations live next to the package source tree.
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade_to_head(url: str) -> None:
    """Bring the database to the latest migration (blocking; run it in a thread from async code)."""
    from alembic import command

    _ensure_sqlite_dir(url)
    command.upgrade(alembic_config(url), "head")


def _ensure_sqlite_dir(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    database = parsed.database
    if parsed.query.get("uri") == "true":  # file:/path/db?mode=ro&uri=true
        if database.startswith("file:"):
            database = database[len("file:"):]
        if parsed.query.get("mode") == "ro":
            return  # read-only: nothing will be created
    Path(database).parent.mkdir(parents=True, exist_ok=True)


def storage_error(exc: OperationalError) -> StorageUnavailable:
    """A client-facing error for a database failure: what SQLite said, without the SQL."""
    orig = getattr(exc, "orig", None)
    detail = str(orig) if orig is not None else exc.__class__.__name__
    log.error("database failure: %s", detail)
    return StorageUnavailable(f"storage unavailable: {detail}")


class Database:
    def __init__(self, url: str, busy_timeout_ms: int = 5000) -> None:
        self.url = url
        self.engine: AsyncEngine = create_async_engine(url)
        self.write_engine: Engine | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None
        if self.engine.dialect.name == "sqlite":
            _configure_sqlite(self.engine.sync_engine, busy_timeout_ms)
            sync_url = make_url(url).set(drivername="sqlite+pysqlite")
            self.write_engine = create_engine(sync_url, pool_size=1 + READERS, max_overflow=0)
            _configure_sqlite(self.write_engine, busy_timeout_ms)
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
            self._readers = ThreadPoolExecutor(max_workers=READERS,
                                               thread_name_prefix="sqlite-reader")
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = asyncio.Lock()

    async def migrate(self) -> None:
        try:
            await asyncio.to_thread(upgrade_to_head, self.url)
        except OperationalError as exc:  # unreadable, read-only before migrating, disk full
            shown = make_url(self.url).render_as_string(hide_password=True)
            raise StorageUnavailable(
                f"cannot bring the database {shown} to the latest migration: {exc.orig}") from None

    def session(self) -> AsyncSession:
        return self.sessions()

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[AsyncSession]:
        """A session for a write transaction, one at a time across the app.

        SQLite has one writer. Concurrent write transactions would meet in SQLite's busy
        handler, which sleeps in steps of up to 100 ms (and a reader upgrading to a writer after
        another commit fails at once with SQLITE_BUSY); queueing them here costs microseconds.
        Reads need no lock (WAL: readers never wait for the writer).
        """
        async with self._write_lock, self.sessions() as session:
            yield session

    async def write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(connection)`` in one write transaction (committed when it returns, rolled
        back when it raises) on the writer thread. ``fn`` runs off the event loop: Core
        statements only, no awaiting. Writes happen in call order."""
        if self._writer is None:  # not SQLite: the same transaction through the async engine
            async with self.writing() as session:
                result = await session.run_sync(lambda sync: fn(sync.connection()))
                await session.commit()
                return result
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, self._transaction, fn)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(connection)`` (reads only) on a reader thread; in WAL mode readers never wait
        for the writer, nor it for them."""
        if self._readers is None:
            async with self.session() as session:
                return await session.run_sync(lambda sync: fn(sync.connection()))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._transaction, fn)

    def _transaction(self, fn: Callable[[Connection], T]) -> T:
        assert self.write_engine is not None
        with self.write_engine.begin() as connection:
            return fn(connection)

    async def close(self) -> None:
        for pool in (self._writer, self._readers):
            if pool is not None:
                await asyncio.to_thread(pool.shutdown)
        if self.write_engine is not None:
            self.write_engine.dispose()
        await self.engine.dispose()


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

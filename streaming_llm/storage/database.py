"""The database handle: one way in for every read and write, and the migrations.

Every unit of work is a plain function over a synchronous SQLAlchemy :class:`~sqlalchemy.orm.Session`
(the statements of :mod:`.queries`), run by :meth:`Database.read` or :meth:`Database.write` in one
transaction: committed when the function returns, rolled back when it raises. REST and chat use
the same two entry points, so there is one writer queue.

SQLite (the default): pysqlite connections in WAL mode with a busy timeout. Writes run on one
writer thread, in call order, so two write transactions never meet in SQLite's busy handler (it
sleeps in steps of up to 100 ms, and a reader upgrading to a writer after another commit fails at
once with SQLITE_BUSY). Reads run on a small pool of reader threads: in WAL mode readers never wait
for the writer, nor it for them. A unit of work on a thread is one hand-off from the event loop;
through aiosqlite every statement would be several, each waiting for a turn of a busy loop.

PostgreSQL (``postgresql+asyncpg://``): the same functions on the async engine through
``AsyncSession.run_sync`` (SQLAlchemy's greenlet bridge over asyncpg, no thread). PostgreSQL has
row locks, so writes need no queue; :func:`.queries.append_turn` says why appends stay ordered.

Database failures leave here as domain errors: :class:`StorageUnavailable` (read-only, disk full,
server gone) and :class:`StorageConflict` (a constraint refused the write).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from ..errors import ServiceError, StorageConflict, StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
READERS = 2  # threads for Database.read on SQLite


@contextlib.contextmanager
def alembic_config(url: str) -> Iterator[Any]:
    """Alembic's configuration for ``url``: the ``alembic.ini`` and ``migrations/`` shipped inside
    this package (``importlib.resources``, so an installed wheel migrates as a checkout does)."""
    from alembic.config import Config

    with as_file(files("streaming_llm.storage")) as storage:
        cfg = Config(str(storage / "alembic.ini"))
        cfg.set_main_option("script_location", str(storage / "migrations"))
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
        cfg.attributes["configure_logger"] = False
        yield cfg


def upgrade_to_head(url: str) -> None:
    """Bring the database to the latest migration (blocking; run it in a thread from async code)."""
    from alembic import command

    ensure_sqlite_dir(url)
    with alembic_config(url) as cfg:
        command.upgrade(cfg, "head")


def ensure_sqlite_dir(url: str) -> None:
    """Create the directory of a SQLite file (SQLite creates the file, not its directory)."""
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


def storage_error(exc: BaseException) -> ServiceError:
    """The client-facing error for a database failure: what the database said, without the SQL."""
    orig = getattr(exc, "orig", None)
    detail = str(orig if orig is not None else exc) or exc.__class__.__name__
    if isinstance(exc, IntegrityError):
        log.warning("write refused by a constraint: %s", detail)
        return StorageConflict(f"the write conflicts with stored data: {detail}")
    log.error("database failure: %s", detail)
    return StorageUnavailable(f"storage unavailable: {detail}")


class Database:
    def __init__(self, url: str, busy_timeout_ms: int = 5000) -> None:
        self.url = url
        self.dialect = make_url(url).get_backend_name()
        self.engine: AsyncEngine | None = None
        self.sqlite: Engine | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None
        if self.dialect != "sqlite":
            # No pool_pre_ping (a round trip per transaction): a connection the server dropped
            # fails its request with StorageUnavailable, and the pool then reconnects.
            self.engine = create_async_engine(url)
        else:
            sync_url = make_url(url).set(drivername="sqlite+pysqlite")
            self.sqlite = create_engine(sync_url, pool_size=1 + READERS, max_overflow=0)
            _configure_sqlite(self.sqlite, busy_timeout_ms)
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
            self._readers = ThreadPoolExecutor(max_workers=READERS,
                                               thread_name_prefix="sqlite-reader")
        self._sessions = sessionmaker(self.sqlite, expire_on_commit=False)
        self._async_sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def migrate(self) -> None:
        try:
            await asyncio.to_thread(upgrade_to_head, self.url)
        except (DBAPIError, OSError) as exc:  # unreadable, read-only, disk full, server down
            shown = make_url(self.url).render_as_string(hide_password=True)
            detail = getattr(exc, "orig", None) or exc
            raise StorageUnavailable(
                f"cannot bring the database {shown} to the latest migration: {detail}") from None

    async def write(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` in one write transaction and return what it returns.

        On SQLite ``fn`` runs on the writer thread, after every write asked for before it. ``fn``
        runs off the event loop and must not await; it may block briefly (the agents' files).
        """
        return await self._run(fn, self._writer)

    async def read(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` (reads only) in one transaction; on SQLite on a reader thread."""
        return await self._run(fn, self._readers)

    async def _run(self, fn: Callable[[Session], T], pool: ThreadPoolExecutor | None) -> T:
        try:
            if pool is not None:
                return await asyncio.get_running_loop().run_in_executor(
                    pool, self._transaction, fn)
            async with self._async_sessions() as session:
                result = await session.run_sync(fn)
                await session.commit()
                return result
        except DBAPIError as exc:
            raise storage_error(exc) from None
        except OSError as exc:  # asyncpg: the server refused or dropped the connection
            if pool is not None:
                raise
            raise storage_error(exc) from None

    def _transaction(self, fn: Callable[[Session], T]) -> T:
        with self._sessions() as session:
            result = fn(session)
            session.commit()
            return result

    async def close(self) -> None:
        for pool in (self._writer, self._readers):
            if pool is not None:
                await asyncio.to_thread(pool.shutdown)
        if self.sqlite is not None:
            self.sqlite.dispose()
        if self.engine is not None:
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

"""Reading what a test's service stored, on SQLite or PostgreSQL alike (the storage tests run on
both): plain SQL through SQLAlchemy, outside the service."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from streaming_llm.settings import Settings

T = TypeVar("T")


def fetch(url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    """The rows of ``sql`` (``:name`` parameters) on the database at ``url``, as dicts."""

    async def run() -> list[dict[str, Any]]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return [dict(row._mapping) for row in await conn.execute(text(sql), params)]
        finally:
            await engine.dispose()

    return asyncio.run(run())


def stored_turns(settings: Settings, conversation_id: str) -> list[tuple[Any, ...]]:
    """``(seq, role, content, finish_reason)`` of the conversation's turns, in order."""
    rows = fetch(settings.resolved_database_url,
                 "SELECT seq, role, content, finish_reason FROM turns "
                 "WHERE conversation_id = :conversation ORDER BY seq", conversation=conversation_id)
    return [tuple(row.values()) for row in rows]


def columns(url: str) -> dict[str, list[str]]:
    """Every table of the database at ``url`` and its column names, in order."""

    def read(conn: Any) -> dict[str, list[str]]:
        inspector = inspect(conn)
        return {table: [c["name"] for c in inspector.get_columns(table)]
                for table in inspector.get_table_names()}

    return run_sync(url, read)


def run_sync(url: str, fn: Callable[[Connection], T]) -> T:
    """``fn(connection)`` on a synchronous connection to the database at ``url``."""

    async def run() -> T:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(fn)
        finally:
            await engine.dispose()

    return asyncio.run(run())

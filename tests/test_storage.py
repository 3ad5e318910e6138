"""Storage on SQLite and a real PostgreSQL server: Alembic owns the schema (migrations run up and
down), a refused write is a domain error that stores nothing, and concurrent appends to one
conversation number their turns without a gap or a duplicate — in-process, across sockets, and
across two service instances sharing one PostgreSQL database."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session
from websockets.sync.client import connect

from streaming_llm.errors import StorageConflict, StorageUnavailable
from streaming_llm.storage import queries
from streaming_llm.storage.database import (
    Database,
    alembic_config,
    ensure_sqlite_dir,
    upgrade_to_head,
)
from streaming_llm.storage.models import AgentRow, Base, utcnow
from streaming_llm.testing.postgres import PostgresServer

from .conftest import BOTH_DATABASES, database_env
from .database import columns, fetch, run_sync
from .server import ServerProcess, http, start_server, wait_healthy

ECHO = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "1"}


def _url(database_url: str, tmp_path: Path) -> str:
    return database_url or f"sqlite+aiosqlite:///{tmp_path / 'nested' / 'db.sqlite'}"


@BOTH_DATABASES
def test_upgrade_creates_schema_and_downgrade_removes_it(tmp_path: Path, database_url: str) -> None:
    url = _url(database_url, tmp_path)
    upgrade_to_head(url)
    tables = columns(url)
    assert tables["turns"][:6] == ["id", "conversation_id", "seq", "role", "content",
                                   "finish_reason"]
    assert {"prompt_tokens", "completion_tokens", "usage", "created_at", "tool_calls",
            "tool_call_id"} <= set(tables["turns"])
    assert fetch(url, "SELECT version_num FROM alembic_version") == [{"version_num": "0004"}]
    upgrade_to_head(url)  # idempotent
    with alembic_config(url) as cfg:
        command.downgrade(cfg, "base")
    assert set(columns(url)) == {"alembic_version"}


@BOTH_DATABASES
def test_models_match_migrations(tmp_path: Path, database_url: str) -> None:
    """Autogenerate finds nothing to do: the models and the migrations agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    url = _url(database_url, tmp_path)
    upgrade_to_head(url)
    diff = run_sync(url, lambda conn: compare_metadata(MigrationContext.configure(conn),
                                                       Base.metadata))
    assert diff == []


@BOTH_DATABASES
async def test_a_write_a_constraint_refuses_is_a_conflict_and_stores_nothing(
        tmp_path: Path, database_url: str) -> None:
    db = Database(_url(database_url, tmp_path))
    await db.migrate()
    try:
        def twice(session: Session) -> None:
            row = {"id": "a", "name": "A", "system_prompt": "", "markdown_context": "",
                   "created_at": utcnow(), "updated_at": utcnow()}
            session.execute(insert(AgentRow).values(row))
            session.execute(insert(AgentRow).values(row))

        with pytest.raises(StorageConflict) as refused:
            await db.write(twice)
        assert refused.value.code == "storage_conflict" and refused.value.status == 409
        assert await db.read(queries.list_agents) == []
    finally:
        await db.close()


@BOTH_DATABASES
async def test_concurrent_appends_to_one_conversation_take_consecutive_seqs(
        tmp_path: Path, database_url: str) -> None:
    """Each append is the service's own: lock the conversation row, then ``max(seq) + 1``. On
    PostgreSQL the transactions really overlap (one connection each); without the lock they
    would read the same ``max(seq)``."""
    db = Database(_url(database_url, tmp_path))
    await db.migrate()
    try:
        conversation = await db.write(lambda s: queries.create_conversation(s, "a", "t"))

        def append(n: int) -> Callable[[Session], str]:
            def store(session: Session) -> str:
                assert queries.touch_conversation(session, conversation)
                return queries.append_turn(session, conversation, role="user", content=f"m{n}")
            return store

        ids = await asyncio.gather(*(db.write(append(n)) for n in range(40)))
        turns = await db.read(lambda s: queries.list_turns(s, conversation))
        assert [t.seq for t in turns] == list(range(40))
        assert sorted(t.id for t in turns) == sorted(ids)
        assert sorted(t.content for t in turns) == sorted(f"m{n}" for n in range(40))
    finally:
        await db.close()


# --- real servers -------------------------------------------------------------------------------
def chat_turn(server: ServerProcess, message: str, conversation_id: str | None) -> dict[str, Any]:
    """One turn on a new socket; returns ``{"start", "text", "done"}``."""
    frame: dict[str, Any] = {"type": "chat", "agent_id": "echoer", "message": message}
    if conversation_id:
        frame["conversation_id"] = conversation_id
    # The id in the URL too, as a balancer routing by conversation needs (deploy/nginx); ignored
    # by the service.
    url = server.ws_url + (f"?conversation_id={conversation_id}" if conversation_id else "")
    with connect(url, open_timeout=10) as ws:
        ws.send(json.dumps(frame))
        start = json.loads(ws.recv(timeout=30))
        assert start["type"] == "start", start
        text = ""
        while (event := json.loads(ws.recv(timeout=30)))["type"] == "token":
            text += event["token"]
    assert event["type"] == "done", event
    return {"start": start, "text": text, "done": event}


def check_stored(url: str, conversation: str, turns: list[dict[str, Any]]) -> None:
    """Every acknowledged turn stored once, with what was sent or streamed; seq 0..n-1."""
    rows = fetch(url, "SELECT id, seq, role, content FROM turns WHERE conversation_id = :c "
                      "ORDER BY seq", c=conversation)
    assert [r["seq"] for r in rows] == list(range(2 * len(turns)))
    stored = {r["id"]: (r["role"], r["content"]) for r in rows}
    for turn in turns:
        assert stored[turn["start"]["turn_id"]] == ("user", turn["message"])
        assert stored[turn["done"]["turn_id"]] == ("assistant", turn["text"])


@pytest.mark.e2e
@BOTH_DATABASES
def test_many_sockets_append_to_one_conversation(tmp_path: Path, database_url: str) -> None:
    sockets, turns_each = 6, 4
    with start_server(tmp_path, ECHO | database_env(database_url)) as server:
        assert http("PUT", server.base_url + "/agents/echoer", {"name": "Echoer"})[0] == 201
        first = chat_turn(server, "first", None) | {"message": "first"}
        conversation = first["start"]["conversation_id"]

        def socket_turns(n: int) -> list[dict[str, Any]]:
            return [chat_turn(server, m, conversation) | {"message": m}
                    for m in (f"socket {n} turn {t}" for t in range(turns_each))]

        with ThreadPoolExecutor(sockets) as pool:  # .result() re-raises a socket's failure
            done = [first, *itertools.chain.from_iterable(
                future.result(timeout=120)
                for future in [pool.submit(socket_turns, n) for n in range(sockets)])]
        assert len(done) == 1 + sockets * turns_each
        url = database_url or f"sqlite+aiosqlite:///{server.db_path}"
        check_stored(url, conversation, done)


@pytest.mark.e2e
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_instances_on_one_postgresql_serve_one_conversation(
        tmp_path: Path, database_url: str) -> None:
    """Two instances of the service on one PostgreSQL database, started at once (the migration
    is taken by one of them, the other waits), serve one conversation alternately: nothing lost,
    nothing doubled, and both read the same history. (Both at once is not promised: one turn at a
    time per conversation holds within one instance; docs/deploy.md, "Many instances".)"""
    env = ECHO | database_env(database_url)
    with start_server(tmp_path / "a", env, wait=False) as a, \
            start_server(tmp_path / "b", env, wait=False) as b:
        for server in (a, b):
            wait_healthy(server.base_url, server.proc, 120, server.log_path)
        assert http("PUT", a.base_url + "/agents/echoer", {"name": "Echoer"})[0] == 201
        done: list[dict[str, Any]] = []
        conversation = None
        for n in range(6):
            server = (a, b)[n % 2]
            message = f"turn {n} on {'ab'[n % 2]}"
            done.append(chat_turn(server, message, conversation) | {"message": message})
            conversation = done[-1]["start"]["conversation_id"]
        assert len(done) == 6
        check_stored(database_url, conversation, done)  # type: ignore[arg-type]
        views = [http("GET", f"{s.base_url}/conversations/{conversation}")[1] for s in (a, b)]
        assert views[0] == views[1] and len(views[0]["turns"]) == 12
    assert "Traceback" not in a.log() + b.log()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_postgresql_restart_fails_one_request_clearly_then_the_pool_reconnects(
        database_url: str, postgres: PostgresServer) -> None:
    db = Database(database_url)
    await db.migrate()
    try:
        await db.write(lambda s: queries.upsert_agent(s, "a", name="A", system_prompt="",
                                                      markdown_context=""))
        await asyncio.to_thread(postgres.restart)  # the pooled connection is now dead
        try:
            agents = await db.read(queries.list_agents)
        except StorageUnavailable as exc:  # the request that met the dropped connection
            assert exc.message.startswith("storage unavailable:")
            agents = await db.read(queries.list_agents)
        assert [a.id for a in agents] == ["a"]
    finally:
        await db.close()


@BOTH_DATABASES
async def test_search_folds_case_in_any_script(tmp_path: Path, database_url: str) -> None:
    """``lower()`` folds ASCII only on SQLite; the stored case-folded copies fold every script,
    the same on both databases."""
    db = Database(_url(database_url, tmp_path))
    await db.migrate()
    try:
        def store(session: Session) -> tuple[str, str, str]:
            ebony = queries.create_conversation(session, "a", "Ébène et ivoire")
            myth = queries.create_conversation(session, "a", "")
            queries.touch_conversation(session, myth)
            queries.append_turn(session, myth, role="user", request_id=None,
                                content="ΣΊΣΥΦΟΣ rolls it up the STRASSE, 100% of the_way")
            decomposed = queries.create_conversation(session, "a", "")
            queries.rename_conversation(session, decomposed, "E\u0301BE\u0300NE")  # É, È as two
            return ebony, myth, decomposed

        ebony, myth, decomposed = await db.write(store)

        async def found(search: str) -> list[str]:
            rows = await db.read(lambda s: queries.list_conversations(s, search=search))
            return sorted(row.id for row in rows)

        assert await found("ébène") == sorted([ebony, decomposed])
        assert await found("ÉBÈNE") == sorted([ebony, decomposed])
        assert await found("e\u0301be\u0300ne") == sorted([ebony, decomposed])
        assert await found("σίσυφος") == [myth]  # final sigma folds like Σ
        assert await found("Straße") == [myth]  # ß folds to ss
        assert await found("100%") == [myth] and await found("e_w") == [myth]
        assert await found("%") == [myth] and await found("_") == [myth]  # wildcards are text
        assert await found("ebene") == []  # accents are kept
    finally:
        await db.close()


@BOTH_DATABASES
def test_upgrade_folds_the_rows_already_stored(tmp_path: Path, database_url: str) -> None:
    url = _url(database_url, tmp_path)
    ensure_sqlite_dir(url)
    with alembic_config(url) as cfg:
        command.upgrade(cfg, "0001")
    turns = [{"id": f"turn_{i:04d}", "seq": i, "content": f"ΣΊΣΥΦΟΣ {i}", "at": utcnow()}
             for i in range(501)]  # more than one backfill batch

    async def insert_rows() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text(
                    "INSERT INTO conversations (id, agent_id, title, created_at, updated_at) "
                    "VALUES ('conv_old', 'a', 'Ébène', :at, :at)"), {"at": utcnow()})
                await conn.execute(text(
                    "INSERT INTO turns (id, conversation_id, seq, role, content, created_at) "
                    "VALUES (:id, 'conv_old', :seq, 'user', :content, :at)"), turns)
        finally:
            await engine.dispose()

    asyncio.run(insert_rows())
    upgrade_to_head(url)
    assert fetch(url, "SELECT title_casefold FROM conversations") == [{"title_casefold": "ébène"}]
    folded = fetch(url, "SELECT content_casefold FROM turns ORDER BY seq")
    assert [row["content_casefold"] for row in folded] == [f"σίσυφοσ {i}" for i in range(501)]

"""Faults: a read-only database, a full disk, an unwritable agents directory, a model that fails
to load. Each gets a clear error; the service keeps serving what it still can."""

from __future__ import annotations

import json
import os
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from starlette.testclient import TestClient
from websockets.sync.client import connect

from streaming_llm.app import create_app
from streaming_llm.settings import Settings

from .conftest import put_agent
from .server import http, start_server
from .test_chat import recv_turn


# --- read-only database -----------------------------------------------------------------------
@pytest.mark.e2e
def test_read_only_database_serves_reads_and_refuses_writes_clearly(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings()  # data dir tmp_path/data: the one start_server uses
    with TestClient(create_app(settings)) as client:
        put_agent(client, "helper")
        with client.websocket_connect("/ws/chat") as ws:
            ws.send_json({"type": "chat", "agent_id": "helper", "message": "before"})
            start, _, _ = recv_turn(ws)
    conversation = start["conversation_id"]
    db = settings.data_dir / "streaming_llm.db"
    agents_dir = settings.resolved_agents_dir
    files_before = {p.name: p.read_bytes() for p in agents_dir.iterdir()}

    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "0",
           "STREAMING_LLM_DATABASE_URL": f"sqlite+aiosqlite:///file:{db}?mode=ro&uri=true"}
    with start_server(tmp_path, env) as server:
        assert http("GET", server.base_url + "/health")[0] == 200
        status, agents = http("GET", server.base_url + "/agents")
        assert status == 200 and [a["id"] for a in agents] == ["helper"]
        status, conv = http("GET", f"{server.base_url}/conversations/{conversation}")
        assert status == 200 and len(conv["turns"]) == 2

        for method, path, body in [("PUT", "/agents/new", {"name": "New"}),
                                   ("PUT", "/agents/helper", {"name": "Changed"}),
                                   ("DELETE", "/agents/helper", None),
                                   ("DELETE", f"/conversations/{conversation}", None)]:
            status, error = http(method, server.base_url + path, body)
            assert status == 503, (method, path, error)
            assert error["error"]["code"] == "storage_unavailable"
            assert "readonly database" in error["error"]["message"]

        with connect(server.ws_url) as ws:
            for extra in ({}, {"conversation_id": conversation}):
                ws.send(json.dumps({"type": "chat", "agent_id": "helper", "message": "x", **extra}))
                error = json.loads(ws.recv(timeout=10))
                assert (error["type"], error["code"]) == ("error", "storage_unavailable"), error
            ws.send(json.dumps({"type": "ping"}))
            assert json.loads(ws.recv(timeout=10))["type"] == "pong"
        assert server.proc.poll() is None
        log = server.log()
    assert "Traceback" not in log and "database failure: attempt to write a readonly" in log
    assert {p.name: p.read_bytes() for p in agents_dir.iterdir()} == files_before
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM turns").fetchone() == (2,)
        assert conn.execute("SELECT name FROM agents").fetchall() == [("Helper",)]


@pytest.mark.e2e
def test_unusable_database_at_start_up_exits_once_with_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "db.sqlite"
    env = {"STREAMING_LLM_ENGINE": "echo",
           "STREAMING_LLM_DATABASE_URL": f"sqlite+aiosqlite:///file:{missing}?mode=ro&uri=true"}
    with start_server(tmp_path, env, wait=False) as server:
        assert server.proc.wait(timeout=60) != 0
        log = server.log()
    assert "cannot bring the database" in log and "unable to open database file" in log
    assert "Application startup failed" in log
    assert not (Path.cwd() / "file:").exists() and not missing.parent.exists()


# --- disk full --------------------------------------------------------------------------------
@pytest.fixture
def disk(client: TestClient) -> Iterator[dict[str, bool]]:
    """``disk["full"] = True`` caps the database at its current size (SQLite's max_page_count):
    every write that needs a new page then fails with SQLITE_FULL, as on a full disk."""
    state = {"full": False}
    db = client.app_state["services"].db
    pools = [db.sqlite.pool]  # every read and write goes through these connections

    def on_checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA page_count")
        pages = cur.fetchone()[0]
        cur.execute(f"PRAGMA max_page_count = {pages if state['full'] else 1 << 30}")
        cur.close()

    for pool in pools:
        event.listen(pool, "checkout", on_checkout)
    yield state
    for pool in pools:
        event.remove(pool, "checkout", on_checkout)


def test_disk_full_gives_clear_errors_and_recovers(client: TestClient, settings: Settings,
                                                  disk: dict[str, bool]) -> None:
    put_agent(client, "helper")
    big = "x" * 150_000
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "first"})
        start, _, _ = recv_turn(ws)
        disk["full"] = True
        ws.send_json({"type": "chat", "agent_id": "helper", "message": big,
                      "conversation_id": start["conversation_id"]})
        error = ws.receive_json()
        assert (error["type"], error["code"]) == ("error", "storage_unavailable")
        assert "database or disk is full" in error["message"]
        resp = client.put("/agents/large", json={"name": "L", "markdown_context": big})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "storage_unavailable"
        assert not (settings.resolved_agents_dir / "large.md").exists()

        disk["full"] = False  # space freed: everything works again, on the same socket
        ws.send_json({"type": "chat", "agent_id": "helper", "message": big[:1000],
                      "conversation_id": start["conversation_id"]})
        _, _, done = recv_turn(ws)
        assert done["type"] == "done"
    assert client.put("/agents/large", json={"name": "L", "markdown_context": big}).status_code == 201
    turns = client.get(f"/conversations/{start['conversation_id']}").json()["turns"]
    assert [t["seq"] for t in turns] == [0, 1, 2, 3]


def test_failed_commit_puts_the_agent_file_back(client: TestClient, settings: Settings,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    put_agent(client, "kept", name="Old")
    path = settings.resolved_agents_dir / "kept.md"
    before = path.read_bytes()

    def full_disk_commit(self: Session) -> None:
        # What a full disk does when SQLite appends the transaction to the WAL at COMMIT; the
        # write that came before (the flush) succeeded, and so did the agent file's.
        raise OperationalError("COMMIT", {}, sqlite3.OperationalError("database or disk is full"))

    with monkeypatch.context() as patch:
        patch.setattr(Session, "commit", full_disk_commit)
        resp = client.put("/agents/kept", json={"name": "New"})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "storage_unavailable"
        resp = client.put("/agents/fresh", json={"name": "Fresh"})
        assert resp.status_code == 503
        assert client.delete("/agents/kept").status_code == 503  # the file went, then came back
    assert path.read_bytes() == before
    assert sorted(p.name for p in settings.resolved_agents_dir.iterdir()) == ["kept.md"]
    assert [(a["id"], a["name"]) for a in client.get("/agents").json()] == [("kept", "Old")]


def test_unwritable_agents_dir(make_settings: Callable[..., Settings], tmp_path: Path,
                               scripted: Any) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the agents directory should be")
    with TestClient(create_app(make_settings(agents_dir=blocker), engine=scripted)) as client:
        resp = client.put("/agents/a", json={"name": "A"})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "storage_unavailable"
        assert "agents directory cannot be written" in resp.json()["error"]["message"]
        assert client.get("/agents").json() == []


# --- a model that fails to load ---------------------------------------------------------------
@pytest.mark.e2e
def test_model_that_fails_to_load(tmp_path: Path) -> None:
    env = {"STREAMING_LLM_ENGINE": "local", "STREAMING_LLM_MODEL": str(tmp_path / "no-model"),
           "HF_HUB_OFFLINE": "1"}
    with start_server(tmp_path, env, wait=False) as server:
        deadline = time.monotonic() + 90
        while True:  # the engine loads in the background: /health says how that ended
            assert server.proc.poll() is None, server.log()
            assert time.monotonic() < deadline, server.log()
            try:
                status, health = http("GET", server.base_url + "/health")
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
                continue
            if health["status"] == "error":
                break
            time.sleep(0.2)
        assert status == 503 and health["ready"] is False
        assert health["detail"].startswith("engine 'local' failed to start: could not load model")
        assert "no-model" in health["detail"]
        # The rest of the service keeps working, and a chat is told why it cannot run.
        assert http("PUT", server.base_url + "/agents/helper", {"name": "Helper"})[0] == 201
        with connect(server.ws_url) as ws:
            ws.send(json.dumps({"type": "chat", "agent_id": "helper", "message": "hi"}))
            frames = [json.loads(ws.recv(timeout=10))]
            while frames[-1]["type"] not in ("done", "error"):
                frames.append(json.loads(ws.recv(timeout=10)))
            assert frames[-1]["code"] == "engine_unavailable" and "no-model" in frames[-1]["message"]
            ws.send(json.dumps({"type": "ping"}))
            assert json.loads(ws.recv(timeout=10))["type"] == "pong"
        assert server.proc.poll() is None
        log = server.log()
    assert "ERROR streaming_llm.app: engine 'local' failed to start" in log
    assert "Traceback" not in log


def test_disk_filling_mid_answer_keeps_user_and_assistant_turns_alternating(
        client: TestClient, scripted: Any, disk: dict[str, bool]) -> None:
    """The user turn is stored, the disk fills while the answer streams, the answer cannot be
    stored: the client is told, and the conversation's next turn first records the lost answer
    as an empty ``error`` turn, so no two user turns follow each other."""
    put_agent(client, "helper")
    scripted.pieces = ["y" * 50_000] * 3
    scripted.delay = 0.05
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "first"})
        start = ws.receive_json()
        assert start["type"] == "start"
        disk["full"] = True
        while (frame := ws.receive_json())["type"] == "token":
            pass
        assert (frame["type"], frame["code"]) == ("error", "storage_unavailable")
        assert frame["message"].startswith("the answer could not be stored")
        disk["full"] = False
        scripted.pieces = ["fine"]
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "again",
                      "conversation_id": start["conversation_id"]})
        _, _, done = recv_turn(ws)
        assert done["type"] == "done"
    turns = client.get(f"/conversations/{start['conversation_id']}").json()["turns"]
    assert [(t["role"], t["content"], t["finish_reason"]) for t in turns] == [
        ("user", "first", None), ("assistant", "", "error"),
        ("user", "again", None), ("assistant", "fine", "stop")]


# --- a hostile agents folder ------------------------------------------------------------------
def _agent_text(agent_id: str, name: str, context: str = "Notes.") -> str:
    return f'---\nid: {agent_id}\nname: "{name}"\nsystem_prompt: "S."\n---\n{context}'


@pytest.mark.e2e
def test_hostile_agents_folder_neither_hangs_nor_crashes_start_up(tmp_path: Path) -> None:
    agents = tmp_path / "data" / "agents"
    agents.mkdir(parents=True)
    (agents / "good.md").write_text(_agent_text("good", "Good"))
    os.mkfifo(agents / "fifo.md")  # opened blocking, start-up would wait for a writer forever
    (agents / "zero.md").symlink_to("/dev/zero")  # read to the end: until memory runs out
    outside = tmp_path / "secret.md"
    outside.write_text(_agent_text("outside", "Outside"))
    (agents / "outside.md").symlink_to(outside)  # a file outside the folder, served over REST
    (agents / "folder.md").mkdir()
    (agents / ".x.tmp").mkdir()  # looked like a leftover temp file: unlinking it crashed start-up
    (agents / ".notes.tmp").write_text("a person's notes")  # not one of our temp names
    (agents / ".good.abcd1234.tmp").write_text("half a write")  # one of ours: removed
    (agents / "long.md").write_text(_agent_text("long", "Long", "x" * 1_000_001))  # field limit
    with open(agents / "huge.md", "w") as fh:  # over the file size limit: never parsed
        fh.write(_agent_text("huge", "Huge", ""))
        fh.truncate(9 * 1024 * 1024)

    env = {"STREAMING_LLM_ENGINE": "echo"}
    started = time.monotonic()
    with start_server(tmp_path, env, timeout=60) as server:
        startup_s = time.monotonic() - started
        status, listed = http("GET", server.base_url + "/agents")
        assert status == 200 and [a["id"] for a in listed] == ["good"]
        assert http("GET", server.base_url + "/agents/outside")[0] == 404
        log = server.log()
    print(f"start-up with a hostile agents folder: {startup_s:.2f}s")  # docs/security.md figure
    reasons = {"fifo.md": "a FIFO", "zero.md": "a symbolic link", "outside.md": "a symbolic link",
               "folder.md": "a directory", "long.md": "markdown_context",
               "huge.md": "more than the 8388608 an agent file may have"}
    skipped = [line for line in log.splitlines() if "skipping agent file" in line]
    assert len(skipped) == len(reasons), skipped  # one warning per skipped file
    for name, reason in reasons.items():
        [line] = [line for line in skipped if f"/{name}:" in line]
        assert reason in line, line
    assert "Traceback" not in log
    assert sorted(p.name for p in agents.iterdir()) == sorted(
        [".notes.tmp", ".x.tmp", "folder.md", "fifo.md", "good.md", "huge.md", "long.md",
         "outside.md", "zero.md"])
    assert (agents / ".notes.tmp").read_text() == "a person's notes"


@pytest.mark.e2e
def test_agent_file_that_cannot_be_touched_leaves_the_row_alone(tmp_path: Path) -> None:
    env = {"STREAMING_LLM_ENGINE": "echo"}
    with start_server(tmp_path, env) as server:
        assert http("PUT", server.base_url + "/agents/helper", {"name": "Helper"})[0] == 201
        path = server.data_dir / "agents" / "helper.md"
        # Neither unlink nor rename can replace a non-empty directory, even for root.
        path.unlink()
        path.mkdir()
        (path / "keep").write_text("x")
        status, error = http("DELETE", server.base_url + "/agents/helper")
        assert (status, error["error"]["code"]) == (503, "storage_unavailable"), error
        status, error = http("PUT", server.base_url + "/agents/helper", {"name": "Changed"})
        assert (status, error["error"]["code"]) == (503, "storage_unavailable"), error
        status, agent = http("GET", server.base_url + "/agents/helper")
        assert status == 200 and agent["name"] == "Helper"
        log = server.log()
    assert "Traceback" not in log and "internal_error" not in log
    with start_server(tmp_path, env, data_dir=server.data_dir) as again:
        status, agent = http("GET", again.base_url + "/agents/helper")
        assert status == 200 and agent["name"] == "Helper"


@pytest.mark.e2e
def test_agent_name_is_stored_as_given_across_a_restart(tmp_path: Path) -> None:
    env = {"STREAMING_LLM_ENGINE": "echo"}
    name = "  Spaced name\t"
    with start_server(tmp_path, env) as server:
        status, agent = http("PUT", server.base_url + "/agents/spaced", {"name": name})
        assert status == 201 and agent["name"] == name
    with start_server(tmp_path, env, data_dir=server.data_dir) as again:
        status, agent = http("GET", again.base_url + "/agents/spaced")
        assert status == 200 and agent["name"] == name
        log = again.log()
    assert "imported agent spaced" not in log

"""Crash survival: ``kill -9`` the real server while it streams on several sockets and writes
agents, restart it on the same data, and check nothing acknowledged was lost."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from streaming_llm.app import create_app
from streaming_llm.chat.agent_files import AgentFiles, parse, render
from streaming_llm.settings import Settings

from .conftest import BOTH_DATABASES, database_env
from .database import fetch
from .server import ServerProcess, start_server

ENV = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "2"}
SOCKETS = 4


def put(server: ServerProcess, agent_id: str, body: dict[str, str]) -> int:
    req = urllib.request.Request(f"{server.base_url}/agents/{agent_id}", method="PUT",
                                 data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status


class Chatter(threading.Thread):
    """One socket running turns back to back; records what the server acknowledged."""

    def __init__(self, server: ServerProcess, n: int) -> None:
        super().__init__(daemon=True)
        self.server, self.n = server, n
        self.acked_user: dict[str, str] = {}  # user turn id (from start) -> message
        self.acked_answer: dict[str, str] = {}  # assistant turn id (from done) -> streamed text
        self.conversation: str | None = None
        self.streaming = threading.Event()  # set once a token of an unfinished turn arrived
        self.done_count = 0

    def run(self) -> None:
        try:
            with connect(self.server.ws_url) as ws:
                for turn in range(1000):
                    message = " ".join(f"s{self.n}t{turn}w{i}" for i in range(60))
                    frame: dict[str, Any] = {"type": "chat", "agent_id": "echoer", "message": message}
                    if self.conversation:
                        frame["conversation_id"] = self.conversation
                    ws.send(json.dumps(frame))
                    start = json.loads(ws.recv(timeout=10))
                    assert start["type"] == "start", start
                    self.conversation = start["conversation_id"]
                    self.acked_user[start["turn_id"]] = message
                    text = ""
                    while (event := json.loads(ws.recv(timeout=10)))["type"] == "token":
                        text += event["token"]
                        self.streaming.set()
                    assert event["type"] == "done", event
                    self.acked_answer[event["turn_id"]] = text
                    self.done_count += 1
        except (ConnectionClosed, ConnectionError, TimeoutError, EOFError):
            return  # the server was killed


class AgentWriter(threading.Thread):
    """Rewrites agents with large bodies; records the last acknowledged version of each."""

    def __init__(self, server: ServerProcess) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.acked: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        version = 0
        try:
            while not self.stop.is_set():
                agent_id = f"writer-{version % 3}"
                status = put(self.server, agent_id, {
                    "name": f"v{version}", "markdown_context": f"v{version}\n" + "x" * 200_000})
                assert status in (200, 201)
                self.acked[agent_id] = version
                version += 1
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return


@pytest.mark.e2e
@BOTH_DATABASES
def test_kill_9_mid_stream_loses_nothing_acknowledged(tmp_path: Path, database_url: str) -> None:
    env = ENV | database_env(database_url)
    with start_server(tmp_path, env) as server:
        assert put(server, "echoer", {"name": "Echoer"}) == 201
        chatters = [Chatter(server, n) for n in range(SOCKETS)]
        writer = AgentWriter(server)
        for t in [*chatters, writer]:
            t.start()
        deadline = time.monotonic() + 30
        while not (sum(c.done_count for c in chatters) >= 2 * SOCKETS
                   and all(c.streaming.is_set() for c in chatters) and len(writer.acked) == 3):
            assert time.monotonic() < deadline, "the load never got going"
            time.sleep(0.01)
        for c in chatters:
            c.streaming.clear()
        deadline = time.monotonic() + 30
        while not all(c.streaming.is_set() for c in chatters):  # every socket mid-answer
            assert time.monotonic() < deadline, "the sockets stopped streaming"
            time.sleep(0.001)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        assert server.proc.returncode == -signal.SIGKILL
        for t in [*chatters, writer]:
            t.join(timeout=15)
            assert not t.is_alive()

    db_path = tmp_path / "data" / "streaming_llm.db"
    if not database_url:
        with sqlite3.connect(db_path) as db:  # before any restart: the file as the crash left it
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    with start_server(tmp_path, env) as server:
        url = database_url or f"sqlite+aiosqlite:///{db_path}"
        if not database_url:
            with sqlite3.connect(db_path) as db:
                assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = {row["id"]: (row["role"], row["content"], row["finish_reason"]) for row in fetch(
            url, "SELECT id, role, content, finish_reason FROM turns")}
        for c in chatters:
            assert c.acked_user and c.acked_answer
            for turn_id, message in c.acked_user.items():
                assert stored[turn_id] == ("user", message, None)
            for turn_id, text in c.acked_answer.items():
                assert stored[turn_id] == ("assistant", text, "stop")
            seqs = [r["seq"] for r in fetch(
                url, "SELECT seq FROM turns WHERE conversation_id = :c ORDER BY seq",
                c=c.conversation)]
            assert seqs == list(range(len(seqs)))
            # Beyond the acknowledged turns, at most what was in flight: the answer being
            # streamed (stored only if it ended just before the kill) and the next user turn.
            acked = len(c.acked_user) + len(c.acked_answer)
            assert acked <= len(seqs) <= acked + 2

        # No half-written agent file: every .md parses, no temp file survives the restart,
        # and every acknowledged agent write is there (or the one after it, in flight at the kill).
        agents_dir = tmp_path / "data" / "agents"
        assert not list(agents_dir.glob(".*"))
        assert sorted(p.name for p in agents_dir.iterdir()) == [
            "echoer.md", "writer-0.md", "writer-1.md", "writer-2.md"]
        assert len(AgentFiles(agents_dir).scan()) == 4
        with urllib.request.urlopen(f"{server.base_url}/agents", timeout=10) as resp:
            agents = {a["id"]: a for a in json.loads(resp.read())}
        assert set(agents) == {"echoer", "writer-0", "writer-1", "writer-2"}
        for agent_id, version in writer.acked.items():
            got = int(agents[agent_id]["name"][1:])
            assert got in (version, version + 3), (agent_id, version, got)
            assert agents[agent_id]["markdown_context"].startswith(f"v{got}\n")
            assert parse((agents_dir / f"{agent_id}.md").read_text())["name"] == f"v{got}"

        # The service serves again, continuing a conversation cut off by the crash.
        chatter = chatters[0]
        with connect(server.ws_url) as ws:
            ws.send(json.dumps({"type": "chat", "agent_id": "echoer", "message": "after the crash",
                                "conversation_id": chatter.conversation}))
            assert json.loads(ws.recv(timeout=10))["type"] == "start"
            text = ""
            while (event := json.loads(ws.recv(timeout=10)))["type"] == "token":
                text += event["token"]
        assert text == "after the crash" and event["type"] == "done"


def test_leftover_temp_files_are_removed_at_start_up(
        make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture) -> None:
    """A crash between the temp file and the rename leaves ``.{id}.*.tmp``: never an agent."""
    settings = make_settings()
    agents_dir = settings.resolved_agents_dir
    agents_dir.mkdir(parents=True)
    (agents_dir / "kept.md").write_text(render("kept", "Kept", "", ""))
    # the names write_atomically makes: ".{id}." + tempfile's 8 random characters + ".tmp"
    (agents_dir / ".half.abc12345.tmp").write_text(render("half", "Half", "", "")[:20])
    (agents_dir / ".kept.xyz_9876.tmp").write_text("---\nid: kept\nname: \"Newer but cut")
    (agents_dir / ".kept.tmp").write_text("a person's file, not one of ours")
    with caplog.at_level("WARNING"), TestClient(create_app(settings)) as client:
        assert [(a["id"], a["name"]) for a in client.get("/agents").json()] == [("kept", "Kept")]
    assert sorted(p.name for p in agents_dir.iterdir()) == [".kept.tmp", "kept.md"]
    assert caplog.text.count("left behind by an interrupted write") == 2

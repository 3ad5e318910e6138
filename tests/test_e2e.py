"""End to end: a real ``streaming-llm serve`` process, real HTTP and a real WebSocket client."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from .server import ROOT, http, start_server

pytestmark = pytest.mark.e2e


def turn(ws: Any, **frame: Any) -> tuple[dict[str, Any], str, dict[str, Any]]:
    ws.send(json.dumps({"type": "chat", **frame}))
    start = json.loads(ws.recv(timeout=10))
    assert start["type"] == "start", start
    text = ""
    while True:
        event = json.loads(ws.recv(timeout=10))
        if event["type"] != "token":
            return start, text, event
        text += event["token"]


def test_serve_end_to_end(tmp_path: Path) -> None:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "1"}
    with start_server(tmp_path, env) as server:
        status, health = http("GET", server.base_url + "/health")
        assert status == 200 and health["engine"] == "echo" and health["ready"] is True
        status, agent = http("PUT", server.base_url + "/agents/echoer",
                             {"name": "Echoer", "system_prompt": "Repeat.", "markdown_context": ""})
        assert status == 201 and agent["id"] == "echoer"
        assert (server.data_dir / "agents" / "echoer.md").exists()

        with connect(server.ws_url) as ws:
            start, text, done = turn(ws, agent_id="echoer", message="hello streaming world")
            assert text == "hello streaming world" and done["finish_reason"] == "stop"
            conv = start["conversation_id"]
            _, text2, done2 = turn(ws, agent_id="echoer", message="one two three four",
                                   conversation_id=conv, options={"max_new_tokens": 2})
            assert text2 == "one two " and done2["finish_reason"] == "length"
            ws.send(json.dumps({"type": "ping", "request_id": "p"}))
            assert json.loads(ws.recv(timeout=5)) == {"type": "pong", "request_id": "p"}

        status, history = http("GET", f"{server.base_url}/conversations/{conv}")
        assert [t["content"] for t in history["turns"]] == [
            "hello streaming world", "hello streaming world", "one two three four", "one two "]
        with sqlite3.connect(server.db_path) as db:
            rows = db.execute("SELECT seq, role, finish_reason FROM turns WHERE conversation_id=?"
                              " ORDER BY seq", (conv,)).fetchall()
        assert rows == [(0, "user", None), (1, "assistant", "stop"), (2, "user", None),
                        (3, "assistant", "length")]
    assert server.proc.returncode == 0
    assert f"listening on http://127.0.0.1:{server.port}" in server.log()


def test_migrate_command(tmp_path: Path) -> None:
    env = {"STREAMING_LLM_DATA_DIR": str(tmp_path / "d"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "streaming_llm", "migrate"], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    with sqlite3.connect(tmp_path / "d" / "streaming_llm.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone() == ("0004",)

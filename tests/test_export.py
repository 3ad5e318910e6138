"""Conversation export over HTTP and the command line, and the transcripts directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient
from websockets.sync.client import connect

from .conftest import BOTH_DATABASES, database_env, put_agent
from .database import fetch
from .server import ROOT, start_server
from .test_conversations import _chat


def chat(ws: Any, **frame: Any) -> dict[str, Any]:
    ws.send(json.dumps({"type": "chat", "agent_id": "echoer", **frame}))
    while (event := json.loads(ws.recv(timeout=10)))["type"] in ("start", "token"):
        pass
    assert event["type"] == "done", event
    return event


def export_cli(data_dir: Path, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMING_LLM_")}
    env.update({"STREAMING_LLM_DATA_DIR": str(data_dir), "STREAMING_LLM_LOG_LEVEL": "warning",
                **database_env(database_url)})
    return subprocess.run([sys.executable, "-m", "streaming_llm", "export", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60, check=False)


def without_export_time(export: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in export.items() if k != "exported_at"}


@BOTH_DATABASES
@pytest.mark.e2e
def test_export_transcripts_and_cli(tmp_path: Path, database_url: str) -> None:
    transcripts = tmp_path / "transcripts"
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "1",
           "STREAMING_LLM_TRANSCRIPTS_DIR": str(transcripts), **database_env(database_url)}
    with start_server(tmp_path, env) as server, httpx.Client(base_url=server.base_url) as http:
        assert http.put("/agents/echoer", json={"name": "Echoer"}).status_code == 201
        with connect(server.ws_url) as ws:
            first = chat(ws, message="hello export world")
            conv = first["conversation_id"]
            transcript = transcripts / f"{conv}.md"
            after_first = transcript.read_text()
            assert "hello export world" in after_first and "second question" not in after_first
            chat(ws, message="second question here", conversation_id=conv,
                 options={"max_new_tokens": 1})
            other = chat(ws, message="another conversation")["conversation_id"]

        markdown = http.get(f"/conversations/{conv}/export")
        assert markdown.status_code == 200
        assert markdown.headers["content-type"] == "text/markdown; charset=utf-8"
        assert f'filename="{conv}.md"' in markdown.headers["content-disposition"]
        text = markdown.text
        assert text.startswith("# hello export world\n")
        assert f"- Conversation: `{conv}`" in text and "- Agent: Echoer (`echoer`)" in text
        assert text.count("### User · 20") == 2 and text.count("### Echoer · 20") == 2
        assert "\n\nsecond question here\n" in text and "\n\nsecond \n" in text
        assert "*finished · 3 tokens · first token after" in text
        assert "*cut at the token limit · 1 tokens" in text
        # The transcript kept after each answer is the same Markdown, written whole.
        assert transcript.read_text() == text
        assert sorted(p.name for p in transcripts.iterdir()) == sorted([f"{conv}.md",
                                                                        f"{other}.md"])

        exported = http.get(f"/conversations/{conv}/export?format=json").json()
        url = database_url or f"sqlite+aiosqlite:///{server.db_path}"
        (conv_row,) = fetch(url, "SELECT * FROM conversations WHERE id = :id", id=conv)
        turn_rows = fetch(url, "SELECT * FROM turns WHERE conversation_id = :id ORDER BY seq",
                          id=conv)
        # Loss-free: every stored column is in the JSON, with its value; but the case-folded
        # copies kept for search, which an import would derive again.
        assert conv_row.pop("title_casefold") == "hello export world"
        assert {k: exported[k] for k in conv_row} == conv_row
        assert len(exported["turns"]) == len(turn_rows) == 4
        for row, turn in zip(turn_rows, exported["turns"], strict=True):
            row.pop("conversation_id")
            assert row.pop("content_casefold") == row["content"].casefold()
            usage = row.pop("usage")
            assert turn["usage"] == (json.loads(usage) if usage else None)
            calls = row.pop("tool_calls")
            assert turn["tool_calls"] == (json.loads(calls) if calls else None)
            assert {k: turn[k] for k in row} == row
        assert exported["agent"]["name"] == "Echoer" and exported["format_version"] == 1

        bad = http.get(f"/conversations/{conv}/export?format=pdf")
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_format"
        missing = http.get("/conversations/conv_nope/export")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "conversation_not_found"

        assert http.delete(f"/conversations/{other}").status_code == 204
        assert not (transcripts / f"{other}.md").exists()

    # The command line reads the same database, with the server stopped.
    out = tmp_path / "out"
    proc = export_cli(server.data_dir, database_url, "--format", "json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "exported 1 conversation(s)" in proc.stderr
    assert [p.name for p in out.iterdir()] == [f"{conv}.json"]
    from_file = json.loads((out / f"{conv}.json").read_text())
    assert without_export_time(from_file) == without_export_time(exported)

    proc = export_cli(server.data_dir, database_url, "--conversation", conv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == text

    proc = export_cli(server.data_dir, database_url, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert [without_export_time(e) for e in json.loads(proc.stdout)] == [
        without_export_time(exported)]

    proc = export_cli(server.data_dir, database_url, "--conversation", "conv_nope")
    assert proc.returncode == 1 and "conversation 'conv_nope' not found" in proc.stderr


def test_a_title_or_name_with_newlines_cannot_forge_markdown_lines(client: TestClient) -> None:
    put_agent(client, "a", name="Agent\n# Forged agent heading")
    with client.websocket_connect("/ws/chat") as ws:
        conv = _chat(ws, "a", "hello")
    title = "Notes\n\n---\n\n### User · 2026-01-01 00:00:00 UTC\r\n\nforged turn\u2028# more"
    assert client.patch(f"/conversations/{conv}", json={"title": title}).status_code == 200
    resp = client.get(f"/conversations/{conv}/export")
    assert resp.status_code == 200
    lines = resp.text.splitlines()
    assert lines[0] == "# Notes --- ### User · 2026-01-01 00:00:00 UTC forged turn # more"
    assert lines[3] == "- Agent: Agent # Forged agent heading (`a`)"
    headings = [line.split(" · ")[0] for line in lines if line.startswith("#")]
    assert headings == ["# Notes --- ### User", "### User", "### Agent # Forged agent heading"]
    assert lines.count("---") == 2  # one rule per turn
    # The JSON export keeps the title as stored.
    assert client.get(f"/conversations/{conv}/export?format=json").json()["title"] == title

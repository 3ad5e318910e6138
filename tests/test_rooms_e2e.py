"""A room on the real default model (SmolLM2-135M-Instruct): two agents with different private
facts share one conversation, each answers from its own context, the second uses what the first
said in the room, and neither shows the other's private context.

The questions are the ones a 135M model answers reliably at temperature 0 (a fact stated as
``# Facts`` in the agent's context, asked for by its words); the assertions look for the fact's
distinctive word, not for a sentence.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from .server import http, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ALICE = {"name": "Alice", "system_prompt": "You are the assistant of Project Kiwi.",
         "markdown_context": "# Facts\n- The project codename is KIWI."}
BOB = {"name": "Bob", "system_prompt": "You are the assistant of the release team.",
       "markdown_context": "# Facts\n- The release date is May 5."}
OPTIONS = {"temperature": 0, "max_new_tokens": 12}


def answers(ws: Any, **frame: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """Send a chat frame; (agent, answer, done) for each answer, in order."""
    ws.send(json.dumps({"type": "chat", "options": OPTIONS, **frame}))
    start = json.loads(ws.recv(timeout=600))
    if start["type"] == "error":
        return [("", "", start)]
    assert start["type"] == "start", start
    got: list[tuple[str, str, dict[str, Any]]] = []
    text = ""
    while len(got) < len(start["agent_ids"]):
        event = json.loads(ws.recv(timeout=600))
        if event["type"] == "token":
            assert event["agent_id"] == start["agent_ids"][len(got)]
            text += event["token"]
            continue
        assert event["type"] == "done", event
        got.append((event["agent_id"], text, event))
        text = ""
    return got


def test_two_agents_share_a_room_each_itself(tmp_path: Path, default_models_dir: Path) -> None:
    env = {"STREAMING_LLM_ENGINE": "local", "STREAMING_LLM_MODELS_DIR": str(default_models_dir),
           "STREAMING_LLM_DEVICE": "cpu"}
    with start_server(tmp_path, env, timeout=300) as server:
        base = server.base_url
        assert http("PUT", base + "/agents/alice", ALICE)[0] == 201
        assert http("PUT", base + "/agents/bob", BOB)[0] == 201
        assert http("PUT", base + "/agents/carol", {"name": "Carol"})[0] == 201
        status, room = http("POST", base + "/conversations", {"agent_ids": ["alice", "bob"]})
        assert status == 201, room
        cid = room["id"]
        with connect(server.ws_url) as ws:
            [(_, codename, _)] = answers(ws, conversation_id=cid, agent_id="alice",
                                         message="What is the project codename?")
            [(_, date, _)] = answers(ws, conversation_id=cid, agent_id="bob",
                                     message="When is the release date?")
            [(_, heard, done)] = answers(ws, conversation_id=cid, agent_id="bob",
                                         message="What project codename did Alice say?")
            [(_, _, refused)] = answers(ws, conversation_id=cid, agent_id="carol",
                                        message="What is the project codename?")
            round_answers = answers(ws, conversation_id=cid, agent_ids=["alice", "bob"],
                                    message="Thank you both.")

    assert "KIWI" in codename and "May" not in codename  # her fact, not Bob's
    assert "May 5" in date and "KIWI" not in date  # his own fact
    assert "KIWI" in heard  # what Alice said in the room, which Bob's context does not hold
    # Bob's cache held the room up to his last answer: only the turns since were new to him.
    assert done["usage"]["cached_tokens"] > 0
    assert refused["type"] == "error" and refused["code"] == "agent_not_in_conversation"
    assert [agent for agent, _, _ in round_answers] == ["alice", "bob"]

    with sqlite3.connect(server.db_path) as db:
        stored = db.execute("SELECT role, agent_id, content FROM turns WHERE conversation_id = ? "
                            "ORDER BY seq", (cid,)).fetchall()
    assert [(role, agent) for role, agent, _ in stored] == [
        ("user", None), ("assistant", "alice"), ("user", None), ("assistant", "bob"),
        ("user", None), ("assistant", "bob"), ("user", None), ("assistant", "alice"),
        ("assistant", "bob")]
    assert [content for _, _, content in stored[:6:2]] == [
        "What is the project codename?", "When is the release date?",
        "What project codename did Alice say?"]
    assert [content for _, _, content in stored[1:6:2]] == [codename, date, heard]

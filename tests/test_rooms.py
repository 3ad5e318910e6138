"""Rooms: several agents in one conversation (chat/rooms.py, chat/rounds.py, the participants'
storage and REST). Run on the scripted engine, which records each request: who answered, which
messages it saw, under which cache key."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.testclient import TestClient

from streaming_llm.app import create_app
from streaming_llm.chat import rooms
from streaming_llm.chat.resume import RoundPieces
from streaming_llm.engines.base import ChatMessage
from streaming_llm.settings import Settings
from streaming_llm.storage.database import alembic_config, ensure_sqlite_dir, upgrade_to_head
from streaming_llm.storage.models import utcnow

from .conftest import BOTH_DATABASES, put_agent
from .database import fetch
from .fakes import ScriptedEngine
from .test_chat import recv_turn
from .test_limits import _wait_for


def _agents(client: TestClient) -> None:
    put_agent(client, "alice", name="Alice", system_prompt="You are Alice.",
              markdown_context="Alice's secret: KIWI")
    put_agent(client, "bob", name="Bob", system_prompt="You are Bob.",
              markdown_context="Bob's secret: MANGO")
    put_agent(client, "carol", name="Carol", system_prompt="You are Carol.", markdown_context="")


def _room(client: TestClient, *agent_ids: str, title: str = "") -> dict[str, Any]:
    resp = client.post("/conversations", json={"agent_ids": list(agent_ids), "title": title})
    assert resp.status_code == 201, resp.text
    return resp.json()


def _stored(settings: Settings, conversation_id: str) -> list[tuple[Any, ...]]:
    rows = fetch(settings.resolved_database_url,
                 "SELECT role, agent_id, content, finish_reason FROM turns "
                 "WHERE conversation_id = :c ORDER BY seq", c=conversation_id)
    return [tuple(row.values()) for row in rows]


def _round(ws: Any) -> tuple[dict[str, Any], list[tuple[str, list[dict[str, Any]], dict[str, Any]]]]:
    """A round's frames: its start, then (agent, tokens, done-or-error) per answer."""
    start = ws.receive_json()
    assert start["type"] == "start", start
    answers: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = []
    tokens: list[dict[str, Any]] = []
    while True:
        frame = ws.receive_json()
        if frame["type"] == "token":
            tokens.append(frame)
            continue
        answers.append((frame.get("agent_id") or "", tokens, frame))
        tokens = []
        if len(answers) == len(start["agent_ids"]) or frame["type"] == "error":
            return start, answers


# --- speaker rules and prompts (no server) ------------------------------------------------------
def test_mentions_pick_participants_in_order_once() -> None:
    people = ["alice", "bob", "carol"]
    assert rooms.mentions("@bob and @alice, then @bob again", people) == ["bob", "alice"]
    assert rooms.mentions("mail bob@alice.com or @dave", people) == []
    assert rooms.mentions("(@carol)", people) == ["carol"]
    assert rooms.mentions("@Bob, then @ALICE", people) == ["bob", "alice"]
    assert rooms.mentions("@bobby and @bob-2", people) == []  # a longer id is another agent


def test_each_speaker_sees_its_own_system_and_the_others_by_name() -> None:
    transcript = [rooms.Said("user", None, "Hi all"), rooms.Said("assistant", "alice", "KIWI"),
                  rooms.Said("assistant", "bob", ""), rooms.Said("user", None, "Again"),
                  rooms.Said("assistant", "bob", "MANGO")]
    names = {"alice": "Alice", "bob": "Bob"}
    assert rooms.speaker_messages("bob", "You are Bob.", transcript, names) == [
        ChatMessage("system", "You are Bob."), ChatMessage("user", "Hi all"),
        ChatMessage("user", "[Alice]: KIWI"), ChatMessage("assistant", ""),
        ChatMessage("user", "Again"), ChatMessage("assistant", "MANGO")]
    alice = rooms.speaker_messages("alice", "", transcript, names)
    assert [m.role for m in alice] == ["user", "assistant", "user", "user"]  # Bob's empty: nothing
    assert alice[-1] == ChatMessage("user", "[Bob]: MANGO")


def test_pick_speakers() -> None:
    room = ["alice", "bob"]
    pick = rooms.pick_speakers
    assert pick(room, conversation_id="c", agent_id="", agent_ids=[], message="@bob hi") == ["bob"]
    assert pick(room, conversation_id="c", agent_id="alice", agent_ids=[],
                message="@bob hi") == ["alice"]  # agent_id wins over a mention
    assert pick(["alice"], conversation_id="c", agent_id="", agent_ids=[], message="x") == ["alice"]
    with pytest.raises(rooms.NoSpeaker):
        pick(room, conversation_id="c", agent_id="", agent_ids=[], message="hi all")
    with pytest.raises(rooms.NotInConversation):
        pick(room, conversation_id="c", agent_id="carol", agent_ids=[], message="x")
    with pytest.raises(rooms.NotInConversation):
        pick(room, conversation_id="c", agent_id="", agent_ids=["alice", "carol"], message="x")
    with pytest.raises(Exception, match="belongs to agent 'alice'"):  # a plain conversation
        pick(["alice"], conversation_id="c", agent_id="bob", agent_ids=[], message="x")


# --- REST ---------------------------------------------------------------------------------------
@BOTH_DATABASES
def test_create_list_patch_and_read_a_room(client: TestClient, settings: Settings,
                                           scripted: ScriptedEngine) -> None:
    _agents(client)
    room = _room(client, "alice", "bob", title="Standup")
    assert room["agent_ids"] == ["alice", "bob"] and room["agent_id"] == "alice"
    assert room["title"] == "Standup" and room["id"].startswith("conv_")
    plain = _room(client, "carol")
    assert [c["id"] for c in client.get("/conversations?agent_id=bob").json()] == [room["id"]]
    assert {c["id"] for c in client.get("/conversations?agent_id=carol").json()} == {plain["id"]}
    listed = {c["id"]: c["agent_ids"] for c in client.get("/conversations").json()}
    assert listed == {room["id"]: ["alice", "bob"], plain["id"]: ["carol"]}

    for body, status, code in [({"agent_ids": []}, 422, "validation_error"),
                               ({"agent_ids": ["alice", "alice"]}, 400, "bad_request"),
                               ({"agent_ids": ["alice", "nobody"]}, 404, "agent_not_found"),
                               ({"agent_ids": ["Bad!"]}, 422, "validation_error"),
                               ({"agent_ids": [f"a{i}" for i in range(17)]}, 422,
                                "validation_error")]:
        resp = client.post("/conversations", json=body)
        assert (resp.status_code, resp.json()["error"]["code"]) == (status, code), body
    assert len(client.get("/conversations").json()) == 2  # nothing stored by those

    one = f"/conversations/{room['id']}"
    resp = client.patch(one, json={"agent_ids": ["bob", "carol", "alice"]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["agent_ids"] == ["bob", "carol", "alice"] and resp.json()["agent_id"] == "bob"
    # A new list of participants: the engine forgets every cache the room may have had.
    assert set(scripted.forgotten) == {room["id"], *(f"{room['id']}:{a}"
                                                     for a in ("alice", "bob", "carol"))}
    resp = client.patch(one, json={"agent_ids": ["bob", "nobody"]})
    assert resp.json()["error"]["code"] == "agent_not_found"
    assert client.get(one).json()["agent_ids"] == ["bob", "carol", "alice"]  # unchanged
    resp = client.patch(one, json={"title": "Daily", "agent_ids": ["carol", "bob"]})
    assert resp.json()["title"] == "Daily" and resp.json()["agent_ids"] == ["carol", "bob"]
    view = client.get(one).json()
    assert view["agent_ids"] == ["carol", "bob"] and view["turns"] == []

    scripted.forgotten.clear()
    assert client.delete(one).status_code == 204
    assert sorted(scripted.forgotten) == sorted([f"{room['id']}:carol", f"{room['id']}:bob"])
    rows = fetch(settings.resolved_database_url,
                 "SELECT conversation_id FROM conversation_agents ORDER BY conversation_id")
    assert rows == [{"conversation_id": plain["id"]}]  # the room's participants went with it


# --- the socket ---------------------------------------------------------------------------------
@BOTH_DATABASES
def test_each_agent_answers_as_itself_with_its_own_cache(client: TestClient, settings: Settings,
                                                         scripted: ScriptedEngine) -> None:
    _agents(client)
    cid = _room(client, "alice", "bob")["id"]
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "alice", "message": "Your secret?",
                      "conversation_id": cid})
        start, tokens, done = recv_turn(ws)
        assert start["agent_ids"] == ["alice"] and done["agent_id"] == "alice"
        assert {t["agent_id"] for t in tokens} == {"alice"}  # tokens name the speaker in a room
        ws.send_json({"type": "chat", "message": "@bob what did Alice say?",
                      "conversation_id": cid})
        start, _, done = recv_turn(ws)
        assert start["agent_ids"] == ["bob"] and done["agent_id"] == "bob", done

    alice, bob = scripted.requests
    assert alice.conversation_id == f"{cid}:alice" and bob.conversation_id == f"{cid}:bob"
    assert alice.messages == [ChatMessage("system", "You are Alice.\n\nAlice's secret: KIWI"),
                              ChatMessage("user", "Your secret?")]
    assert bob.messages == [ChatMessage("system", "You are Bob.\n\nBob's secret: MANGO"),
                            ChatMessage("user", "Your secret?"),
                            ChatMessage("user", "[Alice]: Hello, world!"),
                            ChatMessage("user", "@bob what did Alice say?")]
    assert "KIWI" not in str(bob.messages) and "MANGO" not in str(alice.messages)
    assert _stored(settings, cid) == [
        ("user", None, "Your secret?", None), ("assistant", "alice", "Hello, world!", "stop"),
        ("user", None, "@bob what did Alice say?", None),
        ("assistant", "bob", "Hello, world!", "stop")]
    view = client.get(f"/conversations/{cid}").json()
    assert [t["agent_id"] for t in view["turns"]] == [None, "alice", None, "bob"]


@BOTH_DATABASES
def test_a_round_answers_in_turn_each_seeing_the_previous(client: TestClient, settings: Settings,
                                                          scripted: ScriptedEngine) -> None:
    _agents(client)
    with client.websocket_connect("/ws/chat") as ws:
        # No conversation yet: a round of agent_ids creates the room.
        ws.send_json({"type": "chat", "agent_ids": ["bob", "alice"], "message": "Both of you",
                      "request_id": "r1"})
        start, answers = _round(ws)
    cid = start["conversation_id"]
    assert start["agent_ids"] == ["bob", "alice"]
    assert [(agent, done["type"]) for agent, _, done in answers] == [("bob", "done"),
                                                                     ("alice", "done")]
    for agent, tokens, done in answers:
        assert "".join(t["token"] for t in tokens) == "Hello, world!"
        assert {t["agent_id"] for t in tokens} == {agent} and done["request_id"] == "r1"
    seqs = [t["seq"] for _, tokens, _ in answers for t in tokens]
    assert seqs == sorted(seqs) and seqs[0] == 0  # seq runs on across the round
    assert client.get(f"/conversations/{cid}").json()["agent_ids"] == ["bob", "alice"]
    assert _stored(settings, cid) == [
        ("user", None, "Both of you", None), ("assistant", "bob", "Hello, world!", "stop"),
        ("assistant", "alice", "Hello, world!", "stop")]
    _, second = scripted.requests
    assert second.conversation_id == f"{cid}:alice"
    assert second.messages[1:] == [ChatMessage("user", "Both of you"),
                                   ChatMessage("user", "[Bob]: Hello, world!")]

    # Two @mentions in a room: a round in the order mentioned.
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "message": "@alice then @bob", "conversation_id": cid})
        start, answers = _round(ws)
    assert start["agent_ids"] == ["alice", "bob"] and [a for a, _, _ in answers] == ["alice", "bob"]
    # Alice's second request: her own answer is hers, the rest is new to her.
    alice_again = scripted.requests[2]
    assert alice_again.messages[1:] == [
        ChatMessage("user", "Both of you"), ChatMessage("user", "[Bob]: Hello, world!"),
        ChatMessage("assistant", "Hello, world!"), ChatMessage("user", "@alice then @bob")]


def test_who_may_speak(client: TestClient, settings: Settings) -> None:
    _agents(client)
    cid = _room(client, "alice", "bob")["id"]
    with client.websocket_connect("/ws/chat") as ws:
        first = _chat_error(ws, {"agent_id": "carol", "conversation_id": cid})
        assert first["code"] == "agent_not_in_conversation" and "alice, bob" in first["message"]
        assert _chat_error(ws, {"agent_ids": ["alice", "carol"],
                                "conversation_id": cid})["code"] == "agent_not_in_conversation"
        assert _chat_error(ws, {"conversation_id": cid})["code"] == "no_speaker"
        assert _chat_error(ws, {"agent_id": "nobody",
                                "conversation_id": cid})["code"] == "agent_not_found"
        assert _chat_error(ws, {"agent_ids": ["alice", "alice"],
                                "conversation_id": cid})["code"] == "bad_request"
        assert _chat_error(ws, {})["code"] == "invalid_frame"  # nobody and no conversation
        # A plain conversation keeps its error for another agent.
        ws.send_json({"type": "chat", "agent_id": "carol", "message": "hi"})
        plain = recv_turn(ws)[0]["conversation_id"]
        assert _chat_error(ws, {"agent_id": "alice", "conversation_id": plain})["code"] == \
            "conversation_agent_mismatch"
    assert _stored(settings, cid) == []  # nothing stored by any refusal


def _chat_error(ws: Any, fields: dict[str, Any]) -> dict[str, Any]:
    ws.send_json({"type": "chat", "message": "hello", **fields})
    frame = ws.receive_json()
    assert frame["type"] == "error", frame
    return frame


def test_a_participant_removed_mid_round_ends_the_round_there(
        client: TestClient, settings: Settings, scripted: ScriptedEngine) -> None:
    _agents(client)
    cid = _room(client, "alice", "bob", "carol")["id"]
    scripted.delay = 0.05
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_ids": ["alice", "bob"], "message": "go",
                      "conversation_id": cid})
        start = ws.receive_json()
        assert start["type"] == "start"
        first = ws.receive_json()  # alice answers; bob is removed meanwhile
        assert first["type"] == "token" and first["agent_id"] == "alice"
        resp = client.patch(f"/conversations/{cid}", json={"agent_ids": ["alice", "carol"]})
        assert resp.status_code == 200
        frames = [first]
        while frames[-1]["type"] == "token":
            frames.append(ws.receive_json())
        assert frames[-1]["type"] == "done" and frames[-1]["agent_id"] == "alice"
        error = ws.receive_json()
    assert error["type"] == "error" and error["code"] == "agent_not_in_conversation", error
    assert error["conversation_id"] == cid and error["agent_id"] == "bob"
    assert _stored(settings, cid) == [("user", None, "go", None),
                                      ("assistant", "alice", "Hello, world!", "stop")]


def test_a_cancelled_answer_ends_the_round(client: TestClient, settings: Settings,
                                           scripted: ScriptedEngine) -> None:
    _agents(client)
    cid = _room(client, "alice", "bob")["id"]
    scripted.delay = 0.05
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_ids": ["alice", "bob"], "message": "go",
                      "conversation_id": cid, "request_id": "r1"})
        assert ws.receive_json()["type"] == "start"
        assert ws.receive_json()["type"] == "token"
        ws.send_json({"type": "cancel", "request_id": "r1"})
        frame = ws.receive_json()
        while frame["type"] == "token":
            frame = ws.receive_json()
        assert frame["type"] == "done" and frame["finish_reason"] == "cancelled"
        assert frame["agent_id"] == "alice"
        ws.send_json({"type": "ping", "request_id": "p"})
        assert ws.receive_json() == {"type": "pong", "request_id": "p"}  # no second answer
    assert [row[:2] for row in _stored(settings, cid)] == [("user", None), ("assistant", "alice")]


def test_a_round_cancelled_while_its_next_speaker_waits_ends_with_that_speakers_error(
        make_settings: Callable[..., Settings], scripted: ScriptedEngine) -> None:
    """Bob's answer waits for the one generation slot, which another socket's turn took when
    Alice's answer gave it back; a cancel then ends the round: its last frame is Bob's
    ``cancelled`` error, and nothing of his answer is stored."""
    scripted.pieces = [f"w{i} " for i in range(20)]
    scripted.delay = 0.01
    with TestClient(create_app(make_settings(max_concurrent_generations=1),
                               engine=scripted)) as client:
        _agents(client)
        cid = _room(client, "alice", "bob")["id"]
        gate = client.app_state["services"].gate
        with client.websocket_connect("/ws/chat") as a, client.websocket_connect("/ws/chat") as b:
            a.send_json({"type": "chat", "agent_ids": ["alice", "bob"], "message": "go",
                         "conversation_id": cid, "request_id": "r1"})
            assert a.receive_json()["type"] == "start"
            b.send_json({"type": "chat", "agent_id": "carol", "message": "meanwhile"})
            _wait_for(lambda: gate.waiting == 1)  # carol waits for alice's slot
            frame = a.receive_json()
            while frame["type"] == "token":
                frame = a.receive_json()
            assert (frame["type"], frame["agent_id"]) == ("done", "alice"), frame
            _wait_for(lambda: gate.waiting == 1)  # carol has the slot now; bob waits for it
            a.send_json({"type": "cancel", "request_id": "r1"})
            error = a.receive_json()
            assert (error["type"], error["code"], error["agent_id"]) == ("error", "cancelled",
                                                                         "bob"), error
            assert error["conversation_id"] == cid
            _, _, done = recv_turn(b)
            assert done["type"] == "done"
    assert [row[:2] for row in _stored(make_settings(), cid)] == [("user", None),
                                                                  ("assistant", "alice")]


def test_round_pieces_read_the_answers_as_one_run() -> None:
    first, second = ["a", "b", "c"], ["d"]
    pieces = RoundPieces([first, second])
    assert (len(pieces), pieces[1:5], pieces[3], pieces[-1]) == (4, ["b", "c", "d"], "d", "d")
    second.append("e")  # the live answer grows: the view sees it, no copy
    assert (len(pieces), pieces[2:]) == (5, ["c", "d", "e"])
    with pytest.raises(IndexError):
        pieces[5]


def test_exports_name_the_speakers(client: TestClient) -> None:
    _agents(client)
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_ids": ["alice", "bob"], "message": "hello"})
        start, _ = _round(ws)
    cid = start["conversation_id"]
    client.delete("/agents/bob")
    markdown = client.get(f"/conversations/{cid}/export").text
    assert "- Agents: Alice (`alice`), `bob` (deleted)" in markdown
    assert markdown.index("### Alice ·") < markdown.index("### bob ·")
    exported = client.get(f"/conversations/{cid}/export?format=json").json()
    assert exported["agent_ids"] == ["alice", "bob"]
    assert [t["agent_id"] for t in exported["turns"]] == [None, "alice", "bob"]
    # The deleted agent stays a participant: addressing it says so.
    with client.websocket_connect("/ws/chat") as ws:
        assert _chat_error(ws, {"agent_id": "bob",
                                "conversation_id": cid})["code"] == "agent_not_found"


def test_sqlite3_reads_who_took_part_and_who_spoke(client: TestClient, settings: Settings) -> None:
    _agents(client)
    cid = _room(client, "bob", "alice")["id"]
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "alice", "message": "hi",
                      "conversation_id": cid})
        recv_turn(ws)
    with sqlite3.connect(settings.data_dir / "streaming_llm.db") as db:
        assert db.execute("SELECT agent_id, position FROM conversation_agents "
                          "WHERE conversation_id = ? ORDER BY position", (cid,)).fetchall() == [
            ("bob", 0), ("alice", 1)]
        assert db.execute("SELECT role, agent_id FROM turns WHERE conversation_id = ? "
                          "ORDER BY seq", (cid,)).fetchall() == [("user", None),
                                                                 ("assistant", "alice")]


# --- the migration ------------------------------------------------------------------------------
@BOTH_DATABASES
def test_upgrade_fills_participants_and_speakers_of_old_conversations(
        tmp_path: Path, database_url: str) -> None:
    url = database_url or f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    ensure_sqlite_dir(url)
    with alembic_config(url) as cfg:
        command.upgrade(cfg, "0002")

    async def insert_rows() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text(
                    "INSERT INTO conversations (id, agent_id, title, created_at, updated_at) "
                    "VALUES ('conv_old', 'a', 'Old', :at, :at)"), {"at": utcnow()})
                await conn.execute(text(
                    "INSERT INTO turns (id, conversation_id, seq, role, content, created_at) "
                    "VALUES (:id, 'conv_old', :seq, :role, 'x', :at)"),
                    [{"id": f"t{i}", "seq": i, "role": ("user", "assistant")[i % 2],
                      "at": utcnow()} for i in range(4)])
        finally:
            await engine.dispose()

    asyncio.run(insert_rows())
    upgrade_to_head(url)
    assert fetch(url, "SELECT conversation_id, agent_id, position FROM conversation_agents") == [
        {"conversation_id": "conv_old", "agent_id": "a", "position": 0}]
    assert [row["agent_id"] for row in fetch(url, "SELECT agent_id FROM turns ORDER BY seq")] == [
        None, "a", None, "a"]
    with alembic_config(url) as cfg:
        command.downgrade(cfg, "0002")
    assert "agent_id" not in [row for row in fetch(url, "SELECT * FROM turns LIMIT 1")[0]]


def test_v1_answers_as_one_participant_per_request(client: TestClient, settings: Settings,
                                                   scripted: ScriptedEngine) -> None:
    _agents(client)
    cid = _room(client, "alice", "bob")["id"]
    body = {"model": "bob", "messages": [{"role": "user", "content": "hi"}]}
    resp = client.post("/v1/chat/completions", json=body, headers={"X-Conversation-Id": cid})
    assert resp.status_code == 200, resp.text
    assert scripted.requests[-1].conversation_id == f"{cid}:bob"
    resp = client.post("/v1/chat/completions", json={**body, "model": "carol"},
                       headers={"X-Conversation-Id": cid})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "agent_not_in_conversation"
    assert _stored(settings, cid) == [("user", None, "hi", None),
                                      ("assistant", "bob", "Hello, world!", "stop")]


def test_editing_a_turn_in_a_room_resends_to_the_same_speakers(
        client: TestClient, settings: Settings, scripted: ScriptedEngine) -> None:
    """Edit-and-resend and regenerate work in a room as anywhere: truncate from the user turn,
    send the frame again (with its agent_id or agent_ids); each speaker's cache rolls back to
    what its new prompt shares with it."""
    _agents(client)
    cid = _room(client, "alice", "bob")["id"]
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_ids": ["alice", "bob"], "message": "first",
                      "conversation_id": cid})
        _round(ws)
        assert client.delete(f"/conversations/{cid}/turns?from_seq=1").status_code == 400
        assert client.delete(f"/conversations/{cid}/turns?from_seq=0").status_code == 204
        ws.send_json({"type": "chat", "agent_ids": ["bob", "alice"], "message": "edited",
                      "conversation_id": cid})
        _round(ws)
    assert [row[:3] for row in _stored(settings, cid)] == [
        ("user", None, "edited"), ("assistant", "bob", "Hello, world!"),
        ("assistant", "alice", "Hello, world!")]


def test_an_edited_participant_answers_with_its_new_prompt(client: TestClient,
                                                           scripted: ScriptedEngine) -> None:
    _agents(client)
    cid = _room(client, "alice", "bob")["id"]
    put_agent(client, "bob", name="Robert", system_prompt="You are Robert now.",
              markdown_context="")
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_ids": ["bob", "alice"], "message": "hi",
                      "conversation_id": cid})
        _round(ws)
    bob, alice = scripted.requests
    assert bob.messages[0] == ChatMessage("system", "You are Robert now.")
    assert alice.messages[-1] == ChatMessage("user", "[Robert]: Hello, world!")  # his name now


@pytest.mark.e2e
def test_a_round_cut_mid_answer_resumes_on_a_new_socket(tmp_path: Path) -> None:
    """A real server (echo engine): the socket drops during the first answer of a round; a
    resume gets the rest of it live, its done, the second answer and the round's last done, every
    piece once; both answers are stored, in order, by agent."""
    from .server import http, start_server
    from .test_resume import MESSAGE, assert_contiguous, cut, open_socket

    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "30"}
    with start_server(tmp_path, env) as server:
        for agent_id in ("coder", "critic"):
            assert http("PUT", f"{server.base_url}/agents/{agent_id}",
                        {"name": agent_id.title()})[0] == 201
        ws, sock = open_socket(server)
        ws.send(json.dumps({"type": "chat", "agent_ids": ["coder", "critic"],
                            "message": MESSAGE, "request_id": "r-round"}))
        before = [json.loads(ws.recv(timeout=20)) for _ in range(4)]
        assert before[0]["type"] == "start" and before[0]["agent_ids"] == ["coder", "critic"]
        cid = before[0]["conversation_id"]
        cut(ws, sock)
        seen = before[-1]["seq"] + before[-1].get("count", 1) - 1
        ws, _ = open_socket(server)
        after: list[dict[str, Any]] = []
        with ws:
            ws.send(json.dumps({"type": "resume", "request_id": "r-round", "after_seq": seen}))
            while not after or after[-1]["type"] == "token" or after[-1].get("agent_id") != "critic":
                after.append(json.loads(ws.recv(timeout=30)))
                assert after[-1]["type"] != "error", after[-1]
        tokens = [f for f in before + after if f["type"] == "token"]
        assert_contiguous(tokens)
        dones = [f for f in after if f["type"] == "done"]
        assert [d["agent_id"] for d in dones] == ["coder", "critic"]
        with sqlite3.connect(server.db_path) as db:
            stored = db.execute("SELECT agent_id, content FROM turns WHERE conversation_id = ? "
                                "AND role = 'assistant' ORDER BY seq", (cid,)).fetchall()
        assert stored == [("coder", MESSAGE), ("critic", f"[Coder]: {MESSAGE}")]
        assert "".join(f["token"] for f in tokens) == MESSAGE + f"[Coder]: {MESSAGE}"

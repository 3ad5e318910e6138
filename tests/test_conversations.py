from __future__ import annotations

import sqlite3

from starlette.testclient import TestClient

from streaming_llm.settings import Settings

from .conftest import BOTH_DATABASES, put_agent
from .fakes import ScriptedEngine
from .test_chat import recv_turn


def _chat(ws, agent: str, message: str, conversation_id: str | None = None) -> str:  # type: ignore[no-untyped-def]
    frame = {"type": "chat", "agent_id": agent, "message": message}
    if conversation_id:
        frame["conversation_id"] = conversation_id
    ws.send_json(frame)
    start, _, _ = recv_turn(ws)
    return start["conversation_id"]


@BOTH_DATABASES
def test_list_filter_get_delete(client: TestClient, scripted: ScriptedEngine) -> None:
    put_agent(client, "a")
    put_agent(client, "b")
    with client.websocket_connect("/ws/chat") as ws:
        c1 = _chat(ws, "a", "first conversation")
        c2 = _chat(ws, "b", "second")
        c3 = _chat(ws, "a", "third")
        _chat(ws, "a", "more", c1)  # continuing c1 makes it the most recent
    listed = client.get("/conversations").json()
    assert [c["id"] for c in listed] == [c1, c3, c2]
    assert listed[0]["title"] == "first conversation" and listed[0]["agent_id"] == "a"
    assert [c["id"] for c in client.get("/conversations?agent_id=a").json()] == [c1, c3]
    assert [c["id"] for c in client.get("/conversations?limit=1&offset=1").json()] == [c3]

    conv = client.get(f"/conversations/{c1}").json()
    assert set(conv) == {"id", "agent_id", "agent_ids", "title", "created_at", "updated_at",
                         "turns"}
    assert conv["agent_ids"] == ["a"]
    assert [(t["seq"], t["role"]) for t in conv["turns"]] == [
        (0, "user"), (1, "assistant"), (2, "user"), (3, "assistant")]
    assert set(conv["turns"][1]) == {"id", "seq", "role", "content", "finish_reason", "usage",
                                     "created_at", "agent_id"}
    assert [t["agent_id"] for t in conv["turns"]] == [None, "a", None, "a"]
    assert conv["turns"][0]["usage"] is None and conv["turns"][1]["finish_reason"] == "stop"

    assert client.delete(f"/conversations/{c1}").status_code == 204
    assert scripted.forgotten == [c1]
    assert client.get(f"/conversations/{c1}").json()["error"]["code"] == "conversation_not_found"
    assert client.delete(f"/conversations/{c1}").status_code == 404
    assert [c["id"] for c in client.get("/conversations").json()] == [c3, c2]


def test_bad_query_and_ids(client: TestClient) -> None:
    for url, code in [("/conversations?limit=0", "bad_request"),
                      ("/conversations?limit=abc", "bad_request"),
                      ("/conversations?agent_id=../x", "invalid_id"),
                      ("/conversations/..%2Fx", "invalid_id"),
                      ("/conversations/a%00b", "invalid_id"),
                      ("/conversations/conv_none", "conversation_not_found")]:
        resp = client.get(url)
        assert resp.json()["error"]["code"] == code, url
        assert resp.status_code == (404 if code.endswith("not_found") else 400)


def test_history_is_readable_with_sqlite3(client: TestClient, settings: Settings) -> None:
    put_agent(client, "a")
    with client.websocket_connect("/ws/chat") as ws:
        conv = _chat(ws, "a", "one")
        _chat(ws, "a", "two", conv)
    with sqlite3.connect(settings.data_dir / "streaming_llm.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        rows = db.execute(
            "SELECT t.seq, t.role, t.content, t.finish_reason, t.prompt_tokens, t.completion_tokens,"
            " t.created_at FROM turns t JOIN conversations c ON c.id = t.conversation_id "
            "WHERE c.agent_id = 'a' ORDER BY t.seq").fetchall()
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"agents", "conversations", "turns", "alembic_version"} <= tables
    assert [r[:3] for r in rows] == [(0, "user", "one"), (1, "assistant", "Hello, world!"),
                                     (2, "user", "two"), (3, "assistant", "Hello, world!")]
    assert rows[1][3:6] == ("stop", 2, 4)
    assert all(r[6].endswith("Z") and r[6][10] == "T" for r in rows)
    created = [r[6] for r in rows]
    assert created == sorted(created)


def test_health(client: TestClient, scripted: ScriptedEngine) -> None:
    resp = client.get("/health")
    assert resp.status_code == 200
    assert resp.json() | {"version": None} == {
        "status": "ok", "ready": True, "engine": "scripted", "model": "scripted-model",
        "detail": None, "version": None}
    scripted.ready = False
    resp = client.get("/health")
    assert resp.status_code == 503 and resp.json()["status"] == "loading"


def test_rename_search_and_truncate(client: TestClient, settings: Settings) -> None:
    put_agent(client, "a")
    with client.websocket_connect("/ws/chat") as ws:
        c1 = _chat(ws, "a", "about parsers")
        _chat(ws, "a", "and 100% of the LEXERS_", c1)
        c2 = _chat(ws, "a", "something else")

    # Rename: the stored title changes, the answer is the conversation as stored.
    resp = client.patch(f"/conversations/{c1}", json={"title": "Parsing notes"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["title"] == "Parsing notes" and resp.json()["id"] == c1
    assert client.get(f"/conversations/{c1}").json()["title"] == "Parsing notes"
    for body, status, code in [({"title": ""}, 422, "validation_error"),
                               ({"title": "x" * 201}, 422, "validation_error"),
                               ({"title": "t", "extra": 1}, 422, "validation_error"),
                               ({}, 422, "validation_error")]:
        resp = client.patch(f"/conversations/{c1}", json=body)
        assert (resp.status_code, resp.json()["error"]["code"]) == (status, code), body
    assert client.patch("/conversations/conv_none", json={"title": "t"}).status_code == 404
    assert client.get(f"/conversations/{c1}").json()["title"] == "Parsing notes"

    # Search: title or any turn, case-insensitive; LIKE wildcards are plain characters.
    def found(q: str) -> list[str]:
        resp = client.get("/conversations", params={"q": q})
        assert resp.status_code == 200, resp.text
        return [c["id"] for c in resp.json()]

    assert found("PARSING") == [c1]  # the new title
    assert found("lexers_") == [c1]  # a later user turn
    assert found("100%") == [c1]
    assert found("%") == [c1] and found("_") == [c1]
    assert found("ELSE") == [c2]
    assert found("nowhere") == []
    assert sorted(found("")) == sorted([c1, c2])  # empty: no filter
    assert client.get("/conversations", params={"q": "x" * 201}).status_code == 400

    # Truncate from the second user turn (seq 2): turns 2 and 3 go, 0 and 1 stay.
    assert client.delete(f"/conversations/{c1}/turns?from_seq=1").status_code == 400  # an answer
    assert client.delete(f"/conversations/{c1}/turns?from_seq=9").status_code == 400
    assert client.delete(f"/conversations/{c1}/turns").status_code == 400
    assert client.delete("/conversations/conv_none/turns?from_seq=0").status_code == 404
    assert len(client.get(f"/conversations/{c1}").json()["turns"]) == 4
    assert client.delete(f"/conversations/{c1}/turns?from_seq=2").status_code == 204
    turns = client.get(f"/conversations/{c1}").json()["turns"]
    assert [(t["seq"], t["role"], t["content"]) for t in turns][:1] == [(0, "user", "about parsers")]
    assert [t["seq"] for t in turns] == [0, 1]
    # The conversation goes on from there with the next seq.
    with client.websocket_connect("/ws/chat") as ws:
        _chat(ws, "a", "edited question", c1)
    with sqlite3.connect(settings.data_dir / "streaming_llm.db") as db:
        rows = db.execute("SELECT seq, role, content FROM turns WHERE conversation_id = ? "
                          "ORDER BY seq", (c1,)).fetchall()
    assert [r[:2] for r in rows] == [(0, "user"), (1, "assistant"), (2, "user"), (3, "assistant")]
    assert rows[2][2] == "edited question"


def test_deleting_an_agent_keeps_its_conversations(client: TestClient) -> None:
    # The documented choice (docs/storage.md): no foreign key, nothing cascades.
    put_agent(client, "gone")
    with client.websocket_connect("/ws/chat") as ws:
        conversation_id = _chat(ws, "gone", "remember me")
    assert client.delete("/agents/gone").status_code == 204
    assert [c["id"] for c in client.get("/conversations?agent_id=gone").json()] == [conversation_id]
    assert len(client.get(f"/conversations/{conversation_id}").json()["turns"]) == 2
    assert client.get(f"/conversations/{conversation_id}/export").status_code == 200
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "gone", "message": "still there?",
                      "conversation_id": conversation_id})
        assert ws.receive_json()["code"] == "agent_not_found"
    put_agent(client, "gone")  # the same id again: the conversation goes on
    with client.websocket_connect("/ws/chat") as ws:
        assert _chat(ws, "gone", "back", conversation_id) == conversation_id
    assert len(client.get(f"/conversations/{conversation_id}").json()["turns"]) == 4

"""The chat socket against the real app (lifespan, migrated SQLite) with a scripted engine."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import pytest
from starlette.testclient import TestClient

from streaming_llm.app import create_app
from streaming_llm.settings import Settings

from .conftest import BOTH_DATABASES, put_agent
from .database import stored_turns
from .fakes import ScriptedEngine


def recv_turn(ws: Any) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Read frames until the turn's terminal frame: (start, tokens, done-or-error)."""
    start = ws.receive_json()
    if start["type"] == "error":
        return {}, [], start
    assert start["type"] == "start", start
    tokens = []
    while True:
        frame = ws.receive_json()
        if frame["type"] == "token":
            tokens.append(frame)
        else:
            assert frame["type"] in ("done", "error"), frame
            return start, tokens, frame


@BOTH_DATABASES
def test_one_turn_streams_and_is_stored(client: TestClient, settings: Settings,
                                        scripted: ScriptedEngine) -> None:
    put_agent(client, "helper")
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "Hi there",
                      "request_id": "r1", "options": {"temperature": 0, "max_new_tokens": 7}})
        start, tokens, done = recv_turn(ws)
    assert start["request_id"] == "r1" and start["turn_id"].startswith("turn_")
    # The scripted engine never waits between pieces: what queued shares a frame (seq, count).
    assert "".join(t["token"] for t in tokens) == "Hello, world!"
    assert [t["seq"] for t in tokens] == [sum(t.get("count", 1) for t in tokens[:i])
                                          for i in range(len(tokens))]
    assert sum(t.get("count", 1) for t in tokens) == 4
    assert len(tokens) < 4  # (it never waits: the pieces went out while the first was queued)
    assert all(t["request_id"] == "r1" for t in tokens)
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert done["conversation_id"] == start["conversation_id"] and done["turn_id"] != start["turn_id"]
    assert done["usage"]["completion_tokens"] == 4
    conv = start["conversation_id"]
    assert stored_turns(settings, conv) == [(0, "user", "Hi there", None),
                                        (1, "assistant", "Hello, world!", "stop")]
    request = scripted.requests[0]
    assert request.max_new_tokens == 7 and request.options.temperature == 0
    assert [m.role for m in request.messages] == ["system", "user"]
    assert request.messages[0].content == "You help.\n\n# Notes\nBe brief."


@BOTH_DATABASES
def test_two_turns_continue_one_conversation(client: TestClient, settings: Settings,
                                             scripted: ScriptedEngine) -> None:
    put_agent(client, "helper")
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "first"})
        start1, _, _ = recv_turn(ws)
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "second",
                      "conversation_id": start1["conversation_id"]})
        start2, _, _ = recv_turn(ws)
    assert start1["request_id"].startswith("req_") and start1["request_id"] != start2["request_id"]
    assert start2["conversation_id"] == start1["conversation_id"]
    second = scripted.requests[1]
    assert [(m.role, m.content) for m in second.messages[1:]] == [
        ("user", "first"), ("assistant", "Hello, world!"), ("user", "second")]
    assert [r[:2] for r in stored_turns(settings, start1["conversation_id"])] == [
        (0, "user"), (1, "assistant"), (2, "user"), (3, "assistant")]
    conv = client.get(f"/conversations/{start1['conversation_id']}").json()
    assert [t["content"] for t in conv["turns"]] == ["first", "Hello, world!", "second", "Hello, world!"]
    assert conv["turns"][1]["usage"]["completion_tokens"] == 4


def test_frames_sent_while_generating_wait_their_turn(client: TestClient, settings: Settings,
                                                      scripted: ScriptedEngine) -> None:
    put_agent(client, "helper")
    scripted.delay = 0.01
    with client.websocket_connect("/ws/chat") as ws:
        for i in range(3):
            ws.send_json({"type": "chat", "agent_id": "helper", "message": f"m{i}",
                          "request_id": f"q{i}"})
        ws.send_json({"type": "ping", "request_id": "p"})
        order = []
        terminal = 0
        while terminal < 3:
            frame = ws.receive_json()
            if frame["type"] != "pong":
                order.append((frame["type"], frame["request_id"]))
            terminal += frame["type"] == "done"
    # Turns never interleave: each start..done block belongs to one request, in order.
    starts = [rid for kind, rid in order if kind == "start"]
    assert starts == ["q0", "q1", "q2"]
    current = None
    for kind, rid in order:
        if kind == "start":
            current = rid
        assert rid == current


@BOTH_DATABASES
def test_cancel_stores_partial_answer(client: TestClient, settings: Settings,
                                      scripted: ScriptedEngine) -> None:
    put_agent(client, "helper")
    scripted.pieces = [f"w{i} " for i in range(200)]
    scripted.delay = 0.01
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "long", "request_id": "c1"})
        assert ws.receive_json()["type"] == "start"
        received = [ws.receive_json()["token"] for _ in range(3)]
        ws.send_json({"type": "cancel", "request_id": "c1"})
        while True:
            frame = ws.receive_json()
            if frame["type"] == "token":
                received.append(frame["token"])
            else:
                break
        assert frame["type"] == "done" and frame["finish_reason"] == "cancelled"
        # The socket is still usable afterwards.
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong", "request_id": None}
    assert 3 <= len(received) < 200
    stored = stored_turns(settings, frame["conversation_id"])[-1]
    assert stored == (1, "assistant", "".join(received), "cancelled")
    assert scripted.closed_streams == 1


def test_cancel_without_request_id_and_unknown_request(client: TestClient,
                                                       scripted: ScriptedEngine) -> None:
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "cancel"})  # nothing running: a no-op
        ws.send_json({"type": "cancel", "request_id": "ghost"})
        frame = ws.receive_json()
        assert frame == {"type": "error", "request_id": "ghost", "code": "unknown_request",
                         "message": frame["message"]}


@pytest.mark.parametrize(("frame", "code", "needle"), [
    ("this is not json", "invalid_json", "not valid JSON"),
    ('{"type": "dance"}', "unknown_type", "dance"),
    ('{"agent_id": "helper", "message": "x"}', "invalid_frame", "type"),
    ('{"type": "chat", "message": "x"}', "invalid_frame", "agent_id"),
    ('{"type": "chat", "agent_id": "helper"}', "invalid_frame", "message"),
    ('{"type": "chat", "agent_id": "helper", "message": ""}', "invalid_frame", "message"),
    ('{"type": "chat", "agent_id": 7, "message": "x"}', "invalid_frame", "agent_id"),
    ('{"type": "chat", "agent_id": "../etc", "message": "x"}', "invalid_frame", "agent_id"),
    ('{"type": "chat", "agent_id": "helper", "message": "x", "options": {"temperature": 9}}',
     "invalid_frame", "options.temperature"),
    ('{"type": "chat", "agent_id": "helper", "message": "x", "options": {"max_new_tokens": 0}}',
     "invalid_frame", "options.max_new_tokens"),
    ('{"type": "chat", "agent_id": "helper", "message": "x", "options": {"top_p": -1}}',
     "invalid_frame", "options.top_p"),
    ('{"type": "chat", "agent_id": "helper", "message": "x", "options": {"stop": "x"}}',
     "invalid_frame", "options.stop"),
    ('{"type": "chat", "agent_id": "helper", "message": "x", "options": {"bogus": 1}}',
     "invalid_frame", "bogus"),
    ('{"type": "chat", "agent_id": "nobody", "message": "x", "request_id": "u"}',
     "agent_not_found", "nobody"),
    ('{"type": "chat", "agent_id": "helper", "message": "x", "conversation_id": "conv_missing"}',
     "conversation_not_found", "conv_missing"),
    ('{"type": "chat", "agent_id": "helper", "message": "x", "conversation_id": "../../x"}',
     "invalid_id", "conversation"),
])
def test_bad_frames_get_errors_and_store_nothing(client: TestClient, settings: Settings,
                                                 frame: str, code: str, needle: str) -> None:
    put_agent(client, "helper")
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_text(frame)
        error = ws.receive_json()
        assert error["type"] == "error" and error["code"] == code, error
        assert needle in error["message"]
        # The socket stays usable.
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "ok"})
        _, tokens, done = recv_turn(ws)
        assert done["type"] == "done" and tokens
    with sqlite3.connect(settings.data_dir / "streaming_llm.db") as db:
        assert db.execute("SELECT count(*) FROM conversations").fetchone() == (1,)
        assert db.execute("SELECT count(*) FROM turns").fetchone() == (2,)


def test_binary_frame_is_refused(client: TestClient) -> None:
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_bytes(b"\x00\x01")
        assert ws.receive_json()["code"] == "bad_frame"
        ws.send_json({"type": "ping", "request_id": "still-here"})
        assert ws.receive_json() == {"type": "pong", "request_id": "still-here"}


@BOTH_DATABASES
def test_conversation_of_another_agent_is_refused(client: TestClient) -> None:
    put_agent(client, "one")
    put_agent(client, "two")
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "one", "message": "hi"})
        start, _, _ = recv_turn(ws)
        ws.send_json({"type": "chat", "agent_id": "two", "message": "hi",
                      "conversation_id": start["conversation_id"]})
        assert ws.receive_json()["code"] == "conversation_agent_mismatch"


def test_duplicate_request_id_is_refused(client: TestClient, scripted: ScriptedEngine) -> None:
    put_agent(client, "helper")
    scripted.delay = 0.02
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "a", "request_id": "same"})
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "b", "request_id": "same"})
        frames = []
        while not frames or frames[-1]["type"] != "done":
            frames.append(ws.receive_json())
    errors = [f for f in frames if f["type"] == "error"]
    assert [e["code"] for e in errors] == ["duplicate_request_id"]


def test_engine_failure_stores_partial_with_error(client: TestClient, settings: Settings,
                                                  scripted: ScriptedEngine) -> None:
    put_agent(client, "helper")
    scripted.fail_after = 2
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "x", "request_id": "f"})
        start, tokens, error = recv_turn(ws)
    assert "".join(t["token"] for t in tokens) == "Hello, "
    assert error["type"] == "error" and error["code"] == "engine_error"
    assert error["turn_id"] and error["conversation_id"] == start["conversation_id"]
    assert stored_turns(settings, start["conversation_id"])[-1] == (1, "assistant", "Hello, ", "error")


def test_a_turn_the_engine_refuses_stores_nothing(client: TestClient, settings: Settings,
                                                  scripted: ScriptedEngine) -> None:
    from streaming_llm.errors import EngineUnavailable

    put_agent(client, "helper")
    scripted.refuse = EngineUnavailable("could not load model 'x'")
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "hi", "request_id": "r"})
        error = ws.receive_json()
        assert (error["type"], error["request_id"], error["code"]) == (
            "error", "r", "engine_unavailable")
        assert error["message"] == "could not load model 'x'"
        # An unknown agent is still named first, whatever the engine's state.
        ws.send_json({"type": "chat", "agent_id": "nobody", "message": "hi"})
        assert ws.receive_json()["code"] == "agent_not_found"
        scripted.refuse = None
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "now"})
        start, _, done = recv_turn(ws)
        assert done["type"] == "done"
    assert scripted.requests[-1].messages[-1].content == "now" and len(scripted.requests) == 1
    assert [r[2] for r in stored_turns(settings, start["conversation_id"])] == ["now", "Hello, world!"]
    with sqlite3.connect(settings.data_dir / "streaming_llm.db") as db:
        assert db.execute("SELECT count(*) FROM turns").fetchone() == (2,)


@pytest.mark.parametrize("grace_s", [0, 0.3])
def test_disconnect_mid_answer_stops_generation(make_settings: Callable[..., Settings],
                                                scripted: ScriptedEngine, grace_s: float) -> None:
    """Resume off (0), or nobody resuming within the grace: cancelled, the engine stopped."""
    settings = make_settings(resume_grace_s=grace_s)
    scripted.pieces = [f"w{i} " for i in range(500)]
    scripted.delay = 0.01
    with TestClient(create_app(settings, engine=scripted)) as client:
        put_agent(client, "helper")
        with client.websocket_connect("/ws/chat") as ws:
            ws.send_json({"type": "chat", "agent_id": "helper", "message": "long"})
            start = ws.receive_json()
            ws.receive_json()
        # Leaving the block closed the socket; the turn is stored as cancelled soon after.
        rows = _wait_answered(settings, start["conversation_id"])
    assert rows[1][3] == "cancelled" and len(rows[1][2].split()) < 500
    assert scripted.closed_streams == 1


def _wait_answered(settings: Settings, conversation_id: str) -> list[Any]:
    for _ in range(400):
        rows = stored_turns(settings, conversation_id)
        if len(rows) == 2:
            return rows
        threading.Event().wait(0.02)
    raise AssertionError("the answer was not stored")


def test_turn_ids_are_named_and_a_cancelled_turn_counts_its_prompt(
        make_settings: Callable[..., Settings]) -> None:
    # The echo engine (real, not scripted) reports its prompt size before the first token.
    with TestClient(create_app(make_settings(echo_delay_ms=20))) as client:
        put_agent(client, "helper")
        with client.websocket_connect("/ws/chat") as ws:
            ws.send_json({"type": "chat", "agent_id": "helper", "request_id": "c1",
                          "message": " ".join(f"w{i}" for i in range(300))})
            start = ws.receive_json()
            assert start["type"] == "start"
            assert start["user_turn_id"] == start["turn_id"]  # old name kept
            assert ws.receive_json()["type"] == "token"
            ws.send_json({"type": "cancel", "request_id": "c1"})
            while (done := ws.receive_json())["type"] == "token":
                pass
        assert done["finish_reason"] == "cancelled"
        assert done["answer_turn_id"] == done["turn_id"] != start["user_turn_id"]
        assert done["usage"]["prompt_tokens"] >= 300
        turns = client.get(f"/conversations/{done['conversation_id']}").json()["turns"]
        assert [t["id"] for t in turns] == [start["user_turn_id"], done["answer_turn_id"]]
        assert turns[1]["usage"]["prompt_tokens"] == done["usage"]["prompt_tokens"]


# --- resume and turn lifetime (issue 24) --------------------------------------------------------
def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def replayed(ws: Any, request_id: str, after_seq: int = -1) -> list[dict[str, Any]]:
    """Send ``resume`` and read its frames up to the ending (or the refusal)."""
    ws.send_json({"type": "resume", "request_id": request_id, "after_seq": after_seq})
    out = []
    while True:
        frame = ws.receive_json()
        out.append(frame)
        if frame["type"] in ("done", "error"):
            return out


def test_a_turn_resumed_after_it_ended_is_forgotten_after_its_grace(
        make_settings: Callable[..., Settings], scripted: ScriptedEngine) -> None:
    with TestClient(create_app(make_settings(resume_grace_s=0.3), engine=scripted)) as client:
        put_agent(client, "helper")
        resumable = client.app_state["services"].resumable
        with client.websocket_connect("/ws/chat") as ws:
            ws.send_json({"type": "chat", "agent_id": "helper", "message": "hi",
                          "request_id": "r1"})
            recv_turn(ws)
            assert replayed(ws, "r1")[-1]["type"] == "done"  # lost the done: resumed it
        wait_until(lambda: len(resumable) == 0)
        with client.websocket_connect("/ws/chat") as ws:
            assert replayed(ws, "r1")[-1]["code"] == "unknown_request"


def test_ended_answers_kept_for_a_resume_are_bounded_in_all(
        make_settings: Callable[..., Settings], scripted: ScriptedEngine) -> None:
    """STREAMING_LLM_RESUME_MAX_CHARS: past it the oldest ended answers are forgotten early."""
    settings = make_settings(resume_grace_s=60, resume_max_chars=30)
    with TestClient(create_app(settings, engine=scripted)) as client:
        put_agent(client, "helper")
        resumable = client.app_state["services"].resumable
        with client.websocket_connect("/ws/chat") as ws:
            for rid in ("r1", "r2", "r3"):  # 13 characters each ("Hello, world!")
                ws.send_json({"type": "chat", "agent_id": "helper", "message": "hi",
                              "request_id": rid})
                recv_turn(ws)
            assert (len(resumable), resumable.held_chars) == (2, 26)
            assert replayed(ws, "r1")[-1]["code"] == "unknown_request"
            assert replayed(ws, "r3")[-1]["type"] == "done"


def test_a_live_turn_cannot_be_taken_by_a_second_socket(
        client: TestClient, scripted: ScriptedEngine) -> None:
    """While its socket is connected a turn is refused to a resume from another socket
    (``turn_attached``), and the conversation's export does not show its request id."""
    put_agent(client, "helper")
    scripted.pieces = [f"w{i} " for i in range(40)]
    scripted.delay = 0.02
    with client.websocket_connect("/ws/chat") as owner:
        owner.send_json({"type": "chat", "agent_id": "helper", "message": "hi",
                         "request_id": "live"})
        start = owner.receive_json()
        exported = client.get(f"/conversations/{start['conversation_id']}/export?format=json")
        assert [t["request_id"] for t in exported.json()["turns"]] == [None]
        with client.websocket_connect("/ws/chat") as thief:
            [refused] = replayed(thief, "live")
            assert refused["code"] == "turn_attached", refused
            thief.send_json({"type": "cancel", "request_id": "live"})
            assert thief.receive_json()["code"] == "unknown_request"
        _, tokens, done = recv_turn_rest(owner)
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert "".join(t["token"] for t in tokens) == "".join(scripted.pieces)
    exported = client.get(f"/conversations/{start['conversation_id']}/export?format=json")
    assert [t["request_id"] for t in exported.json()["turns"]] == ["live", "live"]


def recv_turn_rest(ws: Any) -> tuple[None, list[dict[str, Any]], dict[str, Any]]:
    tokens = []
    while (frame := ws.receive_json())["type"] == "token":
        tokens.append(frame)
    return None, tokens, frame


def test_truncating_while_a_turn_streams_keeps_roles_alternating(
        client: TestClient, settings: Settings, scripted: ScriptedEngine) -> None:
    """``DELETE /conversations/{id}/turns?from_seq=`` waits for the running turn's answer to be
    stored (the conversation's lock), then truncates: never an answer stored after it."""
    put_agent(client, "helper")
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "first"})
        start, _, _ = recv_turn(ws)
        conversation = start["conversation_id"]
        scripted.pieces = [f"w{i} " for i in range(40)]
        scripted.delay = 0.02
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "second",
                      "conversation_id": conversation})
        assert ws.receive_json()["type"] == "start"
        assert client.delete(f"/conversations/{conversation}/turns?from_seq=2").status_code == 204
        _, _, done = recv_turn_rest(ws)
    assert done["type"] == "done"
    assert [(seq, role) for seq, role, _, _ in stored_turns(settings, conversation)] == [
        (0, "user"), (1, "assistant")]

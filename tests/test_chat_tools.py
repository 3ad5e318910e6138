"""Tool calls on the chat socket, and agents that declare tools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from streaming_llm.app import create_app
from streaming_llm.engines.base import ChatMessage, ToolCall
from streaming_llm.settings import Settings

from .conftest import put_agent
from .fakes import ScriptedEngine
from .test_chat import recv_turn

CALL = ["<tool_call>\n", '{"name": "get_weather", ', '"arguments": {"city": ', '"Paris"}}',
        "\n</tool_call>"]
WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
FUNCTION = {"type": "function", "function": WEATHER}


def test_a_call_and_its_result_on_the_socket(client: TestClient,
                                             scripted: ScriptedEngine) -> None:
    put_agent(client, "helper")
    scripted.pieces = ["Let me look.\n", *CALL]
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "weather in Paris?",
                      "tools": [FUNCTION], "request_id": "r1"})
        _, tokens, done = recv_turn(ws)
        assert done["type"] == "done" and done["finish_reason"] == "stop"
        [call] = done["tool_calls"]
        assert call["name"] == "get_weather" and call["id"].startswith("call_")
        assert json.loads(call["arguments"]) == {"city": "Paris"}
        # tokens are the text as the model wrote it, the call's block included
        assert "".join(t["token"] for t in tokens) == "".join(scripted.pieces)
        constraint = scripted.requests[0].constraint
        assert constraint is not None and constraint.kind == "tool_calls"
        assert constraint.tools == (WEATHER,) and constraint.lazy_trigger == "<tool_call>"

        scripted.pieces = ["It ", "is ", "sunny."]
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "",
                      "conversation_id": done["conversation_id"], "tools": [FUNCTION],
                      "tool_results": [{"tool_call_id": call["id"], "content": "sunny"}]})
        _, _, done2 = recv_turn(ws)
        assert done2["type"] == "done" and "tool_calls" not in done2
    replayed = scripted.requests[1].messages
    assert replayed[-2:] == [
        ChatMessage("assistant", "Let me look.",
                    (ToolCall(call["id"], "get_weather", '{"city": "Paris"}'),)),
        ChatMessage("tool", "sunny", tool_call_id=call["id"])]
    turns = client.get(f"/conversations/{done['conversation_id']}").json()["turns"]
    assert [(t["role"], t["content"]) for t in turns] == [
        ("user", "weather in Paris?"), ("assistant", "Let me look."), ("tool", "sunny"),
        ("assistant", "It is sunny.")]
    assert turns[1]["tool_calls"][0]["id"] == call["id"]
    assert turns[2]["tool_call_id"] == call["id"]


def test_a_result_for_an_unknown_call_is_refused_and_stores_nothing(
        client: TestClient, scripted: ScriptedEngine) -> None:
    put_agent(client, "helper")
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "hi"})
        _, _, done = recv_turn(ws)
        conversation_id = done["conversation_id"]
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "", "request_id": "r2",
                      "conversation_id": conversation_id,
                      "tool_results": [{"tool_call_id": "call_nope", "content": "x"}]})
        error = ws.receive_json()
        assert error["type"] == "error" and error["code"] == "unknown_tool_call"
        assert error["field"] == "tool_results[0].tool_call_id"
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "x",
                      "tool_choice": {"type": "function", "function": {"name": "nope"}},
                      "tools": [FUNCTION]})
        error = ws.receive_json()
        assert error["code"] == "unknown_tool" and error["field"] == "tool_choice.function.name"
    turns = client.get(f"/conversations/{conversation_id}").json()["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant"]


def test_agents_declare_tools(client: TestClient, scripted: ScriptedEngine,
                              settings: Settings) -> None:
    agent = put_agent(client, "helper", tools=[WEATHER])  # type: ignore[arg-type]
    assert agent["tools"] == [WEATHER]
    assert client.get("/agents/helper").json()["tools"] == [WEATHER]
    text = (settings.resolved_agents_dir / "helper.md").read_text()
    assert 'tools: [{"name":"get_weather"' in text
    with client.websocket_connect("/ws/chat") as ws:
        for extra in ({}, {"tool_choice": "none"}, {"tools": [
                {"type": "function", "function": {"name": "other"}}]}):
            ws.send_json({"type": "chat", "agent_id": "helper", "message": "hi", **extra})
            assert recv_turn(ws)[2]["type"] == "done"
    agents_tools, none, overridden = (r.constraint for r in scripted.requests)
    assert agents_tools is not None and agents_tools.tools == (WEATHER,)
    assert none is None
    assert overridden is not None and [t["name"] for t in overridden.tools] == ["other"]


@pytest.mark.parametrize(("tools", "needle"), [
    ([WEATHER, WEATHER], "tools[1].name"),
    ([{"name": "bad name"}], "tools[0].name"),
    ([{"name": "x", "oops": 1}], "oops"),
])
def test_bad_agent_tools_are_refused(client: TestClient, tools: list[Any], needle: str) -> None:
    resp = client.put("/agents/helper", json={"name": "Helper", "tools": tools})
    assert resp.status_code in (400, 422) and needle in resp.json()["error"]["message"]
    assert client.get("/agents/helper").status_code == 404


def test_agent_files_carry_tools(settings: Settings, tmp_path: Path) -> None:
    agents_dir = settings.resolved_agents_dir
    agents_dir.mkdir(parents=True, exist_ok=True)
    (agents_dir / "writer.md").write_text(
        '---\nid: writer\nname: "Writer"\ntools: [{"name": "save", "parameters": '
        '{"type": "object"}}]\n---\n# Notes\n')
    (agents_dir / "broken.md").write_text('---\nname: "Broken"\ntools: [{"name": 7}]\n---\n')
    with TestClient(create_app(settings, engine=ScriptedEngine())) as client:
        assert client.get("/agents/writer").json()["tools"] == [
            {"name": "save", "description": "", "parameters": {"type": "object"}}]
        assert client.get("/agents/broken").status_code == 404  # skipped with a warning

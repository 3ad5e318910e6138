"""Tools through the ``ollama`` and ``openai`` engines, end to end, one suite for both.

A real server of ours (``streaming-llm serve``, engine ``ollama`` or ``openai``) in front of a fake
upstream that speaks that upstream's real protocol (:mod:`streaming_llm.testing.fake_ollama`,
:mod:`streaming_llm.testing.fake_openai`), driven by the official ``openai`` and ``anthropic``
packages and a WebSocket client. The fake records what it was sent, so each test also checks
that tools, calls and results went upstream in the upstream's own fields, and answers with calls
in its own fields (OpenAI's streamed ``delta.tool_calls``, Ollama's ``message.tool_calls``): the
client must get the same shapes as from the local engine whichever upstream made the call.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai
import pytest
from websockets.sync.client import connect

from streaming_llm.testing.fake_ollama import ChatScript, FakeOllama
from streaming_llm.testing.fake_openai import CompletionScript, FakeOpenAI
from streaming_llm.testing.fake_server import FakeServer, Script

from .server import ServerProcess, start_server

pytestmark = pytest.mark.e2e

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
PARIS = {"name": "get_weather", "arguments": {"city": "Paris", "units": "metric"}}


@dataclass
class Upstream:
    """Our server in front of one fake upstream."""

    kind: str  # "ollama" or "openai"
    fake: FakeServer
    server: ServerProcess

    def answer(self, tokens: list[str], calls: Sequence[dict[str, Any]] = ()) -> None:
        """How the fake answers the next chats: these text pieces, then these calls."""
        script: type[Script] = ChatScript if self.kind == "ollama" else CompletionScript
        self.fake.script = script(tokens=tokens, tool_calls=calls)  # type: ignore[attr-defined]

    @property
    def sent(self) -> dict[str, Any]:
        """The body of the last chat the fake got."""
        return self.fake.chats[-1].body


@pytest.fixture(scope="module", params=["ollama", "openai"])
def upstream(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    kind = request.param
    with (FakeOllama() if kind == "ollama" else FakeOpenAI()) as fake:
        env = ({"STREAMING_LLM_OLLAMA_URL": fake.url, "STREAMING_LLM_OLLAMA_MODEL": "llama3.2"}
               if kind == "ollama" else
               {"STREAMING_LLM_OPENAI_BASE_URL": fake.url + "/v1",
                "STREAMING_LLM_OPENAI_MODEL": "fake-model"})
        with start_server(tmp_path_factory.mktemp(f"tools-{kind}"),
                          {"STREAMING_LLM_ENGINE": kind, **env}) as server:
            resp = httpx.put(f"{server.base_url}/agents/helper",
                             json={"name": "Helper", "system_prompt": "You help."})
            assert resp.status_code == 201, resp.text
            yield Upstream(kind, fake, server)


@pytest.fixture
def oai(upstream: Upstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=upstream.server.base_url + "/v1", api_key="unused",
                       max_retries=0) as client:
        yield client


def test_a_required_call_comes_back_as_tool_calls(upstream: Upstream, oai: openai.OpenAI) -> None:
    upstream.answer([], [PARIS])
    completion = oai.chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[WEATHER, TIME], tool_choice="required")
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == PARIS["arguments"]
    sent = upstream.sent  # the tools went in the upstream's own field, not into the prompt
    assert sent["tools"][0] == WEATHER
    assert [(t["type"], t["function"]["name"]) for t in sent["tools"]] == [
        ("function", "get_weather"), ("function", "get_time")]
    assert "<tools>" not in json.dumps(sent["messages"])
    if upstream.kind == "openai":
        assert sent["tool_choice"] == "required"


def test_streamed_deltas_assemble_into_the_calls(upstream: Upstream, oai: openai.OpenAI) -> None:
    upstream.answer(["Checking", " both."], [PARIS, {"name": "get_time", "arguments": {}}])
    stream = oai.chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "weather and time?"}],
        tools=[WEATHER, TIME], stream=True)
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Checking both."
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for tc in delta.tool_calls or []:
            assert tc.function is not None
            if tc.index not in calls:  # OpenAI's order: id, type and name first
                assert tc.id and tc.type == "function" and tc.function.name
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:
                assert tc.id is None and tc.function.name is None
            calls[tc.index]["arguments"] += tc.function.arguments or ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", PARIS["arguments"]), ("get_time", {})]
    assert calls[0]["id"] != calls[1]["id"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    if upstream.kind == "openai":
        assert upstream.sent["tool_choice"] == "auto"


def test_a_tool_result_continues_and_goes_upstream_natively(upstream: Upstream,
                                                             oai: openai.OpenAI) -> None:
    upstream.answer([], [PARIS])
    asked = [{"role": "user", "content": "weather in Paris?"}]
    message = oai.chat.completions.create(model="helper", messages=asked, tools=[WEATHER],
                                          tool_choice="required").choices[0].message
    [call] = message.tool_calls or []
    upstream.answer(["Sunny", ", 21 C."])
    completion = oai.chat.completions.create(
        model="helper", tools=[WEATHER], messages=[
            *asked, message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}])
    assert completion.choices[0].message.content == "Sunny, 21 C."
    assert completion.choices[0].finish_reason == "stop"
    assistant, result = upstream.sent["messages"][-2:]
    if upstream.kind == "openai":
        assert assistant == {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": "get_weather", "arguments": call.function.arguments}}]}
        assert result == {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}
    else:  # Ollama: arguments as an object, the result names its tool
        assert assistant == {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": PARIS["arguments"]}}]}
        assert result == {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"}


def test_anthropic_messages_get_a_tool_use_block(upstream: Upstream) -> None:
    upstream.answer(["Let me see."], [PARIS])
    with anthropic.Anthropic(base_url=upstream.server.base_url, api_key="unused",
                             max_retries=0) as claude:
        message = claude.messages.create(
            model="helper", max_tokens=256, tool_choice={"type": "any"},
            messages=[{"role": "user", "content": "weather in Paris?"}],
            tools=[{"name": "get_weather", "description": "The weather in a city.",
                    "input_schema": WEATHER["function"]["parameters"]}])  # type: ignore[index]
    assert message.stop_reason == "tool_use"
    text, use = message.content
    assert text.type == "text" and text.text == "Let me see."
    assert use.type == "tool_use" and use.name == "get_weather"
    assert use.input == PARIS["arguments"]


def socket_turn(upstream: Upstream, **frame: Any) -> list[dict[str, Any]]:
    """One chat frame on a new socket; its events up to ``done`` or ``error``."""
    with connect(upstream.server.ws_url) as ws:
        ws.send(json.dumps({"type": "chat", "agent_id": "helper", **frame}))
        events = [json.loads(ws.recv(timeout=20))]
        while events[-1]["type"] not in ("done", "error"):
            events.append(json.loads(ws.recv(timeout=20)))
    return events


def test_the_socket_stores_the_call_and_its_result(upstream: Upstream) -> None:
    upstream.answer(["Let me look."], [PARIS])
    done = socket_turn(upstream, message="weather in Paris?", tools=[WEATHER])[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    [call] = done["tool_calls"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == PARIS["arguments"]
    upstream.answer(["Sunny."])
    conversation = done["conversation_id"]
    again = socket_turn(upstream, message="", conversation_id=conversation, tools=[WEATHER],
                        tool_results=[{"tool_call_id": call["id"], "content": "sunny"}])[-1]
    assert again["type"] == "done" and "tool_calls" not in again
    result = upstream.sent["messages"][-1]
    assert result["role"] == "tool" and result["content"] == "sunny"
    turns = httpx.get(f"{upstream.server.base_url}/conversations/{conversation}").json()["turns"]
    assert [(t["role"], t["content"]) for t in turns] == [
        ("user", "weather in Paris?"), ("assistant", "Let me look."), ("tool", "sunny"),
        ("assistant", "Sunny.")]
    assert turns[1]["tool_calls"] == [call] and turns[2]["tool_call_id"] == call["id"]


@pytest.mark.parametrize("call", [
    {"name": "format_disk", "arguments": {}},
    {"name": "get_weather", "arguments": "Paris"},
], ids=["unknown-tool", "arguments-not-an-object"])
def test_a_malformed_upstream_call_is_an_error_and_nothing_wrong_is_stored(
        upstream: Upstream, oai: openai.OpenAI, call: dict[str, Any]) -> None:
    upstream.answer(["Hm."], [call])
    with pytest.raises(openai.APIStatusError) as info:
        oai.chat.completions.create(
            model="helper", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER])
    assert info.value.status_code == 502 and info.value.code == "engine_protocol_error"
    assert f"{upstream.kind} sent a tool call that" in info.value.message

    events = socket_turn(upstream, message="weather?", tools=[WEATHER])  # a stored turn
    assert events[-1]["code"] == "engine_protocol_error"
    assert "".join(e["token"] for e in events if e["type"] == "token") == "Hm."
    conversation = events[0]["conversation_id"]
    turns = httpx.get(f"{upstream.server.base_url}/conversations/{conversation}").json()["turns"]
    assert [(t["role"], t["content"], t["finish_reason"]) for t in turns] == [
        ("user", "weather?", None), ("assistant", "Hm.", "error")]
    assert "tool_calls" not in turns[1]

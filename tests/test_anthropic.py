"""``POST /v1/messages`` with the official ``anthropic`` package against a real server (echo
engine): plain and streamed text, a tool_use round trip, stored conversations, errors, keys."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from .server import ServerProcess, start_server

CALL = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "units": '
        '"metric"}}\n</tool_call>')
WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
KEY = "anthropic-test-key-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "1",
           "STREAMING_LLM_API_KEY": KEY}
    with start_server(tmp_path_factory.mktemp("anthropic"), env) as server:
        resp = httpx.put(f"{server.base_url}/agents/echoer", headers={"x-api-key": KEY},
                         json={"name": "Echoer", "system_prompt": "Repeat after the user."})
        assert resp.status_code == 201, resp.text
        yield server


@pytest.fixture
def claude(server: ServerProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0) as client:
        yield client


def test_plain_text(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="echoer", max_tokens=64, system="Be terse.",
        messages=[{"role": "user", "content": "hello there"},
                  {"role": "assistant", "content": "earlier"},
                  {"role": "user", "content": [{"type": "text", "text": "hello messages"}]}])
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "echoer" and message.id.startswith("msg_")
    assert [(b.type, b.text) for b in message.content] == [("text", "hello messages")]  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    # agent + request system (4 + 2 words), the history (3) and the new message (2)
    assert message.usage.input_tokens == 11 and message.usage.output_tokens == 2


def test_max_tokens_cuts_the_answer(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model="echoer", max_tokens=2,
                                     messages=[{"role": "user", "content": "a b c d"}])
    assert message.stop_reason == "max_tokens" and message.content[0].text == "a b "  # type: ignore[union-attr]


def test_streamed_text(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model="echoer", max_tokens=64,
                                messages=[{"role": "user", "content": "one two three"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_start") == 1 and kinds.count("content_block_stop") == 1
    deltas = [e for e in events if e.type == "content_block_delta"]
    assert len(deltas) == 3 and all(d.delta.type == "text_delta" for d in deltas)  # type: ignore[union-attr]
    assert final.content[0].text == "one two three"  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 3 and final.usage.input_tokens == 7


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_use_round_trip(claude: anthropic.Anthropic, stream: bool) -> None:
    request: dict[str, Any] = {"model": "echoer", "max_tokens": 256, "tools": [WEATHER],
                               "messages": [{"role": "user", "content": f"Let me see. {CALL}"}]}
    if stream:
        with claude.messages.stream(**request) as events:
            deltas = [e for e in events if e.type == "content_block_delta"]
            message = events.get_final_message()
        json_deltas = [d for d in deltas if d.delta.type == "input_json_delta"]
        assert len(json_deltas) > 2  # the input came in pieces
    else:
        message = claude.messages.create(**request)
    assert message.stop_reason == "tool_use"
    text, use = message.content
    assert text.type == "text" and text.text == "Let me see."
    assert use.type == "tool_use" and use.name == "get_weather"
    assert use.input == {"city": "Paris", "units": "metric"} and use.id.startswith("call_")

    answer = claude.messages.create(
        model="echoer", max_tokens=256, tools=[WEATHER],
        messages=[*request["messages"],
                  {"role": "assistant", "content": [b.model_dump() for b in message.content]},
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]}])
    # the echo engine repeats the last message it was sent: the tool's result
    assert answer.content[0].text == "sunny, 21 C" and answer.stop_reason == "end_turn"  # type: ignore[union-attr]


def test_a_stored_conversation(claude: anthropic.Anthropic, server: ServerProcess) -> None:
    raw = claude.messages.with_raw_response.create(
        model="echoer", max_tokens=64, tools=[WEATHER], tool_choice={"type": "any"},
        messages=[{"role": "user", "content": CALL}], extra_headers={"X-Conversation-Id": "new"})
    conversation_id = raw.headers["x-conversation-id"]
    [use] = raw.parse().content
    assert use.type == "tool_use"
    headers = {"X-Conversation-Id": conversation_id}
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(
            model="echoer", max_tokens=64, extra_headers=headers,
            messages=[{"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}])
    assert "messages[0].content[0].tool_use_id" in info.value.message
    answer = claude.messages.create(
        model="echoer", max_tokens=64, extra_headers=headers,
        messages=[{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": use.id, "content": [
                {"type": "text", "text": "sunny"}]},
            {"type": "text", "text": "and tomorrow?"}]}])
    assert answer.content[0].text == "and tomorrow?"  # type: ignore[union-attr]
    turns = httpx.get(f"{server.base_url}/conversations/{conversation_id}",
                      headers={"x-api-key": KEY}).json()["turns"]
    assert [(t["role"], t["content"]) for t in turns] == [
        ("user", CALL), ("assistant", ""), ("tool", "sunny"), ("user", "and tomorrow?"),
        ("assistant", "and tomorrow?")]
    assert turns[1]["tool_calls"][0]["id"] == use.id
    assert json.loads(turns[1]["tool_calls"][0]["arguments"]) == use.input


@pytest.mark.parametrize(("request_", "status", "kind", "field"), [
    ({"model": "nope"}, 404, "not_found_error", "model"),
    ({"temperature": 1.5}, 400, "invalid_request_error", "temperature"),
    ({"tool_choice": {"type": "tool", "name": "nope"}}, 400, "invalid_request_error",
     "tool_choice.name"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://x"}}]}]}, 400,
     "invalid_request_error", "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     400, "invalid_request_error", "messages[1]"),
    # a user message of no blocks and no system: nothing to answer (found by schemathesis: 500)
    ({"messages": [{"role": "user", "content": []}]}, 400, "invalid_request_error",
     "messages[0]"),
])
def test_errors_have_anthropic_shape(server: ServerProcess, request_: dict[str, Any],
                                     status: int, kind: str, field: str) -> None:
    body = {"model": "echoer", "max_tokens": 16, "tools": [WEATHER],
            "messages": [{"role": "user", "content": "hi"}], **request_}
    resp = httpx.post(f"{server.base_url}/v1/messages", json=body, headers={"x-api-key": KEY})
    assert resp.status_code == status
    error = resp.json()
    assert error["type"] == "error" and set(error["error"]) == {"type", "message"}
    assert error["error"]["type"] == kind and field in error["error"]["message"]


def test_keys_by_x_api_key_or_bearer(server: ServerProcess, tmp_path: Path) -> None:
    body = {"model": "echoer", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    url = f"{server.base_url}/v1/messages"
    assert httpx.post(url, json=body, headers={"x-api-key": KEY}).status_code == 200
    assert httpx.post(url, json=body,
                      headers={"authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.post(url, json=body, headers={"x-api-key": "wrong" * 5}).status_code == 401
    with anthropic.Anthropic(base_url=server.base_url, api_key="wrong" * 5,
                             max_retries=0) as bad, pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(**body)

"""Tools over ``/v1/chat/completions`` with the official ``openai`` package against a real server.

The echo engine repeats the user's message, so a user message holding a ``<tool_call>`` block is
answered with that call: the whole path (parsing, OpenAI's shapes, streaming, storage) runs
without a model. The local engine's constrained decoding writes the same blocks
(tests/test_local_tools_e2e.py, tests/test_structured_e2e.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from .server import ServerProcess, start_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
CALL = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "units": '
        '"metric"}}\n</tool_call>')


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "1",
           "STREAMING_LLM_MAX_TOOLS": "4"}
    with start_server(tmp_path_factory.mktemp("openai-tools"), env) as server:
        resp = httpx.put(f"{server.base_url}/agents/echoer",
                         json={"name": "Echoer", "system_prompt": "Repeat after the user."})
        assert resp.status_code == 201, resp.text
        yield server


@pytest.fixture
def oai(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.mark.parametrize("choice", [
    "required", "auto", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_call_comes_back_as_tool_calls(oai: openai.OpenAI, choice: Any) -> None:
    completion = oai.chat.completions.create(
        model="echoer", messages=[{"role": "user", "content": CALL}], tools=[WEATHER, TIME],
        tool_choice=choice)
    [choice_] = completion.choices
    assert choice_.finish_reason == "tool_calls"
    message = choice_.message
    assert message.content is None
    [call] = message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "units": "metric"}


def test_auto_may_answer_in_text(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model="echoer", messages=[{"role": "user", "content": "just words"}], tools=[WEATHER])
    [choice] = completion.choices
    assert choice.message.content == "just words" and choice.message.tool_calls is None
    assert choice.finish_reason == "stop"


def test_no_tools_means_no_calls(oai: openai.OpenAI) -> None:
    for kwargs in ({}, {"tools": [WEATHER], "tool_choice": "none"}):
        completion = oai.chat.completions.create(
            model="echoer", messages=[{"role": "user", "content": CALL}], **kwargs)
        assert completion.choices[0].message.content == CALL
        assert completion.choices[0].message.tool_calls is None


def test_streamed_deltas_assemble_into_a_call(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="echoer", messages=[{"role": "user", "content": f"Checking. {CALL}\n{CALL}"}],
        tools=[WEATHER], tool_choice="required", stream=True)
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == "Checking."
    calls: dict[int, dict[str, Any]] = {}
    pieces: dict[int, int] = {}
    for delta in deltas:
        for tc in delta.tool_calls or []:
            if tc.index not in calls:  # OpenAI's order: id, type and name come first
                assert tc.id and tc.type == "function" and tc.function and tc.function.name
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:
                assert tc.id is None and tc.function and tc.function.name is None
            calls[tc.index]["arguments"] += tc.function.arguments or ""
            pieces[tc.index] = pieces.get(tc.index, 0) + 1
    assert sorted(calls) == [0, 1] and calls[0]["id"] != calls[1]["id"]
    for call in calls.values():
        assert call["name"] == "get_weather"
        assert json.loads(call["arguments"]) == {"city": "Paris", "units": "metric"}
    assert min(pieces.values()) > 2  # the arguments came in pieces
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_false_keeps_one_call(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model="echoer", messages=[{"role": "user", "content": f"{CALL}\n{CALL}"}],
        tools=[WEATHER], parallel_tool_calls=False)
    assert len(completion.choices[0].message.tool_calls or []) == 1


def _call(oai: openai.OpenAI, **kwargs: Any) -> tuple[Any, Any]:
    raw = oai.chat.completions.with_raw_response.create(
        model="echoer", messages=[{"role": "user", "content": CALL}], tools=[WEATHER], **kwargs)
    completion = raw.parse()
    return raw, completion.choices[0].message


def test_a_tool_result_continues_the_chat(oai: openai.OpenAI) -> None:
    _, message = _call(oai)
    [call] = message.tool_calls
    history = [{"role": "user", "content": CALL}, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    completion = oai.chat.completions.create(model="echoer", messages=history, tools=[WEATHER])
    # the echo engine repeats the last message it was sent: the tool's result
    assert completion.choices[0].message.content == "sunny, 21 C"
    assert completion.choices[0].finish_reason == "stop"

    history[2]["tool_call_id"] = "call_unknown"
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="echoer", messages=history, tools=[WEATHER])
    assert info.value.body["param"] == "messages[2].tool_call_id"  # type: ignore[index]
    assert info.value.code == "unknown_tool_call"


def test_a_stored_conversation_keeps_calls_and_results(oai: openai.OpenAI,
                                                       server: ServerProcess) -> None:
    raw, message = _call(oai, extra_headers={"X-Conversation-Id": "new"})
    conversation_id = raw.headers["x-conversation-id"]
    [call] = message.tool_calls
    header = {"X-Conversation-Id": conversation_id}
    with pytest.raises(openai.BadRequestError) as info:  # nothing stored for a wrong id
        oai.chat.completions.create(
            model="echoer", tools=[WEATHER], extra_headers=header,
            messages=[{"role": "tool", "tool_call_id": "call_nope", "content": "x"}])
    assert info.value.body["param"] == "messages[0].tool_call_id"  # type: ignore[index]
    completion = oai.chat.completions.create(
        model="echoer", tools=[WEATHER], extra_headers=header,
        messages=[{"role": "user", "content": CALL}, message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}])
    assert completion.choices[0].message.content == "sunny, 21 C"

    turns = httpx.get(f"{server.base_url}/conversations/{conversation_id}").json()["turns"]
    assert [(t["role"], t["content"]) for t in turns] == [
        ("user", CALL), ("assistant", ""), ("tool", "sunny, 21 C"),
        ("assistant", "sunny, 21 C")]
    assert turns[1]["finish_reason"] == "stop"
    assert turns[1]["tool_calls"] == [{"id": call.id, "name": "get_weather",
                                       "arguments": call.function.arguments}]
    assert turns[2]["tool_call_id"] == call.id
    assert "tool_calls" not in turns[0] and "tool_call_id" not in turns[3]
    export = f"{server.base_url}/conversations/{conversation_id}/export"
    exported = httpx.get(export, params={"format": "json"}).json()["turns"]
    assert exported[1]["tool_calls"] == turns[1]["tool_calls"]
    assert exported[2]["tool_call_id"] == call.id
    markdown = httpx.get(export, params={"format": "markdown"}).text
    assert f"Calls **get_weather** (`{call.id}`):" in markdown
    assert "### Tool result · " in markdown and f"For call `{call.id}`:" in markdown
    # the same result twice: that call has its answer already
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(
            model="echoer", tools=[WEATHER], extra_headers=header,
            messages=[{"role": "tool", "tool_call_id": call.id, "content": "again"}])


@pytest.mark.parametrize(("kwargs", "param", "code"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "unknown_tool"),
    ({"tools": [WEATHER, TIME, *({"type": "function", "function": {"name": f"t{i}"}}
                                 for i in range(3))]}, "tools", "too_many_tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].name", "invalid_tools"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice", "invalid_tools"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {
        "description": "y" * 70_000}}}]}, "tools", "tools_too_large"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id",
     "invalid_request"),
])
def test_tool_errors_name_the_field(oai: openai.OpenAI, kwargs: dict[str, Any], param: str,
                                    code: str) -> None:
    request: dict[str, Any] = {"model": "echoer", "tools": [WEATHER],
                               "messages": [{"role": "user", "content": "hi"}]}
    request.update(kwargs)
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(**request)
    assert info.value.body["param"] == param and info.value.code == code  # type: ignore[index]


def test_tools_and_a_response_format_are_refused_together(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(
            model="echoer", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
            response_format={"type": "json_object"})
    assert info.value.body["param"] == "response_format"  # type: ignore[index]
    completion = oai.chat.completions.create(  # tool_choice none: the response_format stays
        model="echoer", messages=[{"role": "user", "content": '{"a": 1}'}], tools=[WEATHER],
        tool_choice="none", response_format={"type": "json_object"})
    assert completion.choices[0].message.content == '{"a": 1}'


"""Structured output and tool calls end to end: a real server on the default model
(SmolLM2-135M-Instruct), the official ``openai`` client, answers sampled at temperature 0.8 that
always parse and validate (tests/test_openai_tools.py has the API's shapes on the echo engine)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from streaming_llm.engines.local.prompts import template_tool_format

from .server import ServerProcess, http, start_server

pytestmark = pytest.mark.e2e

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Tokyo", "Lima"]},
        "likes_tea": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "likes_tea"],
    "additionalProperties": False,
}
WEATHER: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
ADD: dict[str, Any] = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 999},
        "b": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["a", "b"], "additionalProperties": False}}}
TOOLS: list[Any] = [WEATHER, ADD]
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris? Use a tool."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           default_models_dir: Path) -> Iterator[ServerProcess]:
    env = {"STREAMING_LLM_ENGINE": "local", "STREAMING_LLM_MODELS_DIR": str(default_models_dir),
           "STREAMING_LLM_DEVICE": "cpu"}
    with start_server(tmp_path_factory.mktemp("structured"), env, timeout=300) as server:
        status, _ = http("PUT", server.base_url + "/agents/clerk", {
            "name": "Clerk", "system_prompt": "You are a helpful assistant who answers in JSON."})
        assert status == 201
        yield server


@pytest.fixture
def oai(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                       timeout=300) as client:
        yield client


def answers(oai: openai.OpenAI, n: int, **request: Any) -> list[Any]:
    """``n`` completions at once (they decode in one batch), seeds 0..n-1."""
    def one(seed: int) -> Any:
        return oai.chat.completions.create(model="clerk", temperature=0.8, seed=seed, **request)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_json_schema_answers_sampled_at_0_8_all_validate(oai: openai.OpenAI) -> None:
    completions = answers(oai, 8, max_tokens=80, response_format={
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        messages=[{"role": "user", "content": "Invent a person: name, age, city, tea?"}])
    texts = [c.choices[0].message.content for c in completions]
    for completion, text in zip(completions, texts, strict=True):
        jsonschema.validate(json.loads(text), PERSON)
        assert completion.choices[0].finish_reason == "stop"  # ends at the closing brace
    assert len(set(texts)) > 1  # sampled


def test_json_object_answers_parse(oai: openai.OpenAI) -> None:
    completions = answers(oai, 4, max_tokens=120, response_format={"type": "json_object"},
                          messages=[{"role": "user",
                                     "content": "Give the capital of France as JSON."}])
    for completion in completions:
        choice = completion.choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:  # cut by max_tokens: what was generated, a prefix of an object
            assert choice.finish_reason == "length"
            assert choice.message.content.startswith("{")
    assert any(c.choices[0].finish_reason == "stop" for c in completions)


def test_a_broken_schema_is_a_400_naming_response_format(oai: openai.OpenAI,
                                                         server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(
            model="clerk", messages=[{"role": "user", "content": "hi"}],
            extra_body={"metadata": {"conversation_id": "new"}},
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "integer",
                                                                     "minimum": "zero"}}})
    assert caught.value.param == "response_format"
    assert caught.value.code == "invalid_response_format"
    assert http("GET", server.base_url + "/conversations")[1] == []  # nothing stored


def check_call(name: str, arguments: str) -> None:
    """A call names one of TOOLS and its arguments validate against that tool's parameters."""
    [tool] = [t["function"] for t in TOOLS if t["function"]["name"] == name]
    jsonschema.validate(json.loads(arguments), tool["parameters"])


def test_required_and_named_calls_sampled_at_0_8_all_validate(oai: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "add"}}
    choices: list[Any] = ["required", "required", named, named]  # decoded in one batch

    def one(seed: int) -> Any:
        return oai.chat.completions.create(
            model="clerk", temperature=0.8, seed=seed, max_tokens=80, messages=ASK, tools=TOOLS,
            tool_choice=choices[seed], parallel_tool_calls=False)

    with ThreadPoolExecutor(len(choices)) as pool:
        completions = list(pool.map(one, range(len(choices))))
    for choice, completion in zip(choices, completions, strict=True):
        [choice_] = completion.choices
        assert choice_.finish_reason == "tool_calls" and choice_.message.content is None
        [call] = choice_.message.tool_calls or []
        check_call(call.function.name, call.function.arguments)
        if choice is named:
            assert call.function.name == "add"


def test_auto_answers_are_text_or_valid_calls(oai: openai.OpenAI) -> None:
    """With ``auto`` the model writes text, or a call that is constrained once it starts (the
    135M model answers this in text; tests/test_openai_tools.py has a model that calls)."""
    completions = answers(oai, 4, max_tokens=32, messages=ASK, tools=TOOLS)
    for completion in completions:
        [choice] = completion.choices
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            for call in choice.message.tool_calls:
                if choice.finish_reason == "tool_calls":
                    check_call(call.function.name, call.function.arguments)
        else:
            assert choice.finish_reason in ("stop", "length") and choice.message.content
            assert "<tool_call>" not in choice.message.content


def test_streamed_call_deltas_assemble_into_a_valid_call(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(model="clerk", messages=ASK, tools=TOOLS,
                                         tool_choice="required", parallel_tool_calls=False,
                                         temperature=0.8, seed=3, max_tokens=80, stream=True)
    chunks = list(stream)
    call: dict[str, str] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            assert delta.index == 0 and delta.function is not None
            if not call:  # OpenAI's order: id, type and name first
                assert delta.id and delta.type == "function" and delta.function.name
                call = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:
                assert delta.id is None and delta.function.name is None
            call["arguments"] += delta.function.arguments or ""
    check_call(call["name"], call["arguments"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_a_tool_result_continues_the_chat(oai: openai.OpenAI, server: ServerProcess) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model="clerk", messages=ASK, tools=TOOLS, tool_choice={
            "type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False,
        temperature=0.8, seed=1, max_tokens=80, extra_headers={"X-Conversation-Id": "new"})
    conversation_id = raw.headers["x-conversation-id"]
    message = raw.parse().choices[0].message
    [call] = message.tool_calls or []
    history = [*ASK, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees."}]
    completion = oai.chat.completions.create(
        model="clerk", messages=history, tools=TOOLS, tool_choice="none", temperature=0.8,
        seed=1, max_tokens=40, extra_headers={"X-Conversation-Id": conversation_id})
    [choice] = completion.choices
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert choice.message.content
    turns = http("GET", f"{server.base_url}/conversations/{conversation_id}")[1]["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant", "tool", "assistant"]
    assert turns[1]["tool_calls"] == [{"id": call.id, "name": "get_weather",
                                       "arguments": call.function.arguments}]
    assert turns[2]["tool_call_id"] == call.id
    assert turns[3]["content"] == choice.message.content


def test_the_default_models_template_gets_the_generic_tool_form(default_models_dir: Path) -> None:
    """SmolLM2's chat template ignores ``tools``: its tools are written in the generic form."""
    from transformers import AutoTokenizer

    # The converted model (torch runtime) and, once a llama.cpp server ran, its kept tokenizer.
    folders = [p for p in default_models_dir.iterdir()
               if p.is_dir() and ".partial-" not in p.name]
    assert folders
    for folder in folders:
        assert template_tool_format(AutoTokenizer.from_pretrained(folder)) == "generic", folder

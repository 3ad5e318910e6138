"""``tool_choice: auto`` through the local engine's lazy constraint, end to end: a real server on
a tiny model that writes ``Checking. <tool_call>`` and would end there, so everything after the
trigger is the engine's constraint alone, read with the official ``openai`` and ``anthropic``
packages. ``<tool_call>`` is one token of its vocabulary, as in Qwen2.5's, Qwen3's and Hermes'.
(tests/test_structured_e2e.py has the default model's sampled calls.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest

from .engines.model_dirs import write_chain_model
from .server import ServerProcess, start_server

pytestmark = pytest.mark.e2e

PARAMETERS: dict[str, Any] = {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}
ASK = [{"role": "user", "content": "add 2 and 3"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("caller")
    model = write_chain_model(path / "chain", "Checking. <tool_call>",
                              added_tokens=["<tool_call>", "</tool_call>"])
    env = {"STREAMING_LLM_ENGINE": "local", "STREAMING_LLM_MODEL": str(model)}
    with start_server(path, env) as server:
        resp = httpx.put(f"{server.base_url}/agents/caller", json={"name": "Caller"})
        assert resp.status_code == 201, resp.text
        yield server


def test_openai_auto_is_free_text_until_the_model_starts_a_call(server: ServerProcess) -> None:
    ask: Any = {"model": "caller", "messages": ASK, "max_tokens": 120, "parallel_tool_calls": False,
                "tools": [{"type": "function", "function": {"name": "add",
                                                            "parameters": PARAMETERS}}]}
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0) as oai:
        for seed in range(2):
            completion = oai.chat.completions.create(**ask, temperature=0.8, seed=seed)
            [choice] = completion.choices
            assert choice.message.content == "Checking." and choice.finish_reason == "tool_calls"
            [call] = choice.message.tool_calls or []
            assert call.function.name == "add"
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS)

        chunks = list(oai.chat.completions.create(**ask, temperature=0, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.content or "" for d in deltas) == "Checking."
        pieces = [tc for d in deltas for tc in d.tool_calls or []]
        assert pieces[0].id and pieces[0].function and pieces[0].function.name == "add"
        arguments = "".join(tc.function.arguments or "" for tc in pieces if tc.function)
        jsonschema.validate(json.loads(arguments), PARAMETERS)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

        # Without tools nothing is constrained: the model's own text, the bare tag, no call.
        completion = oai.chat.completions.create(**ask, tool_choice="none", temperature=0)
        assert completion.choices[0].message.content == "Checking. <tool_call>"
        assert completion.choices[0].message.tool_calls is None


def test_anthropic_tool_use_from_the_model(server: ServerProcess) -> None:
    request: Any = {"model": "caller", "max_tokens": 120, "messages": ASK,
                    "tools": [{"name": "add", "input_schema": PARAMETERS}],
                    "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}
    with anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0) as claude:
        with claude.messages.stream(**request) as events:
            kinds = [e.type for e in events]
            message = events.get_final_message()
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        assert message.stop_reason == "tool_use"
        text, use = message.content
        assert text.type == "text" and text.text == "Checking."
        assert use.type == "tool_use" and use.name == "add"
        jsonschema.validate(use.input, PARAMETERS)

        answer = claude.messages.create(**{**request, "tool_choice": {"type": "none"}, "messages": [
            *ASK, {"role": "assistant", "content": [b.model_dump() for b in message.content]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "5"}]}]})
        assert answer.stop_reason == "end_turn"
        assert [b.text for b in answer.content] == ["Checking. <tool_call>"]  # type: ignore[union-attr]


def test_a_tool_schema_the_engine_cannot_compile_is_a_400_on_both_apis(
        server: ServerProcess) -> None:
    """The engine compiles each tool's schema before the turn starts, on /v1/messages as on
    /v1/chat/completions (an unclosed group in a pattern: valid JSON Schema, no grammar)."""
    bad = {"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}
    ask = [{"role": "user", "content": "Add 2 and 3."}]
    resp = httpx.post(f"{server.base_url}/v1/chat/completions",
                      json={"model": "caller", "messages": ask, "tool_choice": "required",
                            "tools": [{"type": "function",
                                       "function": {"name": "add", "parameters": bad}}]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tools", resp.text
    resp = httpx.post(f"{server.base_url}/v1/messages",
                      json={"model": "caller", "max_tokens": 16, "messages": ask,
                            "tool_choice": {"type": "any"},
                            "tools": [{"name": "add", "input_schema": bad}]})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert "tools" in resp.json()["error"]["message"]

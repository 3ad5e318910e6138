"""The fake Ollama itself answers in the shapes of Ollama's docs/api.md."""

from __future__ import annotations

import json

import aiohttp
import pytest

from streaming_llm.testing.fake_ollama import ChatScript, FakeOllama, normalize_model

BODY = {"model": "llama3.2", "messages": [{"role": "user", "content": "why is the sky blue?"}]}


@pytest.fixture
def fake():
    with FakeOllama(script=ChatScript(tokens=["Rayleigh", " scattering"])) as server:
        yield server


async def test_streamed_chat_is_ndjson_with_a_final_done_line(fake):
    async with aiohttp.ClientSession() as http, \
            http.post(f"{fake.url}/api/chat", json=BODY) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        lines = [line for line in (await resp.text()).split("\n") if line]
    chunks = [json.loads(line) for line in lines]
    assert [c["message"] for c in chunks[:-1]] == [
        {"role": "assistant", "content": "Rayleigh"}, {"role": "assistant", "content": " scattering"}]
    assert all(c["model"] == "llama3.2" and c["done"] is False and c["created_at"].endswith("Z")
               for c in chunks[:-1])
    final = chunks[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["eval_count"] == 2 and final["prompt_eval_count"] == 5
    assert {"total_duration", "load_duration", "prompt_eval_duration", "eval_duration"} <= set(final)
    # The fake marks the answer complete on its own thread, just after the last write.
    assert fake.chats[0].body == BODY and fake.chats[0].complete.wait(5)
    assert not fake.chats[0].disconnected.is_set()


async def test_non_streamed_chat_is_one_object(fake):
    async with aiohttp.ClientSession() as http, \
            http.post(f"{fake.url}/api/chat", json={**BODY, "stream": False}) as resp:
        reply = await resp.json()
    assert reply["message"] == {"role": "assistant", "content": "Rayleigh scattering"}
    assert reply["done"] is True and reply["eval_count"] == 2


async def test_version_tags_and_unknown_model(fake):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{fake.url}/api/version") as resp:
            assert await resp.json() == {"version": fake.version}
        async with http.get(f"{fake.url}/api/tags") as resp:
            models = (await resp.json())["models"]
        assert [m["name"] for m in models] == ["llama3.2:latest"]
        async with http.post(f"{fake.url}/api/chat", json={**BODY, "model": "nope"}) as resp:
            assert resp.status == 404
            assert await resp.json() == {"error": 'model "nope" not found, try pulling it first'}
    assert fake.hits == {"/api/version": 1, "/api/tags": 1, "/api/chat": 1}


@pytest.mark.parametrize(("name", "normalized"), [
    ("llama3.2", "llama3.2:latest"), ("llama3.2:1b", "llama3.2:1b"),
    ("me/model", "me/model:latest"), ("host:5000/me/model", "host:5000/me/model:latest")])
def test_normalize_model(name, normalized):
    assert normalize_model(name) == normalized


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


async def test_tool_calls_come_whole_in_one_line_before_done(fake):
    fake.script = ChatScript(tokens=[], tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Paris"}}])
    async with aiohttp.ClientSession() as http, \
            http.post(f"{fake.url}/api/chat", json={**BODY, "tools": [TOOL]}) as resp:
        chunks = [json.loads(line) for line in (await resp.text()).split("\n") if line]
    assert [c["done"] for c in chunks] == [False, True]
    assert chunks[0]["message"] == {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert chunks[1]["done_reason"] == "stop"
    assert fake.chats[0].body["tools"] == [TOOL]


async def test_refuse_tools_answers_as_ollama_for_a_model_without_tools(fake):
    fake.script = ChatScript(refuse_tools="registry.ollama.ai/library/llama3.2:latest does "
                                          "not support tools")
    async with aiohttp.ClientSession() as http, \
            http.post(f"{fake.url}/api/chat", json={**BODY, "tools": [TOOL]}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"].endswith("does not support tools")

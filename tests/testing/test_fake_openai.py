"""The fake OpenAI-compatible server itself answers in the shapes of OpenAI's Chat Completions API."""

from __future__ import annotations

import json

import aiohttp
import pytest

from streaming_llm.testing.fake_openai import CompletionScript, FakeOpenAI

BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "why is the sky blue?"}],
        "stream": True, "stream_options": {"include_usage": True}}


@pytest.fixture
def fake():
    with FakeOpenAI(script=CompletionScript(tokens=["Rayleigh", " scattering"])) as server:
        yield server


async def events(fake: FakeOpenAI, body: dict) -> list[str]:
    async with aiohttp.ClientSession() as http, \
            http.post(f"{fake.base_url}/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        text = await resp.text()
    assert text.endswith("\n\n")
    return [block.removeprefix("data: ") for block in text.split("\n\n") if block]


async def test_a_streamed_completion_is_chunks_then_usage_then_done(fake):
    data = await events(fake, BODY)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "fake-model"
               for c in chunks)
    assert [c["choices"][0]["delta"] for c in chunks[:-2]] == [
        {"role": "assistant", "content": ""}, {"content": "Rayleigh"}, {"content": " scattering"}]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert fake.chats[0].body == BODY and fake.chats[0].complete.wait(5)


async def test_without_include_usage_no_usage_is_sent(fake):
    data = await events(fake, {**BODY, "stream_options": None})
    assert all("usage" not in json.loads(d) for d in data[:-1])


async def test_max_tokens_cuts_the_answer_with_finish_reason_length(fake):
    data = await events(fake, {**BODY, "max_tokens": 1})
    chunks = [json.loads(d) for d in data[:-1]]
    assert [c["choices"][0]["delta"].get("content") for c in chunks[:-2]] == ["", "Rayleigh"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("body", "status", "code"), [
    ({**BODY, "model": "gpt-9"}, 404, "model_not_found"),
    ({**BODY, "model": ""}, 400, None),
])
async def test_bad_requests_get_openai_error_bodies(fake, body, status, code):
    async with aiohttp.ClientSession() as http, \
            http.post(f"{fake.base_url}/chat/completions", json=body) as resp:
        assert resp.status == status
        error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code


async def test_an_api_key_is_required_when_set():
    with FakeOpenAI(api_key="k" * 20) as fake:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{fake.base_url}/models") as resp:
                assert resp.status == 401
            async with http.get(f"{fake.base_url}/models",
                                headers={"Authorization": "Bearer " + "k" * 20}) as resp:
                assert resp.status == 200
                assert [m["id"] for m in (await resp.json())["data"]] == ["fake-model"]


def test_a_stopped_fake_starts_again_on_the_same_port():
    with FakeOpenAI() as fake:
        port = fake.port
        fake.stop()
        assert not fake.running
        fake.start()
        assert fake.running and fake.port == port


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def test_streamed_tool_calls_assemble_in_the_official_client():
    """The official client's stream helper reads the fake's delta.tool_calls as OpenAI's own:
    per call an index, id, type and name first, then the arguments in pieces."""
    import openai

    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}},
             {"name": "get_weather", "arguments": {"city": "Oslo"}}]
    with FakeOpenAI(script=CompletionScript(tokens=["Looking."], tool_calls=calls)) as fake, \
            openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0) as client, \
            client.chat.completions.stream(model="fake-model", tools=[TOOL],
                                           messages=[{"role": "user", "content": "?"}]) as stream:
        pieces = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    [choice] = final.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Looking."
    assert [(c.id, c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls or []] == [
        ("call_fake0000", "get_weather", {"city": "Paris"}),
        ("call_fake0001", "get_weather", {"city": "Oslo"})]
    assert len(pieces) > 2  # the arguments came in pieces
    assert fake.chats[0].body["tools"] == [TOOL]


async def test_refuse_tools_answers_a_chat_with_tools_400(fake):
    fake.script = CompletionScript(refuse_tools="tools need --enable-auto-tool-choice")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{fake.base_url}/chat/completions",
                             json={**BODY, "tools": [TOOL]}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["message"] == "tools need --enable-auto-tool-choice"
        async with http.post(f"{fake.base_url}/chat/completions", json=BODY) as resp:
            assert resp.status == 200  # without tools, an answer

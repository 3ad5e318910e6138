"""``/v1/chat/completions`` and ``/v1/models`` with the official ``openai`` package as the client,
against a real server process (echo engine), plus in-process checks of what the engine is sent."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from .conftest import put_agent
from .fakes import ScriptedEngine
from .server import ServerProcess, start_server

WORDS = " ".join(f"w{i}" for i in range(400))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "5"}
    with start_server(tmp_path_factory.mktemp("openai"), env) as server:
        for agent_id, name in (("echoer", "Echoer"), ("other", "Other")):
            resp = httpx.put(f"{server.base_url}/agents/{agent_id}",
                             json={"name": name, "system_prompt": "Repeat after the user."})
            assert resp.status_code == 201, resp.text
        yield server


@pytest.fixture
def oai(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def conversations(server: ServerProcess) -> list[dict[str, Any]]:
    return httpx.get(server.base_url + "/conversations").json()


def test_models_are_the_agents(oai: openai.OpenAI) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == ["echoer", "other"]
    assert all(m.object == "model" and m.created > 1_600_000_000 for m in models.data)
    assert oai.models.retrieve("other").id == "other"
    # the model actually served, as /health names it (here the echo engine)
    served = httpx.get(str(oai.base_url).removesuffix("/v1/") + "/health").json()["model"]
    assert {m.model_extra["served_model"] for m in models.data} == {served}
    assert oai.models.retrieve("other").model_extra["served_model"] == served
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("gpt-4o")
    assert info.value.code == "model_not_found"


def test_non_streaming_completion_stores_nothing(oai: openai.OpenAI,
                                                 server: ServerProcess) -> None:
    before = len(conversations(server))
    completion = oai.chat.completions.create(
        model="echoer",
        messages=[{"role": "system", "content": "Be terse."},
                  {"role": "user", "content": "earlier question"},
                  {"role": "assistant", "content": "earlier answer"},
                  {"role": "user", "content": "hello open world"}],
        temperature=0, seed=7)
    assert completion.object == "chat.completion" and completion.model == "echoer"
    assert completion.id.startswith("chatcmpl-")
    [choice] = completion.choices
    assert choice.message.role == "assistant" and choice.message.content == "hello open world"
    assert choice.finish_reason == "stop"
    usage = completion.usage
    assert usage is not None and usage.completion_tokens == 3
    # The echo engine counts the words of every message it was sent: agent + caller system
    # prompts (4 + 2), the two earlier turns (4) and the new message (3).
    assert usage.prompt_tokens == 13 and usage.total_tokens == 16
    assert usage.model_extra and usage.model_extra["time_to_first_token_ms"] > 0
    assert len(conversations(server)) == before


def test_streaming_with_usage_chunk(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="echoer", messages=[{"role": "user", "content": "one two three four"}],
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishing[-1] == "stop" and set(finishing[:-1]) == {None}
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 4 and last.usage.total_tokens > 4
    assert all(c.usage is None for c in body)


def test_streaming_without_usage_and_options(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="echoer", messages=[{"role": "user", "content": "a b c d e f"}],
        stream=True, max_tokens=3)
    chunks = list(stream)
    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "a b c "
    assert chunks[-1].choices[0].finish_reason == "length"

    completion = oai.chat.completions.create(
        model="echoer", messages=[{"role": "user", "content": "one two three four"}],
        stop="three", top_p=0.5, extra_body={"top_k": 3})
    assert completion.choices[0].message.content == "one two "
    assert completion.choices[0].finish_reason == "stop"
    completion = oai.chat.completions.create(
        model="echoer", max_completion_tokens=1,
        messages=[{"role": "user", "content": [{"type": "text", "text": "multi "},
                                               {"type": "text", "text": "part"}]}])
    assert completion.choices[0].message.content == "multi "


@pytest.mark.parametrize(("kwargs", "status", "param", "code"), [
    ({"model": "gpt-4o"}, 404, "model", "model_not_found"),
    ({"temperature": 3}, 400, "temperature", "validation_error"),
    ({"n": 2}, 400, "n", "invalid_request"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     400, "messages[1]", "invalid_request"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0]", "invalid_request"),
    ({"metadata": {"conversation_id": "conv_missing"}}, 404, None, "conversation_not_found"),
    ({"metadata": {"conversation_id": "bad id!"}}, 400, None, "invalid_id"),
])
def test_errors_have_openai_shape(oai: openai.OpenAI, kwargs: dict[str, Any], status: int,
                                  param: str | None, code: str) -> None:
    request: dict[str, Any] = {"model": "echoer", "messages": [{"role": "user", "content": "hi"}]}
    request.update(kwargs)
    with pytest.raises(openai.APIStatusError) as info:
        oai.chat.completions.create(**request)
    error = info.value
    assert error.status_code == status
    body = error.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param and body["error"]["code"] == code
    assert body["error"]["message"]


def test_unknown_v1_route_and_bad_json(server: ServerProcess) -> None:
    resp = httpx.post(server.base_url + "/v1/completions", json={})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_url"
    resp = httpx.post(server.base_url + "/v1/chat/completions", content=b"{nope")
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert resp.json()["error"]["code"] == "invalid_json"


def test_stored_conversation_continues_through_header_and_metadata(
        oai: openai.OpenAI, server: ServerProcess) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model="echoer", messages=[{"role": "user", "content": "first stored turn"}],
        extra_headers={"X-Conversation-Id": "new"})
    conversation_id = raw.headers["x-conversation-id"]
    assert conversation_id.startswith("conv_")
    first = raw.parse()
    assert first.choices[0].message.content == "first stored turn"

    # Only the last message counts: the stored history replaces the rest.
    stream = oai.chat.completions.create(
        model="echoer", stream=True, stream_options={"include_usage": True},
        metadata={"conversation_id": conversation_id},
        messages=[{"role": "user", "content": "ignored"}, {"role": "user", "content": "second"}])
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "second"
    usage = chunks[-1].usage
    assert usage is not None
    # system (4 words) + stored "first stored turn" twice (6) + "second" (1)
    assert usage.prompt_tokens == 11

    turns = httpx.get(f"{server.base_url}/conversations/{conversation_id}").json()["turns"]
    assert [(t["role"], t["content"], t["finish_reason"]) for t in turns] == [
        ("user", "first stored turn", None), ("assistant", "first stored turn", "stop"),
        ("user", "second", None), ("assistant", "second", "stop")]
    assert turns[3]["usage"]["time_to_first_token_ms"] > 0

    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(
            model="echoer", messages=[{"role": "user", "content": "x"}],
            metadata={"conversation_id": conversation_id},
            extra_headers={"X-Conversation-Id": "conv_other"})
    assert info.value.body["param"] == "metadata.conversation_id"  # type: ignore[index]
    with pytest.raises(openai.ConflictError) as conflict:
        oai.chat.completions.create(
            model="other", messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Conversation-Id": conversation_id})
    assert conflict.value.code == "conversation_agent_mismatch"


def test_client_disconnect_stops_the_stream(server: ServerProcess) -> None:
    conversation_id = None
    body = {"model": "echoer", "stream": True, "messages": [{"role": "user", "content": WORDS}]}
    with httpx.Client(timeout=10) as http, http.stream(
            "POST", server.base_url + "/v1/chat/completions", json=body,
            headers={"X-Conversation-Id": "new"}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        conversation_id = resp.headers["x-conversation-id"]
        lines = resp.iter_lines()
        events = [next(lines) for _ in range(6)]  # data, blank, data, blank, ...
        assert json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    # Closing the response closed the connection: the turn ends as cancelled, long before the
    # 400 words (2 s at 5 ms each) would have been echoed.
    deadline = time.monotonic() + 5
    turns: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        turns = httpx.get(f"{server.base_url}/conversations/{conversation_id}").json()["turns"]
        if len(turns) == 2:
            break
        time.sleep(0.05)
    assert len(turns) == 2 and turns[1]["finish_reason"] == "cancelled"
    assert 0 < len(turns[1]["content"]) < len(WORDS)
    assert WORDS.startswith(turns[1]["content"])


def test_client_disconnect_stops_a_non_streaming_answer(server: ServerProcess) -> None:
    words = "quiet " + WORDS
    body = {"model": "echoer", "messages": [{"role": "user", "content": words}]}
    with pytest.raises(httpx.ReadTimeout):  # httpx drops the connection when it gives up
        httpx.post(server.base_url + "/v1/chat/completions", json=body,
                   headers={"X-Conversation-Id": "new"}, timeout=httpx.Timeout(10, read=0.3))
    [conversation] = [c for c in conversations(server) if c["title"] == words[:80]]
    deadline = time.monotonic() + 5
    turns: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        turns = httpx.get(f"{server.base_url}/conversations/{conversation['id']}").json()["turns"]
        if len(turns) == 2:
            break
        time.sleep(0.05)
    assert len(turns) == 2 and turns[1]["finish_reason"] == "cancelled"
    assert 0 < len(turns[1]["content"]) < len(words)


# --- in process: what the engine is sent --------------------------------------------------------
def test_unstored_call_prepends_agent_and_forgets(client: TestClient, scripted: ScriptedEngine) -> None:
    put_agent(client, "helper")
    resp = client.post("/v1/chat/completions", json={
        "model": "helper", "messages": [
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Hi"}]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "Hello, world!"
    [request] = scripted.requests
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "You help.\n\n# Notes\nBe brief.\n\nAnswer in French."), ("user", "Hi")]
    assert request.conversation_id.startswith("tmp_")
    assert scripted.forgotten == [request.conversation_id]
    assert client.get("/conversations").json() == []


def test_engine_failure_is_a_502_before_the_first_token(client: TestClient,
                                                       scripted: ScriptedEngine) -> None:
    put_agent(client, "helper")
    scripted.fail_after = 0
    for stream in (False, True):
        resp = client.post("/v1/chat/completions", json={
            "model": "helper", "stream": stream, "messages": [{"role": "user", "content": "Hi"}]})
        assert resp.status_code == 502
        assert resp.json()["error"] == {"message": "scripted failure", "type": "server_error",
                                        "param": None, "code": "engine_error"}
    scripted.fail_after = 2
    resp = client.post("/v1/chat/completions", json={
        "model": "helper", "stream": True, "messages": [{"role": "user", "content": "Hi"}]})
    assert resp.status_code == 200
    events = [line.removeprefix("data: ") for line in resp.text.split("\n\n") if line]
    assert json.loads(events[-1])["error"]["code"] == "engine_error"
    assert "[DONE]" not in events
    assert len(scripted.forgotten) == 3


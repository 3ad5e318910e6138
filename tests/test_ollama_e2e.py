"""End to end: a real ``streaming-llm serve`` process (engine ollama) against the fake Ollama.

A WebSocket client drives the real socket; we check the body the service sent upstream, the
events the client got, the turns stored, and that cancel / disconnect close the upstream
connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from streaming_llm.testing.fake_ollama import ChatScript, FakeOllama

from .server import ServerProcess, free_port, start_server

pytestmark = pytest.mark.e2e

AGENT = {"name": "Helper", "system_prompt": "You help.", "markdown_context": "# Notes\nBe brief."}
SYSTEM = "You help.\n\n# Notes\nBe brief."


def ollama_env(url: str, **extra: str) -> dict[str, str]:
    return {"STREAMING_LLM_ENGINE": "ollama", "STREAMING_LLM_OLLAMA_URL": url,
            "STREAMING_LLM_RESUME_GRACE_S": "0",  # a disconnect cancels the turn at once
            "STREAMING_LLM_OLLAMA_MODEL": "llama3.2", **extra}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllama(models=["llama3.2:latest"]) as server:
        yield server


@pytest.fixture(scope="module")
def server(fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = ollama_env(fake.url, STREAMING_LLM_OLLAMA_READ_TIMEOUT_S="1")
    with start_server(tmp_path_factory.mktemp("ollama-e2e"), env) as proc:
        httpx.put(f"{proc.base_url}/agents/helper", json=AGENT).raise_for_status()
        yield proc


@pytest.fixture(autouse=True)
def fresh_script(request: pytest.FixtureRequest) -> None:
    if "fake" in request.fixturenames:
        fake: FakeOllama = request.getfixturevalue("fake")
        fake.script = ChatScript()
        fake.chats.clear()


async def receive(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def chat(ws: ClientConnection, message: str, **fields: Any) -> list[dict[str, Any]]:
    """Send one chat frame; return its events up to the terminal ``done`` or ``error``."""
    await ws.send(json.dumps({"type": "chat", "agent_id": "helper", "message": message, **fields}))
    events = []
    while True:
        event = await receive(ws)
        events.append(event)
        if event["type"] in ("done", "error"):
            return events


async def get(url: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(url)


async def put_agent(server: ServerProcess) -> None:
    async with httpx.AsyncClient() as client:
        (await client.put(f"{server.base_url}/agents/helper", json=AGENT)).raise_for_status()


async def stored_turns(server: ServerProcess, conversation_id: str) -> list[dict[str, Any]]:
    resp = await get(f"{server.base_url}/conversations/{conversation_id}")
    resp.raise_for_status()
    return resp.json()["turns"]


async def test_a_turn_streams_through_the_service_and_history_is_sent_next_turn(server, fake):
    fake.script = ChatScript(tokens=["Blue", " because", " of", " Rayleigh", "."])
    options = {"temperature": 0.3, "max_new_tokens": 50, "top_k": 20, "seed": 1}
    async with connect(server.ws_url) as ws:
        events = await chat(ws, "why is the sky blue?", request_id="t1", options=options)

        start, *tokens, done = events
        assert start["type"] == "start" and start["request_id"] == "t1"
        # pieces that queued while a frame went out share the next one (seq, count)
        assert "".join(t["token"] for t in tokens) == "Blue because of Rayleigh."
        assert [t["seq"] for t in tokens] == [sum(t.get("count", 1) for t in tokens[:i])
                                              for i in range(len(tokens))]
        assert sum(t.get("count", 1) for t in tokens) == 5
        assert done["type"] == "done" and done["finish_reason"] == "stop"
        usage = done["usage"]
        assert usage["prompt_tokens"] == 11  # the fake counts the words of the messages
        assert usage["completion_tokens"] == 5
        assert usage["decode_tokens_per_s"] > 0

        assert fake.chats[0].body == {
            "model": "llama3.2",
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": "why is the sky blue?"}],
            "stream": True,
            "keep_alive": "5m",
            "options": {"num_predict": 50, "temperature": 0.3, "top_k": 20, "seed": 1},
        }

        fake.script = ChatScript(tokens=["Mie", " is", " bigger", "."])
        conversation_id = done["conversation_id"]
        events = await chat(ws, "and mie?", conversation_id=conversation_id)
        assert events[-1]["finish_reason"] == "stop"

    assert fake.chats[1].body["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "why is the sky blue?"},
        {"role": "assistant", "content": "Blue because of Rayleigh."},
        {"role": "user", "content": "and mie?"},
    ]
    assert fake.chats[1].body["options"] == {"num_predict": 512}  # the server's default
    turns = await stored_turns(server, conversation_id)
    assert [(t["role"], t["content"], t["finish_reason"]) for t in turns] == [
        ("user", "why is the sky blue?", None),
        ("assistant", "Blue because of Rayleigh.", "stop"),
        ("user", "and mie?", None),
        ("assistant", "Mie is bigger.", "stop"),
    ]


async def test_max_new_tokens_reached_is_finish_reason_length(server, fake):
    fake.script = ChatScript(tokens=[f" w{i}" for i in range(20)])
    async with connect(server.ws_url) as ws:
        events = await chat(ws, "count", options={"max_new_tokens": 3})
    tokens = [e for e in events if e["type"] == "token"]
    assert "".join(e["token"] for e in tokens) == " w0 w1 w2"  # pieces that queued share a frame
    assert sum(e.get("count", 1) for e in tokens) == 3
    assert events[-1]["finish_reason"] == "length"


@pytest.mark.parametrize(("script", "streamed", "code", "message"), [
    (ChatScript(tokens=["Par", "tial", " answer"], error="out of memory", error_after=2),
     "Partial", "engine_error", "out of memory"),
    (ChatScript(status=500, error="llama runner process has terminated"),
     "", "engine_error", "llama runner process has terminated"),
    (ChatScript(tokens=["a", "b"], malformed_after=1), "a", "engine_protocol_error", None),
    (ChatScript(tokens=["a", "b"], end_without_done=True), "ab", "engine_protocol_error", None),
    (ChatScript(tokens=["a", "b", "c"], hang_after=2), "ab", "engine_timeout", None),
], ids=["error-line", "http-500", "malformed-line", "no-done", "read-timeout"])
async def test_upstream_failures_are_error_events_and_the_partial_answer_is_stored(
        server, fake, script, streamed, code, message):
    fake.script = script
    async with connect(server.ws_url) as ws:
        events = await chat(ws, "go", request_id="f1")
        # the socket still works after a failed turn
        await ws.send(json.dumps({"type": "ping", "request_id": "p"}))
        assert (await receive(ws))["type"] == "pong"

    error = events[-1]
    assert error["type"] == "error" and error["request_id"] == "f1"
    assert error["code"] == code
    if message is not None:
        assert message in error["message"]
    assert "".join(e["token"] for e in events if e["type"] == "token") == streamed
    turns = await stored_turns(server, error["conversation_id"])
    assert [(t["id"], t["content"], t["finish_reason"]) for t in turns[1:]] == [
        (error["turn_id"], streamed, "error")]


async def test_cancel_closes_the_upstream_connection_and_stores_the_partial_answer(server, fake):
    fake.script = ChatScript(tokens=[f" w{i}" for i in range(200)], delay_s=0.02)
    async with connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "chat", "agent_id": "helper", "message": "go",
                                  "request_id": "c1"}))
        assert (await receive(ws))["type"] == "start"
        assert (await receive(ws))["type"] == "token"
        await ws.send(json.dumps({"type": "cancel", "request_id": "c1"}))
        events = []
        while (event := await receive(ws))["type"] != "done":
            events.append(event)
        assert event["finish_reason"] == "cancelled"

    record = fake.chats[0]
    assert await asyncio.to_thread(record.wait_disconnected, 5)
    assert not record.complete.is_set()
    turns = await stored_turns(server, event["conversation_id"])
    assert turns[-1]["finish_reason"] == "cancelled"
    # what the client saw is stored (a piece in flight when the cancel landed may be stored too)
    seen = " w0" + "".join(e["token"] for e in events)
    stored = turns[-1]["content"]
    assert stored.startswith(seen)
    assert "".join(f" w{i}" for i in range(200)).startswith(stored)
    assert len(stored) < len("".join(f" w{i}" for i in range(200)))


async def test_a_client_disconnect_closes_the_upstream_connection(server, fake):
    fake.script = ChatScript(tokens=[f" w{i}" for i in range(200)], delay_s=0.02)
    async with connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "chat", "agent_id": "helper", "message": "go"}))
        start = await receive(ws)
        assert (await receive(ws))["type"] == "token"
    # the socket is closed mid-answer
    assert await asyncio.to_thread(fake.chats[0].wait_disconnected, 5)

    for _ in range(50):  # the turn is stored by the server as it winds the socket down
        turns = await stored_turns(server, start["conversation_id"])
        if len(turns) == 2:
            break
        await asyncio.sleep(0.1)
    assert turns[-1]["finish_reason"] == "cancelled"
    assert turns[-1]["content"].startswith(" w0")


async def test_health_reports_ollamas_version_when_ready(server, fake):
    resp = await get(f"{server.base_url}/health")
    assert resp.status_code == 200
    body = resp.json()
    assert (body["status"], body["engine"], body["model"]) == ("ok", "ollama", "llama3.2")
    assert body["engine_info"] == {"url": fake.url, "version": fake.version}


async def first_health(server: ServerProcess) -> httpx.Response:
    """/health as soon as the server answers at all (it is not expected to be ready)."""
    for _ in range(300):
        try:
            return await get(f"{server.base_url}/health")
        except httpx.TransportError:
            await asyncio.sleep(0.1)
    raise TimeoutError(f"the server never answered /health:\n{server.log()}")


async def test_a_missing_model_is_unhealthy_and_a_chat_gets_model_not_found(tmp_path):
    with FakeOllama(models=["qwen2.5:7b"]) as other, \
            start_server(tmp_path, ollama_env(other.url), wait=False) as proc:
        resp = await first_health(proc)
        assert resp.status_code == 503
        body = resp.json()
        assert body["ready"] is False
        assert body["detail"] == "model llama3.2 not found; run `ollama pull llama3.2`"

        await put_agent(proc)
        async with connect(proc.ws_url) as ws:
            events = await chat(ws, "hi")
    assert events[-1]["code"] == "model_not_found"
    assert events[-1]["message"] == 'model "llama3.2" not found, try pulling it first'


async def test_an_unreachable_ollama_is_unhealthy_and_a_chat_gets_engine_unavailable(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with start_server(tmp_path, ollama_env(url), wait=False) as proc:
        resp = await first_health(proc)
        assert resp.status_code == 503
        assert resp.json()["detail"].startswith(f"ollama at {url} is not reachable")

        await put_agent(proc)
        async with connect(proc.ws_url) as ws:
            events = await chat(ws, "hi")
    assert events[-1]["code"] == "engine_unavailable"

"""End to end: the ``openai`` engine against a real second instance of this service.

Two real ``streaming-llm serve`` processes: the *upstream* (echo engine, API key required) serves
its agent ``echoer`` at ``/v1``; the *front* (engine ``openai``) points its
``STREAMING_LLM_OPENAI_BASE_URL`` there. A WebSocket client drives the front; the upstream's own
``/metrics`` says what happened to the turns it was sent (finished, cancelled).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from .server import ServerProcess, start_server

pytestmark = pytest.mark.e2e

KEY = "upstream-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
ECHOER = {"name": "Echoer", "system_prompt": "Repeat.", "markdown_context": ""}
HELPER = {"name": "Helper", "system_prompt": "You help.", "markdown_context": ""}
LONG = " ".join(f"w{i}" for i in range(300))


def front_env(upstream: ServerProcess, **extra: str) -> dict[str, str]:
    return {"STREAMING_LLM_ENGINE": "openai",
            "STREAMING_LLM_RESUME_GRACE_S": "0",  # a disconnect cancels the turn at once
            "STREAMING_LLM_OPENAI_BASE_URL": f"{upstream.base_url}/v1",
            "STREAMING_LLM_OPENAI_MODEL": "echoer", "STREAMING_LLM_OPENAI_API_KEY": KEY, **extra}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "10",
           "STREAMING_LLM_API_KEY": KEY}
    with start_server(tmp_path_factory.mktemp("upstream"), env) as proc:
        httpx.put(f"{proc.base_url}/agents/echoer", json=ECHOER, headers=AUTH).raise_for_status()
        yield proc


@pytest.fixture(scope="module")
def front(upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[ServerProcess]:
    with start_server(tmp_path_factory.mktemp("front"), front_env(upstream)) as proc:
        httpx.put(f"{proc.base_url}/agents/helper", json=HELPER).raise_for_status()
        yield proc


async def receive(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), 20))


async def chat(ws: ClientConnection, message: str, **fields: Any) -> list[dict[str, Any]]:
    await ws.send(json.dumps({"type": "chat", "agent_id": "helper", "message": message, **fields}))
    events = []
    while True:
        events.append(event := await receive(ws))
        if event["type"] in ("done", "error"):
            return events


def tokens(events: list[dict[str, Any]]) -> str:
    return "".join(e["token"] for e in events if e["type"] == "token")


async def upstream_turns(upstream: ServerProcess) -> dict[str, float]:
    """The upstream's ended turns by outcome, and the ones still active, from its /metrics."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{upstream.base_url}/metrics", headers=AUTH)).text
    counts = {m[1]: float(m[2]) for m in re.finditer(
        r'^streaming_llm_turns_total\{outcome="(\w+)"\} (\S+)$', text, re.M)}
    active = re.search(r"^streaming_llm_turns_active (\S+)$", text, re.M)
    counts["active"] = float(active.group(1)) if active else 0.0
    return counts


async def wait_upstream(upstream: ServerProcess, outcome: str, at_least: float) -> dict[str, float]:
    for _ in range(100):
        counts = await upstream_turns(upstream)
        if counts.get(outcome, 0) >= at_least and counts["active"] == 0:
            return counts
        await asyncio.sleep(0.1)
    raise AssertionError(f"upstream never counted {at_least} {outcome} turn(s): {counts}")


async def test_turns_stream_from_the_upstream_with_its_usage(front, upstream):
    async with connect(front.ws_url) as ws:
        events = await chat(ws, "why is the sky blue?")
        assert tokens(events) == "why is the sky blue?"  # the echo engine repeats the message
        done = events[-1]
        assert done["type"] == "done" and done["finish_reason"] == "stop"
        assert done["usage"]["completion_tokens"] == 5  # the upstream's count, via include_usage
        assert done["usage"]["prompt_tokens"] > 5

        again = await chat(ws, "and at sunset?", conversation_id=done["conversation_id"])
        assert tokens(again) == "and at sunset?"
        # the second turn carried the history: more prompt tokens upstream
        assert again[-1]["usage"]["prompt_tokens"] > done["usage"]["prompt_tokens"]

        cut = await chat(ws, "one two three four", options={"max_new_tokens": 2})
        assert tokens(cut) == "one two " and cut[-1]["finish_reason"] == "length"


async def test_cancel_closes_the_upstream_request(front, upstream):
    before = (await upstream_turns(upstream)).get("cancelled", 0)
    async with connect(front.ws_url) as ws:
        await ws.send(json.dumps({"type": "chat", "agent_id": "helper", "message": LONG,
                                  "request_id": "c1"}))
        assert (await receive(ws))["type"] == "start"
        assert (await receive(ws))["type"] == "token"
        await ws.send(json.dumps({"type": "cancel", "request_id": "c1"}))
        while (event := await receive(ws))["type"] != "done":
            pass
        assert event["finish_reason"] == "cancelled"
    # the upstream saw its client go away and cancelled its turn too (not ran it to the end)
    await wait_upstream(upstream, "cancelled", before + 1)


async def test_a_client_disconnect_closes_the_upstream_request(front, upstream):
    before = (await upstream_turns(upstream)).get("cancelled", 0)
    async with connect(front.ws_url) as ws:
        await ws.send(json.dumps({"type": "chat", "agent_id": "helper", "message": LONG}))
        assert (await receive(ws))["type"] == "start"
        assert (await receive(ws))["type"] == "token"
    await wait_upstream(upstream, "cancelled", before + 1)


async def test_health_names_the_upstream_and_never_shows_the_key(front, upstream):
    async with httpx.AsyncClient() as client:
        resp = await client.get(f"{front.base_url}/health")
        metrics = await client.get(f"{front.base_url}/metrics")
    assert resp.status_code == 200
    body = resp.json()
    assert (body["status"], body["engine"], body["model"]) == ("ok", "openai", "echoer")
    assert body["engine_info"] == {"url": f"{upstream.base_url}/v1"}
    for text in (resp.text, metrics.text, front.log()):
        assert KEY not in text


async def test_an_unknown_upstream_model_is_unhealthy_and_a_chat_gets_model_not_found(
        upstream, tmp_path):
    env = front_env(upstream, STREAMING_LLM_OPENAI_MODEL="nope")
    with start_server(tmp_path, env, wait=False) as proc:
        for _ in range(300):
            try:
                resp = httpx.get(f"{proc.base_url}/health")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.1)
        assert resp.status_code == 503
        assert resp.json()["detail"].startswith("model nope is not served by openai at")
        httpx.put(f"{proc.base_url}/agents/helper", json=HELPER).raise_for_status()
        async with connect(proc.ws_url) as ws:
            events = await chat(ws, "hi")
    assert events[-1]["code"] == "model_not_found"
    assert "nope" in events[-1]["message"]


def test_tool_calls_through_an_upstream(front: ServerProcess) -> None:
    """The front offers tools to its upstream natively; the upstream (echoing the block, which
    its own server reads as a call) answers with streamed ``delta.tool_calls``, which the front
    assembles into its call; the result then goes upstream as a ``role: "tool"`` message."""
    call_text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                 "</tool_call>")
    tools = [{"type": "function", "function": {"name": "get_weather",
                                                "parameters": {"type": "object"}}}]
    first = httpx.post(f"{front.base_url}/v1/chat/completions", timeout=30, json={
        "model": "helper", "tools": tools, "messages": [{"role": "user", "content": call_text}]})
    assert first.status_code == 200, first.text
    choice = first.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    second = httpx.post(f"{front.base_url}/v1/chat/completions", timeout=30, json={
        "model": "helper", "tools": tools, "messages": [
            {"role": "user", "content": call_text}, choice["message"],
            {"role": "tool", "tool_call_id": call["id"], "content": "snow"}]})
    assert second.status_code == 200, second.text
    # the upstream echoes the last message it got: the result, as a tool message (text form
    # would have made it a user message "<tool_response>\nsnow\n</tool_response>"), which its
    # server took because the call it answers was sent back with the front's id
    assert second.json()["choices"][0]["message"]["content"] == "snow"

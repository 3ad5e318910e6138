"""End to end: a real ``streaming-llm serve`` spreading turns over three real local Ollama-speaking
servers (fake Ollamas on loopback), one of them stopped mid-test and started again."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from streaming_llm.testing.fake_ollama import ChatScript, FakeOllama

from .server import ServerProcess, start_server

pytestmark = pytest.mark.e2e

AGENT = {"name": "Helper", "system_prompt": "You help.", "markdown_context": ""}


@pytest.fixture
def fakes() -> Iterator[list[FakeOllama]]:
    servers = [FakeOllama(script=ChatScript(tokens=[f"from-{i}", "!"])).start() for i in range(3)]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def server(fakes: list[FakeOllama], tmp_path) -> Iterator[ServerProcess]:
    env = {"STREAMING_LLM_ENGINE": "ollama",
           "STREAMING_LLM_OLLAMA_URL": ",".join(f.url for f in fakes),
           "STREAMING_LLM_BACKEND_RETRY_S": "0.1", "STREAMING_LLM_BACKEND_RETRY_MAX_S": "0.2"}
    with start_server(tmp_path, env) as proc:
        httpx.put(f"{proc.base_url}/agents/helper", json=AGENT).raise_for_status()
        yield proc


async def chat(ws: ClientConnection, message: str, **fields: Any) -> list[dict[str, Any]]:
    await ws.send(json.dumps({"type": "chat", "agent_id": "helper", "message": message, **fields}))
    events = []
    while True:
        events.append(event := json.loads(await asyncio.wait_for(ws.recv(), 20)))
        if event["type"] in ("done", "error"):
            return events


def answer(events: list[dict[str, Any]]) -> str:
    assert events[-1]["type"] == "done", events[-1]
    return "".join(e["token"] for e in events if e["type"] == "token")


async def backends(server: ServerProcess) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        body = (await client.get(f"{server.base_url}/health")).json()
    return body["engine_info"]["backends"]


async def backend_up_metrics(server: ServerProcess) -> dict[str, float]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{server.base_url}/metrics")).text
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^streaming_llm_backend_up\{backend="([^"]+)"\} (\S+)$', text, re.M)}


async def test_turns_spread_stick_and_move_when_a_backend_stops(server, fakes):
    urls = [f.url for f in fakes]
    assert [b["state"] for b in await backends(server)] == ["up", "up", "up"]
    async with connect(server.ws_url) as ws:
        first = await chat(ws, "hello")
        home = int(answer(first).removeprefix("from-").removesuffix("!"))
        conversation = first[-1]["conversation_id"]
        for _ in range(2):  # the conversation sticks to the backend holding its cache
            assert answer(await chat(ws, "again", conversation_id=conversation)) == f"from-{home}!"
        assert [len(f.chats) for f in fakes].count(0) == 2

        fakes[home].stop()  # mid-test
        moved = answer(await chat(ws, "still there?", conversation_id=conversation))
        assert moved != f"from-{home}!"  # it had streamed nothing: it moved, no error
        # the whole history went to the new backend
        new_home = int(moved.removeprefix("from-").removesuffix("!"))
        assert [m["content"] for m in fakes[new_home].chats[-1].body["messages"][1:]] == [
            "hello", f"from-{home}!", "again", f"from-{home}!", "again", f"from-{home}!",
            "still there?"]

        report = await backends(server)
        assert report[home]["state"] == "down" and report[home]["failures"] == 1
        assert [b["url"] for b in report] == urls
        assert (await backend_up_metrics(server)) == {
            url: (0.0 if i == home else 1.0) for i, url in enumerate(urls)}

        others = [await chat(ws, f"new {i}") for i in range(4)]  # fresh conversations
        assert all(answer(e) != f"from-{home}!" for e in others)

        fakes[home].start()  # back on the same port: probed and marked up
        for _ in range(100):
            if (await backends(server))[home]["state"] == "up":
                break
            await asyncio.sleep(0.1)
        assert (await backends(server))[home]["state"] == "up"
        assert (await backend_up_metrics(server))[urls[home]] == 1.0

"""Limits: body size, frame and message size, max_new_tokens ceiling, socket queue, server gate."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from streaming_llm.app import create_app
from streaming_llm.chat.admission import Busy, ConversationLocks, GenerationGate
from streaming_llm.chat.limits import LimitExceeded, Limits
from streaming_llm.engines.base import EngineHealth
from streaming_llm.metrics import Metrics
from streaming_llm.settings import Settings, SettingsError

from .conftest import put_agent
from .fakes import ScriptedEngine
from .test_chat import recv_turn


def limited(make_settings: Callable[..., Settings], scripted: ScriptedEngine,
            **limits: Any) -> TestClient:
    return TestClient(create_app(make_settings(**limits), engine=scripted))


# --- HTTP body --------------------------------------------------------------------------------
def test_body_over_the_limit_is_413_by_length_and_while_streaming(
        make_settings: Callable[..., Settings], scripted: ScriptedEngine) -> None:
    with limited(make_settings, scripted, max_body_bytes=2048) as client:
        big = b'{"name": "n", "system_prompt": "' + b"x" * 3000 + b'"}'
        resp = client.put("/agents/a", content=big, headers={"content-type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
        assert "STREAMING_LLM_MAX_BODY_BYTES" in resp.json()["error"]["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"name": "n", "system_prompt": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        resp = client.put("/agents/b", content=chunks(), headers={"content-type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
        ok = b'{"name": "n", "system_prompt": "' + b"z" * 1900 + b'"}'
        assert client.put("/agents/c", content=ok).status_code == 201
        assert [a["id"] for a in client.get("/agents").json()] == ["c"]


def test_default_body_limit_fits_the_largest_valid_agent(client: TestClient) -> None:
    # Every field at its maximum, every character outside the BMP and so escaped as a JSON
    # surrogate pair (12 bytes, as json.dumps does by default): schema-valid, so it must not be
    # refused for its size.
    import json

    emoji = "\U0001f600"
    body = json.dumps({"name": emoji * 200, "system_prompt": emoji * 100_000,
                       "markdown_context": emoji * 1_000_000}).encode()
    assert len(body) > 13_000_000
    resp = client.put("/agents/largest", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 201, resp.text[:200]


@pytest.mark.parametrize(("field", "limit"), [
    ("name", 200), ("system_prompt", 100_000), ("markdown_context", 1_000_000)])
def test_agent_field_sizes(client: TestClient, field: str, limit: int) -> None:
    body = {"name": "n", field: "é" * limit}
    assert client.put("/agents/fits", json=body).status_code == 201
    body[field] += "é"
    resp = client.put("/agents/over", json=body)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error"
    assert f"$.{field}" in resp.json()["error"]["message"]
    assert [a["id"] for a in client.get("/agents").json()] == ["fits"]


# --- socket frames ----------------------------------------------------------------------------
def test_frame_message_and_max_new_tokens_limits(make_settings: Callable[..., Settings],
                                                 scripted: ScriptedEngine) -> None:
    with limited(make_settings, scripted, max_frame_bytes=4096, max_message_chars=100,
                 max_new_tokens_limit=64, max_new_tokens=32) as client:
        put_agent(client, "helper")
        with client.websocket_connect("/ws/chat") as ws:
            cases = [
                ({"message": "x" * 5000}, "frame_too_large", "STREAMING_LLM_MAX_FRAME_BYTES"),
                ({"message": "日" * 1500}, "frame_too_large", "4096 bytes"),  # 4500 bytes, 1500 chars
                ({"message": "x" * 101}, "message_too_large", "STREAMING_LLM_MAX_MESSAGE_CHARS"),
                ({"message": "x", "options": {"max_new_tokens": 65}}, "max_new_tokens_too_large",
                 "STREAMING_LLM_MAX_NEW_TOKENS_LIMIT"),
            ]
            for fields, code, needle in cases:
                ws.send_json({"type": "chat", "agent_id": "helper", "request_id": "r", **fields})
                error = ws.receive_json()
                assert (error["type"], error["code"]) == ("error", code), error
                assert needle in error["message"]
            ws.send_json({"type": "chat", "agent_id": "helper", "message": "x" * 100,
                          "options": {"max_new_tokens": 64}})
            _, _, done = recv_turn(ws)
            assert done["type"] == "done"
    assert scripted.requests[0].max_new_tokens == 64 and len(scripted.requests) == 1


def test_default_max_new_tokens_must_fit_the_ceiling(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(SettingsError, match="STREAMING_LLM_MAX_NEW_TOKENS_LIMIT"):
        make_settings(max_new_tokens=600, max_new_tokens_limit=500)


def test_check_frame_counts_bytes() -> None:
    limits = Limits(max_frame_bytes=1024, max_message_chars=10, max_new_tokens=5, max_queued_turns=1)
    limits.check_frame("x" * 1024)
    limits.check_frame("é" * 512)  # 1024 bytes
    with pytest.raises(LimitExceeded, match="1026 bytes"):
        limits.check_frame("é" * 513)
    with pytest.raises(LimitExceeded):
        limits.check_frame("x" * 1025)


# --- queues -----------------------------------------------------------------------------------
def test_socket_queue_limit_answers_busy_and_keeps_the_rest(
        make_settings: Callable[..., Settings], scripted: ScriptedEngine) -> None:
    scripted.delay = 0.02
    with limited(make_settings, scripted, max_queued_turns=2) as client:
        put_agent(client, "helper")
        with client.websocket_connect("/ws/chat") as ws:
            ws.send_json({"type": "chat", "agent_id": "helper", "message": "m", "request_id": "q0"})
            assert ws.receive_json()["type"] == "start"  # q0 runs: the queue is empty
            for i in range(1, 5):
                ws.send_json({"type": "chat", "agent_id": "helper", "message": "m",
                              "request_id": f"q{i}"})
            frames = []
            while sum(f["type"] == "done" for f in frames) < 3:
                frames.append(ws.receive_json())
        errors = [(f["request_id"], f["code"]) for f in frames if f["type"] == "error"]
        assert errors == [("q3", "busy"), ("q4", "busy")]
        busy = next(f for f in frames if f["type"] == "error")
        assert "STREAMING_LLM_MAX_QUEUED_TURNS" in busy["message"]
        done = [f["request_id"] for f in frames if f["type"] == "done"]
        assert done == ["q0", "q1", "q2"]


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_server_gate_queues_then_refuses_and_cancel_works_while_waiting(
        make_settings: Callable[..., Settings], scripted: ScriptedEngine) -> None:
    scripted.pieces = [f"w{i} " for i in range(40)]
    scripted.delay = 0.01
    with limited(make_settings, scripted, max_concurrent_generations=1, max_waiting_generations=1) as client:
        put_agent(client, "helper")
        gate = client.app_state["services"].gate
        with client.websocket_connect("/ws/chat") as a, \
                client.websocket_connect("/ws/chat") as b, \
                client.websocket_connect("/ws/chat") as c:
            a.send_json({"type": "chat", "agent_id": "helper", "message": "a", "request_id": "a"})
            assert a.receive_json()["type"] == "start"
            b.send_json({"type": "chat", "agent_id": "helper", "message": "b", "request_id": "b"})
            _wait_for(lambda: gate.waiting == 1)
            c.send_json({"type": "chat", "agent_id": "helper", "message": "c", "request_id": "c"})
            refused = c.receive_json()
            assert (refused["code"], refused["request_id"]) == ("busy", "c")
            assert "STREAMING_LLM_MAX_WAITING_GENERATIONS" in refused["message"]
            b.send_json({"type": "cancel", "request_id": "b"})
            cancelled = b.receive_json()
            assert (cancelled["code"], cancelled["request_id"]) == ("cancelled", "b")
            _, _, done = recv_turn_rest(a)
            assert done["type"] == "done"
            # The slot was given back: the next turn runs.
            c.send_json({"type": "chat", "agent_id": "helper", "message": "c2"})
            _, tokens, done = recv_turn(c)
            assert done["type"] == "done" and len(tokens) == 40
        _wait_for(lambda: gate.running == 0 and gate.waiting == 0)
    assert len(scripted.requests) == 2  # a and c2: b and c never reached the engine


def recv_turn_rest(ws: Any) -> tuple[None, list[dict[str, Any]], dict[str, Any]]:
    """The rest of a turn whose ``start`` was already read."""
    tokens = []
    while True:
        frame = ws.receive_json()
        if frame["type"] != "token":
            return None, tokens, frame
        tokens.append(frame)


async def test_gate_counts_and_cancellation_do_not_leak_slots() -> None:
    gate = GenerationGate(slots=2, max_waiting=1)
    async with contextlib.AsyncExitStack() as held:
        await held.enter_async_context(gate.slot())
        await held.enter_async_context(gate.slot())
        assert (gate.running, gate.waiting) == (2, 0)
        waiter = asyncio.ensure_future(held.enter_async_context(gate.slot()))
        await asyncio.sleep(0)
        assert gate.waiting == 1
        with pytest.raises(Busy):
            async with gate.slot():
                pass
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.waiting == 0
    assert gate.running == 0
    async with gate.slot(), gate.slot():  # both slots are free again
        assert gate.running == 2


async def test_one_client_address_cannot_take_every_slot() -> None:
    """At its cap, an address waits; another address's turn goes ahead of it in the line."""
    gate = GenerationGate(slots=3, max_waiting=10, per_client=2)
    async with contextlib.AsyncExitStack() as held:
        for _ in range(2):
            await held.enter_async_context(gate.slot("10.0.0.1"))
        third = asyncio.ensure_future(held.enter_async_context(gate.slot("10.0.0.1")))
        await asyncio.sleep(0)
        assert (gate.running, gate.waiting) == (2, 1)
        async with asyncio.timeout(1), gate.slot("10.0.0.2"):  # not behind the capped waiter
            assert gate.running == 3 and gate.held_by("10.0.0.2") == 1
        assert not third.done()  # the free slot is still not its: its address is at the cap
        third.cancel()
        with pytest.raises(asyncio.CancelledError):
            await third
    assert (gate.running, gate.waiting) == (0, 0)


def test_openai_endpoint_shares_the_limits_and_the_gate(
        make_settings: Callable[..., Settings], scripted: ScriptedEngine) -> None:
    scripted.pieces = [f"w{i} " for i in range(40)]
    scripted.delay = 0.01
    with limited(make_settings, scripted, max_message_chars=100, max_new_tokens_limit=64,
                 max_new_tokens=32, max_concurrent_generations=1,
                 max_waiting_generations=0) as client:
        put_agent(client, "helper")
        gate = client.app_state["services"].gate

        def complete(content: str, **extra: Any) -> Any:
            return client.post("/v1/chat/completions", json={
                "model": "helper", "messages": [{"role": "user", "content": content}], **extra})

        resp = complete("x" * 101)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "message_too_large"
        resp = complete("x", max_tokens=65)
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "max_new_tokens_too_large"
        with client.websocket_connect("/ws/chat") as ws:  # the socket holds the only slot
            ws.send_json({"type": "chat", "agent_id": "helper", "message": "m"})
            assert ws.receive_json()["type"] == "start"
            resp = complete("x")
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "busy"
            recv_turn_rest(ws)
        _wait_for(lambda: gate.running == 0)
        resp = complete("x")
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]
        assert gate.running == 0  # given back when the answer ended


# --- admission: one owner per rule ------------------------------------------------------------
async def test_resizing_the_gate_admits_waiters_and_the_gauges_follow() -> None:
    metrics = Metrics()
    gate = GenerationGate(slots=1, max_waiting=5, metrics=metrics)

    def gauge(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    async with contextlib.AsyncExitStack() as held:
        await held.enter_async_context(gate.slot())
        second = asyncio.ensure_future(held.enter_async_context(gate.slot()))
        await asyncio.sleep(0)
        assert (gauge("streaming_llm_turns_active"), gauge("streaming_llm_turns_waiting",
                                                           on="slot")) == (1, 1)
        gate.resize(2)
        await second
        assert (gauge("streaming_llm_turns_active"), gauge("streaming_llm_turns_waiting",
                                                           on="slot")) == (2, 0)
        assert gauge("streaming_llm_generation_slots") == 2
    assert gauge("streaming_llm_turns_active") == 0


async def test_a_turn_waiting_for_its_conversation_is_counted_as_waiting() -> None:
    metrics = Metrics()
    locks = ConversationLocks(metrics)
    async with locks.hold("c1"):
        second = asyncio.ensure_future(locks.hold("c1").__aenter__())
        await asyncio.sleep(0)
        assert locks.waiting == 1
        assert metrics.registry.get_sample_value("streaming_llm_turns_waiting",
                                                 {"on": "conversation"}) == 1
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
    assert locks.waiting == 0 and len(locks) == 0


class BatchedEngine(ScriptedEngine):
    """An engine that reports its batch, as the local engine's health does."""

    async def health(self) -> EngineHealth:
        return EngineHealth(ready=self.ready, model="scripted-model", extra={"max_batch": 3})


def test_the_engines_batch_bounds_the_gate(make_settings: Callable[..., Settings]) -> None:
    """A turn holding a slot is one the engine runs: the gate takes the engine's batch when it
    is below STREAMING_LLM_MAX_CONCURRENT_GENERATIONS, and turns beyond it wait in the gate."""
    with TestClient(create_app(make_settings(), engine=BatchedEngine())) as client:
        gate = client.app_state["services"].gate
        _wait_for(lambda: gate.slots == 3)
        assert "streaming_llm_generation_slots 3.0" in client.get("/metrics").text
    with TestClient(create_app(make_settings(max_concurrent_generations=2),
                               engine=BatchedEngine())) as client:
        time.sleep(0.2)
        assert client.app_state["services"].gate.slots == 2  # the setting, when lower

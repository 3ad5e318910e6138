"""``GET /metrics``: Prometheus text from a real server, and engine numbers in process."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from websockets.sync.client import connect

from streaming_llm.app import create_app
from streaming_llm.engines.base import EngineHealth
from streaming_llm.settings import Settings

from .conftest import put_agent
from .fakes import ScriptedEngine
from .server import start_server


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample as ``{(name, labels): value}``."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def scrape(base_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    resp = httpx.get(base_url + "/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=")
    return samples(resp.text)


def recv(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        frame = json.loads(ws.recv(timeout=10))
        if frame["type"] == kind:
            return frame
        assert frame["type"] in ("start", "token"), frame


@pytest.mark.e2e
def test_metrics_follow_requests_sockets_and_turns(tmp_path: Any) -> None:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "10",
           "STREAMING_LLM_RESUME_GRACE_S": "0"}  # a closed socket's turn ends at once
    with start_server(tmp_path, env) as server:
        base = server.base_url
        assert httpx.put(base + "/agents/echoer", json={"name": "Echoer"}).status_code == 201
        assert httpx.get(base + "/agents/nobody").status_code == 404
        assert httpx.get(base + "/no/such/path").status_code == 404

        with connect(server.ws_url) as ws:
            long = " ".join(["word"] * 300)
            ws.send(json.dumps({"type": "chat", "agent_id": "echoer", "message": long,
                                "request_id": "a"}))
            recv(ws, "token")
            ws.send(json.dumps({"type": "chat", "agent_id": "echoer", "message": "one two three",
                                "request_id": "b"}))
            time.sleep(0.1)  # let the server read frame b
            during = scrape(base)
            assert value(during, "streaming_llm_websockets_active") == 1
            assert value(during, "streaming_llm_turns_queued") == 1
            assert value(during, "streaming_llm_turns_active") == 1
            ws.send(json.dumps({"type": "cancel", "request_id": "a"}))
            assert recv(ws, "done")["finish_reason"] == "cancelled"
            done_b = recv(ws, "done")
            assert done_b["request_id"] == "b" and done_b["usage"]["completion_tokens"] == 3

        # A socket closed with a turn still queued leaves nothing queued behind.
        with connect(server.ws_url) as ws:
            for rid in ("c", "d"):
                ws.send(json.dumps({"type": "chat", "agent_id": "echoer", "message": long,
                                    "request_id": rid}))
            recv(ws, "token")

        deadline = time.monotonic() + 5
        while True:
            after = scrape(base)
            if value(after, "streaming_llm_turns_total", outcome="cancelled") == 2:
                break
            assert time.monotonic() < deadline, after
            time.sleep(0.05)
        assert value(after, "streaming_llm_websockets_active") == 0
        assert value(after, "streaming_llm_turns_queued") == 0
        assert value(after, "streaming_llm_turns_active") == 0
        assert value(after, "streaming_llm_turns_total", outcome="stop") == 1
        generated = value(after, "streaming_llm_generated_tokens_total")
        assert generated is not None and generated >= 5  # 3 for b, some for a and c
        assert value(after, "streaming_llm_time_to_first_token_seconds_count") == 3
        first = value(after, "streaming_llm_time_to_first_token_seconds_sum")
        assert first is not None and 0 < first < 3
        gaps = value(after, "streaming_llm_inter_token_seconds_count")
        assert gaps is not None and gaps == generated - 3
        assert value(after, "streaming_llm_engine_ready") == 1
        assert value(after, "streaming_llm_engine_info", engine="echo", model="echo") == 1
        assert value(after, "streaming_llm_http_requests_total", method="PUT",
                     route="/agents/{agent_id}", status="201") == 1
        assert value(after, "streaming_llm_http_requests_total", method="GET",
                     route="/agents/{agent_id}", status="404") == 1
        assert value(after, "streaming_llm_http_requests_total", method="GET",
                     route="unmatched", status="404") == 1
        assert value(after, "streaming_llm_http_request_duration_seconds_count", method="GET",
                     route="/metrics") is not None


def test_engine_numbers_and_one_registry_per_app(settings: Settings,
                                                 scripted: ScriptedEngine) -> None:
    async def health() -> EngineHealth:
        return EngineHealth(ready=False, model="m", extra={
            "cached_conversations": 3, "kv_tokens": 1234, "evicted": 7.5, "loaded": True,
            "url": "http://x"})

    scripted.health = health  # type: ignore[method-assign]
    for _ in range(2):  # a second app in the same process has a registry of its own
        with TestClient(create_app(settings, engine=scripted)) as client:
            put_agent(client, "helper")
            resp = client.post("/v1/chat/completions", json={
                "model": "helper", "messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 200
            found = samples(client.get("/metrics").text)
            assert value(found, "streaming_llm_engine_ready") == 0
            assert value(found, "streaming_llm_cached_conversations") == 3
            assert value(found, "streaming_llm_kv_tokens") == 1234
            assert value(found, "streaming_llm_engine_stat", key="evicted") == 7.5
            assert not any(name == "streaming_llm_engine_stat" and dict(labels)["key"] in
                           ("loaded", "url") for name, labels in found)
            assert value(found, "streaming_llm_turns_total", outcome="stop") == 1
            assert value(found, "streaming_llm_generated_tokens_total") == 4
            assert value(found, "streaming_llm_http_requests_total", method="POST",
                         route="/v1/chat/completions", status="200") == 1

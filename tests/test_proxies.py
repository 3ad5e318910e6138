"""Client addresses behind proxies: ``X-Forwarded-For`` counts only from ``STREAMING_LLM_TRUSTED_PROXIES``
(:mod:`streaming_llm.http.proxies`), seen through the per-client generation cap of a real server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from streaming_llm.http.proxies import trusted_proxies, uvicorn_proxy_options
from streaming_llm.settings import Settings, SettingsError

from .server import ServerProcess, start_server

LONG = " ".join(f"w{i}" for i in range(200))  # 200 words at 50 ms: long enough to hold a slot


@contextmanager
def one_slot_per_client(tmp_path: Path, trusted: str) -> Iterator[ServerProcess]:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "50",
           "STREAMING_LLM_MAX_GENERATIONS_PER_CLIENT": "1",
           "STREAMING_LLM_MAX_WAITING_GENERATIONS": "0",
           "STREAMING_LLM_TRUSTED_PROXIES": trusted}
    with start_server(tmp_path, env) as server:
        resp = httpx.put(f"{server.base_url}/agents/echoer", json={"name": "Echoer"})
        assert resp.status_code == 201, resp.text
        yield server


def second_turn_while_first_streams(server: ServerProcess) -> httpx.Response:
    """Hold a slot with a streamed answer claiming 10.0.0.1, then ask for another claiming
    10.0.0.2; both come from this test's loopback address."""
    url = server.base_url + "/v1/chat/completions"
    body = {"model": "echoer", "stream": True, "messages": [{"role": "user", "content": LONG}]}
    with httpx.Client(timeout=10) as http, http.stream(
            "POST", url, json=body, headers={"X-Forwarded-For": "10.0.0.1"}) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        assert json.loads(next(lines).removeprefix("data: "))["choices"][0]["delta"]["role"]
        return http.post(url, headers={"X-Forwarded-For": "10.0.0.2"},
                         json={"model": "echoer", "max_tokens": 1,
                               "messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.e2e
def test_forwarded_for_from_an_untrusted_peer_counts_as_the_peer(tmp_path: Path) -> None:
    with one_slot_per_client(tmp_path, "") as server:
        second = second_turn_while_first_streams(server)
    assert second.status_code == 503, second.text
    error = second.json()["error"]
    assert error["code"] == "busy"
    assert "(1 for this client" in error["message"]


@pytest.mark.e2e
def test_forwarded_for_from_a_trusted_proxy_names_the_client(tmp_path: Path) -> None:
    with one_slot_per_client(tmp_path, "127.0.0.1") as server:
        second = second_turn_while_first_streams(server)
    assert second.status_code == 200, second.text
    assert second.json()["choices"][0]["message"]["content"] == "hi"


def test_trusted_proxies_setting() -> None:
    assert uvicorn_proxy_options(Settings()) == {"proxy_headers": False, "forwarded_allow_ips": []}
    settings = Settings(trusted_proxies=" 127.0.0.1, 10.0.0.0/8 ,::1")
    assert trusted_proxies(settings) == ["127.0.0.1", "10.0.0.0/8", "::1"]
    assert uvicorn_proxy_options(settings)["proxy_headers"] is True
    with pytest.raises(SettingsError, match="STREAMING_LLM_TRUSTED_PROXIES: 'nginx'"):
        trusted_proxies(Settings(trusted_proxies="127.0.0.1,nginx"))

"""Whole turns against a broken or hostile upstream: the real app (lifespan, SQLite) with the real
``ollama`` / ``openai`` engine on a fake upstream. Whatever the upstream sends, the turn ends
with one clear ending frame and the conversation keeps its answer row."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from streaming_llm.app import create_app
from streaming_llm.settings import Settings
from streaming_llm.testing.fake_ollama import ChatScript, FakeOllama
from streaming_llm.testing.fake_openai import CompletionScript, FakeOpenAI
from streaming_llm.testing.fake_server import FakeServer

from .conftest import put_agent
from .database import stored_turns
from .test_chat import recv_turn

KINDS = {
    "ollama": (FakeOllama, ChatScript, lambda fake: {"ollama_url": fake.url}),
    "openai": (FakeOpenAI, CompletionScript,
               lambda fake: {"openai_base_url": fake.url + "/v1", "openai_model": "fake-model"}),
}
USAGE_NAMES = {"ollama": ("prompt_eval_count", "eval_count"),
               "openai": ("prompt_tokens", "completion_tokens")}


@pytest.fixture(params=sorted(KINDS))
def upstream(request: pytest.FixtureRequest,
             make_settings: Callable[..., Settings]) -> Iterator[tuple[str, FakeServer, Settings]]:
    fake_class, _, settings_of = KINDS[request.param]
    with fake_class() as fake:
        yield request.param, fake, make_settings(engine=request.param, **settings_of(fake))


def turn(settings: Settings, **frame: Any) -> tuple[dict[str, Any], dict[str, Any], str]:
    """One chat turn: (start, ending frame, the streamed text); checks the stored turns too."""
    with TestClient(create_app(settings)) as client:
        put_agent(client, "helper")
        with client.websocket_connect("/ws/chat") as ws:
            ws.send_json({"type": "chat", "agent_id": "helper", "message": "Hi", **frame})
            start, tokens, ending = recv_turn(ws)
        metrics = {s.name: s.value for family in text_string_to_metric_families(
            client.get("/metrics").text) for s in family.samples}
    assert all(value >= 0 for name, value in metrics.items() if "tokens" in name), metrics
    return start, ending, "".join(t["token"] for t in tokens)


@pytest.mark.parametrize("numbers", [(-5, -1), (2**64 - 1, 2**64 - 1)], ids=["negative", "2^64-1"])
def test_bad_usage_numbers_keep_the_answer(upstream, numbers):
    kind, fake, settings = upstream
    fake.script = KINDS[kind][1](counts=dict(zip(USAGE_NAMES[kind], numbers, strict=True)))
    start, done, text = turn(settings)
    assert done["type"] == "done" and done["finish_reason"] == "stop", done
    assert text == "Hello, world!"
    usage = done["usage"]  # (a count of 0 is left out of the frame)
    assert (usage.get("prompt_tokens", 0), usage["completion_tokens"]) == (0, 4)
    assert stored_turns(settings, start["conversation_id"]) == [
        (0, "user", "Hi", None), (1, "assistant", "Hello, world!", "stop")]


def test_a_run_on_answer_is_stored_cut_at_max_new_tokens(upstream):
    kind, fake, settings = upstream
    fake.script = KINDS[kind][1](tokens=[f" w{i}" for i in range(40)], ignore_max_tokens=True)
    start, done, text = turn(settings, options={"max_new_tokens": 6})
    assert done["type"] == "done" and done["finish_reason"] == "length", done
    assert text == " w0 w1 w2 w3 w4 w5"
    assert stored_turns(settings, start["conversation_id"])[1] == (
        1, "assistant", " w0 w1 w2 w3 w4 w5", "length")


def test_a_huge_error_message_reaches_the_client_cut(upstream):
    kind, fake, settings = upstream
    fake.script = KINDS[kind][1](status=500, flood=b"x", flood_bytes=20 * 1024 * 1024,
                                 encoding="gzip")
    start, ending, _ = turn(settings)
    size = len(ending.get("message", ""))  # (not the message itself in the assertion)
    assert ending["type"] == "error" and ending["code"] == "engine_error", ending.get("code")
    assert size <= 1100, size
    # one turn, one ending: the answer row is there, empty, ended by the error
    assert stored_turns(settings, start["conversation_id"]) == [
        (0, "user", "Hi", None), (1, "assistant", "", "error")]

"""The openai engine against a fake OpenAI-compatible server over real TCP.

A real second instance of this service as the upstream is in ``tests/test_openai_upstream_e2e.py``.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from streaming_llm.engines.base import EngineRequest, GenerationOptions, TextChunk
from streaming_llm.engines.openai_compat import OpenAIEngine
from streaming_llm.errors import EngineError
from streaming_llm.settings import Settings
from streaming_llm.testing.fake_openai import CompletionScript, FakeOpenAI
from streaming_llm.testing.server import free_port

from .streams import drain, engine_request, until_error

request = engine_request
KEY = "sk-test-0123456789abcdef"


@pytest.fixture
def fake():
    with FakeOpenAI(models=["fake-model", "other"]) as server:
        yield server


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def make_engine(fake: FakeOpenAI | None, http: aiohttp.ClientSession, **overrides) -> OpenAIEngine:
    url = overrides.pop("url", fake.base_url if fake else "")
    ttl = overrides.pop("health_ttl_s", 5.0)
    overrides.setdefault("openai_model", "fake-model")
    settings = Settings(engine="openai", openai_base_url=url, **overrides)
    return OpenAIEngine(settings, http, health_ttl_s=ttl)


async def collect(engine: OpenAIEngine, req: EngineRequest | None = None):
    return await drain(engine.stream(req or request()))


async def collect_until_error(engine: OpenAIEngine) -> tuple[list[str], EngineError]:
    return await until_error(engine.stream(request()))


# --- the request ------------------------------------------------------------------------------
async def test_request_body_has_messages_in_order_and_options_under_openai_names(fake, http):
    options = GenerationOptions(temperature=0.2, max_new_tokens=99, top_p=0.9, top_k=40,
                                stop=["\n\n", "User:"], seed=7)
    await collect(make_engine(fake, http), request(options, max_new_tokens=64))
    assert fake.chats[0].body == {
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second question"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        # max_tokens comes from the resolved request.max_new_tokens, not the raw option
        "max_tokens": 64, "temperature": 0.2, "top_p": 0.9, "top_k": 40,
        "stop": ["\n\n", "User:"], "seed": 7,
    }


async def test_options_left_unset_are_not_sent(fake, http):
    await collect(make_engine(fake, http), request(max_new_tokens=5))
    body = fake.chats[0].body
    assert set(body) == {"model", "messages", "stream", "stream_options", "max_tokens"}


async def test_the_api_key_is_sent_as_a_bearer_token(http):
    with FakeOpenAI(api_key=KEY) as fake:
        pieces, _ = await collect(make_engine(fake, http, openai_api_key=KEY))
        assert fake.chats[0].headers["Authorization"] == f"Bearer {KEY}"
    assert "".join(pieces) == "Hello, world!"


async def test_without_a_model_setting_the_first_listed_model_is_used(fake, http):
    engine = make_engine(fake, http, openai_model="")
    await collect(engine)
    assert fake.chats[0].body["model"] == "fake-model"
    assert (await engine.health()).model == "fake-model"


async def test_without_a_model_setting_a_server_listing_none_is_engine_unavailable(http):
    with FakeOpenAI(models=[]) as fake:
        _, error = await collect_until_error(make_engine(fake, http, openai_model=""))
        assert fake.chats == []  # nothing was sent with no model to name
    assert error.code == "engine_unavailable"
    assert error.message == f"openai at {fake.base_url} lists no model at /models"


# --- the answer -------------------------------------------------------------------------------
async def test_pieces_then_finish_with_the_upstreams_usage(fake, http):
    fake.script = CompletionScript(tokens=["The", " sky", " is", " blue", "."], cached_tokens=3)
    pieces, finished = await collect(make_engine(fake, http))
    assert "".join(pieces) == "The sky is blue."
    assert finished.reason == "stop"
    usage = finished.usage
    assert usage.prompt_tokens == 9  # the fake counts the words of the messages
    assert usage.completion_tokens == 5
    assert usage.cached_tokens == 3
    assert usage.decode_tokens_per_s is not None and usage.decode_tokens_per_s > 0
    assert usage.time_to_first_token_ms is not None and usage.time_to_first_token_ms >= 0


async def test_without_usage_from_upstream_the_pieces_are_counted(fake, http):
    fake.script = CompletionScript(tokens=["a", "b", "c"], usage=False)
    _, finished = await collect(make_engine(fake, http))
    assert (finished.usage.prompt_tokens, finished.usage.completion_tokens) == (0, 3)


async def test_finish_reason_length_maps_to_length(fake, http):
    fake.script = CompletionScript(tokens=[f" w{i}" for i in range(10)])
    pieces, finished = await collect(make_engine(fake, http), request(max_new_tokens=3))
    assert pieces == [" w0", " w1", " w2"]
    assert finished.reason == "length"


@pytest.mark.parametrize("script", [
    CompletionScript(split_events=True),
    CompletionScript(events_per_write=3),
    CompletionScript(events_per_write=2, split_events=True, crlf=True),
    CompletionScript(events_per_write=100, comments=True),
    CompletionScript(no_done=True),
], ids=["split", "three-per-write", "two-per-write-split-crlf", "all-in-one-with-comments",
        "no-done"])
async def test_events_are_read_whatever_the_network_reads(fake, http, script):
    script.tokens = ["a\n", "{b}", " \"c\"", " é", "\u2028d", "data: x\n\n"]
    fake.script = script
    pieces, finished = await collect(make_engine(fake, http))
    assert pieces == ["a\n", "{b}", " \"c\"", " é", "\u2028d", "data: x\n\n"]
    assert finished.usage.completion_tokens == 6


async def test_a_clean_stream_returns_its_connection_to_the_pool(fake, http):
    engine = make_engine(fake, http)
    await collect(engine)
    await collect(engine)
    assert [c.connection for c in fake.chats] == [1, 1]


# --- errors -----------------------------------------------------------------------------------
async def test_unknown_model_is_model_not_found_with_the_upstreams_message(fake, http):
    pieces, error = await collect_until_error(make_engine(fake, http, openai_model="nope"))
    assert pieces == []
    assert (error.code, error.message) == ("model_not_found", "The model `nope` does not exist.")


async def test_a_wrong_api_key_is_engine_error_and_the_key_is_not_in_the_message(http):
    with FakeOpenAI(api_key="the-right-one") as fake:
        engine = make_engine(fake, http, openai_api_key=KEY)
        _, error = await collect_until_error(engine)
        health = await engine.health()
    assert error.code == "engine_error"
    assert "401" in error.message and "Incorrect API key" in error.message
    assert health.ready is False and "refused the API key" in (health.detail or "")
    assert KEY not in error.message + str(health)


@pytest.mark.parametrize(("status", "code"), [(500, "engine_error"), (503, "engine_unavailable")])
async def test_an_http_error_before_streaming_keeps_the_upstreams_message(fake, http, status, code):
    fake.script = CompletionScript(status=status, error="CUDA out of memory")
    _, error = await collect_until_error(make_engine(fake, http))
    assert error.code == code
    assert str(status) in error.message and "CUDA out of memory" in error.message


async def test_an_error_event_mid_stream_is_engine_error_after_the_pieces(fake, http):
    fake.script = CompletionScript(tokens=["one", " two", " three"], error="out of memory",
                                   error_after=2)
    pieces, error = await collect_until_error(make_engine(fake, http))
    assert pieces == ["one", " two"]
    assert (error.code, error.message) == ("engine_error", "out of memory")


@pytest.mark.parametrize("garbage", [b"not json {", b"[1, 2]", b'{"choices": "many"}', b"\xff\xfe"],
                         ids=["not-json", "not-an-object", "wrong-shape", "not-utf8"])
async def test_garbage_is_a_protocol_error(fake, http, garbage):
    fake.script = CompletionScript(tokens=["x", "y"], garbage=garbage, garbage_after=1)
    pieces, error = await collect_until_error(make_engine(fake, http))
    assert pieces == ["x"]
    assert error.code == "engine_protocol_error"


async def test_a_stream_cut_before_its_finish_reason_is_a_protocol_error(fake, http):
    fake.script = CompletionScript(tokens=["x", "y", "z"], cut_after=2)
    pieces, error = await collect_until_error(make_engine(fake, http))
    assert pieces == ["x", "y"]
    assert error.code == "engine_protocol_error"
    assert "finish reason" in error.message


async def test_connection_refused_is_engine_unavailable(http):
    engine = make_engine(None, http, url=f"http://127.0.0.1:{free_port()}/v1")
    _, error = await collect_until_error(engine)
    assert error.code == "engine_unavailable"
    assert "not reachable" in error.message


@pytest.mark.parametrize("script", [CompletionScript(tokens=["x", "y"], hang_after=1),
                                    CompletionScript(hang_before_headers=True)],
                         ids=["mid-stream", "before-headers"])
async def test_silence_longer_than_the_read_timeout_is_engine_timeout(fake, http, script):
    fake.script = script
    engine = make_engine(fake, http, openai_read_timeout_s=0.3)
    pieces, error = await asyncio.wait_for(collect_until_error(engine), 10)
    assert pieces == (["x"] if script.hang_after else [])
    assert error.code == "engine_timeout"
    assert await asyncio.to_thread(fake.chats[0].wait_disconnected, 5)


# --- cancellation -----------------------------------------------------------------------------
async def test_closing_the_stream_closes_the_upstream_connection(fake, http):
    fake.script = CompletionScript(tokens=[f" w{i}" for i in range(200)], delay_s=0.02)
    stream = make_engine(fake, http).stream(request(max_new_tokens=500))
    assert isinstance(await anext(stream), TextChunk)
    assert isinstance(await anext(stream), TextChunk)
    await stream.aclose()
    record = fake.chats[0]
    assert await asyncio.to_thread(record.wait_disconnected, 5)
    assert not record.complete.is_set()


async def test_cancelling_the_reading_task_closes_the_upstream_connection(fake, http):
    fake.script = CompletionScript(tokens=[f" w{i}" for i in range(200)], delay_s=0.02)
    engine = make_engine(fake, http)
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.stream(request(max_new_tokens=500)):
            got_one.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_one.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(fake.chats[0].wait_disconnected, 5)


# --- health -----------------------------------------------------------------------------------
async def test_health_ready_when_the_server_serves_the_model(fake, http):
    health = await make_engine(fake, http, openai_model="other").health()
    assert (health.ready, health.model) == (True, "other")
    assert health.extra == {"url": fake.base_url}


async def test_health_reports_a_model_the_server_does_not_serve(fake, http):
    health = await make_engine(fake, http, openai_model="gpt-9").health()
    assert health.ready is False
    assert health.detail == (f"model gpt-9 is not served by openai at {fake.base_url} "
                             "(it lists: fake-model, other)")


async def test_health_reports_an_unreachable_server(http):
    url = f"http://127.0.0.1:{free_port()}/v1"
    engine = make_engine(None, http, url=url)
    await engine.start()  # must not raise when the server is down
    health = await engine.health()
    assert health.ready is False
    assert (health.detail or "").startswith(f"openai at {url} is not reachable")


async def test_health_reports_a_failing_server(fake, http):
    fake.models_status = 500
    health = await make_engine(fake, http).health()
    assert health.ready is False
    assert "unexpected answer" in (health.detail or "") and "500" in (health.detail or "")

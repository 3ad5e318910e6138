"""The Ollama engine against a fake Ollama speaking the real wire protocol over real TCP."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from streaming_llm.engines.base import EngineRequest, GenerationOptions, TextChunk
from streaming_llm.engines.ollama import OllamaEngine, keep_alive_value
from streaming_llm.errors import EngineError
from streaming_llm.settings import Settings
from streaming_llm.testing.fake_ollama import ChatScript, FakeOllama

from .streams import drain, engine_request, until_error


@pytest.fixture
def fake():
    with FakeOllama() as server:
        yield server


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def make_engine(fake: FakeOllama | None, http: aiohttp.ClientSession, **overrides) -> OllamaEngine:
    url = overrides.pop("url", fake.url if fake else "")
    ttl = overrides.pop("health_ttl_s", 5.0)
    settings = Settings(engine="ollama", ollama_url=url, **overrides)
    return OllamaEngine(settings, http, health_ttl_s=ttl)


request = engine_request


async def collect(engine: OllamaEngine, req: EngineRequest | None = None):
    return await drain(engine.stream(req or request()))


async def collect_until_error(engine: OllamaEngine) -> tuple[list[str], EngineError]:
    return await until_error(engine.stream(request()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the request ------------------------------------------------------------------------------
async def test_request_body_has_messages_in_order_and_options_under_ollama_names(fake, http):
    engine = make_engine(fake, http, ollama_model="llama3.2", ollama_keep_alive="10m",
                         ollama_num_ctx=4096)
    options = GenerationOptions(temperature=0.2, max_new_tokens=99, top_p=0.9, top_k=40,
                                stop=["\n\n", "User:"], seed=7)
    await collect(engine, request(options, max_new_tokens=64))

    assert fake.chats[0].body == {
        "model": "llama3.2",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second question"},
        ],
        "stream": True,
        "keep_alive": "10m",
        # num_predict comes from the resolved request.max_new_tokens, not the raw option
        "options": {"num_predict": 64, "temperature": 0.2, "top_p": 0.9, "top_k": 40,
                    "stop": ["\n\n", "User:"], "seed": 7, "num_ctx": 4096},
    }


async def test_options_left_unset_are_not_sent(fake, http):
    engine = make_engine(fake, http, ollama_keep_alive="-1")
    await collect(engine, request(max_new_tokens=5))
    body = fake.chats[0].body
    assert body["options"] == {"num_predict": 5}
    assert body["keep_alive"] == -1  # a number: Ollama reads "-1" as an invalid Go duration


@pytest.mark.parametrize(("text", "expected"), [("5m", "5m"), ("-1", -1), ("0", 0),
                                                ("300", 300), ("1.5", 1.5), ("1h30m", "1h30m")])
def test_keep_alive_numbers_are_sent_as_numbers(text, expected):
    assert keep_alive_value(text) == expected


# --- the answer -------------------------------------------------------------------------------
async def test_pieces_then_done_with_usage(fake, http):
    fake.script = ChatScript(tokens=["The", " sky", " is", " blue", "."])
    pieces, finished = await collect(make_engine(fake, http))

    assert "".join(pieces) == "The sky is blue."
    assert finished.reason == "stop"
    usage = finished.usage
    assert usage.prompt_tokens == 9  # the fake counts the words of the messages
    assert usage.completion_tokens == 5
    assert usage.decode_tokens_per_s is not None and usage.decode_tokens_per_s > 0
    assert usage.time_to_first_token_ms is not None and usage.time_to_first_token_ms >= 0


async def test_done_reason_length_maps_to_length(fake, http):
    fake.script = ChatScript(tokens=[f" w{i}" for i in range(10)])
    pieces, finished = await collect(make_engine(fake, http), request(max_new_tokens=3))
    assert pieces == [" w0", " w1", " w2"]
    assert finished.reason == "length"
    assert finished.usage.completion_tokens == 3


@pytest.mark.parametrize("script", [
    ChatScript(split_lines=True),
    ChatScript(lines_per_write=3),
    ChatScript(lines_per_write=2, split_lines=True),
    ChatScript(lines_per_write=100),
], ids=["split", "three-per-write", "two-per-write-split", "all-in-one-write"])
async def test_lines_are_read_whatever_the_network_reads(fake, http, script):
    script.tokens = ["a\n", "{b}", " \"c\"", " é", "\u2028d"]  # newlines/quotes inside content
    fake.script = script
    pieces, finished = await collect(make_engine(fake, http))
    assert pieces == ["a\n", "{b}", " \"c\"", " é", "\u2028d"]
    assert finished.usage.completion_tokens == 5


async def test_a_clean_stream_returns_its_connection_to_the_pool(fake, http):
    engine = make_engine(fake, http)
    await collect(engine)
    await collect(engine)
    assert [c.connection for c in fake.chats] == [1, 1]


# --- errors -----------------------------------------------------------------------------------
async def test_unknown_model_is_model_not_found_with_ollamas_message(fake, http):
    pieces, error = await collect_until_error(make_engine(fake, http, ollama_model="nope"))
    assert pieces == []
    assert error.code == "model_not_found"
    assert error.message == 'model "nope" not found, try pulling it first'


async def test_a_500_before_streaming_is_engine_error_with_status(fake, http):
    fake.script = ChatScript(status=500, error="llama runner process has terminated")
    _, error = await collect_until_error(make_engine(fake, http))
    assert error.code == "engine_error"
    assert "500" in error.message and "llama runner process has terminated" in error.message


async def test_an_error_line_mid_stream_is_engine_error_after_the_pieces(fake, http):
    fake.script = ChatScript(tokens=["one", " two", " three"], error="out of memory", error_after=2)
    pieces, error = await collect_until_error(make_engine(fake, http))
    assert pieces == ["one", " two"]
    assert (error.code, error.message) == ("engine_error", "out of memory")


async def test_connection_refused_is_engine_unavailable(http):
    engine = make_engine(None, http, url=f"http://127.0.0.1:{free_port()}")
    _, error = await collect_until_error(engine)
    assert error.code == "engine_unavailable"
    assert "not reachable" in error.message


async def test_a_connection_not_accepted_in_time_is_engine_unavailable(http):
    # A listening socket whose accept queue is full: the kernel leaves further connects hanging.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            engine = make_engine(None, http, url=f"http://127.0.0.1:{port}",
                                 ollama_connect_timeout_s=0.2)
            _, error = await asyncio.wait_for(collect_until_error(engine), 10)
        finally:
            for filler in fillers:
                filler.close()
    assert error.code == "engine_unavailable"
    assert "did not accept a connection within 0.2 s" in error.message


async def test_a_malformed_line_is_a_protocol_error(fake, http):
    fake.script = ChatScript(tokens=["x", "y"], malformed_after=1)
    pieces, error = await collect_until_error(make_engine(fake, http))
    assert pieces == ["x"]
    assert error.code == "engine_protocol_error"


async def test_a_stream_without_done_is_a_protocol_error(fake, http):
    fake.script = ChatScript(tokens=["x", "y"], end_without_done=True)
    pieces, error = await collect_until_error(make_engine(fake, http))
    assert pieces == ["x", "y"]
    assert error.code == "engine_protocol_error"
    assert "done" in error.message


@pytest.mark.parametrize("script", [ChatScript(tokens=["x", "y"], hang_after=1),
                                    ChatScript(hang_before_headers=True)],
                         ids=["mid-stream", "before-headers"])
async def test_silence_longer_than_the_read_timeout_is_engine_timeout(fake, http, script):
    fake.script = script
    engine = make_engine(fake, http, ollama_read_timeout_s=0.3)
    pieces, error = await asyncio.wait_for(collect_until_error(engine), 10)
    assert pieces == (["x"] if script.hang_after else [])
    assert error.code == "engine_timeout"
    # we gave up on the answer: the upstream connection is closed, not kept
    assert await asyncio.to_thread(fake.chats[0].wait_disconnected, 5)


# --- cancellation -----------------------------------------------------------------------------
async def test_closing_the_stream_closes_the_upstream_connection(fake, http):
    fake.script = ChatScript(tokens=[f" w{i}" for i in range(200)], delay_s=0.02)
    stream = make_engine(fake, http).stream(request(max_new_tokens=500))
    assert isinstance(await anext(stream), TextChunk)
    assert isinstance(await anext(stream), TextChunk)
    await stream.aclose()

    record = fake.chats[0]
    assert await asyncio.to_thread(record.wait_disconnected, 5)
    assert not record.complete.is_set()


async def test_cancelling_the_reading_task_closes_the_upstream_connection(fake, http):
    fake.script = ChatScript(tokens=[f" w{i}" for i in range(200)], delay_s=0.02)
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
async def test_health_ready_when_ollama_answers_and_has_the_model(fake, http):
    health = await make_engine(fake, http, ollama_model="llama3.2").health()
    assert health.ready is True
    assert health.model == "llama3.2"
    assert health.extra == {"url": fake.url, "version": fake.version}


@pytest.mark.parametrize(("configured", "listed", "ready"), [
    ("llama3.2", ["llama3.2:latest"], True),
    ("llama3.2:latest", ["llama3.2:latest"], True),
    ("llama3.2:1b", ["llama3.2:latest"], False),
    ("llama3", ["llama3.2:latest"], False),
    ("me/custom", ["me/custom:latest", "qwen2.5:7b"], True),
])
async def test_health_matches_the_model_to_ollamas_tagged_names(http, configured, listed, ready):
    with FakeOllama(models=listed) as fake:
        health = await make_engine(fake, http, ollama_model=configured).health()
    assert health.ready is ready
    if not ready:
        assert health.detail == f"model {configured} not found; run `ollama pull {configured}`"


async def test_health_reports_an_unreachable_ollama(http):
    url = f"http://127.0.0.1:{free_port()}"
    engine = make_engine(None, http, url=url)
    await engine.start()  # must not raise when Ollama is down
    health = await engine.health()
    assert health.ready is False
    assert health.detail is not None
    assert health.detail.startswith(f"ollama at {url} is not reachable")


async def test_health_reports_a_failing_ollama(fake, http):
    fake.version_status = 500
    health = await make_engine(fake, http).health()
    assert health.ready is False
    assert "unexpected answer" in (health.detail or "") and "500" in (health.detail or "")


async def test_health_is_cached_so_checks_do_not_hammer_ollama(fake, http):
    engine = make_engine(fake, http, health_ttl_s=0.2)
    reports = await asyncio.gather(*(engine.health() for _ in range(5)))
    assert all(r.ready for r in reports)
    assert fake.hits["/api/version"] == 1 and fake.hits["/api/tags"] == 1

    fake.models = []  # a change is seen only once the cached report expires
    assert (await engine.health()).ready is True
    await asyncio.sleep(0.25)
    assert (await engine.health()).ready is False
    assert fake.hits["/api/version"] == 2


async def test_the_first_turn_after_ollama_restarted_gets_a_fresh_connection(fake, http):
    engine = make_engine(fake, http)
    await collect(engine)  # its connection is kept for the next turn...
    fake.stop()
    fake.start()  # ...but Ollama restarted (same port) and that connection is dead
    pieces, finished = await collect(engine)
    assert "".join(pieces) == "Hello, world!" and finished.reason == "stop"

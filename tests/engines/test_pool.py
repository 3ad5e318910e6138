"""The backend pool over three real local servers (fake Ollamas on loopback), one stopped mid-test."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest

from streaming_llm.engines.base import EngineRequest, PromptTokens, TextChunk
from streaming_llm.engines.ollama import OllamaEngine
from streaming_llm.engines.pool import BackendPool
from streaming_llm.engines.registry import create_engine
from streaming_llm.metrics import EngineSnapshot, Metrics
from streaming_llm.settings import Settings
from streaming_llm.testing.fake_ollama import ChatScript, FakeOllama
from streaming_llm.testing.server import free_port

from .streams import drain, engine_request, until_error

SLOW = ChatScript(tokens=[f" w{i}" for i in range(400)], delay_s=0.02)


@pytest.fixture
def fakes() -> Iterator[list[FakeOllama]]:
    servers = [FakeOllama().start() for _ in range(3)]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def settings(urls: list[str], **overrides) -> Settings:
    overrides.setdefault("backend_retry_s", 0.05)
    overrides.setdefault("backend_retry_max_s", 0.2)
    return Settings(engine="ollama", ollama_url=",".join(urls), **overrides)


@pytest.fixture
async def pool(fakes, http):
    engine = create_engine(settings([f.url for f in fakes]), http)
    assert isinstance(engine, BackendPool)
    await engine.start()
    yield engine
    await engine.close()


def turn(conversation_id: str, request_id: str = "r", max_new_tokens: int = 64):
    return engine_request(conversation_id=conversation_id, request_id=request_id,
                          max_new_tokens=max_new_tokens)


def served_by(fakes: list[FakeOllama]) -> list[int]:
    return [len(f.chats) for f in fakes]


def states(pool: BackendPool) -> list[str]:
    return ["up" if b.up else "down" for b in pool.backends]


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_one_url_is_a_plain_engine_and_a_list_is_a_pool(http):
    assert isinstance(create_engine(settings(["http://127.0.0.1:1"]), http), OllamaEngine)
    pool = create_engine(settings(["http://127.0.0.1:1", " http://127.0.0.1:2/ "]), http)
    assert isinstance(pool, BackendPool)
    assert [b.url for b in pool.backends] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]


async def test_concurrent_turns_go_to_the_least_busy_backends(pool, fakes):
    for fake in fakes:
        fake.script = SLOW
    streams = [pool.stream(turn(f"c{i}", max_new_tokens=500)) for i in range(3)]
    for stream in streams:  # each turn starts while the ones before it are streaming
        assert isinstance(await anext(stream), TextChunk)
    assert served_by(fakes) == [1, 1, 1]
    assert [b.active for b in pool.backends] == [1, 1, 1]
    for stream in streams:
        await stream.aclose()
    assert [b.active for b in pool.backends] == [0, 0, 0]


async def test_a_conversation_sticks_to_its_backend_even_when_it_is_busier(pool, fakes):
    await drain(pool.stream(turn("mine")))
    home = served_by(fakes).index(1)
    assert pool.backend_of("mine") == fakes[home].url

    fakes[home].script = SLOW  # another conversation keeps the same backend busy...
    pool.backends[home].picked_at = -1.0  # ...by being sent there first
    busy = pool.stream(turn("other", max_new_tokens=500))
    assert isinstance(await anext(busy), TextChunk)
    assert len(fakes[home].chats) == 2

    fakes[home].script = ChatScript()
    await drain(pool.stream(turn("mine")))  # still goes home, though others are idle
    assert len(fakes[home].chats) == 3
    await busy.aclose()

    pool.forget("mine")
    assert pool.backend_of("mine") is None


async def test_a_stopped_backend_is_marked_down_its_turn_moves_and_it_comes_back(pool, fakes):
    await drain(pool.stream(turn("c1")))
    home = served_by(fakes).index(1)
    fakes[home].stop()  # mid-test: the backend holding c1's cache goes away

    pieces, finished = await drain(pool.stream(turn("c1")))  # nothing streamed yet: it moves
    assert "".join(pieces) == "Hello, world!" and finished.reason == "stop"
    assert states(pool)[home] == "down"
    assert pool.backends[home].failures == 1
    moved_to = pool.backend_of("c1")
    assert moved_to is not None and moved_to != fakes[home].url

    health = await pool.health()
    assert health.ready is True
    assert health.detail is not None and health.detail.startswith("2 of 3 ollama backends up")
    backends = health.extra["backends"]  # type: ignore[index]
    assert [b["state"] for b in backends] == states(pool)
    assert "not reachable" in str(backends[home]["detail"])

    started = pool.backends[home].turns
    for i in range(4):  # while down, new turns are not sent there
        await drain(pool.stream(turn(f"n{i}")))
    assert pool.backends[home].turns == started

    fakes[home].start()  # back on the same port: a probe finds it and marks it up
    await wait_for(lambda: pool.backends[home].up)
    assert pool.backends[home].detail is None
    assert pool.backends[home].failures == 1


async def test_a_backend_probed_down_is_retried_with_growing_waits(fakes, http):
    urls = [fakes[0].url, f"http://127.0.0.1:{free_port()}"]
    engine = BackendPool([OllamaEngine(settings(urls), http, url=u) for u in urls],
                         retry_s=0.05, retry_max_s=0.2)
    await engine.start()
    try:
        assert states(engine) == ["up", "down"]
        down = engine.backends[1]
        await wait_for(lambda: down.retry_s == 0.2)  # 0.05 → 0.1 → 0.2 (the ceiling)
        assert down.up is False and down.failures == 1
    finally:
        await engine.close()
    assert down.recovery is None


async def test_a_turn_that_already_streamed_fails_where_it_is(pool, fakes):
    for fake in fakes:
        fake.script = SLOW
    stream = pool.stream(turn("c1", max_new_tokens=500))
    assert isinstance(await anext(stream), TextChunk)
    home = served_by(fakes).index(1)
    await asyncio.to_thread(fakes[home].stop)
    _, error = await until_error(stream)
    assert error.code == "engine_error" and "lost" in error.message
    assert served_by(fakes).count(1) == 1  # not moved: the client saw the start of an answer
    assert states(pool)[home] == "down"


class PromptFirst(OllamaEngine):
    """An upstream that knows the prompt's size before its first piece, as the local engine."""

    async def stream(self, request: EngineRequest):
        yield PromptTokens(sum(len(m.content.split()) for m in request.messages))
        async for chunk in super().stream(request):
            yield chunk


async def test_a_turn_that_sent_only_its_prompt_tokens_still_moves(fakes, http):
    urls = [f"http://127.0.0.1:{free_port()}", fakes[0].url]  # the first refuses connections
    engine = BackendPool([PromptFirst(settings(urls), http, url=u) for u in urls],
                         retry_s=0.05, retry_max_s=0.2)  # not started: both are up, in order
    try:
        chunks = [chunk async for chunk in engine.stream(turn("c1"))]
        assert sum(isinstance(c, PromptTokens) for c in chunks) == 1
        pieces, finished = await drain(_replay(chunks))
        assert "".join(pieces) == "Hello, world!" and finished.reason == "stop"
        assert states(engine) == ["down", "up"] and served_by(fakes) == [1, 0, 0]
        assert engine.backend_of("c1") == fakes[0].url
    finally:
        await engine.close()


async def _replay(chunks):
    for chunk in chunks:
        yield chunk


async def test_when_every_backend_is_down_the_turn_is_engine_unavailable(pool, fakes):
    for fake in fakes:
        fake.stop()
    _, error = await until_error(pool.stream(turn("c1")))
    assert error.code == "engine_unavailable"
    assert error.message.startswith("no ollama backend could take the turn")
    assert states(pool) == ["down", "down", "down"]
    health = await pool.health()
    assert health.ready is False and health.detail.startswith("0 of 3")  # type: ignore[union-attr]

    fakes[1].start()  # the down ones are still tried, so one that is back takes the next turn
    pieces, _ = await drain(pool.stream(turn("c2")))
    assert "".join(pieces) == "Hello, world!"
    assert states(pool)[1] == "up"


async def test_other_errors_end_the_turn_on_its_backend(pool, fakes):
    for fake in fakes:
        fake.script = ChatScript(status=500, error="llama runner process has terminated")
    _, error = await until_error(pool.stream(turn("c1")))
    assert error.code == "engine_error"
    assert served_by(fakes).count(1) == 1 and sum(served_by(fakes)) == 1
    assert states(pool) == ["up", "up", "up"]


async def test_a_backend_missing_the_model_is_marked_down_by_health(fakes, http):
    fakes[2].models = ["qwen2.5:7b"]
    engine = create_engine(settings([f.url for f in fakes]), http)
    assert isinstance(engine, BackendPool)
    health = await engine.health()
    await engine.close()
    assert health.ready is True
    assert states(engine) == ["up", "up", "down"]
    assert "model llama3.2 not found" in (health.detail or "")


async def test_metrics_show_each_backends_state(pool, fakes):
    await drain(pool.stream(turn("c1")))
    fakes[0].stop()
    fakes[1].stop()
    for conversation in ("c2", "c3"):  # the least recently picked is tried first: both fail
        await drain(pool.stream(turn(conversation)))
    assert states(pool) == ["down", "down", "up"]
    metrics = Metrics()
    metrics.engine = EngineSnapshot("ollama", await pool.health(), None)
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    for fake, up in zip(fakes, [0, 0, 1], strict=True):
        assert f'streaming_llm_backend_up{{backend="{fake.url}"}} {up}.0' in text
    assert f'streaming_llm_backend_failures_total{{backend="{fakes[0].url}"}} 1.0' in text
    turns = {f.url: n for f, n in zip(fakes, [b.turns for b in pool.backends], strict=True)}
    assert sum(turns.values()) >= 2
    for url, n in turns.items():
        assert f'streaming_llm_backend_turns_total{{backend="{url}"}} {float(n)}' in text


async def test_openai_base_urls_make_a_pool_that_moves_off_a_stopped_server(http):
    from streaming_llm.testing.fake_openai import CompletionScript, FakeOpenAI

    servers = [FakeOpenAI(script=CompletionScript(tokens=[f"s{i}"])).start() for i in range(3)]
    try:
        engine = create_engine(Settings(
            engine="openai", openai_base_url=",".join(s.base_url for s in servers),
            openai_model="fake-model", backend_retry_s=0.05), http)
        assert isinstance(engine, BackendPool) and engine.name == "openai"
        await engine.start()
        pieces, _ = await drain(engine.stream(turn("c1")))
        home = int(pieces[0].removeprefix("s"))
        servers[home].stop()
        pieces, finished = await drain(engine.stream(turn("c1")))
        assert pieces != [f"s{home}"] and finished.reason == "stop"
        assert states(engine)[home] == "down"
        await engine.close()
    finally:
        for server in servers:
            server.stop()

"""The upstream engines against fakes that speak each upstream's real wire protocol over real TCP.

One suite for both kinds (Ollama's NDJSON ``/api/chat``, the OpenAI-compatible SSE
``/v1/chat/completions``): what every upstream must do is written once and run on each
:class:`Kind`; what only one protocol has (Ollama's model tags and keep-alive, an OpenAI server's
API key and model list, SSE's comments and ``\\r\\n``) follows in that kind's own section.
A real second instance of this service as the upstream is in ``tests/test_openai_upstream_e2e.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import msgspec
import pytest

from streaming_llm.chat.tool_calls import parse
from streaming_llm.engines.base import (
    ChatMessage,
    Constraint,
    EngineRequest,
    GenerationOptions,
    TextChunk,
    ToolCall,
)
from streaming_llm.engines.ollama import OllamaEngine, keep_alive_value
from streaming_llm.engines.openai_compat import OpenAIEngine
from streaming_llm.engines.tool_text import call_block
from streaming_llm.engines.upstream import UpstreamEngine
from streaming_llm.errors import EngineError
from streaming_llm.settings import Settings
from streaming_llm.testing.fake_ollama import ChatScript, FakeOllama
from streaming_llm.testing.fake_openai import CompletionScript, FakeOpenAI
from streaming_llm.testing.fake_server import FakeServer, Script
from streaming_llm.testing.server import free_port

from .streams import drain, engine_request, until_error

request = engine_request
KEY = "sk-test-0123456789abcdef"
#: streams.MESSAGES as both protocols put them on the wire, in order
SENT_MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second question"},
]


@dataclasses.dataclass(frozen=True)
class Kind:
    """One upstream kind as the shared tests see it."""

    name: str  # the engine setting, and the prefix of its settings (ollama_*, openai_*)
    fake: Callable[..., FakeServer]
    script: Callable[..., Script]
    engine: Callable[..., UpstreamEngine]
    url_setting: str
    path: str  # what follows host:port in the URL setting
    model: str  # the engine's model setting
    models: tuple[str, ...]  # what the fake serves
    probe_status: str  # the fake's attribute that makes its health probe fail

    def url(self, fake: FakeServer) -> str:
        return fake.url + self.path

    def address(self, port: int) -> str:
        return f"http://127.0.0.1:{port}{self.path}"

    def serve(self, **kwargs: Any) -> FakeServer:
        kwargs.setdefault("models", self.models)
        return self.fake(**kwargs)

    def make_engine(self, fake: FakeServer | None, http: aiohttp.ClientSession,
                    **overrides: Any) -> UpstreamEngine:
        """An engine on ``fake``; ``url``, ``model``, ``read_timeout_s``... are this kind's."""
        ttl = overrides.pop("health_ttl_s", 5.0)
        settings: dict[str, Any] = {self.url_setting: self.url(fake) if fake else "",
                                    f"{self.name}_model": self.model}
        for key, value in overrides.items():
            settings[self.url_setting if key == "url" else f"{self.name}_{key}"] = value
        return self.engine(Settings(engine=self.name, **settings), http, health_ttl_s=ttl)


OLLAMA = Kind("ollama", FakeOllama, ChatScript, OllamaEngine, "ollama_url", "", "llama3.2",
              ("llama3.2:latest",), "version_status")
OPENAI = Kind("openai", FakeOpenAI, CompletionScript, OpenAIEngine, "openai_base_url", "/v1",
              "fake-model", ("fake-model", "other"), "models_status")


@pytest.fixture(params=[OLLAMA, OPENAI], ids=lambda kind: kind.name)
def kind(request: pytest.FixtureRequest) -> Kind:
    return request.param


@pytest.fixture
def fake(kind: Kind) -> Iterator[FakeServer]:
    with kind.serve() as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def collect(engine: UpstreamEngine, req: EngineRequest | None = None):
    return await drain(engine.stream(req or request()))


async def collect_until_error(engine: UpstreamEngine) -> tuple[list[str], EngineError]:
    return await until_error(engine.stream(request()))


# --- the answer -------------------------------------------------------------------------------
async def test_pieces_then_finish_with_the_upstreams_usage(kind, fake, http):
    fake.script = kind.script(tokens=["The", " sky", " is", " blue", "."])
    pieces, finished = await collect(kind.make_engine(fake, http))
    assert "".join(pieces) == "The sky is blue."
    assert finished.reason == "stop"
    usage = finished.usage
    assert usage.prompt_tokens == 9  # the fakes count the words of the messages
    assert usage.completion_tokens == 5
    assert usage.decode_tokens_per_s is not None and usage.decode_tokens_per_s > 0
    assert usage.time_to_first_token_ms is not None and usage.time_to_first_token_ms >= 0


async def test_an_answer_cut_by_max_tokens_finishes_with_length(kind, fake, http):
    fake.script = kind.script(tokens=[f" w{i}" for i in range(10)])
    pieces, finished = await collect(kind.make_engine(fake, http), request(max_new_tokens=3))
    assert pieces == [" w0", " w1", " w2"]
    assert finished.reason == "length"
    assert finished.usage.completion_tokens == 3


@pytest.mark.parametrize("cut", [dict(split=True), dict(per_write=3),
                                 dict(per_write=2, split=True), dict(per_write=100)],
                         ids=["split", "three-per-write", "two-per-write-split", "all-in-one-write"])
async def test_lines_are_read_whatever_the_network_reads(kind, fake, http, cut):
    tokens = ["a\n", "{b}", " \"c\"", " é", "\u2028d"]  # newlines/quotes inside content
    fake.script = kind.script(tokens=tokens, **cut)
    pieces, finished = await collect(kind.make_engine(fake, http))
    assert pieces == tokens
    assert finished.usage.completion_tokens == 5


# --- tools ------------------------------------------------------------------------------------
WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TIME = {"name": "get_time", "description": "", "parameters": {"type": "object"}}
HISTORY = [ChatMessage("system", "You are terse."), ChatMessage("user", "weather?"),
           ChatMessage("assistant", "", (ToolCall("call_1", "get_weather", '{"city": "Oslo"}'),)),
           ChatMessage("tool", "snow", tool_call_id="call_1")]


def tool_request(*, lazy: bool = True, tools: tuple[dict[str, Any], ...] = (WEATHER, TIME),
                 parallel: bool = True, max_new_tokens: int = 64) -> EngineRequest:
    """A turn offering ``tools`` after a call and its result; ``lazy``: tool_choice auto."""
    return EngineRequest(request_id="r1", conversation_id="c1", messages=HISTORY,
                         options=GenerationOptions(), max_new_tokens=max_new_tokens,
                         constraint=Constraint("tool_calls", tools=tools, parallel=parallel,
                                               lazy_trigger="<tool_call>" if lazy else None))


#: HISTORY's call and result as each protocol puts them on the wire
SENT_CALLS = {
    "ollama": [{"role": "assistant", "content": "",
                "tool_calls": [{"function": {"name": "get_weather",
                                             "arguments": {"city": "Oslo"}}}]},
               {"role": "tool", "content": "snow", "tool_name": "get_weather"}],
    "openai": [{"role": "assistant", "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "snow"}],
}


async def test_tools_calls_and_results_go_upstream_natively(kind, fake, http):
    await collect(kind.make_engine(fake, http), tool_request())
    body = fake.chats[0].body
    assert body["messages"][:2] == [{"role": "system", "content": "You are terse."},
                                    {"role": "user", "content": "weather?"}]
    assert body["messages"][2:] == SENT_CALLS[kind.name]
    assert body["tools"] == [{"type": "function", "function": WEATHER},
                             {"type": "function", "function": TIME}]
    if kind is OPENAI:
        assert (body["tool_choice"], body["parallel_tool_calls"]) == ("auto", True)
    else:
        assert "tool_choice" not in body  # Ollama has none


@pytest.mark.parametrize(("lazy", "tools", "openai_choice"), [
    (False, (WEATHER, TIME), "required"),
    (False, (TIME,), {"type": "function", "function": {"name": "get_time"}}),  # named
], ids=["required", "named"])
async def test_a_call_that_must_come(kind, fake, http, lazy, tools, openai_choice):
    """OpenAI gets the choice; Ollama, which has none, gets the tools the call must come from."""
    await collect(kind.make_engine(fake, http), tool_request(lazy=lazy, tools=tools,
                                                             parallel=False))
    body = fake.chats[0].body
    assert body["tools"] == [{"type": "function", "function": t} for t in tools]
    if kind is OPENAI:
        assert (body["tool_choice"], body["parallel_tool_calls"]) == (openai_choice, False)


async def test_no_tools_leaves_the_history_native_and_sends_none(kind, fake, http):
    """tool_choice none: no constraint, no tools; the history still carries its call natively."""
    req = msgspec.structs.replace(tool_request(), constraint=None)
    await collect(kind.make_engine(fake, http), req)
    body = fake.chats[0].body
    assert "tools" not in body and "tool_choice" not in body
    assert body["messages"][2:] == SENT_CALLS[kind.name]


async def test_native_calls_come_back_in_the_generic_form_after_the_text(kind, fake, http):
    fake.script = kind.script(tokens=["Let me", " look."], tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Paris", "note": "</tool_call> é"}},
        {"name": "get_time", "arguments": {}}])
    pieces, finished = await collect(kind.make_engine(fake, http), tool_request())
    assert finished.reason == "stop"  # the server says tool_calls: the answer made calls
    assert pieces[:2] == ["Let me", " look."]
    text, calls = parse("".join(pieces), "r1")
    assert text == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "note": "</tool_call> é"}), ("get_time", {})]
    assert pieces[2:] == [call_block(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize(("call", "problem"), [
    ({"name": "rm_rf", "arguments": {}}, "names 'rm_rf', which is no tool offered"),
    ({"name": "get_weather", "arguments": "Paris"}, "arguments that are not a JSON object"),
    ({"name": "get_weather", "arguments": ["Paris"]}, "arguments that are not a JSON object"),
], ids=["unknown-tool", "text-arguments", "array-arguments"])
async def test_a_wrong_call_is_a_protocol_error_and_no_call_gets_out(kind, fake, http, call,
                                                                     problem):
    fake.script = kind.script(tokens=["Hm."], tool_calls=[
        {"name": "get_time", "arguments": {}}, call])
    pieces, error = await until_error(kind.make_engine(fake, http).stream(tool_request()))
    assert pieces == ["Hm."]  # the good call before the wrong one did not get out either
    assert error.code == "engine_protocol_error"
    assert problem in error.message and error.message.startswith(kind.name)


async def test_calls_without_tools_offered_are_a_protocol_error(kind, fake, http):
    fake.script = kind.script(tokens=[], tool_calls=[{"name": "get_time", "arguments": {}}])
    _, error = await until_error(kind.make_engine(fake, http).stream(request()))
    assert error.code == "engine_protocol_error" and "none were" in error.message


async def test_an_upstream_that_refuses_tools_gets_them_as_text(kind, fake, http, caplog):
    """A model (Ollama) or server (vLLM without a tool parser) without native tools answers
    400: the turn is sent once more in the generic text form, which every template takes."""
    fake.script = kind.script(tokens=["ok"], refuse_tools="llama3.2 does not support tools")
    with caplog.at_level(logging.WARNING, "streaming_llm.engines.upstream"):
        pieces, finished = await collect(kind.make_engine(fake, http), tool_request())
    assert (pieces, finished.reason) == (["ok"], "stop")
    native, text = (c.body for c in fake.chats)
    assert "tools" in native and "tools" not in text
    assert [m["role"] for m in text["messages"]] == ["system", "user", "assistant", "user"]
    assert text["messages"][0]["content"].startswith("You are terse.\n\n# Tools")
    assert text["messages"][2]["content"] == call_block("get_weather", '{"city": "Oslo"}')
    assert text["messages"][3]["content"] == "<tool_response>\nsnow\n</tool_response>"
    assert "does not support tools" in caplog.text


async def test_a_400_without_tools_is_not_sent_again(kind, fake, http):
    fake.script = kind.script(status=400, error="bad request")
    _, error = await collect_until_error(kind.make_engine(fake, http))
    assert "bad request" in error.message and len(fake.chats) == 1


async def test_an_answer_cut_short_drops_its_unfinished_call(http):
    """finish_reason length: the last call may be cut mid-arguments; it is dropped, the whole
    ones before it are kept (OpenAI's protocol: Ollama sends calls whole)."""
    with OPENAI.serve() as fake:
        fake.script = OPENAI.script(tokens=[], finish_reason="length", tool_calls=[
            {"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": '{"ci'}])
        pieces, finished = await collect(OPENAI.make_engine(fake, http), tool_request())
    assert finished.reason == "length"
    assert pieces == [call_block("get_time", "{}")]


async def test_assembled_arguments_are_bounded_like_a_line(http):
    """Each piece fits in an event, the call they make does not: engine_protocol_error."""
    with OPENAI.serve() as fake:
        fake.script = OPENAI.script(tokens=[], tool_calls=[
            {"name": "get_weather", "arguments": {"city": "x" * 2000}}])
        engine = OpenAIEngine(Settings(engine="openai", openai_base_url=OPENAI.url(fake),
                                       openai_model=OPENAI.model, upstream_max_line_bytes=1024),
                              http)
        _, error = await until_error(engine.stream(tool_request()))
    assert error.code == "engine_protocol_error"
    assert error.message == "openai sent a tool call longer than 1024 bytes"


async def test_a_clean_stream_returns_its_connection_to_the_pool(kind, fake, http):
    engine = kind.make_engine(fake, http)
    await collect(engine)
    await collect(engine)
    assert [c.connection for c in fake.chats] == [1, 1]


async def test_the_first_turn_after_a_restart_gets_a_fresh_connection(kind, fake, http):
    engine = kind.make_engine(fake, http)
    await collect(engine)  # its connection is kept for the next turn...
    fake.stop()
    fake.start()  # ...but the upstream restarted (same port) and that connection is dead
    pieces, finished = await collect(engine)
    assert "".join(pieces) == "Hello, world!" and finished.reason == "stop"


# --- errors -----------------------------------------------------------------------------------
async def test_unknown_model_is_model_not_found_with_the_upstreams_message(kind, fake, http):
    pieces, error = await collect_until_error(kind.make_engine(fake, http, model="nope"))
    assert pieces == []
    assert error.code == "model_not_found"
    assert error.message == {"ollama": 'model "nope" not found, try pulling it first',
                             "openai": "The model `nope` does not exist."}[kind.name]


async def test_a_500_before_streaming_is_engine_error_with_the_upstreams_message(kind, fake,
                                                                                 http):
    fake.script = kind.script(status=500, error="llama runner process has terminated")
    _, error = await collect_until_error(kind.make_engine(fake, http))
    assert error.code == "engine_error"
    assert "500" in error.message and "llama runner process has terminated" in error.message


async def test_an_error_mid_stream_is_engine_error_after_the_pieces(kind, fake, http):
    fake.script = kind.script(tokens=["one", " two", " three"], error="out of memory",
                              error_after=2)
    pieces, error = await collect_until_error(kind.make_engine(fake, http))
    assert pieces == ["one", " two"]
    assert (error.code, error.message) == ("engine_error", "out of memory")


async def test_connection_refused_is_engine_unavailable(kind, http):
    engine = kind.make_engine(None, http, url=kind.address(free_port()))
    _, error = await collect_until_error(engine)
    assert error.code == "engine_unavailable"
    assert "not reachable" in error.message


async def test_a_connection_not_accepted_in_time_is_engine_unavailable(kind, http):
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
            engine = kind.make_engine(None, http, url=kind.address(port),
                                      connect_timeout_s=0.2)
            _, error = await asyncio.wait_for(collect_until_error(engine), 10)
        finally:
            for filler in fillers:
                filler.close()
    assert error.code == "engine_unavailable"
    assert "did not accept a connection within 0.2 s" in error.message


@pytest.mark.parametrize("hang", [dict(tokens=["x", "y"], hang_after=1),
                                  dict(hang_before_headers=True)],
                         ids=["mid-stream", "before-headers"])
async def test_silence_longer_than_the_read_timeout_is_engine_timeout(kind, fake, http, hang):
    fake.script = kind.script(**hang)
    engine = kind.make_engine(fake, http, read_timeout_s=0.3)
    pieces, error = await asyncio.wait_for(collect_until_error(engine), 10)
    assert pieces == (["x"] if "hang_after" in hang else [])
    assert error.code == "engine_timeout"
    # we gave up on the answer: the upstream connection is closed, not kept
    assert await asyncio.to_thread(fake.chats[0].wait_disconnected, 5)


# --- cancellation -----------------------------------------------------------------------------
async def test_closing_the_stream_closes_the_upstream_connection(kind, fake, http):
    fake.script = kind.script(tokens=[f" w{i}" for i in range(200)], delay_s=0.02)
    stream = kind.make_engine(fake, http).stream(request(max_new_tokens=500))
    assert isinstance(await anext(stream), TextChunk)
    assert isinstance(await anext(stream), TextChunk)
    await stream.aclose()
    record = fake.chats[0]
    assert await asyncio.to_thread(record.wait_disconnected, 5)
    assert not record.complete.is_set()


async def test_cancelling_the_reading_task_closes_the_upstream_connection(kind, fake, http):
    fake.script = kind.script(tokens=[f" w{i}" for i in range(200)], delay_s=0.02)
    engine = kind.make_engine(fake, http)
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
async def test_health_ready_when_the_upstream_serves_the_model(kind, fake, http):
    health = await kind.make_engine(fake, http).health()
    assert health.ready is True
    assert health.model == kind.model
    expected = {"url": kind.url(fake)}
    if isinstance(fake, FakeOllama):
        expected["version"] = fake.version
    assert health.extra == expected


async def test_health_reports_an_unreachable_upstream(kind, http):
    url = kind.address(free_port())
    engine = kind.make_engine(None, http, url=url)
    await engine.start()  # must not raise when the upstream is down
    health = await engine.health()
    assert health.ready is False
    assert (health.detail or "").startswith(f"{kind.name} at {url} is not reachable")


async def test_health_reports_a_failing_upstream(kind, fake, http):
    setattr(fake, kind.probe_status, 500)
    health = await kind.make_engine(fake, http).health()
    assert health.ready is False
    assert "unexpected answer" in (health.detail or "") and "500" in (health.detail or "")


# --- Ollama only ------------------------------------------------------------------------------
@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama() as server:
        yield server


async def test_ollama_request_has_messages_in_order_and_options_under_ollamas_names(ollama, http):
    engine = OLLAMA.make_engine(ollama, http, keep_alive="10m", num_ctx=4096)
    options = GenerationOptions(temperature=0.2, max_new_tokens=99, top_p=0.9, top_k=40,
                                stop=["\n\n", "User:"], seed=7)
    await collect(engine, request(options, max_new_tokens=64))

    assert ollama.chats[0].body == {
        "model": "llama3.2",
        "messages": SENT_MESSAGES,
        "stream": True,
        "keep_alive": "10m",
        # num_predict comes from the resolved request.max_new_tokens, not the raw option
        "options": {"num_predict": 64, "temperature": 0.2, "top_p": 0.9, "top_k": 40,
                    "stop": ["\n\n", "User:"], "seed": 7, "num_ctx": 4096},
    }


async def test_ollama_options_left_unset_are_not_sent(ollama, http):
    engine = OLLAMA.make_engine(ollama, http, keep_alive="-1")
    await collect(engine, request(max_new_tokens=5))
    body = ollama.chats[0].body
    assert body["options"] == {"num_predict": 5}
    assert body["keep_alive"] == -1  # a number: Ollama reads "-1" as an invalid Go duration


@pytest.mark.parametrize(("text", "expected"), [("5m", "5m"), ("-1", -1), ("0", 0),
                                                ("300", 300), ("1.5", 1.5), ("1h30m", "1h30m")])
def test_ollama_keep_alive_numbers_are_sent_as_numbers(text, expected):
    assert keep_alive_value(text) == expected


async def test_ollama_a_malformed_line_is_a_protocol_error(ollama, http):
    ollama.script = ChatScript(tokens=["x", "y"], malformed_after=1)
    pieces, error = await collect_until_error(OLLAMA.make_engine(ollama, http))
    assert pieces == ["x"]
    assert error.code == "engine_protocol_error"


async def test_ollama_a_stream_without_done_is_a_protocol_error(ollama, http):
    ollama.script = ChatScript(tokens=["x", "y"], end_without_done=True)
    pieces, error = await collect_until_error(OLLAMA.make_engine(ollama, http))
    assert pieces == ["x", "y"]
    assert error.code == "engine_protocol_error"
    assert "done" in error.message


@pytest.mark.parametrize(("configured", "listed", "ready"), [
    ("llama3.2", ["llama3.2:latest"], True),
    ("llama3.2:latest", ["llama3.2:latest"], True),
    ("llama3.2:1b", ["llama3.2:latest"], False),
    ("llama3", ["llama3.2:latest"], False),
    ("me/custom", ["me/custom:latest", "qwen2.5:7b"], True),
])
async def test_ollama_health_matches_the_model_to_ollamas_tagged_names(http, configured, listed,
                                                                       ready):
    with FakeOllama(models=listed) as fake:
        health = await OLLAMA.make_engine(fake, http, model=configured).health()
    assert health.ready is ready
    if not ready:
        assert health.detail == f"model {configured} not found; run `ollama pull {configured}`"


async def test_ollama_health_is_cached_so_checks_do_not_hammer_ollama(ollama, http):
    engine = OLLAMA.make_engine(ollama, http, health_ttl_s=0.2)
    reports = await asyncio.gather(*(engine.health() for _ in range(5)))
    assert all(r.ready for r in reports)
    assert ollama.hits["/api/version"] == 1 and ollama.hits["/api/tags"] == 1

    ollama.models = []  # a change is seen only once the cached report expires
    assert (await engine.health()).ready is True
    await asyncio.sleep(0.25)
    assert (await engine.health()).ready is False
    assert ollama.hits["/api/version"] == 2


# --- OpenAI-compatible only -------------------------------------------------------------------
@pytest.fixture
def openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(models=list(OPENAI.models)) as server:
        yield server


async def test_openai_request_has_messages_in_order_and_options_under_openai_names(openai, http):
    options = GenerationOptions(temperature=0.2, max_new_tokens=99, top_p=0.9, top_k=40,
                                stop=["\n\n", "User:"], seed=7)
    await collect(OPENAI.make_engine(openai, http), request(options, max_new_tokens=64))
    assert openai.chats[0].body == {
        "model": "fake-model",
        "messages": SENT_MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        # max_tokens comes from the resolved request.max_new_tokens, not the raw option
        "max_tokens": 64, "temperature": 0.2, "top_p": 0.9, "top_k": 40,
        "stop": ["\n\n", "User:"], "seed": 7,
    }


async def test_openai_options_left_unset_are_not_sent(openai, http):
    await collect(OPENAI.make_engine(openai, http), request(max_new_tokens=5))
    body = openai.chats[0].body
    assert set(body) == {"model", "messages", "stream", "stream_options", "max_tokens"}


async def test_openai_the_api_key_is_sent_as_a_bearer_token(http):
    with FakeOpenAI(api_key=KEY) as fake:
        pieces, _ = await collect(OPENAI.make_engine(fake, http, api_key=KEY))
        assert fake.chats[0].headers["Authorization"] == f"Bearer {KEY}"
    assert "".join(pieces) == "Hello, world!"


async def test_openai_without_a_model_setting_the_first_listed_model_is_used(openai, http):
    engine = OPENAI.make_engine(openai, http, model="")
    await collect(engine)
    assert openai.chats[0].body["model"] == "fake-model"
    assert (await engine.health()).model == "fake-model"


async def test_openai_without_a_model_setting_a_server_listing_none_is_engine_unavailable(http):
    with FakeOpenAI(models=[]) as fake:
        _, error = await collect_until_error(OPENAI.make_engine(fake, http, model=""))
        assert fake.chats == []  # nothing was sent with no model to name
    assert error.code == "engine_unavailable"
    assert error.message == f"openai at {fake.base_url} lists no model at /models"


async def test_openai_cached_prompt_tokens_are_passed_on(openai, http):
    openai.script = CompletionScript(cached_tokens=3)
    _, finished = await collect(OPENAI.make_engine(openai, http))
    assert finished.usage.cached_tokens == 3


async def test_openai_without_usage_from_upstream_the_pieces_are_counted(openai, http):
    openai.script = CompletionScript(tokens=["a", "b", "c"], usage=False)
    _, finished = await collect(OPENAI.make_engine(openai, http))
    assert (finished.usage.prompt_tokens, finished.usage.completion_tokens) == (0, 3)


@pytest.mark.parametrize("script", [
    CompletionScript(per_write=2, split=True, crlf=True),
    CompletionScript(per_write=100, comments=True),
    CompletionScript(no_done=True),
], ids=["two-per-write-split-crlf", "all-in-one-with-comments", "no-done"])
async def test_openai_events_are_read_whatever_the_server_frames(openai, http, script):
    script.tokens = ["a\n", "{b}", " \"c\"", " é", "\u2028d", "data: x\n\n"]
    openai.script = script
    pieces, finished = await collect(OPENAI.make_engine(openai, http))
    assert pieces == ["a\n", "{b}", " \"c\"", " é", "\u2028d", "data: x\n\n"]
    assert finished.usage.completion_tokens == 6


async def test_openai_a_wrong_api_key_is_engine_error_and_the_key_is_not_in_the_message(http):
    with FakeOpenAI(api_key="the-right-one") as fake:
        engine = OPENAI.make_engine(fake, http, api_key=KEY)
        _, error = await collect_until_error(engine)
        health = await engine.health()
    assert error.code == "engine_error"
    assert "401" in error.message and "Incorrect API key" in error.message
    assert health.ready is False and "refused the API key" in (health.detail or "")
    assert KEY not in error.message + str(health)


async def test_openai_a_503_before_streaming_is_engine_unavailable(openai, http):
    openai.script = CompletionScript(status=503, error="CUDA out of memory")
    _, error = await collect_until_error(OPENAI.make_engine(openai, http))
    assert error.code == "engine_unavailable"
    assert "503" in error.message and "CUDA out of memory" in error.message


@pytest.mark.parametrize("garbage", [b"not json {", b"[1, 2]", b'{"choices": "many"}', b"\xff\xfe"],
                         ids=["not-json", "not-an-object", "wrong-shape", "not-utf8"])
async def test_openai_garbage_is_a_protocol_error(openai, http, garbage):
    openai.script = CompletionScript(tokens=["x", "y"], garbage=garbage, garbage_after=1)
    pieces, error = await collect_until_error(OPENAI.make_engine(openai, http))
    assert pieces == ["x"]
    assert error.code == "engine_protocol_error"


async def test_openai_a_stream_cut_before_its_finish_reason_is_a_protocol_error(openai, http):
    openai.script = CompletionScript(tokens=["x", "y", "z"], cut_after=2)
    pieces, error = await collect_until_error(OPENAI.make_engine(openai, http))
    assert pieces == ["x", "y"]
    assert error.code == "engine_protocol_error"
    assert "finish reason" in error.message


async def test_openai_health_reports_a_model_the_server_does_not_serve(openai, http):
    health = await OPENAI.make_engine(openai, http, model="gpt-9").health()
    assert health.ready is False
    assert health.detail == (f"model gpt-9 is not served by openai at {openai.base_url} "
                             "(it lists: fake-model, other)")


# --- a hostile or broken upstream: every read bounded -----------------------------------------
# The bound these tests hold the engine to: the Python memory allocated while a turn or a probe
# runs (tracemalloc's peak, the fake's own pieces included) stays under MEMORY_BOUND, against
# floods of 50 to 200 MB before compression. The engine's own bounds, at their defaults: a line
# or event 1 MiB, an error or probe body 1 MiB, one answer 16 MiB (docs/security.md).
MEMORY_BOUND = 16 * 1024 * 1024
MB = 1024 * 1024
BLANKS = b" " * 1023 + b"\n"  # a line of blanks: skipped by NDJSON and SSE readers alike


class Peak:
    """``with Peak() as peak: ...``, then ``peak.bytes``: the most Python memory allocated at
    once inside the block."""

    bytes = 0

    def __enter__(self) -> Peak:
        tracemalloc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


@pytest.mark.parametrize("encoding", [None, "gzip"])
async def test_an_endless_line_ends_the_turn_in_bounded_memory(kind, fake, http, encoding):
    fake.script = kind.script(tokens=["x"], flood=b"a", flood_bytes=50 * MB, encoding=encoding)
    with Peak() as peak:
        pieces, error = await collect_until_error(kind.make_engine(fake, http))
    assert pieces == ["x"]
    assert error.code == "engine_protocol_error" and "longer than" in error.message
    assert peak.bytes < MEMORY_BOUND, peak.bytes
    assert await asyncio.to_thread(fake.chats[0].wait_disconnected, 5)


async def test_a_gzip_bomb_in_the_answer_ends_it_at_the_answer_bound(kind, fake, http):
    # 200 MB of blank lines (about 200 KB on the wire): valid, endless, and no text
    fake.script = kind.script(tokens=["x"], flood=BLANKS, flood_bytes=200 * MB, encoding="gzip")
    with Peak() as peak:
        pieces, finished = await collect(kind.make_engine(fake, http))
    assert pieces == ["x"] and finished.reason == "length"
    assert peak.bytes < MEMORY_BOUND, peak.bytes
    assert fake.chats[0].sent < 100 * MB  # it stopped reading long before the end
    assert await asyncio.to_thread(fake.chats[0].wait_disconnected, 5)


@pytest.mark.parametrize("encoding", [None, "gzip"])
async def test_a_100_mb_error_message_is_cut_in_bounded_memory(kind, fake, http, encoding):
    fake.script = kind.script(status=500, flood=b"x", flood_bytes=100 * MB, encoding=encoding)
    with Peak() as peak:
        _, error = await collect_until_error(kind.make_engine(fake, http))
    size = len(error.message)  # (not the message itself in the assertion: 100 MB to print)
    assert size <= 1100, size  # ~1 KiB of it reaches the client
    assert error.code == "engine_error" and error.message.startswith(f"{kind.name} answered HTTP 500")
    assert peak.bytes < MEMORY_BOUND, peak.bytes


async def test_a_gzip_bomb_in_the_health_probe_fails_the_probe_in_bounded_memory(kind, fake,
                                                                                 http):
    fake.probe_script = Script(flood=b" ", flood_bytes=200 * MB, encoding="gzip")
    with Peak() as peak:
        health = await kind.make_engine(fake, http).health()
    assert health.ready is False
    assert "unexpected answer" in (health.detail or "") and "more than" in (health.detail or "")
    assert peak.bytes < MEMORY_BOUND, peak.bytes


async def test_a_run_on_answer_is_cut_at_max_new_tokens(kind, fake, http):
    fake.script = kind.script(tokens=[f" w{i}" for i in range(200)], ignore_max_tokens=True,
                              delay_s=0.02)  # (still sending when we stop)
    pieces, finished = await collect(kind.make_engine(fake, http), request(max_new_tokens=5))
    assert pieces == [" w0", " w1", " w2", " w3", " w4"]
    assert finished.reason == "length" and finished.usage.completion_tokens == 5
    # we stopped reading: the connection is closed, so the upstream stops generating
    assert await asyncio.to_thread(fake.chats[0].wait_disconnected, 5)


@pytest.mark.parametrize(("prompt", "completion"), [(-5, 3), (7, -1), (2**64 - 1, 3),
                                                    (7, 2**64 - 1), (-1, 2**31)],
                         ids=["negative-prompt", "negative-completion", "huge-prompt",
                              "huge-completion", "both"])
async def test_bad_usage_numbers_are_dropped_with_one_warning(kind, fake, http, caplog, prompt,
                                                              completion):
    names = {"ollama": ("prompt_eval_count", "eval_count"),
             "openai": ("prompt_tokens", "completion_tokens")}[kind.name]
    fake.script = kind.script(counts=dict(zip(names, (prompt, completion), strict=True)))
    with caplog.at_level(logging.WARNING, "streaming_llm"):
        pieces, finished = await collect(kind.make_engine(fake, http))
    assert "".join(pieces) == "Hello, world!" and finished.reason == "stop"
    usage = finished.usage
    # a bad number is unknown: 0 prompt tokens, the pieces counted as the completion
    assert usage.prompt_tokens == (prompt if 0 <= prompt < 2**31 else 0)
    assert usage.completion_tokens == (completion if 0 <= completion < 2**31 else 4)
    assert usage.decode_tokens_per_s is None or 0 <= usage.decode_tokens_per_s < 2**31
    warnings = [r for r in caplog.records if "usage" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


async def test_a_redirect_is_not_followed(kind, fake, http):
    with kind.serve() as elsewhere:
        fake.script = kind.script(redirect=kind.url(elsewhere) + {
            "ollama": "/api/chat", "openai": "/chat/completions"}[kind.name])
        _, error = await collect_until_error(kind.make_engine(fake, http))
        assert elsewhere.chats == []  # the conversation was not sent on
    assert error.code == "engine_error" and "HTTP 307" in error.message


async def test_a_redirect_of_the_health_probe_is_not_followed(kind, fake, http):
    listing = {"ollama": "/api/tags", "openai": "/models"}[kind.name]
    with kind.serve() as elsewhere:
        fake.probe_script = Script(redirect=kind.url(elsewhere) + listing)
        health = await kind.make_engine(fake, http).health()
        assert sum(elsewhere.hits.values()) == 0
    assert health.ready is False and "307" in (health.detail or "")


async def test_openai_an_endless_event_ends_the_turn_in_bounded_memory(openai, http):
    # data: lines without the blank line that ends an event
    openai.script = CompletionScript(tokens=["x"], flood=b"data: " + b"x" * 1000 + b"\n",
                                     flood_bytes=50 * MB)
    with Peak() as peak:
        pieces, error = await collect_until_error(OPENAI.make_engine(openai, http))
    assert pieces == ["x"]
    assert error.code == "engine_protocol_error" and "longer than" in error.message
    assert peak.bytes < MEMORY_BOUND, peak.bytes

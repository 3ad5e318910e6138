"""The ollama and openai engines pass a JSON constraint upstream (Ollama's ``format``, OpenAI's
``response_format``), as the fake upstreams record; other kinds are refused naming the field."""

from __future__ import annotations

import aiohttp
import msgspec
import pytest

from streaming_llm.engines.base import Constraint, check_constraint
from streaming_llm.engines.ollama import OllamaEngine
from streaming_llm.engines.openai_compat import OpenAIEngine
from streaming_llm.engines.pool import BackendPool
from streaming_llm.errors import InvalidConstraint
from streaming_llm.settings import Settings
from streaming_llm.testing.fake_ollama import FakeOllama
from streaming_llm.testing.fake_openai import FakeOpenAI

from .streams import drain, engine_request

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def constrained(constraint: Constraint):
    return msgspec.structs.replace(engine_request(), constraint=constraint)


@pytest.mark.parametrize(("constraint", "sent"), [
    (Constraint("json_schema", schema=SCHEMA), SCHEMA),
    (Constraint("json_object"), "json"),
])
async def test_ollama_gets_format(http, constraint: Constraint, sent: object) -> None:
    with FakeOllama() as fake:
        engine = OllamaEngine(Settings(engine="ollama", ollama_url=fake.url), http)
        await drain(engine.stream(constrained(constraint)))
        assert fake.chats[0].body["format"] == sent
        await drain(engine.stream(engine_request()))
        assert "format" not in fake.chats[1].body


@pytest.mark.parametrize(("constraint", "sent"), [
    (Constraint("json_schema", schema=SCHEMA),
     {"type": "json_schema", "json_schema": {"name": "response", "schema": SCHEMA,
                                             "strict": True}}),
    (Constraint("json_object"), {"type": "json_object"}),
])
async def test_openai_gets_response_format(http, constraint: Constraint, sent: object) -> None:
    with FakeOpenAI(models=["fake-model"]) as fake:
        engine = OpenAIEngine(Settings(engine="openai", openai_base_url=fake.base_url,
                                       openai_model="fake-model"), http)
        await drain(engine.stream(constrained(constraint)))
        assert fake.chats[0].body["response_format"] == sent
        await drain(engine.stream(engine_request()))
        assert "response_format" not in fake.chats[1].body


@pytest.mark.parametrize("constraint", [
    # (tool_calls go upstream natively: tests/engines/test_upstreams.py)
    Constraint("regex", pattern="[a-z]+"), Constraint("grammar", pattern='start: "a"'),
])
async def test_upstreams_refuse_what_they_cannot_pass_naming_response_format(
        http, constraint: Constraint) -> None:
    with FakeOllama() as fake:
        ollama = OllamaEngine(Settings(engine="ollama", ollama_url=fake.url), http)
        openai = OpenAIEngine(Settings(engine="openai", openai_base_url=fake.url,
                                       openai_model="m"), http)
        pool = BackendPool([ollama], retry_s=1, retry_max_s=1)
        for engine in (ollama, openai, pool):
            with pytest.raises(InvalidConstraint) as caught:
                check_constraint(engine, constraint)
            assert caught.value.param == "response_format"
            assert caught.value.status == 400
        with pytest.raises(InvalidConstraint):  # a request that skipped the check sends nothing
            await drain(ollama.stream(constrained(constraint)))
        assert fake.chats == []

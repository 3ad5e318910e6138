"""Structured output end to end: a real server on the default model (SmolLM2-135M-Instruct), the
official ``openai`` client, answers sampled at temperature 0.8 that always parse and validate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from .server import ServerProcess, http, start_server

pytestmark = pytest.mark.e2e

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Tokyo", "Lima"]},
        "likes_tea": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "likes_tea"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           default_models_dir: Path) -> Iterator[ServerProcess]:
    env = {"STREAMING_LLM_ENGINE": "local", "STREAMING_LLM_MODELS_DIR": str(default_models_dir),
           "STREAMING_LLM_DEVICE": "cpu"}
    with start_server(tmp_path_factory.mktemp("structured"), env, timeout=300) as server:
        status, _ = http("PUT", server.base_url + "/agents/clerk", {
            "name": "Clerk", "system_prompt": "You are a helpful assistant who answers in JSON."})
        assert status == 201
        yield server


@pytest.fixture
def oai(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                       timeout=300) as client:
        yield client


def answers(oai: openai.OpenAI, n: int, **request: Any) -> list[Any]:
    """``n`` completions at once (they decode in one batch), seeds 0..n-1."""
    def one(seed: int) -> Any:
        return oai.chat.completions.create(model="clerk", temperature=0.8, seed=seed, **request)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_json_schema_answers_sampled_at_0_8_all_validate(oai: openai.OpenAI) -> None:
    completions = answers(oai, 8, max_tokens=80, response_format={
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        messages=[{"role": "user", "content": "Invent a person: name, age, city, tea?"}])
    texts = [c.choices[0].message.content for c in completions]
    for completion, text in zip(completions, texts, strict=True):
        jsonschema.validate(json.loads(text), PERSON)
        assert completion.choices[0].finish_reason == "stop"  # ends at the closing brace
    assert len(set(texts)) > 1  # sampled


def test_json_object_answers_parse(oai: openai.OpenAI) -> None:
    completions = answers(oai, 4, max_tokens=120, response_format={"type": "json_object"},
                          messages=[{"role": "user",
                                     "content": "Give the capital of France as JSON."}])
    for completion in completions:
        choice = completion.choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:  # cut by max_tokens: what was generated, a prefix of an object
            assert choice.finish_reason == "length"
            assert choice.message.content.startswith("{")
    assert any(c.choices[0].finish_reason == "stop" for c in completions)


def test_a_broken_schema_is_a_400_naming_response_format(oai: openai.OpenAI,
                                                         server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(
            model="clerk", messages=[{"role": "user", "content": "hi"}],
            extra_body={"metadata": {"conversation_id": "new"}},
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "integer",
                                                                     "minimum": "zero"}}})
    assert caught.value.param == "response_format"
    assert caught.value.code == "invalid_response_format"
    assert http("GET", server.base_url + "/conversations")[1] == []  # nothing stored

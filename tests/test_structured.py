"""Structured output through ``/v1/chat/completions`` (``response_format``) and the socket's
``chat`` frame: the shapes reach the engine as a Constraint; what cannot compile is a 400 naming
``response_format`` before anything is stored.

In process, with a scripted engine that checks constraints with the real grammar compiler on the
demo tokenizer (the local engine's answers are tested in tests/engines/test_constraints.py and,
on the default model, in tests/test_structured_e2e.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.testclient import TestClient

from streaming_llm.app import create_app
from streaming_llm.engines.base import Constraint
from streaming_llm.engines.constraints import Grammars
from streaming_llm.engines.demo_model import build_tokenizer
from streaming_llm.settings import Settings

from .conftest import put_agent
from .fakes import ScriptedEngine

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
_TOKENIZER = build_tokenizer()


@dataclass
class CheckingEngine(ScriptedEngine):
    """The scripted engine, plus the local engine's constraint check (a real compile)."""

    grammars: Grammars = field(default_factory=lambda: Grammars(
        _TOKENIZER, [_TOKENIZER.eos_token_id], len(_TOKENIZER)))

    def check_constraint(self, constraint: Constraint) -> None:
        self.grammars.check(constraint)


@pytest.fixture
def engine() -> CheckingEngine:
    return CheckingEngine(pieces=['{"city": ', '"Oslo"}'])


@pytest.fixture
def app_client(make_settings: Any, engine: CheckingEngine) -> Iterator[TestClient]:
    settings: Settings = make_settings(max_schema_bytes=200)
    with TestClient(create_app(settings, engine=engine)) as c:
        put_agent(c, "helper")
        yield c


def ask(client: TestClient, response_format: Any, **extra: Any) -> Any:
    return client.post("/v1/chat/completions", json={
        "model": "helper", "messages": [{"role": "user", "content": "Where?"}],
        "response_format": response_format, **extra})


@pytest.mark.parametrize(("response_format", "constraint"), [
    (None, None),
    ({"type": "text"}, None),
    ({"type": "json_object"}, Constraint("json_object")),
    ({"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}},
     Constraint("json_schema", schema=SCHEMA)),
    ({"type": "regex", "regex": "[a-z]+"}, Constraint("regex", pattern="[a-z]+")),
    ({"type": "grammar", "grammar": 'start: "a"'}, Constraint("grammar", pattern='start: "a"')),
])
def test_response_format_reaches_the_engine(app_client: TestClient, engine: CheckingEngine,
                                            response_format: Any,
                                            constraint: Constraint | None) -> None:
    resp = ask(app_client, response_format)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == '{"city": "Oslo"}'
    [request] = engine.requests
    assert request.constraint == constraint


@pytest.mark.parametrize(("response_format", "words"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
     "does not compile"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "description": "x" * 300}}}, "200 allowed"),
    ({"type": "regex", "regex": "(("}, "does not compile"),
    ({"type": "yaml"}, "response_format.type"),
    ({"json_schema": {}}, "response_format.type"),
])
@pytest.mark.parametrize("stored", [False, True])
def test_a_bad_response_format_is_a_400_naming_it_and_stores_nothing(
        app_client: TestClient, engine: CheckingEngine, response_format: Any, words: str,
        stored: bool) -> None:
    extra = {"metadata": {"conversation_id": "new"}} if stored else {}
    for stream in (False, True):
        resp = ask(app_client, response_format, stream=stream, **extra)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == "response_format" and words in error["message"]
        assert error["code"] == "invalid_response_format"
        assert error["type"] == "invalid_request_error"
    assert engine.requests == []
    assert app_client.get("/conversations").json() == []


def test_a_stored_conversation_keeps_its_structured_answer(app_client: TestClient,
                                                           engine: CheckingEngine) -> None:
    resp = ask(app_client, {"type": "json_object"}, metadata={"conversation_id": "new"})
    assert resp.status_code == 200, resp.text
    conversation = resp.headers["x-conversation-id"]
    turns = app_client.get(f"/conversations/{conversation}").json()["turns"]
    assert [t["content"] for t in turns] == ["Where?", '{"city": "Oslo"}']
    assert engine.requests[0].constraint == Constraint("json_object")


def test_the_socket_chat_frame_carries_response_format(app_client: TestClient,
                                                       engine: CheckingEngine) -> None:
    with app_client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "Where?",
                      "request_id": "bad", "response_format": {"type": "regex", "regex": "(("}})
        error = ws.receive_json()
        assert error["type"] == "error" and error["request_id"] == "bad"
        assert error["code"] == "invalid_response_format" and error["field"] == "response_format"
        ws.send_json({"type": "chat", "agent_id": "helper", "message": "Where?",
                      "request_id": "good", "response_format": {
                          "type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}})
        frames = [ws.receive_json()]
        while frames[-1]["type"] not in ("done", "error"):
            frames.append(ws.receive_json())
        assert frames[0]["type"] == "start" and frames[-1]["type"] == "done"
    assert [r.constraint for r in engine.requests] == [Constraint("json_schema", schema=SCHEMA)]
    [conversation] = app_client.get("/conversations").json()  # only the good turn was stored
    turns = app_client.get(f"/conversations/{conversation['id']}").json()["turns"]
    assert [t["content"] for t in turns] == ["Where?", '{"city": "Oslo"}']

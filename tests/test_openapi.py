"""``GET /openapi.json``: valid OpenAPI 3.1, covering every REST route, matching live responses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec
from starlette.routing import Route

from streaming_llm.app import create_app
from streaming_llm.http import openapi
from streaming_llm.settings import Settings

from .server import start_server


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


def test_every_rest_route_is_documented(settings: Settings) -> None:
    app = create_app(settings)
    routes = set()
    for route in app.routes:
        # '{rest:path}' routes only turn malformed ids into clear errors; they are not API.
        if isinstance(route, Route) and "{rest:path}" not in route.path:
            routes |= {(m, openapi.route_path(route.path)) for m in route.methods or ()
                       if m != "HEAD"}
    doc = openapi.build()
    assert routes == documented(doc)
    validate_spec(doc)  # type: ignore[arg-type]


class Checker:
    """Validates live responses against the document's schema for their status and media type."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.seen: set[tuple[str, str]] = set()

    def check(self, method: str, path: str, resp: httpx.Response) -> Any:
        op = self.doc["paths"][path][method.lower()]
        self.seen.add((method.upper(), path))
        spec = op["responses"].get(str(resp.status_code))
        assert spec is not None, f"{method} {path}: status {resp.status_code} is undocumented"
        media = resp.headers.get("content-type", "").split(";")[0]
        if "content" not in spec:
            assert not resp.content, f"{method} {path}: a body where none is documented"
            return None
        assert media in spec["content"], f"{method} {path}: {media} is undocumented"
        if media == "application/json":
            body = resp.json()
            self.validate(body, spec["content"][media]["schema"])
            return body
        if media == "text/event-stream":
            # OpenAI's events end with [DONE]; Anthropic's are named (``event: ...``) and end
            # with message_stop.
            events = [e.split("data: ", 1)[1] for e in resp.text.split("\n\n") if e]
            last = events.pop() if events[-1] == "[DONE]" else None
            assert last == "[DONE]" or json.loads(events[-1])["type"] == "message_stop"
            for event in events:
                self.validate(json.loads(event), spec["content"][media]["schema"])
            return events
        return resp.text

    def validate(self, instance: Any, schema: dict[str, Any]) -> None:
        root = {**schema, "components": self.doc["components"]}
        OAS31Validator(root).validate(instance)


@pytest.mark.e2e
def test_live_responses_match_the_document(tmp_path: Path) -> None:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "0"}
    with start_server(tmp_path, env) as server, httpx.Client(base_url=server.base_url) as http:
        doc = http.get("/openapi.json").json()
        assert doc == json.loads(json.dumps(openapi.build()))
        c = Checker(doc)
        c.check("GET", "/openapi.json", http.get("/openapi.json"))
        assert "<html" in c.check("GET", "/", http.get("/")).lower()
        assert "swagger-ui" in c.check("GET", "/docs", http.get("/docs"))
        assert c.check("GET", "/health", http.get("/health"))["ready"] is True
        assert "streaming_llm_engine_ready" in c.check("GET", "/metrics", http.get("/metrics"))

        agent = {"name": "Echoer", "system_prompt": "Repeat.", "markdown_context": "# Notes"}
        c.check("PUT", "/agents/{agent_id}", http.put("/agents/echoer", json=agent))
        c.check("PUT", "/agents/{agent_id}", http.put("/agents/echoer", json=agent))
        c.check("PUT", "/agents/{agent_id}", http.put("/agents/echoer", json={"name": ""}))
        c.check("PUT", "/agents/{agent_id}", http.put("/agents/Bad!", json=agent))
        c.check("GET", "/agents", http.get("/agents"))
        c.check("GET", "/agents/{agent_id}", http.get("/agents/echoer"))
        c.check("GET", "/agents/{agent_id}", http.get("/agents/nobody"))

        c.check("GET", "/v1/models", http.get("/v1/models"))
        c.check("GET", "/v1/models/{model}", http.get("/v1/models/echoer"))
        c.check("GET", "/v1/models/{model}", http.get("/v1/models/nobody"))
        chat = {"model": "echoer", "messages": [{"role": "user", "content": "hello there"}]}
        resp = http.post("/v1/chat/completions", json=chat, headers={"X-Conversation-Id": "new"})
        c.check("POST", "/v1/chat/completions", resp)
        conversation_id = resp.headers["x-conversation-id"]
        c.check("POST", "/v1/chat/completions", http.post("/v1/chat/completions", json={
            **chat, "stream": True, "stream_options": {"include_usage": True}}))
        c.check("POST", "/v1/chat/completions", http.post("/v1/chat/completions",
                                                          json={**chat, "model": "nobody"}))
        c.check("POST", "/v1/chat/completions", http.post("/v1/chat/completions",
                                                          json={**chat, "temperature": 9}))
        claude = {"model": "echoer", "max_tokens": 16,
                  "messages": [{"role": "user", "content": "hello there"}]}
        c.check("POST", "/v1/messages", http.post("/v1/messages", json=claude))
        c.check("POST", "/v1/messages", http.post("/v1/messages", json={**claude, "stream": True}))
        c.check("POST", "/v1/messages", http.post("/v1/messages",
                                                  json={**claude, "model": "nobody"}))
        c.check("POST", "/v1/messages", http.post("/v1/messages", json={**claude, "top_k": -1}))

        c.check("GET", "/conversations", http.get("/conversations"))
        c.check("GET", "/conversations", http.get("/conversations?limit=0"))
        c.check("GET", "/conversations/{conversation_id}",
                http.get(f"/conversations/{conversation_id}"))
        export = f"/conversations/{conversation_id}/export"
        assert c.check("GET", "/conversations/{conversation_id}/export",
                       http.get(export)).startswith("# hello there")
        c.check("GET", "/conversations/{conversation_id}/export", http.get(export + "?format=json"))
        c.check("GET", "/conversations/{conversation_id}/export", http.get(export + "?format=pdf"))
        one = f"/conversations/{conversation_id}"
        assert c.check("PATCH", "/conversations/{conversation_id}",
                       http.patch(one, json={"title": "Renamed"}))["title"] == "Renamed"
        c.check("PATCH", "/conversations/{conversation_id}", http.patch(one, json={"title": ""}))
        c.check("PATCH", "/conversations/{conversation_id}",
                http.patch("/conversations/conv_none", json={"title": "x"}))
        c.check("GET", "/conversations", http.get("/conversations?q=renamed"))
        room = c.check("POST", "/conversations",
                       http.post("/conversations", json={"agent_ids": ["echoer"], "title": "R"}))
        assert room["agent_ids"] == ["echoer"]
        c.check("POST", "/conversations", http.post("/conversations", json={"agent_ids": []}))
        c.check("POST", "/conversations",
                http.post("/conversations", json={"agent_ids": ["echoer", "echoer"]}))
        c.check("POST", "/conversations", http.post("/conversations", json={"agent_ids": ["no"]}))
        c.check("PATCH", "/conversations/{conversation_id}",
                http.patch(f"/conversations/{room['id']}", json={"agent_ids": ["nobody"]}))
        c.check("DELETE", "/conversations/{conversation_id}/turns",
                http.delete(one + "/turns?from_seq=1"))
        c.check("DELETE", "/conversations/{conversation_id}/turns",
                http.delete(one + "/turns?from_seq=0"))
        c.check("DELETE", "/conversations/{conversation_id}",
                http.delete(f"/conversations/{conversation_id}"))
        c.check("DELETE", "/conversations/{conversation_id}",
                http.delete(f"/conversations/{conversation_id}"))
        c.check("GET", "/conversations/{conversation_id}",
                http.get(f"/conversations/{conversation_id}"))
        c.check("DELETE", "/agents/{agent_id}", http.delete("/agents/echoer"))
        c.check("DELETE", "/agents/{agent_id}", http.delete("/agents/echoer"))

        assert c.seen == documented(doc), "an operation was not exercised"


def test_a_drifted_response_fails_validation() -> None:
    """The checker is not a rubber stamp: a body that breaks the schema is caught."""
    c = Checker(openapi.build())
    good = {"id": "a", "name": "A", "system_prompt": "", "markdown_context": "",
            "created_at": "t", "updated_at": "t"}
    c.validate(good, {"$ref": "#/components/schemas/Agent"})
    with pytest.raises(jsonschema.ValidationError, match="required property"):
        c.validate({k: v for k, v in good.items() if k != "name"},
                   {"$ref": "#/components/schemas/Agent"})

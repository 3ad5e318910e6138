"""The OpenAPI 3.1 document of the REST API, built from the msgspec types the routes use.

Each REST route is one :class:`Operation` in :data:`OPERATIONS`: its method and path, the type
of its JSON body and of each response. Schemas come from ``msgspec.json.schema_components``, so
they cannot drift from the types that decode requests and encode responses. The chat socket's
frames (``ClientFrame``, ``ServerFrame``) are published as components too, for client
generators; OpenAPI has no way to describe the socket itself (docs/protocol.md does).

``tests/test_openapi.py`` checks that every route of the app is described here, that the
document is valid OpenAPI 3.1, and that live responses match their schemas.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .. import __version__
from ..anthropic_types import AnthropicError, Message, MessagesRequest
from ..chat.agents import AgentIn
from ..chat.conversations import (
    ConversationCreate,
    ConversationPatchBody,
    ConversationSummary,
    ConversationView,
)
from ..chat.export import ConversationExport
from ..openai_types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Model,
    ModelList,
    OpenAIError,
)
from ..protocol import ClientFrame, ServerFrame
from ..wire import Agent
from .auth import is_public
from .routes.health import HealthReport


class ErrorDetail(msgspec.Struct):
    code: str
    message: str


class ErrorBody(msgspec.Struct):
    """Every error outside ``/v1``: a stable ``code`` and a sentence for people."""

    error: ErrorDetail


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # path | query | header
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


@dataclass(frozen=True)
class Body:
    """A response or request body: a msgspec type as JSON, or text of a media type."""

    description: str
    type: Any = None  # a msgspec-encodable type, or None for a text body
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)  # name → description
    also: tuple[tuple[str, Any], ...] = ()  # (media type, type) the same status may carry


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # the route's path, convertors stripped: /agents/{agent_id}
    summary: str
    tag: str
    responses: dict[int, Body]
    request: type | None = None
    params: tuple[Param, ...] = ()
    description: str = ""


def _error(description: str) -> Body:
    return Body(description, ErrorBody)


def _openai_error(description: str) -> Body:
    return Body(description, OpenAIError)


def _anthropic_error(description: str) -> Body:
    return Body(description, AnthropicError)


AGENT_ID = Param("agent_id", "path", "1-64 lower-case letters, digits, '-' or '_'.",
                 {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$"}, required=True)
CONVERSATION_ID = Param("conversation_id", "path", "A conversation id (conv_...).",
                        {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"}, required=True)
CONVERSATION_HEADER = Param(
    "X-Conversation-Id", "header",
    "A stored conversation to continue and store into, or `new` to start one; without it (and "
    "without metadata.conversation_id) nothing is stored.")

OPERATIONS: tuple[Operation, ...] = (
    Operation("get", "/health", "Readiness of the server and its engine", "service", {
        200: Body("Ready.", HealthReport),
        503: Body("The engine is loading, or failed to start.", HealthReport)}),
    Operation("get", "/metrics", "Prometheus metrics", "service", {
        200: Body("Prometheus text exposition format.", media_type="text/plain")}),
    Operation("get", "/openapi.json", "This document", "service", {
        200: Body("The OpenAPI 3.1 document.", dict[str, Any])}),
    Operation("get", "/", "The reference web page (its files are under /static)", "service", {
        200: Body("The page.", media_type="text/html")}),
    Operation("get", "/docs", "This document for people (swagger-ui, vendored)", "service", {
        200: Body("The page.", media_type="text/html")}),

    Operation("get", "/agents", "List agents", "agents", {200: Body("All agents.", list[Agent])}),
    Operation("get", "/agents/{agent_id}", "Read an agent", "agents", {
        200: Body("The agent.", Agent), 400: _error("Invalid id."),
        404: _error("No such agent.")}, params=(AGENT_ID,)),
    Operation("put", "/agents/{agent_id}", "Create or replace an agent", "agents", {
        200: Body("Updated.", Agent), 201: Body("Created.", Agent),
        400: _error("Invalid id or body."), 422: _error("A field is out of bounds.")},
        request=AgentIn, params=(AGENT_ID,)),
    Operation("delete", "/agents/{agent_id}", "Delete an agent", "agents", {
        204: Body("Deleted."), 400: _error("Invalid id."), 404: _error("No such agent.")},
        params=(AGENT_ID,)),

    Operation("get", "/conversations", "List conversations, most recently active first",
              "conversations", {200: Body("Conversations.", list[ConversationSummary]),
                                400: _error("A bad query parameter.")}, params=(
        Param("agent_id", "query", "Only the conversations this agent takes part in (its own "
              "and the rooms it is in).", AGENT_ID.schema),
        Param("limit", "query", "At most this many (default 100).",
              {"type": "integer", "minimum": 1, "maximum": 1000}),
        Param("offset", "query", "Skip this many.",
              {"type": "integer", "minimum": 0, "maximum": 1_000_000_000}),
        Param("q", "query", "Only conversations whose title or any turn contains this text "
              "(case-insensitive).", {"type": "string", "maxLength": 200}))),
    Operation("post", "/conversations", "Create a room (several agents) or a conversation",
              "conversations", {201: Body("The conversation as stored.", ConversationSummary),
                                400: _error("An agent named twice, or an invalid body."),
                                404: _error("No such agent."),
                                422: _error("No agent, more than 16, or a bad id or title.")},
              request=ConversationCreate,
              description="A room: several agents in one conversation, each answering as "
                          "itself and seeing the others' answers (docs/api.md, Rooms). Chat in "
                          "it on the socket with its id."),
    Operation("get", "/conversations/{conversation_id}", "Read a conversation and its turns",
              "conversations", {200: Body("The conversation.", ConversationView),
                                400: _error("Invalid id."), 404: _error("No such conversation.")},
              params=(CONVERSATION_ID,)),
    Operation("get", "/conversations/{conversation_id}/export",
              "Export a conversation: a Markdown transcript, or loss-free JSON", "conversations", {
                  200: Body("The transcript (`format=markdown`) or every stored field "
                            "(`format=json`).", str, media_type="text/markdown",
                            also=(("application/json", ConversationExport),)),
                  400: _error("Unknown format or invalid id."),
                  404: _error("No such conversation.")},
              params=(CONVERSATION_ID, Param(
                  "format", "query", "markdown (default) or json.",
                  {"type": "string", "enum": ["markdown", "json"], "default": "markdown"}))),
    Operation("patch", "/conversations/{conversation_id}",
              "Rename a conversation, or change its agents", "conversations", {
                  200: Body("The conversation as stored.", ConversationSummary),
                                400: _error("Invalid id or body."),
                                404: _error("No such conversation or agent."),
                                422: _error("Nothing to change, an empty or too long title, bad agent ids.")},
              request=ConversationPatchBody, params=(CONVERSATION_ID,)),
    Operation("delete", "/conversations/{conversation_id}/turns",
              "Delete the turns from a user turn on (edit-and-resend, regenerate)",
              "conversations", {204: Body("Deleted."),
                                400: _error("Invalid id, or no user turn with that seq."),
                                404: _error("No such conversation.")},
              params=(CONVERSATION_ID, Param(
                  "from_seq", "query", "The `seq` of a user turn: it and every later turn go.",
                  {"type": "integer", "minimum": 0, "maximum": 1_000_000_000}, required=True)),
              description="The page's edit-and-resend and regenerate: delete the turns from the "
                          "user turn `from_seq` on, then send the (edited) message again on the "
                          "socket with this conversation id. The deleted turns are gone."),
    Operation("delete", "/conversations/{conversation_id}", "Delete a conversation",
              "conversations", {204: Body("Deleted."), 400: _error("Invalid id."),
                                404: _error("No such conversation.")},
              params=(CONVERSATION_ID,)),

    Operation("post", "/v1/chat/completions", "OpenAI-compatible chat completion", "openai", {
        200: Body("One `chat.completion`, or with `stream: true` server-sent events: "
                  "`data: {chat.completion.chunk}` ... `data: [DONE]`.", ChatCompletion,
                  headers={"X-Conversation-Id": "The stored conversation, when one was named."},
                  also=(("text/event-stream", ChatCompletionChunk),)),
        400: _openai_error("Invalid request."), 404: _openai_error("Unknown model (agent) or "
                                                                   "conversation."),
        409: _openai_error("The conversation belongs to another agent."),
        502: _openai_error("The engine failed."), 503: _openai_error("The engine is not ready.")},
        request=ChatCompletionRequest, params=(CONVERSATION_HEADER,),
        description="`model` is an agent id: its system prompt and Markdown context come first. "
                    "Streamed events are `ChatCompletionChunk` objects (see components)."),
    Operation("post", "/v1/messages", "Anthropic Messages API", "anthropic", {
        200: Body("One `message`, or with `stream: true` Anthropic's server-sent events: "
                  "`message_start`, `content_block_start` / `content_block_delta` / "
                  "`content_block_stop` per block, `message_delta`, `message_stop`.", Message,
                  headers={"X-Conversation-Id": "The stored conversation, when one was named."},
                  also=(("text/event-stream", dict[str, Any]),)),
        400: _anthropic_error("Invalid request."),
        404: _anthropic_error("Unknown model (agent) or conversation."),
        409: _anthropic_error("The conversation belongs to another agent."),
        502: _anthropic_error("The engine failed."),
        503: _anthropic_error("The engine is not ready.")},
        request=MessagesRequest, params=(CONVERSATION_HEADER,),
        description="`model` is an agent id: its system prompt and Markdown context come first. "
                    "Takes the key as `x-api-key` too. Errors are Anthropic's body, the "
                    "message naming the field at fault."),
    Operation("get", "/v1/models", "Agents, listed as OpenAI models", "openai", {
        200: Body("The agents.", ModelList)}),
    Operation("get", "/v1/models/{model}", "One agent as an OpenAI model", "openai", {
        200: Body("The agent.", Model), 404: _openai_error("No such agent.")},
        params=(Param("model", "path", "An agent id.", required=True),)),
)

# Published for clients although no operation names them.
EXTRA_COMPONENTS: dict[str, Any] = {
    "ClientFrame": ClientFrame, "ServerFrame": ServerFrame,
}

_CONVERTOR = re.compile(r":[A-Za-z_]+}")


def route_path(path: str) -> str:
    """``/agents/{agent_id:str}`` → ``/agents/{agent_id}``."""
    return _CONVERTOR.sub("}", path)


def build(operations: tuple[Operation, ...] = OPERATIONS) -> dict[str, Any]:
    """The OpenAPI document as a JSON-ready dict."""
    types: list[Any] = []
    for op in operations:
        if op.request is not None:
            types.append(op.request)
        for b in op.responses.values():
            types += [t for t in (b.type, *(t for _, t in b.also)) if t is not None]
    types += EXTRA_COMPONENTS.values()
    schemas, components = msgspec.json.schema_components(
        types, schema_hook=_any_object, ref_template="#/components/schemas/{name}")
    schema_of = {id(t): s for t, s in zip(types, schemas, strict=True)}
    for name, t in EXTRA_COMPONENTS.items():
        components.setdefault(name, schema_of[id(t)])

    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        responses = {**_guard_responses(op), **op.responses}
        entry: dict[str, Any] = {
            "operationId": _operation_id(op), "summary": op.summary, "tags": [op.tag],
            "responses": {str(status): _response(body, schema_of)
                          for status, body in sorted(responses.items())},
        }
        if is_public(op.path):
            entry["security"] = []  # served without a key
        if op.description:
            entry["description"] = op.description
        if op.params:
            entry["parameters"] = [
                {"name": p.name, "in": p.where, "required": p.required,
                 "description": p.description, "schema": p.schema} for p in op.params]
        if op.request is not None:
            entry["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": schema_of[id(op.request)]}}}
        paths.setdefault(op.path, {})[op.method] = entry

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "streaming-llm", "version": __version__,
            "description": "Agents over REST, chat over the `/ws/chat` WebSocket (frames: the "
                           "`ClientFrame` and `ServerFrame` schemas; see docs/protocol.md), and an "
                           "OpenAI-compatible `/v1` API.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "An API key (STREAMING_LLM_API_KEY), when the server has any."}},
        },
        "security": [{"bearer": []}],
    }


def _guard_responses(op: Operation) -> dict[int, Body]:
    """What the guards in front of every route may answer (streaming_llm.http.guards)."""
    out = {403: _error("A browser Origin that STREAMING_LLM_ALLOWED_ORIGINS does not list.")}
    if not is_public(op.path):
        out[401] = _error("Missing or invalid API key (only when the server has keys).")
    if op.request is not None:
        out[413] = _error("The body is larger than STREAMING_LLM_MAX_BODY_BYTES.")
    if op.method in ("put", "post", "delete"):
        out[503] = _error("The database refused the write (storage_unavailable).")
        out[409] = _error("A constraint of the database refused the write (storage_conflict): "
                          "for example one agent created at once on two instances.")
    return out


def _any_object(t: Any) -> dict[str, Any]:
    if t is object:  # dict[str, object]: free-form JSON values
        return {"description": "any JSON value"}
    raise NotImplementedError  # msgspec's schema_hook protocol: "not a type this hook handles"


def _response(body: Body, schema_of: dict[int, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"description": body.description}
    if body.type is not None:
        out["content"] = {body.media_type: {"schema": schema_of[id(body.type)]}}
        out["content"].update({media: {"schema": schema_of[id(t)]} for media, t in body.also})
    elif body.media_type != "application/json":
        out["content"] = {body.media_type: {"schema": {"type": "string"}}}
    if body.headers:
        out["headers"] = {name: {"description": text, "schema": {"type": "string"}}
                          for name, text in body.headers.items()}
    return out


def _operation_id(op: Operation) -> str:
    words = re.findall(r"[A-Za-z0-9]+", op.path.replace("{", "by_"))
    return "_".join([op.method, *words]).lower()

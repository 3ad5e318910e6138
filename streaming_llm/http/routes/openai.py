"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models``: agents served as models.

``model`` names an agent, whose system prompt and Markdown context become the system message.
Without a conversation id the caller's ``messages`` are the whole history and nothing is stored
(the engine gets a throwaway conversation id and forgets it afterwards). With one, from the
``X-Conversation-Id`` header or ``metadata.conversation_id`` (``new`` starts a conversation),
the stored history replaces ``messages`` except the last (user) message, the turn is stored like
a socket turn, and the engine's per-conversation cache serves the call; the response names the
conversation in its ``X-Conversation-Id`` header.

The turn runs in its own task while a second one waits for the client to go away; a disconnect
cancels the turn, which stops the engine at its next step (the socket's rule; see
:mod:`streaming_llm.http.answers`, shared with ``/v1/messages``). Errors use OpenAI's body,
``{"error": {"message", "type", "param", "code"}}``.

With ``tools``, the calls the model writes (:mod:`streaming_llm.chat.tool_calls`) come back as
``message.tool_calls``, or streamed as ``delta.tool_calls``; ``role: "tool"`` messages at the end
of ``messages`` are the results, stored before the user message (if any) in a stored
conversation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime

import msgspec
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ...chat.response_format import checked_constraint
from ...chat.tool_calls import (
    ArgumentsDelta,
    CallStart,
    Event,
    TextDelta,
    ToolUse,
    check_tools,
    checked_tool_use,
    parse,
    tool_use,
)
from ...chat.turns import Ending
from ...engines.base import ChatMessage, ToolCall
from ...errors import (
    AgentNotFound,
    BadRequest,
    InvalidId,
    NotFound,
    ServiceError,
    ValidationFailed,
)
from ...openai_types import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionUsage,
    Delta,
    FunctionCall,
    FunctionDelta,
    MessageToolCall,
    Model,
    ModelList,
    OpenAIError,
    OpenAIErrorDetail,
    PromptTokensDetails,
    RequestMessage,
    ToolCallDelta,
    openai_finish_reason,
)
from ...wire import Agent, FinishReason, GenerationOptions, Usage
from ..answers import (
    CONVERSATION_HEADER,
    Answer,
    Item,
    check_limits,
    errors_as,
    new_request_id,
    start,
    stop,
    turn_spec,
)
from ..responses import JSONResponse, decode_body

log = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                409: "invalid_request_error", 429: "rate_limit_error"}


# --- errors -------------------------------------------------------------------------------------
class InvalidRequest(BadRequest):
    """A request this endpoint cannot serve; ``param`` names the field, as OpenAI's errors do."""

    def __init__(self, message: str, *, param: str | None, code: str = "invalid_request") -> None:
        super().__init__(message, code=code)
        self.param = param


def openai_error_response(exc: ServiceError) -> JSONResponse:
    """Any service error in OpenAI's shape. Validation errors (422 elsewhere) are 400s here, as
    OpenAI clients expect; an unknown agent is OpenAI's ``model_not_found``."""
    status = 400 if exc.status == 422 else exc.status
    code: str | None = exc.code
    param = getattr(exc, "param", None)
    if isinstance(exc, AgentNotFound):
        code, param = "model_not_found", "model"
    elif param is None and isinstance(exc, ValidationFailed):
        param = exc.field
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = OpenAIError(OpenAIErrorDetail(exc.message, kind, param, code))
    return JSONResponse(body, status_code=status)


_openai_errors = errors_as(openai_error_response)


def _model_not_found(model: str) -> AgentNotFound:
    return AgentNotFound(f"The model {model!r} does not exist: models are agent ids "
                         "(GET /v1/models lists them)")


# --- models -------------------------------------------------------------------------------------
def _model(agent: Agent, served: str) -> Model:
    created = int(datetime.fromisoformat(agent.created_at).timestamp())
    return Model(id=agent.id, created=created, name=agent.name, served_model=served)


async def _served(request: Request) -> str:
    """The name of the model the engine actually serves (as /health reports it)."""
    return (await request.state.services.engine.health()).model


@_openai_errors
async def list_models(request: Request) -> Response:
    agents = await request.state.services.agents.list()
    served = await _served(request)
    return JSONResponse(ModelList([_model(a, served) for a in agents]))


@_openai_errors
async def get_model(request: Request) -> Response:
    model = request.path_params["model"]
    try:
        agent = await request.state.services.agents.get(model)
    except (AgentNotFound, InvalidId):
        raise _model_not_found(model) from None
    return JSONResponse(_model(agent, await _served(request)))


@_openai_errors
async def unknown_route(request: Request) -> Response:
    raise NotFound(f"Invalid URL ({request.method} {request.url.path})", code="unknown_url")


# --- chat completions: the request --------------------------------------------------------------
def _text(message: RequestMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise InvalidRequest(f"content parts of type {part.type!r} are not supported; "
                                 "send text", param=f"messages[{index}].content[{j}]")
        parts.append(part.text)
    return "".join(parts)


def _messages(body: ChatCompletionRequest) -> list[ChatMessage]:
    messages = []
    for i, m in enumerate(body.messages):
        if m.role == "tool":
            if m.tool_call_id is None:
                raise InvalidRequest("a tool message needs the tool_call_id it answers",
                                     param=f"messages[{i}].tool_call_id")
            messages.append(ChatMessage("tool", _text(m, i), tool_call_id=m.tool_call_id))
            continue
        role = "system" if m.role == "developer" else m.role
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments)
                      for c in m.tool_calls or ()) if role == "assistant" else ()
        messages.append(ChatMessage(role, _text(m, i), calls))
    last = messages[-1]
    if last.role != "tool" and (last.role != "user" or not last.content):
        raise InvalidRequest("the last message must be a non-empty user message or a tool "
                             "result", param=f"messages[{len(messages) - 1}]")
    return messages


def _tool_use(request: Request, body: ChatCompletionRequest) -> ToolUse | None:
    settings = request.state.services.settings
    tools = check_tools([msgspec.structs.asdict(t.function) for t in body.tools or ()],
                        max_tools=settings.max_tools, max_bytes=settings.max_tool_schema_bytes,
                        param="tools")
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        return tool_use(tools, choice, parallel=body.parallel_tool_calls is not False)
    return tool_use(tools, choice.function.name, parallel=body.parallel_tool_calls is not False,
                    param="tool_choice.function.name")


def _options(body: ChatCompletionRequest) -> GenerationOptions:
    if body.n not in (None, 1):
        raise InvalidRequest("only n=1 is supported", param="n")
    if body.logprobs:
        raise InvalidRequest("logprobs are not supported", param="logprobs")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return GenerationOptions(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, stop=stop or None,
        seed=body.seed, max_new_tokens=body.max_completion_tokens or body.max_tokens,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, min_p=body.min_p)


def _conversation_id(request: Request, body: ChatCompletionRequest) -> str | None:
    header = request.headers.get(CONVERSATION_HEADER) or None
    field = (body.metadata or {}).get("conversation_id") or None
    if header and field and header != field:
        raise InvalidRequest(f"the {CONVERSATION_HEADER} header ({header!r}) and "
                             f"metadata.conversation_id ({field!r}) disagree",
                             param="metadata.conversation_id")
    return header or field


@_openai_errors
async def chat_completions(request: Request) -> Response:
    body = await decode_body(request, ChatCompletionRequest)
    messages, options = _messages(body), _options(body)
    tools = _tool_use(request, body)
    conversation_id = _conversation_id(request, body)
    services = request.state.services
    # a schema that cannot compile is refused before anything is stored
    constraint = await checked_constraint(body.response_format, services.engine,
                                          max_bytes=services.settings.max_schema_bytes)
    tools = await checked_tool_use(tools, services.engine, response_format=constraint)
    stored = conversation_id is not None
    await check_limits(request, messages, options, stored=stored)
    spec = turn_spec(request, request_id=new_request_id("chatcmpl-"), agent_id=body.model,
                     messages=messages, options=options, conversation_id=conversation_id,
                     constraint=constraint, tools=tools,
                     result_param="messages[{}].tool_call_id".format)
    try:
        answer, work, first = await start(request, spec, stream=bool(body.stream))
    except ClientDisconnect:  # nobody reads the answer: 499, nginx's "client closed request"
        return Response(status_code=499)
    if isinstance(first, ServiceError):  # refused before anything was stored
        raise _model_not_found(body.model) if isinstance(first, AgentNotFound) else first
    headers = {} if answer.conversation_id is None or not stored else {
        CONVERSATION_HEADER: answer.conversation_id}
    reply = _Reply(spec.request_id, body, tools)
    if isinstance(first, Ending) and first.failure is not None:  # before the first piece
        failed = openai_error_response(first.failure)
        failed.headers.update(headers)
        return failed
    if not body.stream:
        assert isinstance(first, Ending)
        return JSONResponse(reply.completion(first.text, first), headers=headers)
    return StreamingResponse(
        reply.events(first, answer), media_type="text/event-stream; charset=utf-8",
        headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        background=BackgroundTask(stop, work))


# --- chat completions: the answer ---------------------------------------------------------------
class _Reply:
    """OpenAI's bodies for one answer: one ``chat.completion``, or server-sent events."""

    def __init__(self, request_id: str, params: ChatCompletionRequest,
                 tools: ToolUse | None) -> None:
        self.request_id, self.params, self.tools = request_id, params, tools
        self.created = int(time.time())
        self.include_usage = bool(params.stream_options and params.stream_options.include_usage)

    def completion(self, text: str, ending: Ending) -> ChatCompletion:
        calls: tuple[ToolCall, ...] = ()
        if self.tools is not None:
            text, calls = parse(text, self.request_id,
                                max_calls=None if self.tools.parallel else 1)
        message = AssistantMessage(
            content=text if text or not calls else None,
            tool_calls=[MessageToolCall(c.id, FunctionCall(c.name, c.arguments))
                        for c in calls] or None)
        return ChatCompletion(self.request_id, self.created, self.params.model,
                              [Choice(0, message,
                                      openai_finish_reason(ending.reason, called=bool(calls)))],
                              _usage(ending.usage))

    async def events(self, first: Item, answer: Answer) -> AsyncIterator[bytes]:
        yield self.chunk(Delta(role="assistant", content=""))
        parser = self.tools.parser(self.request_id) if self.tools is not None else None
        item = first
        while isinstance(item, str):
            if parser is None:
                yield self.chunk(Delta(content=item))
            else:
                for event in parser.feed(item):
                    yield self.chunk(_delta(event))
            item = await answer.next()
        failure = item if isinstance(item, ServiceError) else item.failure
        if failure is not None:  # OpenAI's clients raise on a data event carrying "error"
            yield _event(bytes(openai_error_response(failure).body))
            return
        assert isinstance(item, Ending)
        called = False
        if parser is not None:
            for event in parser.close():
                yield self.chunk(_delta(event))
            called = bool(parser.calls)
        yield self.chunk(Delta(), item.reason, called=called)
        if self.include_usage:
            yield _event(_encoder.encode(ChatCompletionChunk(
                self.request_id, self.created, self.params.model, [], _usage(item.usage))))
        yield _event(b"[DONE]")

    def chunk(self, delta: Delta, finish_reason: FinishReason | None = None, *,
              called: bool = False) -> bytes:
        reason = (None if finish_reason is None
                  else openai_finish_reason(finish_reason, called=called))
        return _event(_encoder.encode(ChatCompletionChunk(
            self.request_id, self.created, self.params.model, [ChunkChoice(0, delta, reason)])))


def _event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def _delta(event: Event) -> Delta:
    """A parser event as OpenAI's delta: a call's id and name first, then its arguments."""
    match event:
        case TextDelta(text):
            return Delta(content=text)
        case CallStart(index, call_id, name):
            return Delta(tool_calls=[ToolCallDelta(index, call_id, "function",
                                                   FunctionDelta(name=name, arguments=""))])
        case ArgumentsDelta(index, text):
            return Delta(tool_calls=[ToolCallDelta(index, function=FunctionDelta(arguments=text))])
    raise AssertionError(event)


def _usage(usage: Usage) -> CompletionUsage:
    details = (None if usage.cached_tokens is None
               else PromptTokensDetails(cached_tokens=usage.cached_tokens))
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=details, time_to_first_token_ms=usage.time_to_first_token_ms,
        decode_tokens_per_s=usage.decode_tokens_per_s)


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:str}", get_model, methods=["GET"]),
    Route("/v1/{rest:path}", unknown_route,
          methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
]

"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models``: agents served as models.

``model`` names an agent, whose system prompt and Markdown context become the system message.
Without a conversation id the caller's ``messages`` are the whole history and nothing is stored
(the engine gets a throwaway conversation id and forgets it afterwards). With one, from the
``X-Conversation-Id`` header or ``metadata.conversation_id`` (``new`` starts a conversation),
the stored history replaces ``messages`` except the last (user) message, the turn is stored like
a socket turn, and the engine's per-conversation cache serves the call; the response names the
conversation in its ``X-Conversation-Id`` header.

The turn runs in its own task while a second one waits for the client to go away; a disconnect
cancels the turn, which stops the engine at its next step (the socket's rule). Errors use
OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..agents import Agent
from ..conversations import ConversationManager, Turn, store_partial
from ..engines.base import ChatMessage, FinishReason, GenerationOptions, Usage
from ..errors import AgentNotFound, BadRequest, EngineError, InvalidId, NotFound, ServiceError
from ..limits import Limits
from ..openai_types import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionUsage,
    Delta,
    Model,
    ModelList,
    OpenAIError,
    OpenAIErrorDetail,
    PromptTokensDetails,
    RequestMessage,
    openai_finish_reason,
)
from ..responses import JSONResponse, decode_body

log = logging.getLogger(__name__)

CONVERSATION_HEADER = "x-conversation-id"
NEW_CONVERSATION = "new"

_encoder = msgspec.json.Encoder()
_FIELD = re.compile(r"at `\$\.([^`]+)`")
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
    elif param is None and (found := _FIELD.search(exc.message)):
        param = found.group(1)
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = OpenAIError(OpenAIErrorDetail(exc.message, kind, param, code))
    return JSONResponse(body, status_code=status)


def _openai_errors(endpoint: Callable[[Request], Awaitable[Response]]
                   ) -> Callable[[Request], Awaitable[Response]]:
    @functools.wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ServiceError as exc:
            return openai_error_response(exc)

    return wrapper


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
            raise InvalidRequest("tool messages are not supported", param=f"messages[{i}].role")
        role = "system" if m.role == "developer" else m.role
        messages.append(ChatMessage(role, _text(m, i)))
    last = messages[-1]
    if last.role != "user" or not last.content:
        raise InvalidRequest("the last message must be a non-empty user message",
                             param=f"messages[{len(messages) - 1}]")
    return messages


def _options(body: ChatCompletionRequest) -> GenerationOptions:
    if body.n not in (None, 1):
        raise InvalidRequest("only n=1 is supported", param="n")
    if body.tools:
        raise InvalidRequest("tools are not supported", param="tools")
    if body.logprobs:
        raise InvalidRequest("logprobs are not supported", param="logprobs")
    if body.response_format not in (None, {"type": "text"}):
        raise InvalidRequest("only response_format {'type': 'text'} is supported",
                             param="response_format")
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
    conversation_id = _conversation_id(request, body)
    services = request.state.services
    Limits.from_settings(services.settings).check_chat(messages[-1].content, options.max_new_tokens)
    manager: ConversationManager = services.conversations
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    await manager.gate.acquire()  # a generation slot, as for the socket (busy: 503)
    try:
        if conversation_id is None:
            turn = await manager.begin_unstored(request_id=request_id, agent_id=body.model,
                                                messages=messages, options=options)
        else:
            turn = await manager.begin(
                request_id=request_id, agent_id=body.model, message=messages[-1].content,
                conversation_id=None if conversation_id == NEW_CONVERSATION else conversation_id,
                options=options)
    except AgentNotFound:
        manager.gate.release()
        raise _model_not_found(body.model) from None
    except BaseException:
        manager.gate.release()
        raise
    return TurnResponse(manager, turn, body)  # gives the slot back when the answer ends


# --- chat completions: the answer ---------------------------------------------------------------
class TurnResponse(Response):
    """Runs the turn while answering, as one ``chat.completion`` or as server-sent events.

    Its own task runs the turn; this one waits for whichever ends first, the turn or the client.
    An engine failure before the first piece is an HTTP error; after it (streaming), an
    ``error`` event ends the stream.
    """

    def __init__(self, manager: ConversationManager, turn: Turn,
                 body: ChatCompletionRequest) -> None:
        self.manager, self.turn, self.params = manager, turn, body
        self.created = int(time.time())
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.extra_headers = [] if not turn.stored else [
            (CONVERSATION_HEADER.encode(), turn.conversation_id.encode())]
        self.send: Send | None = None
        self.streaming = False  # the 200 and the first event went out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.send = send
        work = asyncio.create_task(self.run(), name=f"turn-{self.turn.request_id}")
        watch = asyncio.create_task(_disconnected(receive))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                log.info("turn %s: client went away, cancelling", self.turn.request_id)
                work.cancel()
            try:
                with contextlib.suppress(asyncio.CancelledError):
                    await work
            finally:
                self.manager.gate.release()  # taken in chat_completions

    async def run(self) -> None:
        turn, on_piece = self.turn, (self.stream_piece if self.params.stream else _ignore)
        failure: EngineError | None = None
        try:
            async with contextlib.aclosing(self.manager.generate(turn)) as pieces:
                async for piece in pieces:
                    await on_piece(piece)
        except asyncio.CancelledError:
            await self.end("cancelled", turn.partial_usage())
            raise
        except EngineError as exc:
            failure = exc
        except Exception as exc:  # an engine bug: answer 502 rather than drop the connection
            log.exception("turn %s failed", turn.request_id)
            failure = EngineError(f"generation failed: {exc.__class__.__name__}")

        if failure is not None or turn.finished is None:
            failure = failure or EngineError("the engine ended the answer without a finish reason")
            await self.end("error", turn.partial_usage())
            await self.fail(failure)
            return
        reason, usage = turn.finished.reason, turn.finished.usage
        await self.end(reason, usage)
        if self.params.stream:
            await self.stream_end(reason, usage)
        else:
            await self.complete(reason, usage)

    async def end(self, reason: FinishReason, usage: Usage) -> None:
        if self.turn.stored:
            await store_partial(self.manager, self.turn, reason, usage)
        else:
            await self.manager.discard(self.turn, reason, usage)

    # one chat.completion --------------------------------------------------------------------------
    async def complete(self, reason: FinishReason, usage: Usage) -> None:
        message = AssistantMessage(content="".join(self.turn.pieces))
        body = ChatCompletion(self.turn.request_id, self.created, self.params.model,
                              [Choice(0, message, openai_finish_reason(reason))], _usage(usage))
        await self.respond(200, "application/json", _encoder.encode(body), more=False)

    async def fail(self, exc: ServiceError) -> None:
        body = bytes(openai_error_response(exc).body)
        if self.streaming:
            await self.event(body)  # OpenAI's clients raise on a data event carrying "error"
            await self.body_part(b"", more=False)
        else:
            await self.respond(exc.status, "application/json", body, more=False)

    # server-sent events ---------------------------------------------------------------------------
    async def stream_piece(self, piece: str) -> None:
        if not self.streaming:
            await self.respond(200, "text/event-stream; charset=utf-8", b"", more=True)
            self.streaming = True
            await self.chunk(Delta(role="assistant", content=""))
        await self.chunk(Delta(content=piece))

    async def stream_end(self, reason: FinishReason, usage: Usage) -> None:
        if not self.streaming:  # an empty answer
            await self.respond(200, "text/event-stream; charset=utf-8", b"", more=True)
            self.streaming = True
            await self.chunk(Delta(role="assistant", content=""))
        await self.chunk(Delta(), openai_finish_reason(reason))
        if self.include_usage:
            await self.event(_encoder.encode(ChatCompletionChunk(
                self.turn.request_id, self.created, self.params.model, [], _usage(usage))))
        await self.event(b"[DONE]")
        await self.body_part(b"", more=False)

    async def chunk(self, delta: Delta, finish_reason: FinishReason | None = None) -> None:
        reason = None if finish_reason is None else openai_finish_reason(finish_reason)
        chunk = ChatCompletionChunk(self.turn.request_id, self.created, self.params.model,
                                    [ChunkChoice(0, delta, reason)])
        await self.event(_encoder.encode(chunk))

    async def event(self, data: bytes) -> None:
        await self.body_part(b"data: " + data + b"\n\n", more=True)

    # ASGI -------------------------------------------------------------------------------------------
    async def respond(self, status: int, content_type: str, body: bytes, *, more: bool) -> None:
        assert self.send is not None
        headers = [(b"content-type", content_type.encode()), *self.extra_headers]
        if more:
            headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        else:
            headers.append((b"content-length", str(len(body)).encode()))
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.body_part(body, more=more)

    async def body_part(self, body: bytes, *, more: bool) -> None:
        assert self.send is not None
        await self.send({"type": "http.response.body", "body": body, "more_body": more})


def _usage(usage: Usage) -> CompletionUsage:
    details = (None if usage.cached_tokens is None
               else PromptTokensDetails(cached_tokens=usage.cached_tokens))
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=details, time_to_first_token_ms=usage.time_to_first_token_ms,
        decode_tokens_per_s=usage.decode_tokens_per_s)


async def _ignore(piece: str) -> None:
    return None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:str}", get_model, methods=["GET"]),
    Route("/v1/{rest:path}", unknown_route,
          methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
]

"""Anthropic's Messages API, ``POST /v1/messages``: agents served as models to Anthropic's SDKs.

The same rules as ``/v1/chat/completions`` (:mod:`.openai`), sharing its turn code
(:mod:`streaming_llm.http.answers`): ``model`` names an agent, whose system prompt and Markdown
context come before the request's ``system``; without an ``X-Conversation-Id`` header the
request's ``messages`` are the whole history and nothing is stored; with one (``new`` starts a
conversation) the stored history replaces them but for the new part at the end (tool results
and the last user message), which is stored with the answer.

Content blocks map onto the engine's messages: ``text`` blocks are the text, an assistant's
``tool_use`` blocks its calls, a user's ``tool_result`` blocks ``tool`` messages answering them.
Streamed, the answer is Anthropic's events: ``message_start``, then per content block
``content_block_start`` / ``content_block_delta`` (``text_delta``, or ``input_json_delta`` for
a call's input in pieces) / ``content_block_stop``, then ``message_delta`` (the stop reason and
usage) and ``message_stop``. Errors use Anthropic's body,
``{"type": "error", "error": {"type", "message"}}``, the message naming the field at fault.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ...anthropic_types import (
    AnthropicError,
    AnthropicErrorDetail,
    Block,
    ContentOut,
    Message,
    MessagesRequest,
    MessageUsage,
    StopReason,
    TextOut,
    ToolUseOut,
)
from ...chat.tool_calls import (
    ArgumentsDelta,
    CallStart,
    Event,
    TextDelta,
    ToolUse,
    arguments_object,
    check_tools,
    parse,
    tool_use,
)
from ...chat.turns import Ending
from ...engines.base import ChatMessage, ToolCall
from ...errors import AgentNotFound, BadRequest, ServiceError, ValidationFailed
from ...wire import GenerationOptions, Usage
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

_encoder = msgspec.json.Encoder()
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 409: "invalid_request_error",
                413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


class InvalidRequest(BadRequest):
    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message, code="invalid_request")
        self.param = param


def anthropic_error(exc: ServiceError) -> AnthropicError:
    status = 400 if exc.status == 422 else exc.status
    param = getattr(exc, "param", None)
    if param is None and isinstance(exc, ValidationFailed):
        param = exc.field
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return AnthropicError(AnthropicErrorDetail(kind, f"{param}: {exc.message}" if param
                                               else exc.message))


def anthropic_error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse(anthropic_error(exc), status_code=400 if exc.status == 422 else exc.status)


_anthropic_errors = errors_as(anthropic_error_response)


# --- the request --------------------------------------------------------------------------------
def _text(blocks: str | list[Block] | None, where: str) -> str:
    """The text of a string or of a list of text blocks."""
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    parts = []
    for j, block in enumerate(blocks):
        if block.type != "text" or block.text is None:
            raise InvalidRequest(f"content blocks of type {block.type!r} are not supported "
                                 "here; send text", param=f"{where}[{j}]")
        parts.append(block.text)
    return "".join(parts)


def _messages(body: MessagesRequest) -> tuple[list[ChatMessage], list[str]]:
    """The engine's messages, and for each the field a tool result's error names."""
    messages: list[ChatMessage] = []
    where: list[str] = []
    if body.system:
        messages.append(ChatMessage("system", _text(body.system, "system")))
        where.append("system")
    for i, m in enumerate(body.messages):
        at = f"messages[{i}].content"
        blocks = [Block("text", text=m.content)] if isinstance(m.content, str) else m.content
        texts: list[str] = []
        calls: list[ToolCall] = []
        for j, block in enumerate(blocks):
            if block.type == "text" and block.text is not None:
                texts.append(block.text)
            elif block.type == "tool_use" and m.role == "assistant" and block.id and block.name:
                calls.append(ToolCall(block.id, block.name,
                                      json.dumps(block.input or {}, ensure_ascii=False)))
            elif block.type == "tool_result" and m.role == "user" and block.tool_use_id:
                content = _text(block.content, f"{at}[{j}].content")
                messages.append(ChatMessage(
                    "tool", f"Error: {content}" if block.is_error else content,
                    tool_call_id=block.tool_use_id))
                where.append(f"{at}[{j}].tool_use_id")
            else:
                raise InvalidRequest(f"a {m.role} message cannot hold a block of type "
                                     f"{block.type!r} here (text, tool_use in assistant "
                                     "messages, tool_result in user messages)",
                                     param=f"{at}[{j}]")
        if texts or calls or m.role == "assistant":
            messages.append(ChatMessage(m.role, "".join(texts), tuple(calls)))
            where.append(at)
    last = messages[-1] if messages else None  # a user message of no blocks adds nothing
    if last is None or (last.role != "tool" and (last.role != "user" or not last.content)):
        raise InvalidRequest("the last message must be a user message with text or tool "
                             "results (an assistant prefill is not supported)",
                             param=f"messages[{len(body.messages) - 1}]")
    return messages, where


def _tool_use(request: Request, body: MessagesRequest) -> ToolUse | None:
    settings = request.state.services.settings
    for i, tool in enumerate(body.tools or ()):
        if tool.type not in (None, "custom"):
            raise InvalidRequest(f"server tools ({tool.type!r}) are not supported",
                                 param=f"tools[{i}].type")
    tools = check_tools([msgspec.structs.asdict(t) for t in body.tools or ()],
                        max_tools=settings.max_tools, max_bytes=settings.max_tool_schema_bytes,
                        schema_key="input_schema")
    choice = body.tool_choice
    if choice is None:
        return tool_use(tools, None)
    parallel = not choice.disable_parallel_tool_use
    if choice.type == "tool":
        if not choice.name:
            raise InvalidRequest("tool_choice of type 'tool' names the tool",
                                 param="tool_choice.name")
        return tool_use(tools, choice.name, parallel=parallel, param="tool_choice.name")
    mode = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    return tool_use(tools, mode, parallel=parallel)


@_anthropic_errors
async def messages(request: Request) -> Response:
    body = await decode_body(request, MessagesRequest)
    history, where = _messages(body)
    tools = _tool_use(request, body)
    options = GenerationOptions(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                stop=body.stop_sequences or None, max_new_tokens=body.max_tokens)
    conversation_id = request.headers.get(CONVERSATION_HEADER) or None
    stored = conversation_id is not None
    await check_limits(request, history, options, stored=stored)
    spec = turn_spec(request, request_id=new_request_id("msg_"), agent_id=body.model,
                     messages=history, options=options, conversation_id=conversation_id,
                     tools=tools, result_param=where.__getitem__)
    try:
        answer, work, first = await start(request, spec, stream=body.stream)
    except ClientDisconnect:
        return Response(status_code=499)
    if isinstance(first, ServiceError):  # refused before anything was stored
        if isinstance(first, AgentNotFound):
            first.message = (f"model {body.model!r} not found: models are agent ids "
                             "(GET /v1/models lists them)")
        raise first
    headers = {} if answer.conversation_id is None or not stored else {
        CONVERSATION_HEADER: answer.conversation_id}
    reply = _Reply(spec.request_id, body.model, tools)
    if isinstance(first, Ending) and first.failure is not None:
        failed = anthropic_error_response(first.failure)
        failed.headers.update(headers)
        return failed
    if not body.stream:
        assert isinstance(first, Ending)
        return JSONResponse(reply.message(first.text, first), headers=headers)
    return StreamingResponse(
        reply.events(first, answer), media_type="text/event-stream; charset=utf-8",
        headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        background=BackgroundTask(stop, work))


# --- the answer ---------------------------------------------------------------------------------
def _stop_reason(ending: Ending, called: bool) -> StopReason:
    if ending.reason != "stop":
        return "max_tokens"  # cut short: the token limit (or a cancel nobody reads)
    return "tool_use" if called else "end_turn"


def _usage(usage: Usage) -> MessageUsage:
    return MessageUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens)


class _Reply:
    """Anthropic's bodies for one answer: one ``message``, or its server-sent events."""

    def __init__(self, request_id: str, model: str, tools: ToolUse | None) -> None:
        self.request_id, self.model, self.tools = request_id, model, tools
        self.block = -1  # the index of the open content block
        self.open: str | None = None  # its type

    def message(self, text: str, ending: Ending) -> Message:
        calls: tuple[ToolCall, ...] = ()
        if self.tools is not None:
            text, calls = parse(text, self.request_id,
                                max_calls=None if self.tools.parallel else 1)
        content: list[ContentOut] = [TextOut(text)] if text else []
        content += [ToolUseOut(c.id, c.name, arguments_object(c.arguments)) for c in calls]
        return Message(self.request_id, self.model, content,
                       _stop_reason(ending, bool(calls)), _usage(ending.usage))

    async def events(self, first: Item, answer: Answer) -> AsyncIterator[bytes]:
        prompt_tokens = answer.turn.prompt_tokens if answer.turn is not None else 0
        yield _event("message_start", {"type": "message_start", "message": {
            "id": self.request_id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}})
        parser = self.tools.parser(self.request_id) if self.tools is not None else None
        item = first
        while isinstance(item, str):
            for event in parser.feed(item) if parser is not None else [TextDelta(item)]:
                for data in self._blocks(event):
                    yield data
            item = await answer.next()
        failure = item if isinstance(item, ServiceError) else item.failure
        if failure is not None:  # the SDK raises on an error event
            yield _event("error", msgspec.to_builtins(anthropic_error(failure)))
            return
        assert isinstance(item, Ending)
        for event in parser.close() if parser is not None else []:
            for data in self._blocks(event):
                yield data
        if self.open is not None:
            yield _event("content_block_stop", {"type": "content_block_stop",
                                                "index": self.block})
        yield _event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": _stop_reason(item, bool(parser and parser.calls)),
                      "stop_sequence": None},
            "usage": {"input_tokens": item.usage.prompt_tokens,
                      "output_tokens": item.usage.completion_tokens}})
        yield _event("message_stop", {"type": "message_stop"})

    def _blocks(self, event: Event) -> list[bytes]:
        """The events writing ``event``: a new block when the kind changes, then its delta."""
        out = []
        kind = "text" if isinstance(event, TextDelta) else "tool_use"
        if isinstance(event, CallStart) or self.open != kind:
            if self.open is not None:
                out.append(_event("content_block_stop", {"type": "content_block_stop",
                                                         "index": self.block}))
            self.block += 1
            self.open = kind
            block: dict[str, Any] = ({"type": "text", "text": ""} if kind == "text" else {
                "type": "tool_use", "id": getattr(event, "id", ""),
                "name": getattr(event, "name", ""), "input": {}})
            out.append(_event("content_block_start", {
                "type": "content_block_start", "index": self.block, "content_block": block}))
        match event:
            case TextDelta(text):
                delta: dict[str, Any] = {"type": "text_delta", "text": text}
            case ArgumentsDelta(_, text):
                delta = {"type": "input_json_delta", "partial_json": text}
            case _:
                return out
        out.append(_event("content_block_delta", {"type": "content_block_delta",
                                                  "index": self.block, "delta": delta}))
        return out


def _event(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encoder.encode(data) + b"\n\n"


routes = [Route("/v1/messages", messages, methods=["POST"])]

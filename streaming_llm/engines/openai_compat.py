"""``openai``: a streaming proxy to any OpenAI-compatible server (``POST /v1/chat/completions``).

vLLM, llama.cpp's ``llama-server``, OpenAI itself, or another instance of this service (whose
``/v1`` serves agents as models). Each turn is one ``POST {base}/chat/completions`` with
``"stream": true`` and ``"stream_options": {"include_usage": true}``, the messages in order and
the sampling options under OpenAI's names (``max_tokens`` ← ``max_new_tokens``; ``top_k`` is sent
only when set, as the extension vLLM and llama-server read). ``STREAMING_LLM_OPENAI_API_KEY``, when
set, goes in ``Authorization: Bearer``; it is never logged nor shown by ``/health``.

Tools go as OpenAI's API takes them: ``tools`` (``{"type": "function", "function": {...}}``),
``tool_choice`` (``auto``; ``required`` or, with one tool left, the named
``{"type": "function", "function": {"name"}}``: the server puts only the named tool in a named
choice's constraint) and ``parallel_tool_calls``; an assistant message of the history carries its
``tool_calls`` (``id``, ``type``, ``function.name``, ``function.arguments`` as text, ``content``
null when it said nothing), a result is a ``role: "tool"`` message with its ``tool_call_id``.
Calls come back as ``delta.tool_calls`` pieces (``index``, then ``id`` and ``function.name``
first, ``function.arguments`` in pieces), gathered by
:class:`~streaming_llm.engines.upstream.NativeCalls`; ``finish_reason`` ``"tool_calls"`` ends
the answer as ``stop`` (the server says ``tool_calls`` when the answer made calls).

The answer is server-sent events: ``data: {"choices": [{"delta": {"content": ...},
"finish_reason": null}]}`` per piece, a chunk whose choice has ``finish_reason`` ``"stop"``,
``"length"`` or ``"tool_calls"``, with ``include_usage`` one more chunk with no choices and the
``usage``, then ``data: [DONE]``. Usage comes from that chunk when the upstream sends it
(``cached_tokens`` from ``prompt_tokens_details``); an upstream that ignores ``include_usage``
gets the number of pieces (a call one piece) as ``completion_tokens``. Time to first token and the
decode rate are measured here.

The request, the error mapping (``engine_unavailable``, ``model_not_found``, ...), cancellation
and the health cache are :class:`~streaming_llm.engines.upstream.UpstreamEngine`'s, shared with
the ``ollama`` engine. OpenAI-specific: an error event mid-stream (``data: {"error": {...}}``) is
``engine_error`` with its message; an event that is not JSON or not a chunk, or a stream that
ends without a finish reason, is ``engine_protocol_error``. A stream that sent its finish reason
and then ends without ``[DONE]`` is accepted. The health probe asks ``GET {base}/models`` whether
the model is served.

Server-sent events are parsed here (about twenty lines, after the WHATWG rules: ``data:`` lines
joined by newlines, a blank line ends the event, ``:`` comments and other fields ignored): the
aiohttp SSE clients on PyPI are unmaintained, and the format is small.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal

import aiohttp
import msgspec

from ..errors import EngineError, EngineProtocolError, EngineUnavailable
from ..settings import Settings, url_list
from .base import (
    ChatMessage,
    Chunk,
    Constraint,
    EngineHealth,
    EngineRequest,
    Finished,
    TextChunk,
    Usage,
)
from .tool_text import template_messages
from .upstream import HEALTH_TTL_S, Bounds, NativeCalls, UpstreamEngine, error_message

DONE = b"[DONE]"


# --- wire types (only the fields we read) -------------------------------------------------------
class _FunctionDelta(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    index: int | None = None
    id: str | None = None
    function: _FunctionDelta | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    finish_reason: str | None = None


class _PromptTokensDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _PromptTokensDetails | None = None


class _ChatChunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict[str, Any] | str | None = None
    object: str | None = None  # vLLM's error events: {"object": "error", "message": ...}
    message: str | None = None


class _ModelEntry(msgspec.Struct):
    id: str


class _Models(msgspec.Struct):
    data: list[_ModelEntry]


_chunk_decoder = msgspec.json.Decoder(_ChatChunk)
_models_decoder = msgspec.json.Decoder(_Models)


async def sse_data(lines: AsyncIterator[bytes], label: str, max_bytes: int) -> AsyncIterator[bytes]:
    """The ``data`` of each server-sent event (its ``data:`` lines joined by ``\\n``) read from
    ``lines`` (blank ones kept); an event longer than ``max_bytes`` is a protocol error."""
    data: list[bytes] = []
    size = 0
    async for line in lines:
        if not line:  # a blank line dispatches the event
            if data:
                yield b"\n".join(data)
                data, size = [], 0
        elif line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
            size += len(data[-1]) + 1
            if size > max_bytes:
                raise EngineProtocolError(f"{label} sent an event longer than {max_bytes} bytes")
        # ":" comments (keep-alives), event:, id: and retry: change nothing here
    if data:  # the body ended without the blank line: take the event anyway
        yield b"\n".join(data)


class OpenAIEngine(UpstreamEngine):
    name = "openai"
    label = "openai"
    chat_path = "/chat/completions"

    def __init__(self, settings: Settings, http: aiohttp.ClientSession, *,
                 url: str | None = None, health_ttl_s: float = HEALTH_TTL_S) -> None:
        key = settings.openai_api_key
        super().__init__(http, url or url_list(settings.openai_base_url)[0], settings.openai_model,
                         connect_timeout_s=settings.openai_connect_timeout_s,
                         read_timeout_s=settings.openai_read_timeout_s, health_ttl_s=health_ttl_s,
                         bounds=Bounds.from_settings(settings),
                         headers={"Authorization": f"Bearer {key}"} if key else None)
        self._served: str | None = settings.openai_model or None  # empty: learned from /models

    # --- health ---------------------------------------------------------------------------------
    async def _probe(self) -> EngineHealth:
        """Does the server answer ``GET /models``, and does it serve the model?"""
        try:
            raw = await self.get("/models")
        except aiohttp.ClientResponseError as exc:
            if exc.status in (401, 403):
                return self.unhealthy(f"{self.where} refused the API key (HTTP {exc.status}); "
                                      "check STREAMING_LLM_OPENAI_API_KEY")
            raise
        served = [m.id for m in _models_decoder.decode(raw).data]
        if not self._model:
            if not served:
                return self.unhealthy(f"{self.where} lists no model at /models")
            self._served = served[0]
        elif self._model not in served:
            listed = ", ".join(served[:5]) or "none"
            return self.unhealthy(f"model {self._model} is not served by {self.where} "
                                  f"(it lists: {listed})")
        model = self._served or self._model
        return EngineHealth(ready=True, model=model, detail=f"{model} at {self._base}",
                            extra={"url": self._base})

    # --- chat -----------------------------------------------------------------------------------
    def chat_body(self, request: EngineRequest, *, native_tools: bool = True) -> dict[str, Any]:
        """The ``/chat/completions`` request body; only the options that are set are sent."""
        opts = request.options
        constraint = request.constraint
        body: dict[str, Any] = {
            "model": self._served or self._model,
            "messages": (openai_messages(request.messages) if native_tools
                         else template_messages(request.messages, constraint)),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_new_tokens,
        }
        for name, value in (("temperature", opts.temperature), ("top_p", opts.top_p),
                            ("top_k", opts.top_k), ("stop", opts.stop), ("seed", opts.seed)):
            if value is not None:
                body[name] = value
        if constraint is not None and constraint.kind == "tool_calls":
            if native_tools:
                body.update(openai_tools(constraint))
        elif constraint is not None:
            self.check_constraint(constraint)
            body["response_format"] = {"type": "json_object"} if constraint.kind == "json_object" \
                else {"type": "json_schema", "json_schema": {
                    "name": "response", "schema": constraint.schema, "strict": True}}
        return body

    async def prepare(self) -> None:
        if self._served is None:  # no model configured: ask the server which one it serves
            report = await self.health()
            if self._served is None:
                raise EngineUnavailable(report.detail or f"{self.where} names no model")

    async def read_answer(self, resp: aiohttp.ClientResponse, started: float,
                          calls: NativeCalls) -> AsyncGenerator[Chunk, None]:
        first_at: float | None = None
        pieces = 0
        reason: str | None = None
        usage: _Usage | None = None
        async for data in sse_data(self.body_lines(resp, keep_empty=True), self.label,
                                   self.bounds.line_bytes):
            if data == DONE:
                break
            try:
                chunk = _chunk_decoder.decode(data)
            except msgspec.DecodeError as exc:
                raise EngineProtocolError(
                    f"openai sent an event that is not a chat completion chunk ({exc}): "
                    f"{data[:200]!r}") from None
            if chunk.error is not None or chunk.object == "error":
                raise EngineError(error_message(data) or "the upstream reported an error")
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.index != 0:
                    continue
                delta = choice.delta
                if delta is not None and delta.content:
                    if first_at is None:
                        first_at = time.perf_counter()
                    pieces += 1
                    yield TextChunk(delta.content)
                for call in (delta.tool_calls or ()) if delta is not None else ():
                    if first_at is None:
                        first_at = time.perf_counter()
                    function = call.function or _FunctionDelta()
                    calls.piece(call.index, name=function.name, arguments=function.arguments,
                                starts=bool(call.id or function.name))
                if choice.finish_reason is not None:
                    reason = choice.finish_reason
        if reason is None:
            raise EngineProtocolError("openai ended the stream without a finish reason")
        yield _finished(reason, usage, pieces + len(calls), started, first_at)


def openai_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as OpenAI's API takes them, tool calls and results included."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
        elif m.tool_calls:
            out.append({"role": m.role, "content": m.content or None, "tool_calls": [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls]})
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def openai_tools(constraint: Constraint) -> dict[str, Any]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` for a ``tool_calls`` constraint:
    with a lazy trigger the model may answer in text (``auto``); without, it must call, the one
    tool left by name (a named choice's constraint holds only that tool) or any (``required``)."""
    tools = constraint.tools
    choice: str | dict[str, Any] = "auto"
    if constraint.lazy_trigger is None:
        choice = ({"type": "function", "function": {"name": tools[0]["name"]}}
                  if len(tools) == 1 else "required")
    return {"tools": [{"type": "function", "function": t} for t in tools],
            "tool_choice": choice, "parallel_tool_calls": constraint.parallel}


def _finished(reason: str, usage: _Usage | None, pieces: int, started: float,
              first_at: float | None) -> Finished:
    ended = time.perf_counter()
    # "tool_calls" (and the older "function_call") end the answer as "stop": the server says
    # tool_calls itself when the answer made calls
    finish: Literal["stop", "length"] = "length" if reason == "length" else "stop"
    completion = usage.completion_tokens if usage is not None else pieces
    ttft = round((first_at - started) * 1000, 3) if first_at is not None else None
    tps = None
    if first_at is not None and completion > 1 and ended > first_at:
        tps = round((completion - 1) / (ended - first_at), 2)
    cached = None
    if usage is not None and usage.prompt_tokens_details is not None:
        cached = usage.prompt_tokens_details.cached_tokens
    return Finished(finish, Usage(
        prompt_tokens=usage.prompt_tokens if usage is not None else 0,
        completion_tokens=completion, cached_tokens=cached,
        time_to_first_token_ms=ttft, decode_tokens_per_s=tps))

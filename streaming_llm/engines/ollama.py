"""``ollama``: a streaming proxy to an Ollama server (``POST /api/chat``, NDJSON).

Each turn is one ``POST {ollama_url}/api/chat`` with ``"stream": true``, the messages in order and
the sampling options under Ollama's names (``num_predict`` ← ``max_new_tokens``). Ollama answers
``application/x-ndjson``: one JSON object per line, ``{"message": {"content": ...}, "done": false}``
for each piece, then ``{"done": true, "done_reason": "stop"|"length", "prompt_eval_count",
"eval_count", "eval_duration", ...}`` (durations in nanoseconds). Lines are cut out of the byte
stream ourselves, so a line split across network reads or several lines in one read both work.

Tools go as Ollama's ``/api/chat`` takes them: ``tools`` (OpenAI's function list), an
assistant message's ``tool_calls`` (``{"function": {"name", "arguments": {...}}}``, the arguments
an object) and results as ``role: "tool"`` messages naming their tool (``tool_name``). Calls come
back whole in ``message.tool_calls`` (usually one chunk) and are gathered by
:class:`~streaming_llm.engines.upstream.NativeCalls`; Ollama gives them no ids, the server names
them. Ollama has no ``tool_choice``: ``auto`` and ``required`` send every tool, a named choice only
the named one (the server's constraint holds only that one), and ``none`` none; a model may
still answer ``required`` or a named choice in text, which comes back as text (no call, finish
``stop``): the one approximation, see docs/engines.md.

The request, the error mapping, cancellation and the health cache are
:class:`~streaming_llm.engines.upstream.UpstreamEngine`'s, shared with the ``openai`` engine.
Ollama-specific: an ``{"error": ...}`` line mid-stream is ``engine_error`` with Ollama's message, a
malformed line or a stream that ends without ``done`` is ``engine_protocol_error``, and the health
probe asks ``/api/version`` and ``/api/tags`` (is the model pulled?).

``STREAMING_LLM_OLLAMA_URL`` may list several servers; the registry then puts one engine per URL
behind a :class:`~streaming_llm.engines.pool.BackendPool`.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncGenerator
from typing import Any, Literal

import aiohttp
import msgspec

from ..errors import EngineError, EngineProtocolError
from ..settings import Settings, url_list
from .base import ChatMessage, Chunk, EngineHealth, EngineRequest, Finished, TextChunk, Usage
from .tool_text import template_messages
from .upstream import (
    HEALTH_TTL_S,
    Bounds,
    NativeCalls,
    UpstreamEngine,
    arguments_value,
    clip,
    offered_tools,
    tool_names,
)


# --- wire types (only the fields we read; unknown ones such as "thinking" are ignored) ----------
class _Function(msgspec.Struct):
    name: str = ""
    arguments: Any = None  # an object (checked by NativeCalls)


class _ToolCall(msgspec.Struct):
    function: _Function


class _Message(msgspec.Struct):
    content: str = ""
    tool_calls: list[_ToolCall] | None = None


class _ChatChunk(msgspec.Struct):
    message: _Message | None = None
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int = 0
    eval_count: int = 0
    eval_duration: int = 0  # nanoseconds
    error: str | None = None


class _Version(msgspec.Struct):
    version: str


class _Model(msgspec.Struct):
    name: str = ""
    model: str = ""


class _Tags(msgspec.Struct):
    models: list[_Model] = []


_chunk_decoder = msgspec.json.Decoder(_ChatChunk)
_version_decoder = msgspec.json.Decoder(_Version)
_tags_decoder = msgspec.json.Decoder(_Tags)
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def normalize_model(name: str) -> str:
    """``llama3.2`` → ``llama3.2:latest``: Ollama's tag defaults to ``latest``."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def keep_alive_value(text: str) -> str | float | int:
    """Ollama reads a JSON number as seconds and a string as a Go duration ("5m"); a bare "-1" or
    "300" string is no valid Go duration, so numbers are sent as numbers."""
    text = text.strip()
    if _NUMBER.match(text):
        return float(text) if "." in text else int(text)
    return text


class OllamaEngine(UpstreamEngine):
    name = "ollama"
    label = "ollama"
    chat_path = "/api/chat"

    def __init__(self, settings: Settings, http: aiohttp.ClientSession, *,
                 url: str | None = None, health_ttl_s: float = HEALTH_TTL_S) -> None:
        super().__init__(http, url or url_list(settings.ollama_url)[0], settings.ollama_model,
                         connect_timeout_s=settings.ollama_connect_timeout_s,
                         read_timeout_s=settings.ollama_read_timeout_s, health_ttl_s=health_ttl_s,
                         bounds=Bounds.from_settings(settings))
        self._keep_alive = keep_alive_value(settings.ollama_keep_alive)
        self._num_ctx = settings.ollama_num_ctx

    # --- health ---------------------------------------------------------------------------------
    async def _probe(self) -> EngineHealth:
        """Does Ollama answer, and does it have the model?"""
        version = _version_decoder.decode(await self.get("/api/version")).version
        tags = _tags_decoder.decode(await self.get("/api/tags"))
        wanted = normalize_model(self._model)
        if not any(wanted in (normalize_model(m.name), normalize_model(m.model))
                   for m in tags.models if m.name or m.model):
            return self.unhealthy(f"model {self._model} not found; run `ollama pull {self._model}`",
                                  version=version)
        return EngineHealth(ready=True, model=self._model, detail=f"ollama {version} at {self._base}",
                            extra={"url": self._base, "version": version})

    # --- chat -----------------------------------------------------------------------------------
    def chat_body(self, request: EngineRequest, *, native_tools: bool = True) -> dict[str, Any]:
        """The ``/api/chat`` request body for a turn; only the options that are set are sent."""
        opts = request.options
        options: dict[str, Any] = {"num_predict": request.max_new_tokens}
        for name, value in (("temperature", opts.temperature), ("top_p", opts.top_p),
                            ("top_k", opts.top_k), ("stop", opts.stop), ("seed", opts.seed),
                            ("repeat_penalty", opts.repetition_penalty),
                            ("presence_penalty", opts.presence_penalty),
                            ("frequency_penalty", opts.frequency_penalty), ("min_p", opts.min_p)):
            if value is not None:
                options[name] = value
        if self._num_ctx > 0:
            options["num_ctx"] = self._num_ctx
        body: dict[str, Any] = {
            "model": self._model,
            "messages": (ollama_messages(request.messages) if native_tools
                         else template_messages(request.messages, request.constraint)),
            "stream": True,
            "keep_alive": self._keep_alive,
            "options": options,
        }
        constraint = request.constraint
        if constraint is not None and constraint.kind == "tool_calls":
            if native_tools:  # (no tool_choice in Ollama: see the module docstring)
                body["tools"] = [{"type": "function", "function": t}
                                 for t in offered_tools(request)]
        elif constraint is not None:
            self.check_constraint(constraint)  # Ollama's structured outputs
            body["format"] = constraint.schema if constraint.kind == "json_schema" else "json"
        return body

    async def read_answer(self, resp: aiohttp.ClientResponse, started: float,
                          calls: NativeCalls) -> AsyncGenerator[Chunk, None]:
        first_at: float | None = None
        decode = _chunk_decoder.decode
        async for line in self.body_lines(resp):
            try:
                chunk = decode(line)
            except msgspec.DecodeError as exc:
                if not line.strip():
                    continue  # a line of blanks
                raise EngineProtocolError(
                    f"ollama sent a line that is not a chat chunk ({exc}): {line[:200]!r}"
                ) from None
            if chunk.error is not None:
                raise EngineError(clip(chunk.error))
            message = chunk.message
            if message is not None and message.content:
                if first_at is None:
                    first_at = time.perf_counter()
                yield TextChunk(message.content)
            for call in (message.tool_calls or ()) if message is not None else ():
                if first_at is None:
                    first_at = time.perf_counter()
                calls.whole(call.function.name, call.function.arguments)
            if chunk.done:
                yield _finished(chunk, started, first_at)
                return
        raise EngineProtocolError("ollama ended the stream without a final done chunk")


def ollama_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as ``/api/chat`` takes them, tool calls and results included."""
    names = tool_names(messages)
    out: list[dict[str, Any]] = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [
                {"function": {"name": c.name, "arguments": arguments_value(c.arguments)}}
                for c in m.tool_calls]
        if m.role == "tool" and m.tool_call_id in names:
            message["tool_name"] = names[m.tool_call_id]
        out.append(message)
    return out


def _finished(chunk: _ChatChunk, started: float, first_at: float | None) -> Finished:
    reason: Literal["stop", "length"] = "length" if chunk.done_reason == "length" else "stop"
    tps = None
    if chunk.eval_count and chunk.eval_duration > 0:
        tps = round(chunk.eval_count / (chunk.eval_duration / 1e9), 2)
    ttft = round((first_at - started) * 1000, 3) if first_at is not None else None
    return Finished(reason, Usage(prompt_tokens=chunk.prompt_eval_count,
                                  completion_tokens=chunk.eval_count,
                                  time_to_first_token_ms=ttft, decode_tokens_per_s=tps))

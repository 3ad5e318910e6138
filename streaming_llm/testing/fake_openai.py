"""A fake OpenAI-compatible server (``aiohttp.web``): ``/v1/chat/completions`` and ``/v1/models``.

It speaks the wire protocol vLLM, llama-server and OpenAI share:

- ``POST /v1/chat/completions`` with ``"stream": true``: ``text/event-stream`` of ``data: {"id",
  "object": "chat.completion.chunk", "created", "model", "choices": [{"index": 0, "delta":
  {"content"}, "finish_reason": null}]}`` events (the first delta also carries the role), a chunk
  with ``finish_reason``, with ``stream_options.include_usage`` a last chunk with ``"choices": []``
  and the ``usage`` (every other chunk then says ``"usage": null``), then ``data: [DONE]``. With
  ``"stream": false`` one ``chat.completion``. ``max_tokens`` (or ``max_completion_tokens``) caps the
  answer (``finish_reason: "length"``). An unknown model is a 404 ``{"error": {"message", "type",
  "param", "code": "model_not_found"}}``; a wrong or missing API key, when one is set, a 401.
  A script's ``tool_calls`` come after the tokens as OpenAI streams them: per call a
  ``delta.tool_calls`` chunk with its ``index``, ``id``, ``type`` and ``function.name`` (and empty
  ``arguments``), then its arguments' text in pieces (``{"index", "function": {"arguments"}}``),
  and ``finish_reason: "tool_calls"``; ``refuse_tools`` answers a chat with ``tools`` with a 400
  (as vLLM does without ``--enable-auto-tool-choice``).
- ``GET /v1/models`` → ``{"object": "list", "data": [{"id", "object": "model", ...}]}``.

It runs as :class:`~streaming_llm.testing.fake_server.FakeServer` does (its own loop and thread,
a free loopback port, restartable on the same port). :class:`CompletionScript` sets how the next
completions answer: slowly, events split across writes or many per write, ``\\r\\n`` line ends and
keep-alive comments, an HTTP error, an error event mid-stream, garbage instead of an event, a
stream cut before its finish reason, no ``[DONE]``, a hang, usage or none.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from .fake_server import ChatRecord, FakeServer, Script

__all__ = ["ChatRecord", "CompletionScript", "FakeOpenAI"]

DEFAULT_MODELS = ("fake-model",)


@dataclasses.dataclass
class CompletionScript(Script):
    """How the fake answers ``/v1/chat/completions`` (set ``FakeOpenAI.script`` before); the
    shared fields are :class:`~streaming_llm.testing.fake_server.Script`'s."""

    finish_reason: str = "stop"  # when the answer is not cut by max_tokens
    crlf: bool = False  # end lines with \r\n
    comments: bool = False  # a ": keep-alive" comment before every event
    usage: bool | None = None  # None: as the request's stream_options.include_usage says
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when set
    garbage: bytes | None = None  # a data line with these bytes after `garbage_after` tokens
    garbage_after: int = 0
    cut_after: int | None = None  # end the body after this many tokens: no finish, no [DONE]
    no_done: bool = False  # finish (and usage) but end the body without data: [DONE]


class FakeOpenAI(FakeServer):
    """``with FakeOpenAI() as fake: ... fake.base_url ...``; thread-safe to script and inspect."""

    thread_name = "fake-openai"

    def __init__(self, *, models: Sequence[str] = DEFAULT_MODELS, api_key: str | None = None,
                 script: CompletionScript | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        super().__init__(host=host, port=port)
        self.models = list(models)
        self.api_key = api_key
        self.script = script or CompletionScript()
        self.models_status = 200  # set to e.g. 500 to make /v1/models fail

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_get("/v1/models", self._models)

    # --- handlers -----------------------------------------------------------------------------
    def _refused(self, request: web.Request) -> web.Response | None:
        if self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}":
            return None
        return _error(401, "Incorrect API key provided.", "invalid_api_key")

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        if (refused := self._refused(request)) is not None:
            return refused
        if self.probe_script is not None:
            if (moved := self.redirect(self.probe_script)) is not None:
                return moved
            return await self.flooded_probe(request, self.probe_script,
                                            b'{"object": "list", "data": [', b"]}")
        if self.models_status != 200:
            return _error(self.models_status, "models unavailable", None)
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": 1735689600, "owned_by": "fake"}
            for m in self.models]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        script = self.script
        try:
            record = await self.begin_chat(request)
        except ValueError as exc:
            return _error(400, f"invalid JSON body: {exc}", None)
        if (refused := self._refused(request)) is not None:
            return refused
        if (moved := self.redirect(script)) is not None:
            return moved
        body = record.body
        model = body.get("model")
        if not model:
            return _error(400, "you must provide a model parameter", None)
        if model not in self.models:
            return _error(404, f"The model `{model}` does not exist.", "model_not_found")
        if script.refuse_tools is not None and body.get("tools"):
            return _error(400, script.refuse_tools, None)
        if script.status != 200 and script.flood_bytes:
            return await self.flooded_error(request, record, script,
                                            b'{"error": {"type": "server_error", "message": "',
                                            b'"}}')
        if script.status != 200:
            return _error(script.status, script.error or f"fake failure (HTTP {script.status})",
                          None)

        tokens = list(script.tokens)
        finish = script.finish_reason
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and 0 <= limit < len(tokens) and not script.ignore_max_tokens:
            tokens, finish = tokens[:limit], "length"
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in body["messages"])
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        usage: dict[str, Any] | None = None if not (
            wants_usage if script.usage is None else script.usage) else {
            "prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens)}
        if script.counts is not None:  # a broken upstream's numbers, asked for or not
            usage = {**(usage or {}), **script.counts}
        if usage is not None and script.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": script.cached_tokens}

        if script.tool_calls and finish == "stop":
            finish = "tool_calls"
        if body.get("stream") is not True:
            record.complete.set()
            message: dict[str, Any] = {"role": "assistant", "content": "".join(tokens) or None}
            if script.tool_calls:
                message["tool_calls"] = [
                    {"id": _call_id(i), "type": "function",
                     "function": {"name": c["name"], "arguments": _arguments(c)}}
                    for i, c in enumerate(script.tool_calls)]
            return web.json_response({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": model, "usage": usage, "choices": [{
                    "index": 0, "finish_reason": finish, "message": message}]})
        events, ending = _events(script, model, tokens, finish, usage, wants_usage)
        return await self.stream(request, record, script, {"Content-Type": "text/event-stream",
                                                           "Cache-Control": "no-cache"},
                                 events, ending)


def _events(script: CompletionScript, model: str, tokens: list[str], finish: str,
            usage: dict[str, Any] | None,
            wants_usage: bool) -> tuple[list[bytes], list[bytes]]:
    """The events up to the last token, and those that end the answer (a flood goes between)."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        event: dict[str, Any] = {
            "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": 0, "delta": delta,
                                         "finish_reason": reason}]}
        if wants_usage:
            event["usage"] = None
        return event

    # The plan: token events up to the first scripted interruption, then how the answer ends.
    stops = [len(tokens)]
    stops += [n for n in (script.cut_after, script.hang_after) if n is not None]
    if script.error is not None:
        stops.append(script.error_after)
    if script.garbage is not None:
        stops.append(script.garbage_after)
    cut = max(0, min(stops))
    events: list[bytes] = [_data(chunk({"role": "assistant", "content": ""}))]
    events += [_data(chunk({"content": token})) for token in tokens[:cut]]
    streamed = len(events)
    if script.error is not None and script.error_after == cut:
        events.append(_data({"error": {"message": script.error, "type": "server_error",
                                       "param": None, "code": None}}))
    elif script.garbage is not None and script.garbage_after == cut:
        events.append(b"data: " + script.garbage + b"\n\n")
    elif script.cut_after == cut or script.hang_after == cut:
        pass
    else:
        for i, call in enumerate(script.tool_calls):  # the calls, then how the answer ends
            events.append(_data(chunk({"tool_calls": [{
                "index": i, "id": _call_id(i), "type": "function",
                "function": {"name": call["name"], "arguments": ""}}]})))
            text = _arguments(call)
            step = max(1, len(text) // 3)  # the arguments' text in pieces, as models write it
            events += [_data(chunk({"tool_calls": [{
                "index": i, "function": {"arguments": text[at:at + step]}}]}))
                for at in range(0, len(text), step)]
        events.append(_data(chunk({}, finish)))
        if usage is not None:
            events.append(_data({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                 "created": created, "model": model, "choices": [],
                                 "usage": usage}))
        if not script.no_done:
            events.append(b"data: [DONE]\n\n")
    if script.comments:
        events = [b": keep-alive\n\n" + e for e in events]
    if script.crlf:
        events = [e.replace(b"\n", b"\r\n") for e in events]
    return events[:streamed], events[streamed:]


def _call_id(index: int) -> str:
    return f"call_fake{index:04d}"


def _arguments(call: dict[str, Any]) -> str:
    """A scripted call's arguments as text: an object as JSON, text (a broken call's) as is."""
    arguments = call["arguments"]
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _error(status: int, message: str, code: str | None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "param": None,
                                        "code": code}}, status=status)

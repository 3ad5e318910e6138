"""A fake Ollama server (``aiohttp.web``) that speaks Ollama's documented wire protocol.

Endpoints, as in Ollama's ``docs/api.md``:

- ``POST /api/chat``: with ``"stream": true`` (the default) an ``application/x-ndjson`` stream of
  ``{"model", "created_at", "message": {"role": "assistant", "content"}, "done": false}`` lines and
  a final ``{"done": true, "done_reason", "total_duration", "load_duration", "prompt_eval_count",
  "prompt_eval_duration", "eval_count", "eval_duration"}`` line (durations in nanoseconds); with
  ``"stream": false`` one JSON object. An unknown model is a 404 ``{"error": "model \\"x\\" not
  found, try pulling it first"}``. ``options.num_predict`` caps the answer (``done_reason:
  "length"``). A script's ``tool_calls`` come after the tokens in one line's
  ``message.tool_calls`` (``[{"function": {"name", "arguments": {...}}}]``, no ids, as Ollama
  sends them); ``refuse_tools`` answers a chat with ``tools`` as Ollama answers for a model whose
  template has none (400 ``{"error": "... does not support tools"}``).
- ``GET /api/version`` → ``{"version": "0.x.y"}``; ``GET /api/tags`` → ``{"models": [...]}``.

It runs as :class:`~streaming_llm.testing.fake_server.FakeServer` does (its own loop and thread,
a free loopback port, restartable on the same port). :class:`ChatScript` sets how the next chats answer (slowly, lines split across
writes or several per write, an error line, a 404/500, a malformed line, no final ``done``, a
hang); every chat is recorded as a :class:`ChatRecord` with its body and whether the client closed
the connection before the answer was complete.

``python -m streaming_llm.testing.fake_ollama --tokens 1000`` runs one standalone (used by
``streaming-llm bench ollama``); it prints its URL on the first line of stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from .fake_server import ChatRecord, FakeServer, Item, Script

__all__ = ["ChatRecord", "ChatScript", "FakeOllama", "normalize_model"]

DEFAULT_MODELS = ("llama3.2:latest",)
VERSION = "0.6.5"


@dataclasses.dataclass
class ChatScript(Script):
    """How the fake answers ``/api/chat`` (set ``FakeOllama.script`` before the request); the
    shared fields are :class:`~streaming_llm.testing.fake_server.Script`'s."""

    done_reason: str = "stop"  # when the answer is not cut by options.num_predict
    malformed_after: int | None = None  # a line that is not JSON after this many tokens
    end_without_done: bool = False  # finish the response without the final done line


def normalize_model(name: str) -> str:
    """``llama3.2`` → ``llama3.2:latest``: Ollama's tag defaults to ``latest``."""
    base = name.rsplit("/", 1)[-1]
    return name if ":" in base else f"{name}:latest"


class FakeOllama(FakeServer):
    """``with FakeOllama() as fake: ... fake.url ...``; thread-safe to script and inspect."""

    thread_name = "fake-ollama"

    def __init__(self, *, models: Sequence[str] = DEFAULT_MODELS, version: str = VERSION,
                 script: ChatScript | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host=host, port=port)
        self.models = list(models)
        self.version = version
        self.script = script or ChatScript()
        self.version_status = 200  # set to e.g. 500 to make /api/version fail

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/chat", self._chat)
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)

    # --- handlers -----------------------------------------------------------------------------
    async def _version(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        if self.version_status != 200:
            return web.json_response({"error": "version unavailable"}, status=self.version_status)
        return web.json_response({"version": self.version})

    async def _tags(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        if self.probe_script is not None:
            if (moved := self.redirect(self.probe_script)) is not None:
                return moved
            return await self.flooded_probe(request, self.probe_script, b'{"models": [', b"]}")
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": "2025-01-01T00:00:00Z",
                "size": 2019393189,
                "digest": f"{abs(hash(name)):064x}"[:64],
                "details": {"format": "gguf", "family": "llama", "families": ["llama"],
                            "parameter_size": "3.2B", "quantization_level": "Q4_K_M"},
            }
            for name in self.models
        ]
        return web.json_response({"models": models})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        script = self.script
        try:
            record = await self.begin_chat(request)
        except ValueError as exc:
            return web.json_response({"error": f"invalid JSON body: {exc}"}, status=400)
        if (moved := self.redirect(script)) is not None:
            return moved
        body = record.body
        model = body.get("model")
        if not model:
            return web.json_response({"error": "model is required"}, status=400)
        if normalize_model(model) not in {normalize_model(m) for m in self.models}:
            return web.json_response(
                {"error": f'model "{model}" not found, try pulling it first'}, status=404)
        if script.refuse_tools is not None and body.get("tools"):
            return web.json_response({"error": script.refuse_tools}, status=400)
        if script.status != 200:
            if script.flood_bytes:
                return await self.flooded_error(request, record, script, b'{"error": "', b'"}')
            message = script.error or f"fake failure (HTTP {script.status})"
            return web.json_response({"error": message}, status=script.status)

        options = body.get("options") or {}
        tokens = list(script.tokens)
        done_reason = script.done_reason
        limit = options.get("num_predict")
        if isinstance(limit, int) and 0 <= limit < len(tokens) and not script.ignore_max_tokens:
            tokens, done_reason = tokens[:limit], "length"
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in body["messages"])

        if body.get("stream", True) is False:
            started = time.perf_counter_ns()
            reply = _final(model, done_reason, prompt_tokens, len(tokens), started, script.counts)
            reply["message"]["content"] = "".join(tokens)
            if script.tool_calls:
                reply["message"]["tool_calls"] = _tool_calls(script)
            record.complete.set()
            return web.json_response(reply)

        started = time.perf_counter_ns()
        plan = _plan(script, model, tokens, done_reason, prompt_tokens, started)
        # a flood goes after the tokens, before how the answer ends
        cut = sum(isinstance(item, functools.partial) for item in plan)
        return await self.stream(request, record, script, {"Content-Type": "application/x-ndjson"},
                                 plan[:cut], plan[cut:])


def _plan(script: ChatScript, model: str, tokens: list[str], done_reason: str,
          prompt_tokens: int, started: int) -> list[Item]:
    # The plan: token lines up to the first scripted interruption, then how the answer ends.
    # Lines are built when sent, so created_at and the final line's durations are real.
    stops = [len(tokens)]
    stops += [n for n in (script.malformed_after, script.hang_after) if n is not None]
    if script.error is not None:
        stops.append(script.error_after)
    cut = max(0, min(stops))
    plan: list[Item] = [functools.partial(_token_line, model, token) for token in tokens[:cut]]
    if script.error is not None and script.error_after == cut:
        plan.append(_line({"error": script.error}))
    elif script.malformed_after == cut:
        plan.append(b'{"model":"' + model.encode() + b'","message":{"content":\n')
    elif script.hang_after is None and not script.end_without_done:
        if script.tool_calls:  # whole calls, in one line, before the final one
            plan.append(functools.partial(_tool_calls_line, model, _tool_calls(script)))
        plan.append(lambda: _line(_final(model, done_reason, prompt_tokens, cut, started,
                                         script.counts)))
    return plan


def _token_line(model: str, token: str) -> bytes:
    return _line(_chunk(model, token, done=False))


def _tool_calls(script: ChatScript) -> list[dict[str, Any]]:
    return [{"function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in script.tool_calls]


def _tool_calls_line(model: str, calls: list[dict[str, Any]]) -> bytes:
    chunk = _chunk(model, "", done=False)
    chunk["message"]["tool_calls"] = calls
    return _line(chunk)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _chunk(model: str, content: str, *, done: bool) -> dict[str, Any]:
    return {"model": model, "created_at": _now(),
            "message": {"role": "assistant", "content": content}, "done": done}


def _final(model: str, done_reason: str, prompt_tokens: int, eval_count: int,
           started_ns: int, counts: dict[str, Any] | None = None) -> dict[str, Any]:
    eval_ns = max(1, time.perf_counter_ns() - started_ns)
    final = _chunk(model, "", done=True)
    final.update(done_reason=done_reason, total_duration=eval_ns + 2_000_000,
                 load_duration=1_000_000, prompt_eval_count=prompt_tokens,
                 prompt_eval_duration=1_000_000, eval_count=eval_count, eval_duration=eval_ns)
    final.update(counts or {})  # a broken upstream's numbers
    return final


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=100, help="tokens in every answer")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="pause before every line")
    parser.add_argument("--model", action="append", help="model to list (repeatable)")
    args = parser.parse_args(argv)
    script = ChatScript(tokens=[f" w{i}" for i in range(args.tokens)], delay_s=args.delay_ms / 1000)
    with FakeOllama(models=args.model or DEFAULT_MODELS, script=script, host=args.host,
                    port=args.port) as fake:
        print(fake.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``ollama``: a streaming proxy to an Ollama server (``POST /api/chat``, NDJSON).

Each turn is one ``POST {ollama_url}/api/chat`` with ``"stream": true``, the messages in order and
the sampling options under Ollama's names (``num_predict`` ← ``max_new_tokens``). Ollama answers
``application/x-ndjson``: one JSON object per line, ``{"message": {"content": ...}, "done": false}``
for each piece, then ``{"done": true, "done_reason": "stop"|"length", "prompt_eval_count",
"eval_count", "eval_duration", ...}`` (durations in nanoseconds). Lines are cut out of the byte
stream ourselves, so a line split across network reads or several lines in one read both work.

Failures raise :mod:`streaming_llm.errors` classes carrying Ollama's own message: a non-2xx answer
before streaming (404 → ``model_not_found``), an ``{"error": ...}`` line mid-stream
(``engine_error``), connection refused or not accepted within the connect timeout
(``engine_unavailable``), no bytes within the read timeout (``engine_timeout``), a malformed line or a stream that ends without ``done``
(``engine_protocol_error``).

Cancellation: Ollama stops generating when its client goes away, so closing the stream (or
cancelling the task reading it) closes the upstream response *and its TCP connection* instead of
returning it to the pool. A stream that ended cleanly returns its connection for reuse.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp
import msgspec

from ..errors import (
    EngineError,
    EngineProtocolError,
    EngineTimeout,
    EngineUnavailable,
    ModelNotFound,
)
from ..settings import Settings
from .base import Chunk, EngineHealth, EngineRequest, Finished, TextChunk, Usage

HEALTH_TTL_S = 5.0
MAX_LINE_BYTES = 16 * 1024 * 1024  # a longer "line" means we are not talking to Ollama
END_OF_BODY_WAIT_S = 0.5  # after done: longest wait for the body's end before closing instead


# --- wire types (only the fields we read; unknown ones such as "thinking" are ignored) ----------
class _Message(msgspec.Struct):
    content: str = ""


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
_encoder = msgspec.json.Encoder()
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


async def ndjson_lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Yield the non-empty lines of an NDJSON body, whatever the network reads look like."""
    pending = b""
    async for received in content.iter_any():
        data = pending + received if pending else received
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            if end > start:
                line = data[start:end].strip()
                if line:
                    yield line
            start = end + 1
        pending = data[start:]
        if len(pending) > MAX_LINE_BYTES:
            raise EngineProtocolError(f"Ollama sent a line longer than {MAX_LINE_BYTES} bytes")
    if pending.strip():
        yield pending.strip()


class OllamaEngine:
    name = "ollama"

    def __init__(self, settings: Settings, http: aiohttp.ClientSession, *,
                 health_ttl_s: float = HEALTH_TTL_S) -> None:
        self._http = http
        self._base = settings.ollama_url.rstrip("/")
        self._model = settings.ollama_model
        self._keep_alive = keep_alive_value(settings.ollama_keep_alive)
        self._num_ctx = settings.ollama_num_ctx
        # sock_read bounds the wait for each read (headers included: Ollama sends them with the
        # first piece, so a model load counts); no total limit, answers may stream for minutes.
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.ollama_connect_timeout_s,
            sock_read=settings.ollama_read_timeout_s)
        self._probe_timeout = aiohttp.ClientTimeout(
            total=settings.ollama_connect_timeout_s + min(settings.ollama_read_timeout_s, 5.0),
            sock_connect=settings.ollama_connect_timeout_s)
        self._health_ttl_s = health_ttl_s
        self._health: tuple[float, EngineHealth] | None = None
        self._health_lock = asyncio.Lock()

    # --- life cycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.health()  # a first probe, for the log and /health; never fails start-up

    async def close(self) -> None:
        return None  # the ClientSession belongs to the app's lifespan

    def forget(self, conversation_id: str) -> None:
        return None  # Ollama keeps no per-conversation state for us

    def refusal(self, system: str | None = None) -> EngineError | None:
        return None  # Ollama's state is learned per request (its errors are stable codes)

    # --- health ---------------------------------------------------------------------------------
    async def health(self) -> EngineHealth:
        """Does Ollama answer, and does it have the model? Cached ``health_ttl_s`` seconds."""
        async with self._health_lock:  # concurrent callers share one probe
            if self._health is not None and time.monotonic() - self._health[0] < self._health_ttl_s:
                return self._health[1]
            report = await self._probe()
            self._health = (time.monotonic(), report)
            return report

    async def _probe(self) -> EngineHealth:
        extra: dict[str, object] = {"url": self._base}
        try:
            version = _version_decoder.decode(await self._get("/api/version")).version
            extra["version"] = version
            tags = _tags_decoder.decode(await self._get("/api/tags"))
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            detail = f"ollama at {self._base} is not reachable ({_describe(exc)})"
            return EngineHealth(ready=False, model=self._model, detail=detail, extra=extra)
        except (aiohttp.ClientResponseError, msgspec.DecodeError) as exc:
            detail = f"ollama at {self._base} gave an unexpected answer ({_describe(exc)})"
            return EngineHealth(ready=False, model=self._model, detail=detail, extra=extra)
        wanted = normalize_model(self._model)
        if not any(wanted in (normalize_model(m.name), normalize_model(m.model))
                   for m in tags.models if m.name or m.model):
            detail = f"model {self._model} not found; run `ollama pull {self._model}`"
            return EngineHealth(ready=False, model=self._model, detail=detail, extra=extra)
        return EngineHealth(ready=True, model=self._model,
                            detail=f"ollama {version} at {self._base}", extra=extra)

    async def _get(self, path: str) -> bytes:
        async with self._http.get(self._base + path, timeout=self._probe_timeout) as resp:
            resp.raise_for_status()
            return await resp.read()

    # --- chat -----------------------------------------------------------------------------------
    def chat_body(self, request: EngineRequest) -> dict[str, Any]:
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
        return {
            "model": self._model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "stream": True,
            "keep_alive": self._keep_alive,
            "options": options,
        }

    async def stream(self, request: EngineRequest) -> AsyncIterator[Chunk]:
        url = self._base + "/api/chat"
        body = _encoder.encode(self.chat_body(request))
        started = time.perf_counter()
        try:
            resp = await self._http.post(url, data=body, timeout=self._timeout,
                                         headers={"Content-Type": "application/json"})
        except aiohttp.ClientConnectorError as exc:
            raise EngineUnavailable(
                f"ollama at {self._base} is not reachable ({_describe(exc)})") from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise EngineUnavailable(
                f"ollama at {self._base} did not accept a connection within "
                f"{self._timeout.sock_connect:g} s") from exc
        except TimeoutError as exc:  # aiohttp's timeouts subclass it
            raise EngineTimeout(f"ollama at {self._base} did not answer within "
                                f"{self._timeout.sock_read:g} s") from exc
        except aiohttp.ClientError as exc:
            raise EngineError(
                f"request to ollama at {self._base} failed ({_describe(exc)})") from exc

        clean = False  # True once the stream ended as the protocol says: keep the connection
        try:
            if resp.status >= 300:
                raise await _status_error(resp)
            first_at: float | None = None
            finished: Finished | None = None
            async for line in ndjson_lines(resp.content):
                try:
                    chunk = _chunk_decoder.decode(line)
                except msgspec.DecodeError as exc:
                    raise EngineProtocolError(
                        f"ollama sent a line that is not a chat chunk ({exc}): {line[:200]!r}"
                    ) from None
                if chunk.error is not None:
                    raise EngineError(chunk.error)
                if chunk.message is not None and chunk.message.content:
                    if first_at is None:
                        first_at = time.perf_counter()
                    yield TextChunk(chunk.message.content)
                if chunk.done:
                    finished = _finished(chunk, started, first_at)
                    break
            if finished is None:
                raise EngineProtocolError("ollama ended the stream without a final done chunk")
            clean = await _read_to_end(resp)
            yield finished
        except TimeoutError as exc:  # aiohttp's timeouts subclass it
            raise EngineTimeout(f"ollama sent nothing for {self._timeout.sock_read:g} s") from exc
        except aiohttp.ClientError as exc:
            raise EngineError(f"connection to ollama lost mid-answer ({_describe(exc)})") from exc
        finally:
            if clean:
                resp.release()  # the body was read to its end: the connection goes back to the pool
            else:
                resp.close()  # closes the TCP connection: Ollama sees it and stops generating


async def _read_to_end(resp: aiohttp.ClientResponse) -> bool:
    """After ``done`` only the end of the chunked body should follow (Ollama writes it right after
    the last line). Reading it lets the connection go back to the pool; True if the body ended."""
    try:
        async with asyncio.timeout(END_OF_BODY_WAIT_S):
            await resp.content.read()
    except (TimeoutError, aiohttp.ClientError):
        return False
    return True


def _finished(chunk: _ChatChunk, started: float, first_at: float | None) -> Finished:
    reason: Literal["stop", "length"] = "length" if chunk.done_reason == "length" else "stop"
    tps = None
    if chunk.eval_count and chunk.eval_duration > 0:
        tps = round(chunk.eval_count / (chunk.eval_duration / 1e9), 2)
    ttft = round((first_at - started) * 1000, 3) if first_at is not None else None
    return Finished(reason, Usage(prompt_tokens=chunk.prompt_eval_count,
                                  completion_tokens=chunk.eval_count,
                                  time_to_first_token_ms=ttft, decode_tokens_per_s=tps))


async def _status_error(resp: aiohttp.ClientResponse) -> EngineError:
    """The error for a non-2xx answer, with Ollama's ``{"error": ...}`` message when it sent one."""
    try:
        raw = await resp.read()
    except (TimeoutError, aiohttp.ClientError):
        raw = b""
    message: str | None = None
    try:
        decoded = msgspec.json.decode(raw)
        if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
            message = decoded["error"]
    except msgspec.DecodeError:
        pass
    if resp.status == 404 and message is not None:
        return ModelNotFound(message)
    text = message or raw.decode("utf-8", "replace").strip()[:200] or resp.reason or ""
    return EngineError(f"ollama answered HTTP {resp.status}: {text}")


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__

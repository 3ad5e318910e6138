"""What every engine that streams from an HTTP server shares: one upstream, one aiohttp session.

:class:`UpstreamEngine` is the base of the ``ollama`` and ``openai`` engines. It owns the parts
that do not depend on the wire format:

- **the request**: ``POST base + chat_path`` with the JSON body the subclass builds, under a
  connect timeout and a per-read timeout (no total limit: answers may stream for minutes);
- **the error mapping**, the same for every upstream: connection refused or not accepted within
  the connect timeout, or an HTTP 503, is ``engine_unavailable``; a 404 carrying an error message
  is ``model_not_found``; no bytes within the read timeout is ``engine_timeout``; a connection
  that drops mid-answer is :class:`ConnectionLost` (``engine_error``); any other non-2xx answer is
  ``engine_error`` with the upstream's own message (Ollama's ``{"error": "..."}``, OpenAI's
  ``{"error": {"message": ...}}``, vLLM's ``{"object": "error", "message": ...}``);
- **kept-alive connections**: a request whose pooled connection turns out closed by the server
  (its idle timeout, a restart) is sent once more on a new connection;
- **cancellation**: closing the stream (or cancelling the task reading it) closes the upstream
  response *and its TCP connection*, which is how Ollama, vLLM and llama-server learn that the
  client went away and stop generating; a stream that ended as its protocol says is read to the
  end of its body so the connection goes back to the pool;
- **health**: a probe, cached ``health_ttl_s`` seconds so ``/health`` and ``/metrics`` do not
  hammer the upstream; :meth:`UpstreamEngine.probe` skips the cache (the backend pool uses it to
  see whether a backend that was down came back);
- **lines**: :func:`lines` cuts a body into lines whatever the network reads look like (a line
  split across reads, many lines in one read), for NDJSON and server-sent events alike.

A subclass sets ``name``, ``label`` (how messages call the upstream), ``chat_path``, and writes
``chat_body``, ``read_answer`` (the body → text pieces and one :class:`Finished`) and ``_probe``;
``prepare`` runs before each request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import aiohttp
import msgspec

from ..errors import (
    EngineError,
    EngineProtocolError,
    EngineTimeout,
    EngineUnavailable,
    InvalidConstraint,
    ModelNotFound,
)
from .base import Chunk, Constraint, EngineHealth, EngineRequest, Finished

HEALTH_TTL_S = 5.0
MAX_LINE_BYTES = 16 * 1024 * 1024  # a longer "line" means we are not talking to what we think
END_OF_BODY_WAIT_S = 0.5  # after the end of an answer: longest wait for the body's end

_encoder = msgspec.json.Encoder()


class ConnectionLost(EngineError):
    """The upstream connection dropped (or the server closed it) in the middle of an answer."""


async def lines(content: aiohttp.StreamReader, label: str, *,
                keep_empty: bool = False) -> AsyncIterator[bytes]:
    """Yield the lines of a body without their ``\\n`` (and ``\\r``), whatever the reads look like.

    Empty lines are skipped unless ``keep_empty`` (server-sent events end an event with one).
    A last line without a final newline is yielded too.
    """
    pending = b""
    async for received in content.iter_any():
        data = pending + received if pending else received
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            line = data[start:end]
            if line.endswith(b"\r"):
                line = line[:-1]
            if line or keep_empty:
                yield line
            start = end + 1
        pending = data[start:]
        if len(pending) > MAX_LINE_BYTES:
            raise EngineProtocolError(f"{label} sent a line longer than {MAX_LINE_BYTES} bytes")
    if pending.rstrip(b"\r"):
        yield pending.rstrip(b"\r")


class UpstreamEngine(ABC):
    """The shared half of an engine that proxies one HTTP server; see the module docstring."""

    name = "upstream"
    label = "upstream"  # "ollama at http://...", in messages
    chat_path = "/"

    def __init__(self, http: aiohttp.ClientSession, base_url: str, model: str, *,
                 connect_timeout_s: float, read_timeout_s: float,
                 health_ttl_s: float = HEALTH_TTL_S,
                 headers: Mapping[str, str] | None = None) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._model = model
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        # sock_read bounds the wait for each read (the headers included: a model load counts).
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)
        self._probe_timeout = aiohttp.ClientTimeout(
            total=connect_timeout_s + min(read_timeout_s, 5.0), sock_connect=connect_timeout_s)
        self._health_ttl_s = health_ttl_s
        self._health: tuple[float, EngineHealth] | None = None
        self._health_lock = asyncio.Lock()

    @property
    def url(self) -> str:
        return self._base

    @property
    def where(self) -> str:
        return f"{self.label} at {self._base}"

    # --- life cycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.health()  # a first probe, for the log and /health; never fails start-up

    async def close(self) -> None:
        return None  # the ClientSession belongs to the app's lifespan

    def forget(self, conversation_id: str) -> None:
        return None  # the upstream keeps no per-conversation state for us

    def refusal(self, system: str | None = None) -> EngineError | None:
        return None  # the upstream's state is learned per request (its errors are stable codes)

    def check_constraint(self, constraint: Constraint) -> None:
        """Upstreams take a JSON schema or "any JSON object" (Ollama's ``format``, OpenAI's
        ``response_format``); the schema itself is checked by the upstream."""
        if constraint.kind not in ("json_schema", "json_object"):
            raise InvalidConstraint(
                f"the {self.name} engine passes only JSON schemas and JSON objects upstream, "
                f"not {constraint.kind!r}")

    # --- health ---------------------------------------------------------------------------------
    async def health(self) -> EngineHealth:
        """The last probe's report if younger than ``health_ttl_s``, else a new probe."""
        async with self._health_lock:  # concurrent callers share one probe
            if self._health is not None and time.monotonic() - self._health[0] < self._health_ttl_s:
                return self._health[1]
            return await self._probe_and_keep()

    async def probe(self) -> EngineHealth:
        """A new probe, whatever the cache holds (the report is cached for the next callers)."""
        async with self._health_lock:
            return await self._probe_and_keep()

    async def _probe_and_keep(self) -> EngineHealth:
        try:
            report = await self._probe()
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            report = self.unhealthy(f"{self.where} is not reachable ({describe(exc)})")
        except (aiohttp.ClientError, msgspec.DecodeError) as exc:
            report = self.unhealthy(f"{self.where} gave an unexpected answer ({describe(exc)})")
        self._health = (time.monotonic(), report)
        return report

    def unhealthy(self, detail: str, **extra: object) -> EngineHealth:
        return EngineHealth(ready=False, model=self._model, detail=detail,
                            extra={"url": self._base, **extra})

    @abstractmethod
    async def _probe(self) -> EngineHealth:
        """This wire format's health check (each engine asks its own endpoint)."""

    async def get(self, path: str) -> bytes:
        """``GET base + path`` for a probe; a non-2xx answer raises ``ClientResponseError``."""
        async with self._http.get(self._base + path, timeout=self._probe_timeout,
                                  headers=self._headers) as resp:
            resp.raise_for_status()
            return await resp.read()

    # --- chat -----------------------------------------------------------------------------------
    @abstractmethod
    def chat_body(self, request: EngineRequest) -> dict[str, Any]:
        """The JSON body of this wire format's chat request."""

    async def prepare(self) -> None:
        """Called before each request; learn what the request needs (e.g. the model's name)."""
        return None

    @abstractmethod
    def read_answer(self, resp: aiohttp.ClientResponse,
                    started: float) -> AsyncGenerator[Chunk, None]:
        """The answer's text pieces, then one :class:`Finished` once the protocol says it ended.
        Raise :class:`EngineProtocolError` for what breaks the protocol."""

    async def stream(self, request: EngineRequest) -> AsyncIterator[Chunk]:
        started = time.perf_counter()
        await self.prepare()
        resp = await self._post(self.chat_path, _encoder.encode(self.chat_body(request)))
        clean = False  # True once the stream ended as the protocol says: keep the connection
        try:
            if resp.status >= 300:
                raise await self._status_error(resp)
            finished: Finished | None = None
            async with contextlib.aclosing(self.read_answer(resp, started)) as chunks:
                async for chunk in chunks:
                    if isinstance(chunk, Finished):
                        finished = chunk
                        break
                    yield chunk
            if finished is None:
                raise EngineProtocolError(f"{self.label} ended the stream without finishing the answer")
            clean = await _read_to_end(resp)
            yield finished
        except TimeoutError as exc:  # aiohttp's timeouts subclass it
            raise EngineTimeout(
                f"{self.label} sent nothing for {self._timeout.sock_read:g} s") from exc
        except aiohttp.ClientError as exc:
            raise ConnectionLost(
                f"connection to {self.label} lost mid-answer ({describe(exc)})") from exc
        finally:
            if clean:
                resp.release()  # the body was read to its end: the connection goes back to the pool
            else:
                resp.close()  # closes the TCP connection: the upstream sees it and stops generating

    async def _post(self, path: str, body: bytes) -> aiohttp.ClientResponse:
        try:
            try:
                return await self._http.post(self._base + path, data=body, timeout=self._timeout,
                                             headers=self._headers)
            except aiohttp.ServerDisconnectedError:
                # A kept-alive connection the server had just closed (uvicorn, so vLLM, drops
                # idle ones after 5 s; a restart drops them all): once more, on a new one.
                return await self._http.post(self._base + path, data=body, timeout=self._timeout,
                                             headers=self._headers)
        except aiohttp.ClientConnectorError as exc:
            raise EngineUnavailable(f"{self.where} is not reachable ({describe(exc)})") from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise EngineUnavailable(
                f"{self.where} did not accept a connection within "
                f"{self._timeout.sock_connect:g} s") from exc
        except TimeoutError as exc:  # aiohttp's timeouts subclass it
            raise EngineTimeout(f"{self.where} did not answer within "
                                f"{self._timeout.sock_read:g} s") from exc
        except aiohttp.ServerDisconnectedError as exc:  # accepted, then closed before answering
            raise ConnectionLost(f"{self.where} closed the connection ({describe(exc)})") from exc
        except aiohttp.ClientError as exc:
            raise EngineError(f"request to {self.where} failed ({describe(exc)})") from exc

    async def _status_error(self, resp: aiohttp.ClientResponse) -> EngineError:
        """The error for a non-2xx answer, with the upstream's own message when it sent one."""
        try:
            raw = await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            raw = b""
        message = error_message(raw)
        text = message or raw.decode("utf-8", "replace").strip()[:200] or resp.reason or ""
        if resp.status == 404 and message is not None:
            return ModelNotFound(message)
        if resp.status == 503:  # overloaded or still loading: another backend may take the turn
            return EngineUnavailable(f"{self.label} answered HTTP 503: {text}")
        return EngineError(f"{self.label} answered HTTP {resp.status}: {text}")


def error_message(raw: bytes) -> str | None:
    """The message of an error body: ``{"error": "..."}`` (Ollama), ``{"error": {"message": ...}}``
    (OpenAI, llama-server, this service) or ``{"message": ...}`` (vLLM's error object)."""
    try:
        decoded = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    if not isinstance(decoded, dict):
        return None
    error = decoded.get("error")
    if isinstance(error, str):
        return error
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(decoded.get("message"), str):
        return str(decoded["message"])
    return None


async def _read_to_end(resp: aiohttp.ClientResponse) -> bool:
    """After the answer's end only the end of the chunked body should follow. Reading it lets
    the connection go back to the pool; True if the body ended in time."""
    try:
        async with asyncio.timeout(END_OF_BODY_WAIT_S):
            await resp.content.read()
    except (TimeoutError, aiohttp.ClientError):
        return False
    return True


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__

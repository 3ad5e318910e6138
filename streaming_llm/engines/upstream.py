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
  split across reads, many lines in one read), for NDJSON and server-sent events alike;
- **bounds** (:class:`Bounds`, from the ``STREAMING_LLM_UPSTREAM_MAX_*`` settings): an upstream
  is read as untrusted input. We ask for ``Accept-Encoding: identity`` and decode the body
  ourselves (aiohttp's own decompression is off), so a gzip or deflate body an upstream sends
  anyway is inflated a bounded piece at a time; a line or event is at most ``line_bytes``; an
  error body or a probe answer at most ``body_bytes`` (an error message reaching a client at most
  :data:`MAX_ERROR_CHARS`); one answer at most ``answer_bytes`` and ``max_new_tokens`` text
  pieces, past which it ends with ``length`` and the connection is closed; usage numbers outside
  ``0 ≤ n < 2**31`` are dropped with a warning (0 prompt tokens, the pieces counted), so a broken
  counter never reaches metrics or storage; redirects are not followed (a 3xx is an error: the
  conversation is not re-sent to wherever it points).

- **tools**, sent natively: the offered tools, the calls of the history and their results go
  in each wire format's own fields (the subclass's ``chat_body``); the calls the upstream makes
  come back in its own fields and are gathered by :class:`NativeCalls` until the answer ends,
  then checked (a tool that was offered, arguments that are a JSON object, at most
  ``line_bytes`` a call: else ``engine_protocol_error``) and given out as text in the generic
  form (:func:`~streaming_llm.engines.tool_text.call_block`) just before the answer's
  :class:`Finished`, so the server reads them as it reads the local engine's. An upstream that
  refuses a request carrying tools (HTTP 400 or 422: an Ollama model whose template has no
  tools, a vLLM started without a tool parser) gets it once more with the tools as text
  (:func:`~streaming_llm.engines.tool_text.template_messages`), as before they went natively.

A subclass sets ``name``, ``label`` (how messages call the upstream), ``chat_path``, and writes
``chat_body``, ``read_answer`` (the body → text pieces, the native calls into a
:class:`NativeCalls`, and one :class:`Finished`) and ``_probe``; ``prepare`` runs before each
request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Mapping
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
from ..settings import Settings
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
from .tool_text import call_block

log = logging.getLogger(__name__)

HEALTH_TTL_S = 5.0
END_OF_BODY_WAIT_S = 0.5  # after the end of an answer: longest wait for the body's end
READ_CHUNK = 64 * 1024  # bytes read, or inflated, at a time
MAX_ERROR_CHARS = 1024  # of an upstream's error message, in the error a client gets
MAX_COUNT = 2**31 - 1  # a usage number above this is no count of tokens
TOOLS_REFUSED = (400, 422)  # an upstream's answer to tools it does not take natively

_encoder = msgspec.json.Encoder()


@dataclasses.dataclass(frozen=True)
class Bounds:
    """How much is read from an upstream (bytes after decompression); see the module docstring."""

    line_bytes: int = 1024 * 1024
    body_bytes: int = 1024 * 1024
    answer_bytes: int = 16 * 1024 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> Bounds:
        return cls(line_bytes=settings.upstream_max_line_bytes,
                   body_bytes=settings.upstream_max_body_bytes,
                   answer_bytes=settings.upstream_max_answer_bytes)


class ConnectionLost(EngineError):
    """The upstream connection dropped (or the server closed it) in the middle of an answer."""


class AnswerTooLong(Exception):
    """The answer's body passed ``Bounds.answer_bytes``: the answer ends there, with ``length``."""


async def decoded(resp: aiohttp.ClientResponse, label: str) -> AsyncIterator[bytes]:
    """The body after its ``Content-Encoding``, in pieces of at most :data:`READ_CHUNK` bytes
    whatever the compression ratio: a gzip bomb is inflated one piece at a time, as it is read.
    Needs the request's ``auto_decompress=False``."""
    encoding = resp.headers.get(aiohttp.hdrs.CONTENT_ENCODING, "").strip().lower()
    if encoding in ("", "identity"):
        async for raw in resp.content.iter_chunked(READ_CHUNK):
            yield raw
        return
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise EngineProtocolError(
            f"{label} sent a body in an encoding we do not read ({encoding[:40]!r})")
    inflate = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or a zlib header, told apart
    try:
        async for raw in resp.content.iter_chunked(READ_CHUNK):
            data = raw
            while data and not inflate.eof:
                piece = inflate.decompress(data, READ_CHUNK)
                data = inflate.unconsumed_tail
                if piece:
                    yield piece
    except zlib.error as exc:
        raise EngineProtocolError(f"{label} sent a body that does not inflate ({exc})") from None


async def read_body(resp: aiohttp.ClientResponse, label: str, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the (decoded) body, and whether there was more."""
    parts: list[bytes] = []
    size = 0
    async for piece in decoded(resp, label):
        if size + len(piece) > limit:
            parts.append(piece[:limit - size])
            return b"".join(parts), True
        parts.append(piece)
        size += len(piece)
    return b"".join(parts), False


async def capped(pieces: AsyncIterable[bytes], limit: int) -> AsyncIterator[bytes]:
    """``pieces`` until ``limit`` bytes passed; then :class:`AnswerTooLong`."""
    size = 0
    async for piece in pieces:
        size += len(piece)
        if size > limit:
            raise AnswerTooLong(limit)
        yield piece


async def lines(pieces: AsyncIterable[bytes], label: str, *, max_bytes: int,
                keep_empty: bool = False) -> AsyncIterator[bytes]:
    """Yield the lines of a body without their ``\\n`` (and ``\\r``), whatever the reads look like.

    Empty lines are skipped unless ``keep_empty`` (server-sent events end an event with one).
    A last line without a final newline is yielded too. A line longer than ``max_bytes`` is
    :class:`EngineProtocolError` (a longer "line" means we are not talking to what we think).
    """
    pending = b""
    async for received in pieces:
        data = pending + received if pending else received
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            if end - start > max_bytes:
                break
            line = data[start:end]
            if line.endswith(b"\r"):
                line = line[:-1]
            if line or keep_empty:
                yield line
            start = end + 1
        pending = data[start:]
        if len(pending) > max_bytes:
            raise EngineProtocolError(f"{label} sent a line longer than {max_bytes} bytes")
    if pending.rstrip(b"\r"):
        yield pending.rstrip(b"\r")


def clip(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """An upstream's message as a client may see it: at most ``limit`` characters."""
    return message if len(message) <= limit else message[:limit] + "…"


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT:
        return value
    return None


def checked_usage(usage: Usage, pieces: int, label: str) -> Usage:
    """``usage`` with every number an upstream could break made plausible: a count outside
    ``0 ≤ n ≤ 2**31 - 1`` is dropped (prompt tokens 0, completion tokens the ``pieces`` read,
    cached tokens unknown), a rate that is not a finite non-negative number too; one warning
    names what was dropped. Metrics counters and the database never see the bad number."""
    dropped: list[str] = []
    prompt, completion = _count(usage.prompt_tokens), _count(usage.completion_tokens)
    cached = usage.cached_tokens
    rate = usage.decode_tokens_per_s
    if prompt is None:
        dropped.append(f"prompt_tokens={usage.prompt_tokens!r}")
    if completion is None:
        dropped.append(f"completion_tokens={usage.completion_tokens!r}")
    if cached is not None and _count(cached) is None:
        dropped.append(f"cached_tokens={cached!r}")
        cached = None
    if rate is not None and (completion is None or not math.isfinite(rate) or not 0 <= rate <= MAX_COUNT):
        rate = None  # (computed from a dropped count, or itself absurd)
    if not dropped and rate == usage.decode_tokens_per_s:
        return usage
    if dropped:
        log.warning("%s reported usage numbers that cannot be token counts; dropped: %s",
                    label, ", ".join(s[:60] for s in dropped))
    return msgspec.structs.replace(
        usage, prompt_tokens=0 if prompt is None else prompt,
        completion_tokens=pieces if completion is None else completion, cached_tokens=cached,
        decode_tokens_per_s=rate)


# --- tools -------------------------------------------------------------------------------------
def offered_tools(request: EngineRequest) -> tuple[dict[str, Any], ...]:
    """The tools a request offers (``{"name", "description", "parameters"}``); () for none."""
    constraint = request.constraint
    return constraint.tools if constraint is not None and constraint.kind == "tool_calls" else ()


def carries_tools(request: EngineRequest) -> bool:
    """Does the request send anything an upstream may refuse natively: tools, or calls and
    results in its history?"""
    return bool(offered_tools(request)) or any(
        m.role == "tool" or m.tool_calls for m in request.messages)


def tool_names(messages: list[ChatMessage]) -> dict[str, str]:
    """Each call id of the history → the name of the tool it called (for Ollama's
    ``tool_name`` on a result)."""
    return {c.id: c.name for m in messages for c in m.tool_calls}


def arguments_value(arguments: str) -> Any:
    """A stored call's arguments as JSON (Ollama takes an object, not text); {} for text that
    is no JSON (a call cut short by ``length``)."""
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}


@dataclasses.dataclass
class _Native:
    name: str = ""
    arguments: list[str] = dataclasses.field(default_factory=list)  # text, in pieces as sent
    size: int = 0
    value: Any = None  # arguments sent as JSON (Ollama), not text
    whole: bool = False  # value holds them


class NativeCalls:
    """The tool calls one answer makes in the upstream's own fields, gathered as they stream
    (OpenAI's ``delta.tool_calls``: id and name first, arguments in pieces; Ollama's
    ``message.tool_calls``: whole calls), then checked and written in the generic text form by
    :meth:`blocks` once the answer ended.

    A call must name a tool the request offered and carry a JSON object as its arguments; one
    that does not is :class:`EngineProtocolError` (nothing of the calls reaches the client or
    storage: they are given out only once all are checked), except in an answer cut short
    (``length``), whose last call may well be unfinished: such calls are dropped, with a warning.
    A call assembled from pieces (name and arguments) longer than ``max_bytes`` is a protocol
    error at once, as a line too long is. Ids are not kept: the server names calls itself
    (``call_…`` from the request id and the call's index), whichever engine made them."""

    def __init__(self, offered: tuple[dict[str, Any], ...], label: str, max_bytes: int) -> None:
        self._offered = [str(t["name"]) for t in offered]
        self._label, self._max_bytes = label, max_bytes
        self._calls: dict[int, _Native] = {}
        self._last: int | None = None

    def __len__(self) -> int:
        return len(self._calls)

    def piece(self, index: int | None, *, name: str | None = None,
              arguments: str | None = None, starts: bool = False) -> None:
        """A piece of call ``index`` (OpenAI's delta): its name and its arguments' text are
        joined piece by piece. An upstream that leaves out ``index`` starts a new call with each
        piece that carries an id or a name (``starts``)."""
        if index is None:
            index = (max(self._calls, default=-1) + 1 if starts or self._last is None
                     else self._last)
        call = self._calls.setdefault(index, _Native())
        self._last = index
        if name:
            call.name += name
            self._grow(call, len(name.encode()))
        if arguments:
            call.arguments.append(arguments)
            self._grow(call, len(arguments.encode()))

    def whole(self, name: str, arguments: Any) -> None:
        """A whole call (Ollama's), its arguments as JSON (bounded already: a call comes in one
        line, at most ``line_bytes`` long)."""
        index = max(self._calls, default=-1) + 1
        self._calls[index] = _Native(name=name, value=arguments, whole=True)
        self._last = index

    def _grow(self, call: _Native, size: int) -> None:
        call.size += size
        if call.size > self._max_bytes:
            raise EngineProtocolError(
                f"{self._label} sent a tool call longer than {self._max_bytes} bytes")

    def blocks(self, reason: str) -> list[str]:
        """The calls, checked, each in the generic text form; raises :class:`EngineProtocolError`
        for the first that is wrong (with ``reason`` ``length``: drops it)."""
        out = []
        for index in sorted(self._calls):
            call = self._calls[index]
            text, problem = self._checked(call)
            if problem is None:
                out.append(call_block(call.name, text))
            elif reason == "length":
                log.warning("%s: dropped tool call %d of an answer cut short: %s",
                            self._label, index, problem)
            else:
                raise EngineProtocolError(f"{self._label} sent a tool call that {problem}")
        return out

    def _checked(self, call: _Native) -> tuple[str, str | None]:
        """The call's arguments as JSON text, and what is wrong with the call (None: nothing)."""
        if call.name not in self._offered:
            offered = ", ".join(self._offered) or "none were"
            return "", f"names {clip(call.name, 80)!r}, which is no tool offered ({offered})"
        if call.whole:
            value = call.value
            text = json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else ""
        else:
            text = "".join(call.arguments).strip() or "{}"  # no arguments: an empty object
            try:
                value = json.loads(text)
            except ValueError:
                value = None
        if not isinstance(value, dict):
            shown = clip("".join(call.arguments) if not call.whole else json.dumps(value), 120)
            return "", f"calls {call.name!r} with arguments that are not a JSON object: {shown}"
        return text, None


class UpstreamEngine(ABC):
    """The shared half of an engine that proxies one HTTP server; see the module docstring."""

    name = "upstream"
    label = "upstream"  # "ollama at http://...", in messages
    chat_path = "/"

    def __init__(self, http: aiohttp.ClientSession, base_url: str, model: str, *,
                 connect_timeout_s: float, read_timeout_s: float,
                 health_ttl_s: float = HEALTH_TTL_S, bounds: Bounds | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._model = model
        self.bounds = bounds or Bounds()
        # identity: compressed bodies are no use on a local network and a bomb away elsewhere
        # (one that comes anyway is inflated with bounds, see decoded()).
        self._headers = {"Content-Type": "application/json", "Accept-Encoding": "identity",
                         **(headers or {})}
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
        ``response_format``) and tools (``tools``); the schemas themselves are checked by the
        upstream, which enforces them as far as it does."""
        if constraint.kind not in ("json_schema", "json_object", "tool_calls"):
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
        except (aiohttp.ClientError, msgspec.DecodeError, EngineProtocolError) as exc:
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
        """``GET base + path`` for a probe; a non-2xx answer (a redirect too: not followed)
        raises ``ClientResponseError``, an answer over ``bounds.body_bytes`` (decoded)
        :class:`EngineProtocolError`."""
        async with self._http.get(self._base + path, timeout=self._probe_timeout,
                                  headers=self._headers, allow_redirects=False,
                                  auto_decompress=False) as resp:
            if resp.status >= 300:
                raise aiohttp.ClientResponseError(resp.request_info, resp.history,
                                                  status=resp.status, message=resp.reason or "",
                                                  headers=resp.headers)
            body, more = await read_body(resp, self.label, self.bounds.body_bytes)
            if more:
                resp.close()  # the rest is not read: the connection cannot be reused
                raise EngineProtocolError(
                    f"{path} sent more than {self.bounds.body_bytes} bytes")
            return body

    def body_lines(self, resp: aiohttp.ClientResponse, *,
                   keep_empty: bool = False) -> AsyncIterator[bytes]:
        """The answer's lines, decoded and bounded (``bounds.line_bytes`` a line,
        ``bounds.answer_bytes`` in all); for :meth:`read_answer`."""
        return lines(capped(decoded(resp, self.label), self.bounds.answer_bytes), self.label,
                     max_bytes=self.bounds.line_bytes, keep_empty=keep_empty)

    # --- chat -----------------------------------------------------------------------------------
    @abstractmethod
    def chat_body(self, request: EngineRequest, *, native_tools: bool = True) -> dict[str, Any]:
        """The JSON body of this wire format's chat request: tools, calls and results in its
        own fields, or (``native_tools`` False) in the generic text form."""

    async def prepare(self) -> None:
        """Called before each request; learn what the request needs (e.g. the model's name)."""
        return None

    @abstractmethod
    def read_answer(self, resp: aiohttp.ClientResponse, started: float,
                    calls: NativeCalls) -> AsyncGenerator[Chunk, None]:
        """The answer's text pieces, then one :class:`Finished` once the protocol says it ended;
        the tool calls it makes go into ``calls``. Raise :class:`EngineProtocolError` for what
        breaks the protocol."""

    async def stream(self, request: EngineRequest) -> AsyncIterator[Chunk]:
        started = time.perf_counter()
        await self.prepare()
        resp = await self._post(self.chat_path, _encoder.encode(self.chat_body(request)))
        if resp.status in TOOLS_REFUSED and carries_tools(request):
            refused = await self._status_error(resp)
            resp.close()
            log.warning("%s refused a request with tools (%s); sent again with the tools as text",
                        self.where, refused.message)
            resp = await self._post(self.chat_path, _encoder.encode(
                self.chat_body(request, native_tools=False)))
        calls = NativeCalls(offered_tools(request), self.label, self.bounds.line_bytes)
        clean = False  # True once the stream ended as the protocol says: keep the connection
        pieces = 0
        first_at: float | None = None
        try:
            if resp.status >= 300:
                raise await self._status_error(resp)
            finished: Finished | None = None
            try:
                async with contextlib.aclosing(self.read_answer(resp, started, calls)) as chunks:
                    async for chunk in chunks:
                        if isinstance(chunk, Finished):
                            finished = chunk
                            break
                        if isinstance(chunk, TextChunk):
                            if pieces == request.max_new_tokens:
                                # it ignores max_tokens / num_predict: stop reading, and
                                # closing the connection stops the generation upstream
                                raise AnswerTooLong(pieces)
                            pieces += 1
                            first_at = first_at or time.perf_counter()
                        yield chunk
            except AnswerTooLong:
                finished = self._cut_short(pieces, started, first_at)
                for block in calls.blocks("length"):  # the calls it finished before the cut
                    yield TextChunk(block)
            else:
                if finished is None:
                    raise EngineProtocolError(
                        f"{self.label} ended the stream without finishing the answer")
                blocks = calls.blocks(finished.reason)
                finished = msgspec.structs.replace(
                    finished, usage=checked_usage(finished.usage, pieces + len(blocks),
                                                  self.where))
                clean = await _read_to_end(resp, self.bounds.body_bytes)
                for block in blocks:  # after every text piece, as a model writes its calls
                    yield TextChunk(block)
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

    def _cut_short(self, pieces: int, started: float, first_at: float | None) -> Finished:
        """The end of an answer we stopped reading (max_new_tokens or the byte bound reached):
        ``length``, with the pieces read as its completion tokens."""
        ttft = round((first_at - started) * 1000, 3) if first_at is not None else None
        return Finished("length", Usage(prompt_tokens=0, completion_tokens=pieces,
                                        time_to_first_token_ms=ttft))

    async def _post(self, path: str, body: bytes) -> aiohttp.ClientResponse:
        # No redirects: one would re-send the conversation wherever it points (a 3xx is an
        # error, see _status_error). Bodies are decoded by decoded(), with bounds.
        options: dict[str, Any] = {"data": body, "timeout": self._timeout,
                                   "headers": self._headers, "allow_redirects": False,
                                   "auto_decompress": False}
        try:
            try:
                return await self._http.post(self._base + path, **options)
            except aiohttp.ServerDisconnectedError:
                # A kept-alive connection the server had just closed (uvicorn, so vLLM, drops
                # idle ones after 5 s; a restart drops them all): once more, on a new one.
                return await self._http.post(self._base + path, **options)
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
        """The error for a non-2xx answer, with the upstream's own message when it sent one
        (read up to ``bounds.body_bytes``, cut to :data:`MAX_ERROR_CHARS`)."""
        try:
            raw, _ = await read_body(resp, self.label, self.bounds.body_bytes)
        except (TimeoutError, aiohttp.ClientError, EngineProtocolError):
            raw = b""
        message = error_message(raw)
        text = message or clip(raw.decode("utf-8", "replace").strip(), 200) or resp.reason or ""
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
        return clip(error)
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return clip(str(error["message"]))
    if isinstance(decoded.get("message"), str):
        return clip(str(decoded["message"]))
    return None


async def _read_to_end(resp: aiohttp.ClientResponse, limit: int) -> bool:
    """After the answer's end only the end of the chunked body should follow. Reading it lets
    the connection go back to the pool; True if the body ended in time and within ``limit``
    bytes (more, and the connection is closed instead)."""
    size = 0
    try:
        async with asyncio.timeout(END_OF_BODY_WAIT_S):
            async for piece in resp.content.iter_chunked(READ_CHUNK):
                size += len(piece)
                if size > limit:
                    return False
    except (TimeoutError, aiohttp.ClientError):
        return False
    return True


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__

"""Python client: agents over REST and streaming chat over ``/ws/chat`` (aiohttp).

It mirrors the TypeScript client (``clients/ts``): ``list_agents`` / ``get_agent`` /
``update_agent`` / ``delete_agent``, and ``stream_chat``, whose turns are sent one at a time in
the order ``send_message`` was called, so every turn after the first continues the conversation
the first one started::

    async with stream_chat("http://localhost:8000", "reviewer",
                           options={"temperature": 0.2}) as chat:
        result = await chat.send_message("Summarize the latest run.")
        print(result.text, result.finish_reason, result.usage.completion_tokens)

``chat.events()`` is an async iterator of the server's ``start`` / ``token`` / ``done`` /
``error`` frames (the :mod:`streaming_llm.protocol` structs) and :class:`Resumed`; ``on_event``
gets the same events as a callback. A socket that drops is reopened by itself (bounded backoff,
``reconnect_attempts`` tries) and the answer in flight resumed where it stopped (the server's
``resume`` frame): :class:`Resumed` says so, and no token is lost or repeated. ``send_message`` resolves on the turn's ``done`` and raises :class:`ChatError` on
its ``error``. ``cancel()`` stops the current answer (it ends ``cancelled``; the socket stays
open), ``close()`` closes the socket (pending turns raise ``ChatError('stopped')``).
Tools: ``send_message(..., tools=[...])`` offers functions (OpenAI's shape, or the agent's own
when it declares them); the calls the answer made are in ``result.tool_calls``, and their
results go back with the next turn, which may carry no message::

        result = await chat.send_message("Weather in Paris?", tools=[{"type": "function",
            "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
        for call in result.tool_calls:  # ToolCall(id, name, arguments: JSON text)
            result = await chat.send_message("", tool_results=[
                {"tool_call_id": call.id, "content": get_weather(**json.loads(call.arguments))}])

Rooms (several agents in one conversation): ``create_room(["coder", "reviewer"])`` makes one;
a stream on it (``stream_chat(url, "", conversation_id=room.id)``) sends to one agent
(``send_message(text, agent_id="reviewer")``, or an ``@mention``) or to several in turn
(``send_round(text, ["coder", "reviewer"])``: one :class:`ChatResult` per answer, each naming
its ``agent_id``); the ``token`` and ``done`` events name the agent too.
A stream that continues a conversation (``conversation_id=``) puts the id in the socket URL as
``?conversation_id=``, so a proxy that routes by it (``deploy/nginx``) sends it to the instance
that holds the conversation's cache.

Only msgspec and aiohttp are imported: the client does not pull in the server's dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import aiohttp
import msgspec

from ..protocol import Done, Error, Start, Token
from ..wire import Agent, FinishReason, GenerationOptions, ToolCall, Usage

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://localhost:8000"

ServerEvent = Start | Token | Done | Error
Options = GenerationOptions | Mapping[str, Any]
RECONNECT_DELAYS_S = (0.1, 0.25, 0.5, 1.0, 2.0)  # then 2 s apart


class Resumed(msgspec.Struct, tag="resumed"):
    """Client-side event: the socket dropped and was reopened; ``request_id`` (the turn in
    flight, None when there was none) goes on after ``after_seq``. ``attempt`` counts the tries."""

    request_id: str | None
    after_seq: int
    attempt: int


ChatEvent = ServerEvent | Resumed
_event_decoder = msgspec.json.Decoder(ServerEvent)


# --- errors ---------------------------------------------------------------------------------------
class ApiError(Exception):
    """A REST call failed: ``status`` is the HTTP status (0 when the server was unreachable)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class ChatError(Exception):
    """A turn or the stream failed: ``code`` is the server's (``agent_not_found``, ...) or the
    client's own (``socket_open_failed``, ``socket_closed``, ``stopped``)."""

    def __init__(self, code: str, message: str, request_id: str | None = None,
                 results: Sequence[ChatResult] = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.request_id = code, message, request_id
        self.results = list(results)  # a round's answers that ended before the error


# --- REST -----------------------------------------------------------------------------------------
def _headers(api_key: str | None) -> dict[str, str]:
    # Placeholder for the server's API keys: sent as a bearer token when given.
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


async def _request(method: str, path: str, base_url: str, *, api_key: str | None,
                   session: aiohttp.ClientSession | None, body: Any = None) -> Any:
    url = base_url.rstrip("/") + path
    data = None if body is None else msgspec.json.encode(body)
    headers = {"accept": "application/json", **_headers(api_key)}
    if data is not None:
        headers["content-type"] = "application/json"
    own = session is None
    http = session or aiohttp.ClientSession()
    try:
        async with http.request(method, url, data=data, headers=headers) as resp:
            raw = await resp.read()
            status = resp.status
    except aiohttp.ClientError as exc:
        raise ApiError(0, "network_error", f"{method} {url} failed: {exc}") from exc
    finally:
        if own:
            await http.close()
    if status >= 400:
        code, message = "http_error", f"{method} {url}: HTTP {status}"
        with contextlib.suppress(msgspec.DecodeError, AttributeError, TypeError):
            error = msgspec.json.decode(raw)["error"]
            code, message = str(error["code"]), str(error["message"])
        raise ApiError(status, code, message)
    return msgspec.json.decode(raw) if raw else None


async def list_agents(base_url: str = DEFAULT_BASE_URL, *, api_key: str | None = None,
                      session: aiohttp.ClientSession | None = None) -> list[Agent]:
    data = await _request("GET", "/agents", base_url, api_key=api_key, session=session)
    return msgspec.convert(data, list[Agent])


async def get_agent(agent_id: str, base_url: str = DEFAULT_BASE_URL, *,
                    api_key: str | None = None,
                    session: aiohttp.ClientSession | None = None) -> Agent:
    data = await _request("GET", f"/agents/{_segment(agent_id)}", base_url, api_key=api_key,
                          session=session)
    return msgspec.convert(data, Agent)


async def update_agent(agent: Agent, base_url: str = DEFAULT_BASE_URL, *,
                       api_key: str | None = None,
                       session: aiohttp.ClientSession | None = None) -> Agent:
    """Create or replace ``agent.id``; returns the agent as stored."""
    body: dict[str, Any] = {"name": agent.name, "system_prompt": agent.system_prompt,
                            "markdown_context": agent.markdown_context}
    if agent.tools is not None:
        body["tools"] = msgspec.to_builtins(agent.tools)
    data = await _request("PUT", f"/agents/{_segment(agent.id)}", base_url, api_key=api_key,
                          session=session, body=body)
    return msgspec.convert(data, Agent)


async def delete_agent(agent_id: str, base_url: str = DEFAULT_BASE_URL, *,
                       api_key: str | None = None,
                       session: aiohttp.ClientSession | None = None) -> None:
    await _request("DELETE", f"/agents/{_segment(agent_id)}", base_url, api_key=api_key,
                   session=session)


class Room(msgspec.Struct):
    """A conversation and its agents: several in a room, one in a plain conversation."""

    id: str
    agent_id: str  # the first participant
    title: str
    created_at: str
    updated_at: str
    agent_ids: list[str] = []


async def create_room(agent_ids: Sequence[str], base_url: str = DEFAULT_BASE_URL, *,
                      title: str = "", api_key: str | None = None,
                      session: aiohttp.ClientSession | None = None) -> Room:
    """A new conversation of ``agent_ids`` (several: a room), empty until the first chat."""
    data = await _request("POST", "/conversations", base_url, api_key=api_key, session=session,
                          body={"agent_ids": list(agent_ids), "title": title})
    return msgspec.convert(data, Room)


async def update_room(conversation_id: str, base_url: str = DEFAULT_BASE_URL, *,
                      agent_ids: Sequence[str] | None = None, title: str | None = None,
                      api_key: str | None = None,
                      session: aiohttp.ClientSession | None = None) -> Room:
    """Set the participants (the new list, in order) and/or the title."""
    body: dict[str, Any] = {}
    if agent_ids is not None:
        body["agent_ids"] = list(agent_ids)
    if title is not None:
        body["title"] = title
    data = await _request("PATCH", f"/conversations/{_segment(conversation_id)}", base_url,
                          api_key=api_key, session=session, body=body)
    return msgspec.convert(data, Room)


def _segment(value: str) -> str:
    if not value:
        raise ValueError("id must be a non-empty string")
    return quote(value, safe="")


# --- chat -----------------------------------------------------------------------------------------
class ChatResult(msgspec.Struct):
    text: str  # the whole answer: the turn's tokens joined
    conversation_id: str
    finish_reason: FinishReason
    usage: Usage
    request_id: str
    turn_id: str
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)  # the calls it made
    agent_id: str = ""  # who answered


@dataclass
class _Turn:
    request_id: str
    frame: dict[str, Any]
    future: asyncio.Future[list[ChatResult]]
    pieces: list[str] = field(default_factory=list)  # of the answer in progress
    results: list[ChatResult] = field(default_factory=list)  # answers ended (a round: several)
    expected: int = 1  # answers to wait for: start.agent_ids
    received: int = 0  # answer pieces received: the next token frame's seq
    sent: bool = False
    started: bool = False  # its start came
    resuming: bool = False  # a resume for it is out, not yet answered


def socket_url(url: str) -> str:
    """``http://host:port`` → ``ws://host:port/ws/chat``; a ``ws(s)://`` URL is kept as given."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"not an http(s) or ws(s) URL: {url!r}")
    path = parts.path if parts.scheme in ("ws", "wss") or parts.path.strip("/") else "/ws/chat"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def conversation_url(url: str, conversation_id: str) -> str:
    """``url`` with ``?conversation_id=`` set (other query parameters kept), for sticky routing."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k != "conversation_id"]
    query.append(("conversation_id", conversation_id))
    return urlunsplit(parts._replace(query=urlencode(query)))


def _wire_options(options: Options | None) -> dict[str, Any]:
    if options is None:
        return {}
    if isinstance(options, GenerationOptions):
        return msgspec.to_builtins(options)
    try:  # validate now, against the same bounds the server applies
        return msgspec.to_builtins(msgspec.convert(dict(options), GenerationOptions))
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid chat options: {exc}") from None


class ChatStream:
    """One chat socket for one agent; see the module docstring."""

    def __init__(self, backend_url: str, agent_id: str, *, options: Options | None = None,
                 conversation_id: str | None = None,
                 on_event: Callable[[ChatEvent], None] | None = None,
                 api_key: str | None = None,
                 session: aiohttp.ClientSession | None = None,
                 reconnect_attempts: int = len(RECONNECT_DELAYS_S)) -> None:
        if not agent_id and not conversation_id:
            raise ValueError("agent_id must be a non-empty string (or continue a room: "
                             "conversation_id)")
        self.url = socket_url(backend_url)
        if conversation_id:
            self.url = conversation_url(self.url, conversation_id)
        self.agent_id = agent_id
        self.defaults = _wire_options(options)
        self.on_event = on_event
        self.api_key = api_key
        self._conversation_id = conversation_id
        self._session = session
        self._own_session = session is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._queue: list[_Turn] = []
        self._subscribers: list[asyncio.Queue[ChatEvent | None]] = []
        self._ended: ChatError | None = None
        self._send_lock = asyncio.Lock()
        self._prefix = uuid.uuid4().hex[:12]  # random: a resume names the turn by its id alone
        self._counter = 0
        self.reconnect_attempts = reconnect_attempts

    @property
    def conversation_id(self) -> str | None:
        """The conversation every turn continues: the caller's, else the first turn's."""
        return self._conversation_id

    # lifecycle ------------------------------------------------------------------------------------
    async def open(self) -> ChatStream:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            self._ws = await self._connect()
        except (aiohttp.ClientError, OSError) as exc:
            await self._close_session()
            raise ChatError("socket_open_failed",
                            f"cannot open a chat socket to {self.url}: {exc}") from exc
        self._reader = asyncio.create_task(self._read(), name="chat-reader")
        return self

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        assert self._session is not None
        url = (self.url if self._conversation_id is None  # a reconnect: route by the conversation
               else conversation_url(self.url, self._conversation_id))
        return await self._session.ws_connect(url, headers=_headers(self.api_key),
                                              max_msg_size=16 * 1024 * 1024)

    async def __aenter__(self) -> ChatStream:
        return await self.open()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the socket; turns still pending raise ``ChatError('stopped')``."""
        self._end(ChatError("stopped", "the chat stream was closed"))
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._close_session()

    async def _close_session(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # turns ----------------------------------------------------------------------------------------
    async def send_message(self, message: str, *, options: Options | None = None,
                           agent_id: str | None = None,
                           tools: list[dict[str, Any]] | None = None,
                           tool_choice: str | dict[str, Any] | None = None,
                           tool_results: list[dict[str, str]] | None = None) -> ChatResult:
        """Queue a turn; returns on its ``done``, raises :class:`ChatError` on its ``error``.
        ``agent_id`` names who answers in a room (default: the stream's agent; none: the room
        goes by the message's ``@mentions``; several mentioned: the last answer returns).

        ``tools`` / ``tool_choice`` have OpenAI's shapes; ``tool_results`` (``{"tool_call_id",
        "content"}``) answer the calls of the previous answer (``message`` may then be "")."""
        results = await self._queue_turn(message, options, agent_id=agent_id or self.agent_id,
                                         tools=tools, tool_choice=tool_choice,
                                         tool_results=tool_results)
        return results[-1]

    async def send_round(self, message: str, agent_ids: Sequence[str], *,
                         options: Options | None = None) -> list[ChatResult]:
        """Ask several agents of a room to answer in turn, each seeing the answers before its
        own; returns their answers in order. An error ends the round: the :class:`ChatError`
        holds the answers before it (``results``)."""
        if not agent_ids:
            raise ValueError("agent_ids must name at least one agent")
        return await self._queue_turn(message, options, agent_ids=list(agent_ids))

    async def _queue_turn(self, message: str, options: Options | None, *, agent_id: str = "",
                          agent_ids: list[str] | None = None,
                          tools: list[dict[str, Any]] | None = None,
                          tool_choice: str | dict[str, Any] | None = None,
                          tool_results: list[dict[str, str]] | None = None) -> list[ChatResult]:
        if self._ended is not None:
            raise ChatError(self._ended.code, self._ended.message)
        if self._ws is None:
            raise ChatError("not_open", "open the stream first (async with / await open())")
        frame: dict[str, Any] = {"type": "chat", "message": message}
        if agent_ids:
            frame["agent_ids"] = agent_ids
        elif agent_id:
            frame["agent_id"] = agent_id
        merged = {**self.defaults, **_wire_options(options)}
        if merged:
            frame["options"] = merged
        for key, value in (("tools", tools), ("tool_choice", tool_choice),
                           ("tool_results", tool_results)):
            if value is not None:
                frame[key] = value
        self._counter += 1
        turn = _Turn(f"{self._prefix}-{self._counter}", frame,
                     asyncio.get_running_loop().create_future())
        frame["request_id"] = turn.request_id
        self._queue.append(turn)
        await self._pump()
        return await turn.future

    async def cancel(self) -> None:
        """Stop the current answer (it finishes ``cancelled``); the socket stays open."""
        current = self._queue[0] if self._queue else None
        if self._ended is None and current is not None and current.sent:
            await self._send({"type": "cancel", "request_id": current.request_id})

    def events(self) -> AsyncIterator[ChatEvent]:
        """Every event from now until the stream ends (registered at call time, so call it
        before sending if you want the turn's ``start``)."""
        queue: asyncio.Queue[ChatEvent | None] = asyncio.Queue()
        if self._ended is None:
            self._subscribers.append(queue)
        else:
            queue.put_nowait(None)
        return self._drain(queue)

    async def _drain(self, queue: asyncio.Queue[ChatEvent | None]) -> AsyncIterator[ChatEvent]:
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(queue)

    # internals ------------------------------------------------------------------------------------
    async def _send(self, frame: dict[str, Any]) -> None:
        assert self._ws is not None
        async with self._send_lock:
            await self._ws.send_str(msgspec.json.encode(frame).decode())

    async def _pump(self) -> None:
        """Send the first queued turn if it is not out yet (turns go one at a time)."""
        turn = self._queue[0] if self._queue else None
        if self._ended is not None or turn is None or turn.sent:
            return
        if self._conversation_id is not None:
            turn.frame["conversation_id"] = self._conversation_id
        turn.sent = True
        try:
            await self._send(turn.frame)
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            self._end(ChatError("socket_closed", f"could not send on the chat socket: {exc}"))

    async def _next(self) -> None:
        self._queue.pop(0)
        await self._pump()

    def _emit(self, event: ChatEvent) -> None:
        for queue in self._subscribers:
            queue.put_nowait(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a caller's bug must not break the turn bookkeeping
                log.exception("on_event raised")

    def _end(self, error: ChatError) -> None:
        if self._ended is not None:
            return
        self._ended = error
        pending, self._queue = self._queue, []
        for turn in pending:
            if not turn.future.done():
                turn.future.set_exception(ChatError(error.code, error.message, turn.request_id))
        for queue in self._subscribers:
            queue.put_nowait(None)

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            while True:
                async for message in self._ws:
                    if message.type != aiohttp.WSMsgType.TEXT:
                        continue
                    try:
                        event = _event_decoder.decode(message.data)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        continue  # pong, or a frame type newer than this client
                    await self._handle(event)
                if self._ended is not None or not await self._reconnect():
                    break
        finally:
            code = self._ws.close_code
            self._end(ChatError("socket_closed", "the chat socket closed"
                                + (f" (code {code})" if code else "")))

    async def _reconnect(self) -> bool:
        """Reopen the dropped socket (bounded backoff) and resume the turn in flight."""
        for attempt in range(1, self.reconnect_attempts + 1):
            await asyncio.sleep(RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S)) - 1])
            if self._ended is not None:
                return False
            try:
                ws = await self._connect()
            except (aiohttp.ClientError, OSError) as exc:
                log.info("chat socket: reconnect %d failed: %s", attempt, exc)
                continue
            self._ws = ws
            current = self._queue[0] if self._queue else None
            after = -1
            try:
                if current is not None and current.sent:
                    after = current.received - 1
                    current.resuming = True
                    await self._send({"type": "resume", "request_id": current.request_id,
                                      "after_seq": after})
                self._emit(Resumed(current.request_id if current else None, after, attempt))
                await self._pump()
            except (aiohttp.ClientError, ConnectionError, RuntimeError):
                continue
            return True
        return False

    async def _handle(self, event: ChatEvent) -> None:
        current = self._queue[0] if self._queue else None
        mine = current is not None and current.sent and event.request_id == current.request_id
        match event:
            case Start():
                if self._conversation_id is None:
                    self._conversation_id = event.conversation_id
                if mine and current is not None:
                    current.started = True
                    current.expected = max(len(event.agent_ids), 1)
                self._emit(event)
            case Token():
                if mine and current is not None:
                    current.resuming = False
                    if event.seq != current.received:
                        return  # already had it (or a gap the server never makes)
                    current.pieces.append(event.token)
                    current.received += event.count
                self._emit(event)
            case Done():
                if self._conversation_id is None:
                    self._conversation_id = event.conversation_id
                self._emit(event)
                if mine and current is not None:
                    current.results.append(ChatResult(
                        "".join(current.pieces), event.conversation_id, event.finish_reason,
                        event.usage, current.request_id, event.turn_id, list(event.tool_calls),
                        event.agent_id))
                    current.pieces = []
                    # A round's answers before the last; a round ends early when one did not
                    # end normally (the server starts no further speaker then).
                    if (len(current.results) < current.expected
                            and event.finish_reason in ("stop", "length")):
                        return
                    if not current.future.done():  # the caller may have stopped waiting
                        current.future.set_result(current.results)
                    await self._next()
            case Error():
                if (mine and current is not None and current.resuming and not current.started
                        and event.code == "unknown_request"):
                    # It was dropped before it started (nothing stored): send it again.
                    current.resuming = False
                    await self._send(current.frame)
                    return
                self._emit(event)
                # No request id: the server could not read the frame in flight, the current one.
                if current is not None and current.sent and event.request_id in (
                        None, current.request_id):
                    if not current.future.done():
                        current.future.set_exception(ChatError(
                            event.code, event.message, current.request_id, current.results))
                    await self._next()


def stream_chat(backend_url: str, agent_id: str, *, options: Options | None = None,
                conversation_id: str | None = None,
                on_event: Callable[[ChatEvent], None] | None = None,
                api_key: str | None = None,
                session: aiohttp.ClientSession | None = None,
                reconnect_attempts: int = len(RECONNECT_DELAYS_S)) -> ChatStream:
    """A chat stream for ``agent_id``: use ``async with`` (or ``await stream.open()``).

    ``backend_url`` is the server (``http://host:port``) or the socket (``ws://host:port/ws/chat``).
    ``options`` are defaults for every turn; ``send_message(options=...)`` overrides them field
    by field. ``reconnect_attempts=0`` turns the reconnect off (a drop then ends the stream).
    """
    return ChatStream(backend_url, agent_id, options=options, conversation_id=conversation_id,
                      on_event=on_event, api_key=api_key, session=session,
                      reconnect_attempts=reconnect_attempts)

"""Connections: caps on open connections, read deadlines, and WebSocket pongs that cannot pile up.

uvicorn answers every connection for as long as the client likes: a client that sends its
headers one byte a minute (slowloris), or opens thousands of sockets, or floods pings on a socket
it never reads, holds descriptors and memory without end. The server therefore runs uvicorn's
own protocols with these additions (:func:`uvicorn_options`):

- **Connection caps**, counted over uvicorn's live connections (HTTP and WebSocket alike):
  at most ``STREAMING_LLM_MAX_CONNECTIONS`` in all and ``STREAMING_LLM_MAX_CONNECTIONS_PER_ADDRESS``
  from one client address. One over the cap is answered at once with ``503 too_many_connections``
  (JSON body, ``Retry-After``, ``Connection: close``; a WebSocket client sees it as the handshake's
  answer) and closed; ``streaming_llm_connections_refused_total{reason}`` counts it.
- **Header deadline**: a connection has ``STREAMING_LLM_HEADER_TIMEOUT_S`` from connect (or from
  a later request's first byte) to finish the request line and headers, and at most
  :data:`MAX_HEADER_BYTES` of them; else it is closed (``reason="header_timeout"`` /
  ``"headers_too_large"``). Idle keep-alive connections close after ``STREAMING_LLM_IDLE_TIMEOUT_S``
  (uvicorn's ``timeout_keep_alive``).
- **Body deadline** (:class:`BodyReadTimeout`, an ASGI middleware): the whole body within
  ``STREAMING_LLM_BODY_TIMEOUT_S`` of the headers, else ``408 request_timeout`` and the connection
  closes.
- **Pongs**: uvicorn's WebSocket protocols write a pong for every ping straight into the
  transport, whether or not the client reads: a ping flood on a socket that never reads grows
  the write buffer without bound. :class:`BoundedWebSocketProtocol` writes pongs only while the
  transport accepts writes and otherwise keeps just the latest one (RFC 6455, 5.5.3 allows
  answering only the most recent ping), sent when the client reads again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from ..errors import ServiceError
from ..settings import Settings
from .proxies import uvicorn_proxy_options

log = logging.getLogger(__name__)

#: Request line plus headers of one request; more is refused (uvicorn's parser has no limit).
MAX_HEADER_BYTES = 64 * 1024
#: How long a refused connection may go on sending before it is closed (so that the client
#: reads the 503 instead of a reset).
REFUSAL_LINGER_S = 2.0
#: Refused connections waiting for their request to be answered with 503; beyond this many
#: (a flood), further ones are dropped at once, so that refusals cannot use up descriptors.
MAX_PENDING_REFUSALS = 32
#: Refusals are logged at most this often (each one is counted in /metrics).
LOG_EVERY_S = 10.0


class RequestTimeout(ServiceError):
    code, status = "request_timeout", 408


@dataclass
class ConnectionLimits:
    """The caps and deadlines of one server, and what to do when a connection is refused."""

    max_connections: int
    max_per_address: int
    header_timeout_s: float
    on_refused: Callable[[str], None] = lambda reason: None
    _logged_at: float = 0.0
    _unlogged: int = 0

    @classmethod
    def from_settings(cls, settings: Settings, on_refused: Callable[[str], None]) -> ConnectionLimits:
        return cls(settings.max_connections, settings.max_connections_per_address,
                   settings.header_timeout_s, on_refused)

    def refused(self, reason: str, client: tuple[str, int] | None) -> None:
        self.on_refused(reason)
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            log.warning("refused or closed %d connection(s) (latest: %s from %s; "
                        "streaming_llm_connections_refused_total counts them all)",
                        self._unlogged, reason, client[0] if client else "?")
            self._logged_at, self._unlogged = now, 0


class TooManyConnections(ServiceError):
    code, status = "too_many_connections", 503


def _refusal(message: str) -> bytes:
    """The raw 503 a refused connection gets (no request has been parsed, so no ASGI app runs)."""
    body = msgspec.json.encode(TooManyConnections(message).to_dict())
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"retry-after: 5\r\nconnection: close\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with connection caps and a header deadline."""

    limits: ClassVar[ConnectionLimits]
    refused = False  # read by other connections' counts
    _request_head: bytes | None = None  # a refused connection's request, until its end

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._arm_header_deadline()
        reason = self._over_limit()
        if reason is not None:
            self._refuse(reason)

    def _over_limit(self) -> str | None:
        live = [c for c in self.connections if not getattr(c, "refused", False)]
        if len(live) > self.limits.max_connections:
            return "too_many_connections"
        address = self.client[0] if self.client else None
        if address is not None and sum(
                1 for c in live if (getattr(c, "client", None) or ("",))[0] == address
        ) > self.limits.max_per_address:
            return "too_many_connections_per_address"
        return None

    def _refuse(self, reason: str) -> None:
        """Answer the request once its headers are in (no parser, no app), then close."""
        pending = sum(1 for c in self.connections if getattr(c, "refused", False))
        self.refused = True
        self._refusal_reason = reason
        self.limits.refused(reason, self.client)
        if pending >= MAX_PENDING_REFUSALS:
            self.transport.abort()  # a flood: no answer, and the descriptor is free at once
            return
        self._request_head = b""

    def _answer_refusal(self) -> None:
        what = ("the server is at its connection limit (STREAMING_LLM_MAX_CONNECTIONS)"
                if self._refusal_reason == "too_many_connections" else
                "this address is at its connection limit "
                "(STREAMING_LLM_MAX_CONNECTIONS_PER_ADDRESS)")
        self._disarm_header_deadline()
        self.transport.write(_refusal(f"{what}; try again later"))
        if self.transport.can_write_eof():
            self.transport.write_eof()  # what the client still sends is read and dropped
        self.loop.call_later(REFUSAL_LINGER_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if not self.refused:
            super().data_received(data)
        elif self._request_head is not None:
            self._request_head += data
            if b"\r\n\r\n" in self._request_head or len(self._request_head) > MAX_HEADER_BYTES:
                self._request_head = None
                self._answer_refusal()

    def eof_received(self) -> None:
        if self.refused:
            self.transport.close()
            return
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    # the header deadline ------------------------------------------------------------------------
    def _arm_header_deadline(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s,
                                                      self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()  # type: ignore[union-attr]
            self._header_timer = None

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.limits.refused("header_timeout", self.client)
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._arm_header_deadline()  # a later request on a keep-alive connection

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:
            self.limits.refused("headers_too_large", self.client)
            # uvicorn answers a parser callback's exception with 400 and closes the connection
            raise ValueError(f"request headers larger than {MAX_HEADER_BYTES} bytes")

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()


class BoundedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's default WebSocket protocol, with pongs that cannot pile up unread."""

    _pending_pong = b""

    def handle_ping(self) -> None:
        output = b"".join(self.conn.data_to_send())
        if self.writable.is_set():
            self.transport.write(output)
        else:  # the client is not reading: answer only the latest ping, once it reads again
            self._pending_pong = output

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._pending_pong and not self.transport.is_closing():
            self.transport.write(self._pending_pong)
        self._pending_pong = b""


def uvicorn_options(settings: Settings, on_refused: Callable[[str], None]) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments for the protocols, caps and timeouts above, and for
    the proxies whose forwarded headers are believed (:mod:`streaming_llm.http.proxies`)."""
    limits = ConnectionLimits.from_settings(settings, on_refused)
    http = type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": limits})
    return {"http": http, "ws": BoundedWebSocketProtocol,
            "timeout_keep_alive": settings.idle_timeout_s, **uvicorn_proxy_options(settings)}


class BodyReadTimeout:
    """``408 request_timeout`` (and ``Connection: close``) for a body not in within the deadline."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.timeout_s
        body_done = False
        timed_out = False

        async def receive_by_deadline() -> Message:
            nonlocal body_done, timed_out
            if body_done:  # after the body only http.disconnect comes: no deadline for it
                return await receive()
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                timed_out = True
                raise RequestTimeout(
                    f"the request body did not arrive within {self.timeout_s:g}s "
                    "(STREAMING_LLM_BODY_TIMEOUT_S)") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def send_closing(message: Message) -> None:
            if timed_out and message["type"] == "http.response.start":
                # The rest of the body is still on its way: do not read it as the next request.
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_by_deadline, send_closing)

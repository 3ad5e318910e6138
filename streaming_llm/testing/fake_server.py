"""The running half of the fake upstream servers (:mod:`.fake_ollama`, :mod:`.fake_openai`).

A fake runs an ``aiohttp.web`` application on its own event loop in a background thread, on a
free loopback port (or the one it is given), so it serves an in-process client and a server
subprocess alike, and a test may block its own loop without starving it. ``stop()`` then
``start()`` again serves on the same port: a backend that goes away and comes back.

Every chat request is kept as a :class:`ChatRecord`: its body (so a test sees what went upstream:
the tools, the history's calls and results), the TCP connection it came on, and whether the
client closed the connection before the answer was complete. :class:`Script` holds
what both fakes' scripts share (the answer's tokens, pacing, how writes are cut, errors, hangs),
and :meth:`FakeServer.stream` sends a planned answer the way a script says.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Self

from aiohttp import web


@dataclasses.dataclass
class ChatRecord:
    """One chat request as the fake saw it."""

    body: dict[str, Any]
    connection: int  # distinct number of the TCP connection it came on
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    sent: int = 0  # bytes of the answer written (before compression), floods included
    complete: threading.Event = dataclasses.field(default_factory=threading.Event)
    disconnected: threading.Event = dataclasses.field(default_factory=threading.Event)

    def wait_disconnected(self, timeout: float = 5.0) -> bool:
        """Block until the client closed the connection mid-answer; False on timeout."""
        return self.disconnected.wait(timeout)


@dataclasses.dataclass
class Script:
    """How a fake answers its next chats (set ``fake.script`` before the request); each fake's
    script adds the endings its protocol has."""

    tokens: Sequence[str] = ("Hello", ",", " world", "!")
    delay_s: float = 0.0  # pause before each write
    per_write: int = 1  # lines (NDJSON) or events (SSE) sent in one write
    split: bool = False  # send every write in two halves, cut in the middle
    status: int = 200  # non-2xx: answer the protocol's error body instead of streaming
    error: str | None = None  # with status 200: an error line/event after `error_after` tokens
    error_after: int = 0
    hang_after: int | None = None  # after this many tokens send nothing more, keep the socket
    hang_before_headers: bool = False  # never even send the response headers
    # --- a hostile or broken upstream --------------------------------------------------------
    encoding: str | None = None  # "gzip": the body goes gzip-compressed, whatever was asked
    flood: bytes = b""  # after the tokens (inside the message of an error body): this, repeated
    flood_bytes: int = 0  # ... to this many bytes before compression, made as it is sent
    ignore_max_tokens: bool = False  # run on past max_tokens / num_predict
    counts: dict[str, Any] | None = None  # usage numbers sent in place of the real ones
    redirect: str | None = None  # answer every chat with a 307 to this URL
    # --- tools -------------------------------------------------------------------------------
    # calls made after the tokens, in the protocol's own fields: {"name", "arguments"}, the
    # arguments an object (or anything else, for a broken upstream's call)
    tool_calls: Sequence[dict[str, Any]] = ()
    # a chat that offers tools gets HTTP 400 with this message (a model or server without them)
    refuse_tools: str | None = None


FLOOD_PIECE = 1024 * 1024  # a flood is made and sent a MiB at a time: the fake's memory stays low


#: One item of a planned answer: bytes as they are, or a function building them when sent (so
#: timestamps and durations in it are real).
Item = bytes | Callable[[], bytes]


class FakeServer(ABC):
    """Base of the fakes: ``with Fake() as fake: ... fake.url ...``; subclasses add routes."""

    thread_name = "fake-server"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.chats: list[ChatRecord] = []
        self.hits: collections.Counter[str] = collections.Counter()  # path → requests
        self._connections: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        # set: the model-list probe answers with this script's flood (or redirect)
        self.probe_script: Script | None = None

    @abstractmethod
    def add_routes(self, app: web.Application) -> None:
        """The fake's routes (each fake speaks its own upstream's API)."""

    # --- life cycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self) -> Self:
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            serving = False
            try:
                loop.run_until_complete(self._start_site())
                self._loop, serving = loop, True
            except OSError as exc:  # e.g. the port is taken: report it to the starting thread
                failure.append(exc)
            finally:
                started.set()  # whatever happens, never leave start() waiting
            if serving:
                loop.run_forever()  # until stop()
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name=self.thread_name, daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        if not self.port:
            raise RuntimeError(f"{type(self).__name__} did not start")
        return self

    def stop(self) -> None:
        """Stop serving: open connections are closed and new ones refused (until ``start()``)."""
        if self._loop is None or self._thread is None:
            return
        loop, self._loop = self._loop, None

        def stop_loop() -> None:
            assert self._stopping is not None
            self._stopping.set()  # wake hanging handlers so cleanup does not wait for them
            loop.stop()

        loop.call_soon_threadsafe(stop_loop)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _start_site(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application()
        self.add_routes(app)
        # handler_cancellation: a client closing the connection cancels the handler, which is how
        # a hanging or slow answer learns about it (as Go and Python servers do via the context).
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0,
                                     access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    # --- for handlers -------------------------------------------------------------------------
    async def begin_chat(self, request: web.Request) -> ChatRecord:
        """Count a chat request and keep its record; ``ValueError`` when the body is not JSON
        (a body that is JSON but not an object is recorded as ``{}``)."""
        self.hits[request.path] += 1
        body = await request.json()
        return self.record(request, body if isinstance(body, dict) else {})

    def record(self, request: web.Request, body: dict[str, Any]) -> ChatRecord:
        transport_id = id(request.transport)
        connection = self._connections.setdefault(transport_id, len(self._connections) + 1)
        record = ChatRecord(body=body, connection=connection, headers=dict(request.headers))
        self.chats.append(record)
        return record

    async def stream(self, request: web.Request, record: ChatRecord | None, script: Script,
                     headers: dict[str, str], plan: Sequence[Item], tail: Sequence[Item] = (),
                     *, status: int = 200) -> web.StreamResponse:
        """Send ``plan``, the script's flood, then ``tail`` as a streamed body, paced, cut and
        encoded as ``script`` says, then hang if it says so. The record (none for a probe) is
        marked complete at the end, or disconnected when the client went away first."""
        try:
            if script.hang_before_headers:
                await self.hang()
            squeeze = None
            if script.encoding == "gzip":
                squeeze = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip header
                headers = {**headers, "Content-Encoding": "gzip"}
            response = web.StreamResponse(status=status, headers=headers)
            await response.prepare(request)

            async def send(payload: bytes) -> None:
                if record is not None:
                    record.sent += len(payload)
                if squeeze is not None:
                    payload = squeeze.compress(payload) + squeeze.flush(zlib.Z_SYNC_FLUSH)
                if script.split:
                    half = len(payload) // 2
                    await response.write(payload[:half])
                    await asyncio.sleep(0.002)  # let the halves reach the client as separate reads
                    await response.write(payload[half:])
                else:
                    await response.write(payload)

            per_write = max(1, script.per_write)
            for start in range(0, len(plan), per_write):
                if script.delay_s:
                    await asyncio.sleep(script.delay_s)
                await send(b"".join(item if isinstance(item, bytes) else item()
                                    for item in plan[start:start + per_write]))
            if script.flood and script.flood_bytes:
                piece = script.flood * (FLOOD_PIECE // len(script.flood) + 1)
                for sent in range(0, script.flood_bytes, FLOOD_PIECE):
                    await send(piece[:min(FLOOD_PIECE, script.flood_bytes - sent)])
            for item in tail:
                await send(item if isinstance(item, bytes) else item())
            if script.hang_after is not None:
                await self.hang()
            if squeeze is not None:
                await response.write(squeeze.flush())
            await response.write_eof()
            if record is not None:
                record.complete.set()
            return response
        except (ConnectionError, asyncio.CancelledError):
            if record is not None and not record.complete.is_set():
                record.disconnected.set()
            raise

    async def flooded_error(self, request: web.Request, record: ChatRecord, script: Script,
                            prefix: bytes, suffix: bytes) -> web.StreamResponse:
        """A ``script.status`` error whose JSON body carries the script's flood as its message:
        ``prefix``, the flood, ``suffix``."""
        return await self.stream(request, record, script, {"Content-Type": "application/json"},
                                 [prefix], [suffix], status=script.status)

    async def flooded_probe(self, request: web.Request, script: Script, prefix: bytes,
                            suffix: bytes) -> web.StreamResponse:
        """A probe's 200 answer padded with the script's flood (JSON whitespace keeps it valid)."""
        return await self.stream(request, None, script, {"Content-Type": "application/json"},
                                 [prefix], [suffix])

    @staticmethod
    def redirect(script: Script) -> web.Response | None:
        if script.redirect is None:
            return None
        return web.Response(status=307, headers={"Location": script.redirect})

    async def hang(self) -> None:
        """Wait until the server stops (or the client goes away and cancels the handler)."""
        assert self._stopping is not None
        await self._stopping.wait()

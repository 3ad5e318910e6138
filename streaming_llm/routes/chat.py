"""``/ws/chat``: many turns over one socket, tokens streamed as they are generated.

Two tasks per socket: the reader decodes frames as they arrive (so ``cancel`` and ``ping`` are
answered while a turn generates) and queues chat frames; the worker runs queued turns one at a
time, in order. Cancelling a turn cancels the task that drains the engine stream, which closes
the stream and so stops the engine at its next step; the partial answer is stored as
``cancelled``. A disconnect cancels the worker the same way. On shutdown
:class:`~streaming_llm.shutdown.LiveSockets` drains the socket: no new turns, the running one
finishes or is cancelled after the grace period, then the socket is closed with 1001.

Limits (:mod:`streaming_llm.limits`): the reader refuses oversized frames and messages, a
``max_new_tokens`` over the ceiling and chats beyond the socket's queue; the worker waits for a
server-wide generation slot before each turn (``cancel`` works while it waits) and answers ``busy``
when the line for slots is full. A turn that fails unexpectedly is reported and logged; the
socket keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from sqlalchemy.exc import OperationalError
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..conversations import ConversationManager, Turn, store_partial
from ..engines.base import FinishReason, Usage
from ..errors import EngineError, ServiceError, ShuttingDown
from ..limits import GenerationGate, Limits
from ..protocol import Cancel, Chat, Done, Error, Ping, Pong, Start, Token, client_decoder, encoder
from ..shutdown import LiveSockets
from ..storage.database import storage_error

log = logging.getLogger(__name__)


@dataclass
class _Job:
    frame: Chat
    request_id: str
    cancelled: bool = False


class ChatSocket:
    def __init__(self, ws: WebSocket, manager: ConversationManager, live: LiveSockets,
                 limits: Limits) -> None:
        self.ws = ws
        self.manager = manager
        self.live = live
        self.limits = limits
        self.closed = False
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.jobs: dict[str, _Job] = {}  # queued or running, by request id
        self.current: _Job | None = None
        self.drain: asyncio.Task[None] | None = None
        self.admission: asyncio.Task[None] | None = None  # the current job waiting for a slot
        self.send_lock = asyncio.Lock()

    @property
    def busy(self) -> bool:
        return self.current is not None

    async def send(self, frame: msgspec.Struct) -> None:
        async with self.send_lock:
            if not self.closed:  # after a shutdown close, late frames have nowhere to go
                await self.ws.send_text(encoder.encode(frame).decode())

    async def close(self, code: int, reason: str) -> None:
        async with self.send_lock:
            if not self.closed:
                self.closed = True
                with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # already gone
                    await self.ws.close(code, reason)

    async def error(self, request_id: str | None, code: str, message: str, **extra: str) -> None:
        await self.send(Error(request_id=request_id, code=code, message=message, **extra))

    # reader -------------------------------------------------------------------------------------
    async def run(self) -> None:
        worker = asyncio.create_task(self.work())
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    await self.error(None, "bad_frame", "binary frames are not supported; send JSON text")
                    continue
                await self.handle(text)
        except WebSocketDisconnect:
            pass
        finally:
            self.manager.metrics.turns_queued.dec(self.queue.qsize())  # never to run
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                pass

    async def handle(self, text: str) -> None:
        try:
            self.limits.check_frame(text)
        except ServiceError as exc:
            await self.error(None, exc.code, exc.message)
            return
        try:
            frame = client_decoder.decode(text)
        except msgspec.ValidationError as exc:
            code = "unknown_type" if "`$.type`" in str(exc) or "tag" in str(exc) else "invalid_frame"
            await self.error(_peek_request_id(text), code, f"invalid frame: {exc}")
            return
        except (msgspec.DecodeError, UnicodeEncodeError) as exc:  # a lone surrogate: not UTF-8
            await self.error(None, "invalid_json", f"frame is not valid JSON: {exc}")
            return
        except RecursionError:  # msgspec recurses into values it skips, e.g. unknown fields
            await self.error(None, "invalid_frame", "invalid frame: nested too deeply")
            return
        match frame:
            case Chat():
                request_id = frame.request_id or f"req_{uuid.uuid4().hex}"
                if self.live.draining:
                    await self.refuse(request_id)
                    return
                if request_id in self.jobs:
                    await self.error(request_id, "duplicate_request_id",
                                     f"request {request_id!r} is already queued or running")
                    return
                try:
                    self.limits.check_chat(frame.message, frame.options.max_new_tokens)
                    self.limits.check_queue(self.queue.qsize())
                except ServiceError as exc:
                    await self.error(request_id, exc.code, exc.message)
                    return
                job = _Job(frame, request_id)
                self.jobs[request_id] = job
                self.queue.put_nowait(job)
                self.manager.metrics.turns_queued.inc()
            case Cancel():
                await self.cancel(frame.request_id)
            case Ping():
                await self.send(Pong(request_id=frame.request_id))

    async def cancel(self, request_id: str | None) -> None:
        job = self.current if request_id is None else self.jobs.get(request_id)
        if job is None:
            if request_id is not None:
                await self.error(request_id, "unknown_request",
                                 f"no queued or running request {request_id!r} on this socket")
            return  # nothing running: a bare cancel is a no-op
        job.cancelled = True
        if job is self.current:
            for task in (self.drain, self.admission):
                if task is not None:
                    task.cancel()

    # worker -------------------------------------------------------------------------------------
    async def work(self) -> None:
        while True:
            job = await self.queue.get()
            self.manager.metrics.turns_queued.dec()
            self.current = job
            try:
                if self.live.draining and not job.cancelled:
                    await self.refuse(job.request_id)
                elif await self.admit(job):
                    try:
                        await self.run_turn(job)
                    finally:
                        self.manager.gate.release()
            except WebSocketDisconnect:
                return  # the reader sees the disconnect too and ends the socket
            except Exception:  # one broken turn must not take the socket down with it
                log.exception("turn %s failed unexpectedly", job.request_id)
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise asyncio.CancelledError from None  # the socket is closing: stop
                with contextlib.suppress(Exception):
                    await self.error(job.request_id, "internal_error", "internal server error")
            finally:
                self.current = None
                self.jobs.pop(job.request_id, None)

    async def admit(self, job: _Job) -> bool:
        """Wait for a generation slot; False (the client told why) when refused or cancelled."""
        if job.cancelled:
            await self.error(job.request_id, "cancelled", "cancelled before it started")
            return False
        gate = self.manager.gate
        waiter = asyncio.ensure_future(gate.acquire())
        self.admission = waiter
        try:
            # asyncio.wait: a cancel of the waiter alone (the client's) does not raise here.
            await asyncio.wait([waiter])
        except asyncio.CancelledError:  # disconnect or shutdown while waiting
            waiter.cancel()
            waiter.add_done_callback(_release_if_acquired(gate))
            raise
        finally:
            self.admission = None
        if waiter.cancelled():
            await self.error(job.request_id, "cancelled", "cancelled before it started")
            return False
        exc = waiter.exception()
        if isinstance(exc, ServiceError):
            await self.error(job.request_id, exc.code, exc.message)
            return False
        if exc is not None:
            raise exc
        return True

    async def run_turn(self, job: _Job) -> None:
        frame, request_id = job.frame, job.request_id
        try:
            turn = await self.manager.begin(
                request_id=request_id, agent_id=frame.agent_id, message=frame.message,
                conversation_id=frame.conversation_id, options=frame.options)
        except (ServiceError, OperationalError) as exc:
            refused = storage_error(exc) if isinstance(exc, OperationalError) else exc
            await self.error(request_id, refused.code, refused.message)
            return
        log.info("turn %s started: conversation %s", request_id, turn.conversation_id)
        await self.send(Start(request_id, turn.conversation_id, turn.user_turn_id))
        started = time.perf_counter()
        self.drain = asyncio.create_task(self.stream(turn))
        if job.cancelled:  # cancelled while the user turn was being stored
            self.drain.cancel()
        reason: FinishReason
        failure: EngineError | None = None
        usage: Usage
        try:
            await self.drain
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                # Disconnect or shutdown: keep what was streamed, then let the cancel through.
                await store_partial(self.manager, turn, "cancelled")
                log.info("turn %s cancelled by disconnect", request_id)
                raise
        except WebSocketDisconnect:  # gone while tokens were sent: a disconnect, not a failure
            await store_partial(self.manager, turn, "cancelled")
            raise
        except EngineError as exc:
            failure = exc
        except Exception as exc:  # an engine bug must not kill the socket
            log.exception("turn %s failed", request_id)
            failure = EngineError(f"generation failed: {exc.__class__.__name__}")
        finally:
            self.drain = None

        if failure is not None:
            reason, usage = "error", turn.partial_usage()
        elif turn.finished is None:
            reason, usage = "cancelled", turn.partial_usage()
        else:
            reason, usage = turn.finished.reason, turn.finished.usage
        try:
            turn_id = await store_partial(self.manager, turn, reason, usage)
        except (OperationalError, ServiceError) as exc:
            failed: ServiceError = (storage_error(exc) if isinstance(exc, OperationalError)
                                    else exc)
            await self.error(request_id, failed.code,
                             f"the answer could not be stored: {failed.message}",
                             conversation_id=turn.conversation_id)
            return
        elapsed = time.perf_counter() - started
        log.info("turn %s finished: %s, %d pieces in %.2fs", request_id, reason, len(turn.pieces),
                 elapsed)
        if failure is not None:
            await self.error(request_id, failure.code, failure.message,
                             conversation_id=turn.conversation_id, turn_id=turn_id)
        else:
            await self.send(Done(request_id, turn.conversation_id, turn_id, reason, usage))

    async def refuse(self, request_id: str) -> None:
        exc = ShuttingDown("the server is shutting down; send the turn again once it is back")
        await self.error(request_id, exc.code, exc.message)

    async def stream(self, turn: Turn) -> None:
        seq = 0
        async for piece in self.manager.generate(turn):
            await self.send(Token(turn.request_id, piece, seq))
            seq += 1


class _RequestId(msgspec.Struct):
    request_id: str | None = None


_peek_decoder = msgspec.json.Decoder(_RequestId)


def _peek_request_id(text: str) -> str | None:
    """Best effort: the request_id of a frame that failed validation, so the error can carry it."""
    try:
        rid = _peek_decoder.decode(text).request_id
    except (msgspec.MsgspecError, RecursionError):
        return None
    return rid if rid is not None and 0 < len(rid) <= 128 else None


def _release_if_acquired(gate: GenerationGate) -> Callable[[asyncio.Future[None]], None]:
    def done(waiter: asyncio.Future[None]) -> None:
        if not waiter.cancelled() and waiter.exception() is None:
            gate.release()

    return done


async def chat_endpoint(ws: WebSocket) -> None:
    await ws.accept()
    services = ws.state.services
    chat = ChatSocket(ws, services.conversations, services.sockets,
                      Limits.from_settings(services.settings))
    with services.sockets.track(chat):
        await chat.run()


routes = [WebSocketRoute("/ws/chat", chat_endpoint)]

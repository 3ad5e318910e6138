"""``/ws/chat``: many turns over one socket, tokens streamed as they are generated.

The reader (the endpoint's own task) decodes frames as they arrive, so ``cancel`` and ``ping``
are answered while a turn generates. Each chat frame becomes one job, one task: it waits for the
turns queued before it on this socket (they run one at a time, in order), then hands the turn to
the :class:`~streaming_llm.chat.turns.TurnRunner` with this socket as the writer of its frames
(``start``, ``token``) and writes the ending (``done`` or ``error``). ``cancel`` cancels the job's
:class:`~streaming_llm.chat.turns.TurnControl`: waiting, it ends ``cancelled`` before it started;
running, its partial answer is stored as ``cancelled`` and ``done`` says so.

Every frame goes out with a deadline (``STREAMING_LLM_SEND_TIMEOUT_S``): uvicorn sends a frame
only once the connection's write buffer is below its high-water mark (64 KiB), so a client that
stops reading stalls its own turn, and past the deadline the turn ends ``cancelled``, its slot is
free and the socket is closed with 1008. A disconnect, a keepalive timeout or the shutdown's
close are the same: the client is gone, the turn is cancelled, never an engine error. On
shutdown :class:`~streaming_llm.http.shutdown.LiveSockets` drains the socket: no new turns, the
running one finishes or is cancelled after the grace period, then the socket is closed with 1001.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field

import msgspec
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from ...chat.conversations import Turn
from ...chat.limits import Limits
from ...chat.resume import Replayable, ResumableTurns
from ...chat.tool_calls import ToolUse, check_tools, tool_use
from ...chat.turns import ClientGone, Ending, TurnCancelled, TurnControl, TurnRunner, TurnSpec
from ...engines.base import ChatMessage
from ...errors import ServiceError, ShuttingDown
from ...metrics import Metrics
from ...protocol import (
    Cancel,
    Chat,
    Done,
    Error,
    FrameHead,
    Ping,
    Pong,
    Resume,
    Start,
    Token,
    client_decoder,
    encoder,
    head_decoder,
)
from ..auth import KEY_ID_SCOPE
from ..shutdown import LiveSockets

log = logging.getLogger(__name__)

SEND_TIMEOUT_CLOSE = 1008  # policy violation: the client did not read its frames
#: Pieces that may wait for the socket (and go out in one ``token`` frame) before the turn waits.
MAX_PENDING = 256


@dataclass(eq=False)
class _Job:
    """One chat frame's turn on this socket; it writes its own frames. Once started it is
    :class:`~streaming_llm.chat.resume.Replayable`: its frames go to whichever socket resumed it."""

    socket: ChatSocket
    frame: Chat
    request_id: str
    control: TurnControl = field(default_factory=TurnControl)
    task: asyncio.Task[None] | None = None
    queued: bool = True  # counted in streaming_llm_turns_queued
    kept: Replayable | None = None  # once started
    sender: asyncio.Task[None] | None = None  # writes the pieces (see piece)
    lost: ClientGone | None = None  # the sender could not write and the turn cannot detach
    _wake: asyncio.Event = field(default_factory=asyncio.Event)  # pieces to write
    _drained: asyncio.Event = field(default_factory=asyncio.Event)  # nothing left to write

    def dequeue(self) -> None:
        if self.queued:
            self.queued = False
            self.socket.metrics.turns_queued.dec()

    def ended(self, task: asyncio.Task[None]) -> None:
        # A done callback: it runs even for a task cancelled before it started.
        self.dequeue()
        self.socket.jobs.pop(self.request_id, None)
        if self.sender is not None:
            self.sender.cancel()

    @property
    def detachable(self) -> bool:
        """Gone clients leave this turn generating, waiting for a resume."""
        return (self.kept is not None and self.kept.final is None
                and self.socket.resumable.enabled
                and not self.socket.live.draining and not self.control.cancelled)

    async def emit(self, frame: msgspec.Struct) -> None:
        """Write a frame to the socket the turn is attached to; a gone client detaches it."""
        kept = self.kept
        sink = self.socket if kept is None else kept.sink
        if sink is None:
            return  # detached: the frame is kept for a resume
        try:
            await sink.send(frame)
        except ClientGone:
            if kept is None or not self.detachable:
                raise
            if kept.sink is sink:
                kept.detach()

    async def start(self, turn: Turn) -> None:
        sock = self.socket
        self.kept = sock.resumable.keep(self.request_id, sock.owner, self.control.cancel, sock)
        await self.emit(Start(self.request_id, turn.conversation_id, turn.user_turn_id))

    async def piece(self, turn: Turn, text: str) -> None:
        """Hand one piece to the sender, which writes what is waiting as one ``token`` frame.

        A client that keeps up gets every piece in a frame of its own as soon as the engine
        waits for its next one; only pieces that came while the previous frame was being
        written share a frame (``count`` > 1). At most :data:`MAX_PENDING` pieces wait: then
        the turn waits for the client, as before, and the send timeout still ends it.
        """
        kept = self.kept
        assert kept is not None
        if self.lost is not None:
            raise self.lost
        kept.pieces.append(text)
        self._wake.set()
        if self.sender is None:
            self.sender = asyncio.create_task(self._send_pieces(), name=f"send-{self.request_id}")
        if len(kept.pieces) - kept.delivered >= MAX_PENDING:
            await self._flush()
            if self.lost is not None:
                del kept.pieces[len(turn.pieces):]  # what it will store: not replayed either
                raise self.lost

    async def _send_pieces(self) -> None:
        kept = self.kept
        assert kept is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (sink := kept.sink) is not None and kept.delivered < len(kept.pieces):
                first = kept.delivered
                batch = kept.pieces[first:first + MAX_PENDING]
                kept.delivered = first + len(batch)
                text = batch[0] if len(batch) == 1 else "".join(batch)
                try:
                    await sink.send(Token(self.request_id, text, first, len(batch)))
                except ClientGone as exc:
                    if not self.detachable:
                        self.lost = exc
                        self._drained.set()
                        return
                    if kept.sink is sink:
                        kept.detach()
            self._drained.set()

    async def _flush(self) -> None:
        """Wait until the waiting pieces are written (or the client is gone)."""
        kept = self.kept
        while (kept is not None and self.sender is not None and not self.sender.done()
               and kept.sink is not None and kept.delivered < len(kept.pieces)):
            self._drained.clear()
            self._wake.set()
            await self._drained.wait()

    async def end(self, frame: msgspec.Struct) -> None:
        """The ending (``done``/``error``), after the pieces: kept for a resume, written if a
        client is there."""
        await self._flush()
        if self.sender is not None:
            self.sender.cancel()
        if self.kept is not None:
            self.kept.ended(frame)
        await self.emit(frame)


class ChatSocket:
    def __init__(self, ws: WebSocket, runner: TurnRunner, live: LiveSockets, limits: Limits,
                 metrics: Metrics, send_timeout_s: float,
                 resumable: ResumableTurns | None = None, owner: str = "") -> None:
        self.ws = ws
        self.runner = runner
        self.live = live
        self.limits = limits
        self.metrics = metrics
        self.send_timeout_s = send_timeout_s
        self.client = ws.client.host if ws.client is not None else ""
        self.closed = False  # closed by us, or the client is gone: nothing more is sent
        self.jobs: dict[str, _Job] = {}  # queued or running, by request id
        self.current: _Job | None = None
        self.turns = asyncio.Lock()  # FIFO: the socket's turns run one at a time, in order
        self.send_lock = asyncio.Lock()
        self.reader: asyncio.Task[None] | None = None
        self.stalled: str | None = None  # why the client was given up on
        self.resumable = resumable if resumable is not None else ResumableTurns(0)
        self.owner = owner  # the API key's id: whose turns this socket may resume
        self.attached: set[Replayable] = set()  # turns writing here (own or resumed)
        self.replays: set[asyncio.Task[None]] = set()

    @property
    def busy(self) -> bool:
        return self.current is not None

    async def send(self, frame: msgspec.Struct) -> None:
        """Send one frame within the send timeout; :class:`ClientGone` when it cannot go out."""
        async with self.send_lock:
            if self.closed:  # after a close (ours, the client's, shutdown's) frames go nowhere
                raise ClientGone
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    await self.ws.send_text(encoder.encode(frame).decode())
            except TimeoutError:
                self.closed = True
                self.stalled = (f"the client did not read for {self.send_timeout_s:g}s "
                                "(STREAMING_LLM_SEND_TIMEOUT_S)")
                log.warning("chat socket from %s: %s; closing it", self.client, self.stalled)
                if self.reader is not None and self.reader is not asyncio.current_task():
                    self.reader.cancel()  # it waits on receive(): stop it, it closes the socket
                raise ClientGone from None
            except (OSError, RuntimeError, WebSocketDisconnect) as exc:
                # Disconnected, or closed meanwhile (keepalive timeout, uvicorn's shutdown).
                self.closed = True
                raise ClientGone from exc

    async def close(self, code: int, reason: str) -> None:
        async with self.send_lock:
            self.closed = True
            await self._close(code, reason)

    async def _close(self, code: int, reason: str, timeout_s: float = 2.0) -> None:
        # Bounded: the close frame waits for the write buffer like any frame.
        with contextlib.suppress(OSError, RuntimeError, TimeoutError, WebSocketDisconnect):
            async with asyncio.timeout(timeout_s):
                await self.ws.close(code, reason[:120])

    async def error(self, request_id: str | None, code: str, message: str, **extra: str) -> None:
        await self.send(Error(request_id=request_id, code=code, message=message, **extra))

    # reader -------------------------------------------------------------------------------------
    async def run(self) -> None:
        self.reader = asyncio.current_task()
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
        except ClientGone:
            pass
        except asyncio.CancelledError:
            if self.stalled is None:
                raise  # not ours: the server is going away
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        finally:
            self.closed = True
            for replay in self.replays:
                replay.cancel()
            for kept in list(self.attached):  # started turns generate on, for a resume
                kept.detach()
            jobs = [job.task for job in self.jobs.values()
                    if job.task is not None and not job.detachable]
            for task in jobs:
                task.cancel()
            await asyncio.gather(*jobs, *self.replays, return_exceptions=True)
            if self.stalled is not None:  # a client that reads again gets the reason
                await self._close(SEND_TIMEOUT_CLOSE, self.stalled, self.send_timeout_s)

    async def handle(self, text: str) -> None:
        try:
            self.limits.check_frame(text)
        except ServiceError as exc:
            await self.error(None, exc.code, exc.message)
            return
        try:
            frame = client_decoder.decode(text)
        except msgspec.ValidationError as exc:
            head = _head(text)
            code = "unknown_type" if head is not None and head.unknown_type else "invalid_frame"
            await self.error(None if head is None else head.valid_request_id, code,
                             f"invalid frame: {exc}")
            return
        except (msgspec.DecodeError, UnicodeEncodeError) as exc:  # a lone surrogate: not UTF-8
            await self.error(None, "invalid_json", f"frame is not valid JSON: {exc}")
            return
        except RecursionError:  # msgspec recurses into values it skips, e.g. unknown fields
            await self.error(None, "invalid_frame", "invalid frame: nested too deeply")
            return
        match frame:
            case Chat():
                await self.queue(frame)
            case Cancel():
                await self.cancel(frame.request_id)
            case Ping():
                await self.send(Pong(request_id=frame.request_id))
            case Resume():
                await self.resume(frame)

    async def queue(self, frame: Chat) -> None:
        request_id = frame.request_id or f"req_{uuid.uuid4().hex}"
        if self.live.draining:
            await self.refuse(request_id)
            return
        if request_id in self.jobs:
            await self.error(request_id, "duplicate_request_id",
                             f"request {request_id!r} is already queued or running")
            return
        if not frame.message and not frame.tool_results:
            await self.error(request_id, "invalid_frame", "invalid frame: a chat frame needs a "
                             "non-empty message, or tool_results - at `$.message`")
            return
        try:
            self.limits.check_chat(frame.message, frame.options.max_new_tokens)
            self.limits.check_queue(len(self.jobs) - (self.current is not None))
        except ServiceError as exc:
            await self.error(request_id, exc.code, exc.message)
            return
        job = _Job(self, frame, request_id)
        self.jobs[request_id] = job
        self.metrics.turns_queued.inc()
        job.task = asyncio.create_task(self.work(job), name=f"turn-{request_id}")
        job.task.add_done_callback(job.ended)

    async def resume(self, frame: Resume) -> None:
        kept = self.resumable.get(self.owner, frame.request_id)
        if kept is None or frame.request_id in self.jobs:
            await self.error(frame.request_id, "unknown_request",
                             f"no turn {frame.request_id!r} to resume: unknown, or it ended more "
                             "than STREAMING_LLM_RESUME_GRACE_S ago")
            return
        replay = asyncio.create_task(kept.replay(self, frame.after_seq),
                                     name=f"resume-{frame.request_id}")
        self.replays.add(replay)
        replay.add_done_callback(self._replayed)

    def _replayed(self, replay: asyncio.Task[None]) -> None:
        self.replays.discard(replay)
        if not replay.cancelled() and not isinstance(replay.exception(), ClientGone | None):
            log.error("resume failed", exc_info=replay.exception())

    async def cancel(self, request_id: str | None) -> None:
        job = self.current if request_id is None else self.jobs.get(request_id)
        if job is None and request_id is not None:  # a resumed turn
            kept = next((k for k in self.attached if k.request_id == request_id), None)
            if kept is not None:
                kept.cancel()
                return
        if job is None:
            if request_id is not None:
                await self.error(request_id, "unknown_request",
                                 f"no queued or running request {request_id!r} on this socket")
            return  # nothing running: a bare cancel is a no-op
        job.control.cancel()

    # one job ------------------------------------------------------------------------------------
    async def work(self, job: _Job) -> None:
        try:
            try:
                async with job.control.cancellable():
                    await self.turns.acquire()
            finally:
                job.dequeue()
            try:
                self.current = job
                await self.run_turn(job)
            finally:
                self.current = None
                self.turns.release()
        except TurnCancelled:
            with contextlib.suppress(ClientGone):
                await self.error(job.request_id, "cancelled", "cancelled before it started")
        except ClientGone:
            pass  # the reader sees it too, and ends the socket
        except Exception:  # one broken turn must not take the socket down with it
            log.exception("turn %s failed unexpectedly", job.request_id)
            with contextlib.suppress(ClientGone):
                await job.end(Error(request_id=job.request_id, code="internal_error",
                                    message="internal server error"))
        finally:
            self.jobs.pop(job.request_id, None)

    async def run_turn(self, job: _Job) -> None:
        frame, request_id = job.frame, job.request_id
        if self.live.draining and not job.control.cancelled:
            await self.refuse(request_id)
            return
        try:
            tools = await _tool_use(self.ws, frame)  # tools (h/tools)
            spec = TurnSpec(request_id=request_id, agent_id=frame.agent_id, message=frame.message,
                            options=frame.options, conversation_id=frame.conversation_id,
                            client=self.client, tools=tools,
                            tool_results=tuple(ChatMessage("tool", r.content,
                                                           tool_call_id=r.tool_call_id)
                                               for r in frame.tool_results),
                            result_params=tuple(f"tool_results[{i}].tool_call_id"
                                                for i in range(len(frame.tool_results))))
            ending = await self.runner.run(spec, job, job.control)
        except ServiceError as exc:  # refused before anything was stored
            param = getattr(exc, "param", None)  # the field at fault (tools)
            await self.error(request_id, exc.code,
                             f"{param}: {exc.message}" if param else exc.message)
            return
        await self.end(job, ending)

    async def end(self, job: _Job, ending: Ending) -> None:
        conversation_id = ending.conversation_id
        frame: Error | Done
        if ending.turn_id is None and ending.failure is not None:
            failed = ending.failure
            frame = Error(request_id=job.request_id, code=failed.code,
                          message=f"the answer could not be stored: {failed.message}",
                          conversation_id=conversation_id)
        elif ending.failure is not None:
            frame = Error(request_id=job.request_id, code=ending.failure.code,
                          message=ending.failure.message, conversation_id=conversation_id,
                          turn_id=ending.turn_id or "")
        else:
            frame = Done(job.request_id, conversation_id, ending.turn_id or "", ending.reason,
                         ending.usage, tool_calls=list(ending.tool_calls))
        await job.end(frame)

    async def refuse(self, request_id: str) -> None:
        exc = ShuttingDown("the server is shutting down; send the turn again once it is back")
        await self.error(request_id, exc.code, exc.message)


def _head(text: str) -> FrameHead | None:
    try:
        return head_decoder.decode(text)
    except (msgspec.MsgspecError, RecursionError, UnicodeEncodeError):
        return None


# --- tools (h/tools) -----------------------------------------------------------------------------
async def _tool_use(ws: WebSocket, frame: Chat) -> ToolUse | None:
    """The tools a chat frame offers: its own, else its agent's (if it declares any)."""
    settings = ws.state.services.settings
    if frame.tools is not None:
        given = [msgspec.structs.asdict(t.function) for t in frame.tools]
    elif frame.tool_choice == "none":
        return None
    else:
        given = list(await ws.state.services.agents.tools(frame.agent_id))
    tools = check_tools(given, max_tools=settings.max_tools,
                        max_bytes=settings.max_tool_schema_bytes)
    choice = frame.tool_choice
    if choice is None or isinstance(choice, str):
        return tool_use(tools, choice, parallel=frame.parallel_tool_calls)
    return tool_use(tools, choice.function.name, parallel=frame.parallel_tool_calls,
                    param="tool_choice.function.name")
# --- end tools ------------------------------------------------------------------------------------


async def chat_endpoint(ws: WebSocket) -> None:
    await ws.accept()
    services = ws.state.services
    chat = ChatSocket(ws, services.turns, services.sockets, Limits.from_settings(services.settings),
                      services.metrics, services.settings.send_timeout_s,
                      services.resumable, ws.scope.get(KEY_ID_SCOPE, ""))
    with services.sockets.track(chat):
        await chat.run()


routes = [WebSocketRoute("/ws/chat", chat_endpoint)]

"""``/ws/chat``: many turns over one socket, tokens streamed as they are generated.

The reader (the endpoint's own task) decodes frames as they arrive, so ``cancel`` and ``ping``
are answered while a turn generates. Each chat frame becomes one :class:`SocketTurn`, one task:
it waits for the turns queued before it on this socket (they run one at a time, in order: the
socket's own admission rule, see :mod:`streaming_llm.chat.admission`), then hands the turn to the
:class:`~streaming_llm.chat.turns.TurnRunner`, which calls it for ``start``, every ``token`` and
the ending (``done`` or ``error``), in that order; the frames go out through the turn's
:class:`~streaming_llm.chat.resume.ResumableTurn`, to whichever socket listens. ``cancel``
cancels the turn's :class:`~streaming_llm.chat.turns.TurnControl`: waiting, it ends
``cancelled`` before it started; running, its partial answer is stored as ``cancelled`` and
``done`` says so.

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

from ...chat.conversations import TurnInProgress
from ...chat.limits import Limits
from ...chat.response_format import checked_constraint
from ...chat.resume import ResumableTurn, ResumableTurns
from ...chat.rounds import SpeakerRefused, run_answers
from ...chat.tool_calls import ToolUse, check_tools, checked_tool_use, tool_use
from ...chat.turns import ClientGone, Ending, TurnCancelled, TurnControl, TurnRunner, TurnSpec
from ...engines.base import ChatMessage, Constraint
from ...errors import InvalidConstraint, InvalidTools, ServiceError, ShuttingDown
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
    client_decoder,
    encoder,
    head_decoder,
)
from ..auth import KEY_ID_SCOPE
from ..shutdown import LiveSockets

log = logging.getLogger(__name__)

SEND_TIMEOUT_CLOSE = 1008  # policy violation: the client did not read its frames


@dataclass(eq=False)
class SocketTurn:
    """One chat frame's turn on this socket, and the :class:`~streaming_llm.chat.turns.TurnWriter`
    that turns what the runner hands it into frames. Once started its frames go through a
    :class:`~streaming_llm.chat.resume.ResumableTurn`, to whichever socket listens."""

    socket: ChatSocket
    frame: Chat
    request_id: str
    control: TurnControl = field(default_factory=TurnControl)
    task: asyncio.Task[None] | None = None
    queued: bool = True  # counted in streaming_llm_turns_queued
    kept: ResumableTurn | None = None  # once started

    def dequeue(self) -> None:
        if self.queued:
            self.queued = False
            self.socket.metrics.turns_queued.dec()

    def ended(self, task: asyncio.Task[None]) -> None:
        # A done callback: it runs even for a task cancelled before it started.
        self.dequeue()
        self.socket.turns.pop(self.request_id, None)
        if self.kept is not None:
            self.kept.abandon()

    @property
    def detachable(self) -> bool:
        """Gone clients leave this turn generating, waiting for a resume."""
        return (self.kept is not None and self.kept.final is None
                and self.socket.resumable.enabled
                and not self.socket.live.draining and not self.control.cancelled)

    # TurnWriter (and RoundWriter: chat/rounds.py) ---------------------------------------------
    async def start(self, turn: TurnInProgress) -> None:
        sock = self.socket
        self.kept = sock.resumable.keep(self.request_id, sock.owner, self.control.cancel, sock,
                                        turn.pieces, lambda: self.detachable,
                                        turn.agent_id if turn.room else None)
        await self.kept.send(Start(self.request_id, turn.conversation_id, turn.user_turn_id,
                                   agent_ids=turn.speakers))

    async def piece(self, turn: TurnInProgress, text: str) -> None:
        assert self.kept is not None
        await self.kept.wrote()

    async def next_answer(self, turn: TurnInProgress) -> None:
        assert self.kept is not None
        self.kept.next_answer(turn.pieces, turn.agent_id if turn.room else None)

    async def answered(self, turn: TurnInProgress, ending: Ending) -> None:
        assert self.kept is not None
        await self.kept.answered(self._ending(ending))

    async def end(self, turn: TurnInProgress, ending: Ending) -> None:
        await self.finish(self._ending(ending))

    def _ending(self, ending: Ending) -> Error | Done:
        conversation_id = ending.conversation_id
        if ending.turn_id is None and ending.failure is not None:
            failed = ending.failure
            return Error(request_id=self.request_id, code=failed.code,
                         message=f"the answer could not be stored: {failed.message}",
                         conversation_id=conversation_id, agent_id=ending.agent_id or None)
        if ending.failure is not None:
            return Error(request_id=self.request_id, code=ending.failure.code,
                         message=ending.failure.message, conversation_id=conversation_id,
                         turn_id=ending.turn_id or "", agent_id=ending.agent_id or None)
        return Done(self.request_id, conversation_id, ending.turn_id or "", ending.reason,
                    ending.usage, tool_calls=list(ending.tool_calls), agent_id=ending.agent_id)

    async def finish(self, frame: Error | Done) -> None:
        """Write the ending frame: through the resumable turn once started."""
        if self.kept is None:
            await self.socket.send(frame)
        else:
            await self.kept.end(frame)


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
        self.turns: dict[str, SocketTurn] = {}  # queued or running, by request id
        self.current: SocketTurn | None = None
        self.order = asyncio.Lock()  # FIFO: the socket's turns run one at a time, in order
        self.send_lock = asyncio.Lock()
        self.reader: asyncio.Task[None] | None = None
        self.stalled: str | None = None  # why the client was given up on
        self.resumable = resumable if resumable is not None else ResumableTurns(0)
        self.owner = owner  # the API key's id: whose turns this socket may resume
        self.attached: set[ResumableTurn] = set()  # turns writing here (own or resumed)
        self.replay: asyncio.Task[None] | None = None  # one resume replays at a time

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
            if self.replay is not None:
                self.replay.cancel()
            for kept in list(self.attached):  # started turns generate on, for a resume
                kept.detach()
            tasks = [turn.task for turn in self.turns.values()
                     if turn.task is not None and not turn.detachable]
            for task in tasks:
                task.cancel()
            if self.replay is not None:
                tasks.append(self.replay)
            await asyncio.gather(*tasks, return_exceptions=True)
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
        if request_id in self.turns:
            await self.error(request_id, "duplicate_request_id",
                             f"request {request_id!r} is already queued or running")
            return
        if not frame.message and not frame.tool_results:
            await self.error(request_id, "invalid_frame", "invalid frame: a chat frame needs a "
                             "non-empty message, or tool_results - at `$.message`")
            return
        try:
            self.limits.check_chat(frame.message, frame.options.max_new_tokens)
            self.limits.check_queue(len(self.turns) - (self.current is not None))
        except ServiceError as exc:
            await self.error(request_id, exc.code, exc.message)
            return
        turn = SocketTurn(self, frame, request_id)
        self.turns[request_id] = turn
        self.metrics.turns_queued.inc()
        turn.task = asyncio.create_task(self.work(turn), name=f"turn-{request_id}")
        turn.task.add_done_callback(turn.ended)

    async def resume(self, frame: Resume) -> None:
        kept = self.resumable.get(self.owner, frame.request_id)
        if kept is None or frame.request_id in self.turns:
            await self.error(frame.request_id, "unknown_request",
                             f"no turn {frame.request_id!r} to resume: unknown, or it ended more "
                             "than STREAMING_LLM_RESUME_GRACE_S ago")
            return
        if kept.final is None and kept.listener not in (None, self) and not kept.listener.closed:
            # Its client is still there: a resume would take the live turn from it (and could
            # cancel it). Resume is for a client whose socket is gone.
            await self.error(frame.request_id, "turn_attached",
                             f"turn {frame.request_id!r} is still streaming to the socket that "
                             "has it; resume it once that socket is closed")
            return
        if self.replay is not None:
            # One replay per socket: a flood of resumes holds one replay's frames, not thousands,
            # and a client that does not read is held up by these answers (the send timeout).
            await self.error(frame.request_id, "busy",
                             "a resume is already replaying on this socket; send this one when "
                             "its frames have arrived")
            return
        self.replay = asyncio.create_task(kept.replay(self, frame.after_seq),
                                          name=f"resume-{frame.request_id}")
        self.replay.add_done_callback(self._replayed)

    def _replayed(self, replay: asyncio.Task[None]) -> None:
        if self.replay is replay:
            self.replay = None
        if not replay.cancelled() and not isinstance(replay.exception(), ClientGone | None):
            log.error("resume failed", exc_info=replay.exception())

    async def cancel(self, request_id: str | None) -> None:
        turn = self.current if request_id is None else self.turns.get(request_id)
        if turn is None and request_id is not None:  # a resumed turn
            kept = next((k for k in self.attached if k.request_id == request_id), None)
            if kept is not None:
                kept.cancel()
                return
        if turn is None:
            if request_id is not None:
                await self.error(request_id, "unknown_request",
                                 f"no queued or running request {request_id!r} on this socket")
            return  # nothing running: a bare cancel is a no-op
        turn.control.cancel()

    # one turn ------------------------------------------------------------------------------------
    async def work(self, turn: SocketTurn) -> None:
        try:
            try:
                async with turn.control.cancellable():
                    await self.order.acquire()
            finally:
                turn.dequeue()
            try:
                self.current = turn
                await self.run_turn(turn)
            finally:
                self.current = None
                self.order.release()
        except TurnCancelled:
            with contextlib.suppress(ClientGone):
                await self.error(turn.request_id, "cancelled", "cancelled before it started")
        except ClientGone:
            pass  # the reader sees it too, and ends the socket
        except Exception:  # one broken turn must not take the socket down with it
            log.exception("turn %s failed unexpectedly", turn.request_id)
            with contextlib.suppress(ClientGone):
                await turn.finish(Error(request_id=turn.request_id, code="internal_error",
                                       message="internal server error"))
        finally:
            self.turns.pop(turn.request_id, None)

    async def run_turn(self, turn: SocketTurn) -> None:
        frame, request_id = turn.frame, turn.request_id
        if self.live.draining and not turn.control.cancelled:
            await self.refuse(request_id)
            return
        try:
            constraint = await checked_constraint(
                frame.response_format, self.runner.manager.engine,
                max_bytes=self.limits.max_schema_bytes)
            tools = await _tool_use(self.ws, frame, constraint)  # tools (h/tools)
        except (InvalidConstraint, InvalidTools) as exc:  # refused before anything was stored
            await self.error(request_id, exc.code, exc.message, **_field(exc.param))
            return
        spec = TurnSpec(request_id=request_id, agent_id=frame.agent_id or "",
                        message=frame.message, options=frame.options,
                        conversation_id=frame.conversation_id, client=self.client,
                        agent_ids=tuple(frame.agent_ids or ()), constraint=constraint,
                        tools=tools,
                        tool_results=tuple(ChatMessage("tool", r.content,
                                                       tool_call_id=r.tool_call_id)
                                           for r in frame.tool_results),
                        result_params=tuple(f"tool_results[{i}].tool_call_id"
                                            for i in range(len(frame.tool_results))))
        try:
            await run_answers(self.runner, spec, turn, turn.control)
        except SpeakerRefused as exc:  # a round's later speaker could not answer: it ends here
            await turn.finish(Error(request_id=request_id, code=exc.code, message=exc.message,
                                    conversation_id=exc.conversation_id, agent_id=exc.agent_id))
        except ServiceError as exc:  # refused before anything was stored
            # the field at fault: a tool result for an unknown call
            await self.error(request_id, exc.code, exc.message,
                             **_field(getattr(exc, "param", None)))

    async def refuse(self, request_id: str) -> None:
        exc = ShuttingDown("the server is shutting down; send the turn again once it is back")
        await self.error(request_id, exc.code, exc.message)


def _head(text: str) -> FrameHead | None:
    try:
        return head_decoder.decode(text)
    except (msgspec.MsgspecError, RecursionError, UnicodeEncodeError):
        return None


# --- tools (h/tools) -----------------------------------------------------------------------------
def _field(param: str | None) -> dict[str, str]:
    return {} if param is None else {"field": param}


async def _tool_use(ws: WebSocket, frame: Chat, response_format: Constraint | None
                    ) -> ToolUse | None:
    """The tools a chat frame offers: its own, else its agent's (if it declares any, and the
    frame asks for no ``response_format``), checked by the engine."""
    settings = ws.state.services.settings
    engine = ws.state.services.engine
    if frame.tools is not None:
        given = [msgspec.structs.asdict(t.function) for t in frame.tools]
    elif frame.tool_choice == "none" or response_format is not None:
        return None
    elif frame.agent_id is None or frame.agent_ids:  # no single speaker: no agent's own tools
        return None
    else:
        given = list(await ws.state.services.agents.tools(frame.agent_id))
    tools = check_tools(given, max_tools=settings.max_tools,
                        max_bytes=settings.max_tool_schema_bytes)
    choice = frame.tool_choice
    if choice is None or isinstance(choice, str):
        use = tool_use(tools, choice, parallel=frame.parallel_tool_calls)
    else:
        use = tool_use(tools, choice.function.name, parallel=frame.parallel_tool_calls,
                       param="tool_choice.function.name")
    return await checked_tool_use(use, engine, response_format=response_format)
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

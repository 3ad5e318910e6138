"""One answer over plain HTTP, shared by ``/v1/chat/completions`` and ``/v1/messages``.

A route describes the turn (:func:`turn_spec`: stored when the caller names a conversation in
``X-Conversation-Id``, else the caller's messages are the whole prompt and nothing is stored),
starts it (:func:`start`) and writes what :class:`Answer` hands it in its own wire format.

The turn runs in its own task while the route waits for the client to go away; a disconnect
cancels the turn, which stops the engine at its next step (the socket's rule).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ..chat.conversations import TurnInProgress
from ..chat.limits import Limits
from ..chat.tool_calls import ToolUse, check_results
from ..chat.turns import ClientGone, Ending, TurnRunner, TurnSpec
from ..engines.base import ChatMessage, Constraint, count_tokens
from ..errors import ServiceError
from ..wire import GenerationOptions

log = logging.getLogger(__name__)

CONVERSATION_HEADER = "x-conversation-id"
NEW_CONVERSATION = "new"

Item = str | Ending | ServiceError  # a piece, the ending, or a refusal before the start


def new_input(messages: Sequence[ChatMessage]) -> tuple[list[ChatMessage], str]:
    """What a request adds to a stored conversation: the tool results at its end (before a last
    user message, if any) and that user message's text ("" when it ends with results)."""
    end = len(messages) - 1 if messages[-1].role == "user" else len(messages)
    start = end
    while start > 0 and messages[start - 1].role == "tool":
        start -= 1
    return list(messages[start:end]), messages[-1].content if end < len(messages) else ""


async def check_limits(request: Request, messages: Sequence[ChatMessage],
                       options: GenerationOptions, *, stored: bool) -> None:
    """The request's messages obey the ``/v1`` limits; unstored, they are the whole prompt and
    its tokens are counted too (a stored conversation's prompt is the socket's)."""
    services = request.state.services
    limits = Limits.from_settings(services.settings)
    limits.check_messages([m.content for m in messages], options.max_new_tokens)
    if not stored:
        limits.check_prompt_tokens(
            await asyncio.to_thread(count_tokens, services.engine, messages))


def turn_spec(request: Request, *, request_id: str, agent_id: str,
              messages: Sequence[ChatMessage], options: GenerationOptions,
              conversation_id: str | None, tools: ToolUse | None,
              result_param: Callable[[int], str],
              constraint: Constraint | None = None) -> TurnSpec:
    """The turn a request asks for. ``messages`` is the caller's history (system messages
    included); ``result_param(i)`` names the call id field of the tool result ``messages[i]``
    in errors. Tool results must answer calls of the assistant message before them: checked
    here against the caller's history, or by the conversation manager against the stored one."""
    results, message = new_input(messages)
    first = len(messages) - len(results) - (1 if message else 0)
    params = tuple(result_param(first + i) for i in range(len(results)))
    stored = conversation_id is not None
    if not stored:
        check_results(messages[:first], results, params=params)
    return TurnSpec(
        request_id=request_id, agent_id=agent_id, message=message, options=options,
        conversation_id=None if conversation_id in (None, NEW_CONVERSATION) else conversation_id,
        client=request.client.host if request.client is not None else "",
        history=None if stored else messages, constraint=constraint, tools=tools,
        tool_results=tuple(results),
        result_params=params)


Endpoint = Callable[[Request], Awaitable[Response]]


def errors_as(render: Callable[[ServiceError], Response]) -> Callable[[Endpoint], Endpoint]:
    """A decorator: an endpoint's :class:`ServiceError` answered in an API's own error shape."""
    def decorate(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def wrapper(request: Request) -> Response:
            try:
                return await endpoint(request)
            except ServiceError as exc:
                return render(exc)

        return wrapper

    return decorate


def new_request_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class Answer:
    """The turn's writer: hands pieces to the response through a short queue, so a client that
    stops reading stalls its own turn; past the send timeout the turn ends ``cancelled``."""

    def __init__(self, *, stream: bool, send_timeout_s: float) -> None:
        self.stream = stream
        self.send_timeout_s = send_timeout_s
        self.items: asyncio.Queue[Item] = asyncio.Queue(maxsize=64)
        self.conversation_id: str | None = None
        self.turn: TurnInProgress | None = None

    async def produce(self, runner: TurnRunner, spec: TurnSpec) -> None:
        try:
            await runner.run(spec, self)  # its ending comes through end()
        except ServiceError as exc:
            await self.items.put(exc)
        except ClientGone:
            pass  # stopped reading: the turn is stored as cancelled, nobody waits for more

    async def next(self) -> Item:
        return await self.items.get()

    # TurnWriter ---------------------------------------------------------------------------------
    async def start(self, turn: TurnInProgress) -> None:
        self.conversation_id = turn.conversation_id
        self.turn = turn

    async def piece(self, turn: TurnInProgress, text: str) -> None:
        if self.stream:
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    await self.items.put(text)
            except TimeoutError:
                log.warning("turn %s: the client did not read for %gs, cancelling",
                            turn.request_id, self.send_timeout_s)
                raise ClientGone from None

    async def end(self, turn: TurnInProgress, ending: Ending) -> None:
        await self.items.put(ending)


async def start(request: Request, spec: TurnSpec, *, stream: bool
                ) -> tuple[Answer, asyncio.Task[None], Item]:
    """Start the turn: its answer, its task and the first item (a piece when streaming, else
    the ending; or the refusal). Raises :class:`ClientDisconnect` when the client went away
    before that (the turn is stopped then)."""
    services = request.state.services
    answer = Answer(stream=stream, send_timeout_s=services.settings.send_timeout_s)
    work = asyncio.create_task(answer.produce(services.turns, spec), name=spec.request_id)
    try:
        first = await _unless_disconnected(request, answer.next())
    except BaseException:
        await stop(work)
        raise
    return answer, work, first


async def _unless_disconnected(request: Request, waiting: Awaitable[Item]) -> Item:
    """What ``waiting`` gives, unless the client goes away first (:class:`ClientDisconnect`).

    Only until the response starts: from then on :class:`StreamingResponse` watches for it.
    """
    result = asyncio.ensure_future(waiting)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not result.done():
        result.cancel()
        raise ClientDisconnect
    return result.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def stop(work: asyncio.Task[None]) -> None:
    """End the turn's task (a no-op once it ended): a cancel stores the partial answer."""
    if not work.done():
        log.info("turn %s: client went away, cancelling", work.get_name())
        work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work

"""The chat socket protocol (``/ws/chat``): JSON text frames as msgspec tagged unions.

Client → server frames are tagged by ``type``: ``chat``, ``cancel``, ``ping``, ``resume``. Server → client
frames: ``start``, ``token``, ``done``, ``error``, ``pong``. Every server frame answering a request
carries its ``request_id``. New fields are only ever added with defaults, so older clients keep
working (msgspec schema evolution).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from .openai_types import FunctionTool, NamedToolChoice
from .wire import FinishReason, GenerationOptions, ToolCall, Usage

Id = Annotated[str, Meta(min_length=1, max_length=128)]
AgentId = Annotated[str, Meta(pattern=r"^[a-z0-9_-]{1,64}$")]


# --- client → server ----------------------------------------------------------------------------
class ToolResult(msgspec.Struct, forbid_unknown_fields=True):
    """The result of a call the last answer made (``done.tool_calls``)."""

    tool_call_id: Id
    content: str


class Chat(msgspec.Struct, tag="chat", forbid_unknown_fields=True, kw_only=True):
    """A message, and who answers it: ``agent_id``; or in a room (a conversation of several
    agents) ``agent_ids`` — each answers in turn, seeing the answers before its own — or, with
    neither, the participants the message ``@mentions``. A frame without ``conversation_id``
    starts a conversation of ``agent_id``, or a room of ``agent_ids``. ``message`` may be "" only
    when ``tool_results`` carries results (they are stored before it, and the agent continues).
    ``tools`` / ``tool_choice`` have OpenAI's shapes; without ``tools`` a single speaker's own
    tools are offered, if it declares any."""

    agent_id: AgentId | None = None
    message: str
    conversation_id: Id | None = None
    request_id: Id | None = None
    options: GenerationOptions = GenerationOptions()
    agent_ids: Annotated[list[AgentId], Meta(min_length=1, max_length=16)] | None = None
    # OpenAI's shape, {"type": "json_object"} / {"type": "json_schema", "json_schema": {...}}:
    # checked by streaming_llm.chat.response_format (an error frame names the field)
    response_format: dict[str, Any] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    tool_results: list[ToolResult] = []

    def __post_init__(self) -> None:
        # msgspec reports this as a ValidationError: the socket's invalid_frame.
        if self.conversation_id is None and self.agent_id is None and not self.agent_ids:
            raise ValueError("a chat frame without conversation_id needs agent_id (or agent_ids)")


class Cancel(msgspec.Struct, tag="cancel", forbid_unknown_fields=True):
    request_id: Id | None = None  # None = whatever this socket is generating now


class Ping(msgspec.Struct, tag="ping"):
    request_id: Id | None = None


class Resume(msgspec.Struct, tag="resume", forbid_unknown_fields=True):
    """Pick up a turn started on a socket that dropped: its tokens after ``after_seq`` (-1: all
    of them), then the live rest and its ``done``."""

    request_id: Id
    after_seq: Annotated[int, Meta(ge=-1)] = -1


ClientFrame = Chat | Cancel | Ping | Resume


# --- server → client ----------------------------------------------------------------------------
class Start(msgspec.Struct, tag="start"):
    """The user turn is stored. ``user_turn_id`` names it; ``turn_id`` is the same id, kept for
    clients written before ``user_turn_id`` existed."""

    request_id: str
    conversation_id: str
    turn_id: str  # the stored user turn (same as user_turn_id)
    user_turn_id: str = ""  # filled from turn_id when not given
    agent_ids: list[str] = []  # who will answer, in order (several: a round in a room)

    def __post_init__(self) -> None:
        if not self.user_turn_id:
            self.user_turn_id = self.turn_id


class Token(msgspec.Struct, tag="token", omit_defaults=True):
    """Answer pieces ``seq`` … ``seq + count - 1`` of the turn, their texts joined. ``count`` is
    left out when 1 (the usual case: a client that keeps up gets one piece per frame)."""

    request_id: str
    token: str
    seq: int  # 0, 1, 2, ... within the turn: the first piece's
    count: int = 1  # pieces in this frame: the next frame's seq is seq + count
    agent_id: str | None = None  # in a room: whose answer this is (left out otherwise)


class Done(msgspec.Struct, tag="done", omit_defaults=True):
    """The answer is stored. ``answer_turn_id`` names it; ``turn_id`` is the same id, kept for
    clients written before ``answer_turn_id`` existed. ``tool_calls`` (left out when none) are
    the calls the answer made: send their results back in the next ``chat`` frame's
    ``tool_results``."""

    request_id: str
    conversation_id: str
    turn_id: str  # the stored assistant turn (same as answer_turn_id)
    finish_reason: FinishReason
    usage: Usage
    answer_turn_id: str = ""  # filled from turn_id when not given
    tool_calls: list[ToolCall] = []
    agent_id: str = ""  # who answered; a round sends one done per answer

    def __post_init__(self) -> None:
        if not self.answer_turn_id:
            self.answer_turn_id = self.turn_id


class Error(msgspec.Struct, tag="error", omit_defaults=True):
    request_id: str | None
    code: str
    message: str
    # Set when a turn failed after ``start``: its partial answer is stored under ``turn_id``
    # (``answer_turn_id`` is the same id under its clearer name).
    conversation_id: str | None = None
    turn_id: str | None = None
    answer_turn_id: str | None = None
    agent_id: str | None = None  # set for a failed answer: whose it was
    field: str | None = None  # the frame's field at fault, e.g. "response_format"

    def __post_init__(self) -> None:
        if self.answer_turn_id is None:
            self.answer_turn_id = self.turn_id


class Pong(msgspec.Struct, tag="pong"):
    request_id: str | None = None


ServerFrame = Start | Token | Done | Error | Pong

client_decoder = msgspec.json.Decoder(ClientFrame)
encoder = msgspec.json.Encoder()
CLIENT_TAGS = frozenset(t.__struct_config__.tag for t in (Chat, Cancel, Ping, Resume))


class FrameHead(msgspec.Struct):
    """The envelope of any client frame, decoded first so a bad frame is classified by what it
    holds: a ``type`` that is no frame type is ``unknown_type``, anything else ``invalid_frame``."""

    type: object = msgspec.UNSET
    request_id: object = None

    @property
    def unknown_type(self) -> bool:
        return self.type is not msgspec.UNSET and not (isinstance(self.type, str)
                                                    and self.type in CLIENT_TAGS)

    @property
    def valid_request_id(self) -> str | None:
        rid = self.request_id
        return rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None


head_decoder = msgspec.json.Decoder(FrameHead)

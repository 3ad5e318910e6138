"""Anthropic-shaped request and response types for ``POST /v1/messages``.

The subset of Anthropic's Messages API this server honours: ``system``, ``messages`` whose
content is a string or a list of ``text`` / ``tool_use`` / ``tool_result`` blocks, ``max_tokens``,
sampling options, ``stop_sequences``, ``stream``, ``tools`` (custom tools) and ``tool_choice``.
Other block types (images, documents, thinking) are refused by the route with a 400 naming the
block; unknown fields (``metadata``, ``cache_control``, ...) are accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

StopString = Annotated[str, Meta(min_length=1, max_length=256)]


# --- request ------------------------------------------------------------------------------------
class Block(msgspec.Struct):
    """A content block of any type: which fields count depends on ``type``."""

    type: str
    text: str | None = None  # text
    id: str | None = None  # tool_use
    name: str | None = None  # tool_use
    input: dict[str, Any] | None = None  # tool_use
    tool_use_id: str | None = None  # tool_result
    content: str | list[Block] | None = None  # tool_result
    is_error: bool = False  # tool_result


class MessageParam(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(msgspec.Struct):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom" or absent; server tools are refused


class ToolChoice(msgspec.Struct):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # type "tool"
    disable_parallel_tool_use: bool = False


class MessagesRequest(msgspec.Struct):
    """Body of ``POST /v1/messages``. ``model`` is an agent id; the ``X-Conversation-Id`` header
    names a stored conversation to continue and store into (``new`` starts one)."""

    model: Annotated[str, Meta(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)]
    messages: Annotated[list[MessageParam], Meta(min_length=1)]
    system: str | list[Block] | None = None
    stream: bool = False
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0, le=100_000)] | None = None
    stop_sequences: Annotated[list[StopString], Meta(max_length=16)] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


# --- responses ----------------------------------------------------------------------------------
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class TextOut(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ToolUseOut(msgspec.Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: dict[str, Any]


ContentOut = TextOut | ToolUseOut


class MessageUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int


class Message(msgspec.Struct, tag="message", tag_field="type"):
    id: str
    model: str
    content: list[ContentOut]
    stop_reason: StopReason | None
    usage: MessageUsage
    role: Literal["assistant"] = "assistant"
    stop_sequence: str | None = None


class AnthropicErrorDetail(msgspec.Struct):
    type: str
    message: str


class AnthropicError(msgspec.Struct, tag="error", tag_field="type"):
    """Anthropic's error body: ``{"type": "error", "error": {"type", "message"}}``."""

    error: AnthropicErrorDetail

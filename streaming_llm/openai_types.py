"""OpenAI-shaped request and response types for ``/v1/chat/completions`` and ``/v1/models``.

Only the subset of OpenAI's Chat Completions API this server can honour is declared. Request
fields OpenAI clients commonly send but that change nothing here (``user``, ``store``, ...) are
accepted and ignored, as unknown fields are;
fields that would change the answer in a way we cannot (``n`` > 1, ``logprobs``) are refused
by the route with a 400 naming the field. ``response_format`` (text, ``json_object``,
``json_schema``) is read by :mod:`streaming_llm.chat.response_format`. Tools are OpenAI's
function tools; calls come back in ``message.tool_calls`` and, streamed, in
``delta.tool_calls`` (see :mod:`streaming_llm.chat.tool_calls`).
Bounds live in the types, so a bad value fails with the path of the field (``$.temperature``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from .wire import FinishReason

StopString = Annotated[str, Meta(min_length=1, max_length=256)]


# --- request ------------------------------------------------------------------------------------
class ContentPart(msgspec.Struct):
    """One part of a multi-part message content; only ``text`` parts are supported."""

    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # JSON text


class MessageToolCall(msgspec.Struct):
    """A call an assistant message made (in a request's history, and in an answer)."""

    id: Annotated[str, Meta(min_length=1, max_length=128)]
    function: FunctionCall
    type: Literal["function"] = "function"


class RequestMessage(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant
    tool_call_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None  # tool


class FunctionDefinition(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict[str, object] | None = None
    strict: bool | None = None


class FunctionTool(msgspec.Struct):
    function: FunctionDefinition
    type: Literal["function"] = "function"


class NamedFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    """``{"type": "function", "function": {"name": ...}}``: call this tool."""

    function: NamedFunction
    type: Literal["function"] = "function"


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct):
    """Body of ``POST /v1/chat/completions``. ``model`` is an agent id; ``top_k`` is an extension;
    ``metadata.conversation_id`` (or the ``X-Conversation-Id`` header) names a stored
    conversation to continue and store into (``new`` starts one)."""

    model: Annotated[str, Meta(min_length=1, max_length=256)]
    messages: Annotated[list[RequestMessage], Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0, le=100_000)] | None = None
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    stop: StopString | Annotated[list[StopString], Meta(max_length=16)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Meta(ge=0.5, le=2)] | None = None  # extension
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None  # extension
    metadata: dict[str, str] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Declared only to be refused when set to something this server cannot do:
    n: int | None = None
    logprobs: bool | None = None
    # Structured output (streaming_llm.chat.response_format): checked there, to name the field
    response_format: dict[str, object] | None = None


# --- responses ----------------------------------------------------------------------------------
OpenAIFinishReason = Literal["stop", "length", "tool_calls"]


def openai_finish_reason(reason: FinishReason, *, called: bool = False) -> OpenAIFinishReason:
    """OpenAI has no ``cancelled``: an answer stopped early reads as ``length`` (it was cut).
    An answer that ended by itself after making calls (``called``) ends in ``tool_calls``."""
    if reason == "stop":
        return "tool_calls" if called else "stop"
    return "length"


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class CompletionUsage(msgspec.Struct, omit_defaults=True):
    """OpenAI's usage, plus this server's timings (extensions, left out when unknown)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    time_to_first_token_ms: float | None = None
    decode_tokens_per_s: float | None = None


class AssistantMessage(msgspec.Struct):
    content: str | None
    role: Literal["assistant"] = "assistant"
    refusal: None = None
    tool_calls: list[MessageToolCall] | None = None


class Choice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: OpenAIFinishReason
    logprobs: None = None


class ChatCompletion(msgspec.Struct, tag="chat.completion", tag_field="object"):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage


class FunctionDelta(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    """A streamed call: the first delta of call ``index`` has its ``id``, ``type`` and
    ``function.name`` (and ``arguments: ""``), the next ones pieces of ``function.arguments``."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta | None = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: OpenAIFinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct, tag="chat.completion.chunk", tag_field="object"):
    """One server-sent event of a streamed completion. With ``stream_options.include_usage``,
    every chunk carries ``usage: null`` and one last chunk with no choices carries the usage."""

    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


class Model(msgspec.Struct, tag="model", tag_field="object"):
    """An agent, listed as a model: ``id`` is the agent id."""

    id: str
    created: int
    owned_by: str = "streaming-llm"
    name: str | None = None  # extension: the agent's display name
    served_model: str | None = None  # extension: the model the engine serves (as /health names it)


class ModelList(msgspec.Struct, tag="list", tag_field="object"):
    data: list[Model]


class OpenAIErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(msgspec.Struct):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: OpenAIErrorDetail

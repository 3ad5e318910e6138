"""Types that cross the wire: shared by the server, the socket protocol and the Python client.

The chat socket's frames (:mod:`streaming_llm.protocol`), the REST bodies and the Python client
(:mod:`streaming_llm.client`) are built from these, so a client imports neither the engines nor
the storage layer. The engines speak them too (:mod:`streaming_llm.engines.base` takes
:class:`GenerationOptions` and reports :class:`Usage`). New fields only ever come with defaults
(msgspec schema evolution), so older clients keep working.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

FinishReason = Literal["stop", "length", "cancelled", "error"]


class GenerationOptions(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """Sampling options; bounds live in the types so a bad socket frame names the bad field.

    ``None`` means "the engine's / server's default".
    """

    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    max_new_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0, le=100_000)] | None = None
    stop: Annotated[list[Annotated[str, Meta(min_length=1, max_length=256)]], Meta(max_length=16)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    # Against repetition loops (Ollama / llama.cpp names and meanings; docs/engines.md: Sampling).
    repetition_penalty: Annotated[float, Meta(ge=0.5, le=2)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None


class Usage(msgspec.Struct, omit_defaults=True):
    """Token counts and timings reported on ``done``; engine-specific fields default to None."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None  # prompt tokens served from a kept per-conversation cache
    evicted_tokens: int | None = None  # tokens evicted from the conversation's cache so far
    dropped_turns: int | None = None  # dense mode: oldest turns left out to fit the context
    time_to_first_token_ms: float | None = None
    decode_tokens_per_s: float | None = None
    batch_size: int | None = None  # local engine: the most conversations decoded with this turn
    # local engine: where the turn's cache came from: "memory", "disk", "rebuilt" (no usable
    # cache: rebuilt from the agent prefix and the last window of the history) or "new"
    cache_source: str | None = None


class ToolCall(msgspec.Struct, frozen=True):
    """A function call the model made: ``arguments`` is its JSON text, as the model wrote it
    (``done.tool_calls``, a stored turn's ``tool_calls``)."""

    id: str
    name: str
    arguments: str


class Tool(msgspec.Struct, forbid_unknown_fields=True):
    """A function an agent may call: its name, what it does, and its arguments' JSON Schema."""

    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str = ""
    parameters: dict[str, object] = msgspec.field(
        default_factory=lambda: {"type": "object", "properties": {}})


class Agent(msgspec.Struct, kw_only=True):
    """An agent as ``GET /agents/{id}`` returns it. A client building one to send (the Python
    client's ``update_agent``) may leave out everything but ``id`` and ``name``; the server
    always fills every field."""

    id: str
    name: str
    system_prompt: str = ""
    markdown_context: str = ""
    created_at: str = ""  # ISO-8601 UTC, set by the server
    updated_at: str = ""
    tools: list[Tool] | None = None  # offered in its socket chats unless a frame sends its own

"""The engine interface: what the conversation manager needs from a text generator.

An engine turns an :class:`EngineRequest` (chat messages + options + the conversation id, so an
engine may keep per-conversation state such as a KV cache) into an async stream of
:class:`TextChunk` pieces followed by exactly one :class:`Finished`; an engine that knows the
prompt's size before the first piece yields one :class:`PromptTokens` first (so an answer cut
short still reports its ``prompt_tokens``).

Cancellation is the caller closing the stream (``await stream.aclose()``) or cancelling the task
that iterates it; an engine stops its underlying work promptly when that happens (the local engine's
scheduler checks a flag every step; an HTTP proxy closes its upstream response). Failures are raised
as :class:`streaming_llm.errors.EngineError` subclasses, with a stable ``code``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import msgspec

from ..errors import EngineError
from ..wire import FinishReason, GenerationOptions, ToolCall, Usage

__all__ = [
    "ChatMessage",
    "Chunk",
    "Constraint",
    "ConstraintChecker",
    "Engine",
    "EngineHealth",
    "EngineRequest",
    "FinishReason",
    "Finished",
    "GenerationOptions",
    "PromptTokens",
    "Role",
    "TextChunk",
    "TokenCounter",
    "ToolCall",
    "Usage",
    "check_constraint",
    "count_tokens",
]

Role = Literal["system", "user", "assistant", "tool"]


class ChatMessage(msgspec.Struct, frozen=True):
    """One message of a prompt. An assistant message may carry the ``tool_calls`` it made; a
    ``tool`` message is the result of the call ``tool_call_id``."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class Constraint:
    """What the answer must match, enforced token by token (local engine) or passed upstream."""
    kind: Literal["json_schema", "json_object", "regex", "grammar", "tool_calls"]
    schema: dict[str, Any] | None = None   # json_schema
    pattern: str | None = None             # regex, or grammar text (Lark/llguidance syntax)
    tools: tuple[dict[str, Any], ...] = () # tool_calls: OpenAI-shape function tools {"name","description","parameters"}
    lazy_trigger: str | None = None        # tool_calls with tool_choice auto: free text until this string starts a call
    parallel: bool = True  # tool_calls: several calls one after another (parallel_tool_calls)


class EngineRequest(msgspec.Struct, frozen=True):
    request_id: str
    conversation_id: str
    messages: list[ChatMessage]  # system (if any), the stored history, then the new user message
    options: GenerationOptions
    max_new_tokens: int  # options.max_new_tokens resolved against the server default
    constraint: Constraint | None = None  # the answer must match it (structured output, tools)


class TextChunk(msgspec.Struct, frozen=True):
    text: str


class PromptTokens(msgspec.Struct, frozen=True):
    """How many tokens the prompt has, yielded before the first text piece by engines that know
    it then, so an answer cut short (cancelled, failed) still reports its ``prompt_tokens``."""

    count: int


class Finished(msgspec.Struct, frozen=True):
    reason: Literal["stop", "length"]
    usage: Usage


Chunk = PromptTokens | TextChunk | Finished


class EngineHealth(msgspec.Struct, omit_defaults=True):
    ready: bool
    model: str
    detail: str | None = None  # a sentence for people, e.g. "demo model: words are meaningless"
    extra: dict[str, object] | None = None


@runtime_checkable
class Engine(Protocol):
    """What every engine provides. See the module docstring for the streaming contract."""

    name: str

    async def start(self) -> None:
        """Load / connect. Called once by the lifespan in a background task; may take minutes."""

    async def close(self) -> None:
        """Release everything (threads, sessions). Called once at shutdown."""

    async def health(self) -> EngineHealth:
        """Cheap readiness report; ``ready`` is False until :meth:`start` has finished."""

    def stream(self, request: EngineRequest) -> AsyncIterator[Chunk]:
        """Yield text pieces, then one :class:`Finished`. Closing the iterator cancels."""

    def forget(self, conversation_id: str) -> None:
        """Drop any per-conversation state (the conversation was deleted)."""

    def refusal(self, system: str | None = None) -> EngineError | None:
        """Why no turn can start now, when that is known without I/O (the model is still
        loading, or failed to load; with ``system``, the agent's system message, also an agent
        the engine cannot serve, e.g. ``agent_context_too_long``); None means "try". Checked
        before a user turn is stored, so a turn that cannot run leaves nothing behind."""


@runtime_checkable
class ConstraintChecker(Protocol):
    """An engine that can tell, before a turn is stored, whether it can enforce a constraint.

    Optional: an engine without ``check_constraint`` is taken to accept every constraint (and to
    fail, if at all, while streaming)."""

    def check_constraint(self, constraint: Constraint) -> None:
        """Raise :class:`~streaming_llm.errors.InvalidConstraint` (naming the request field in
        its ``param``) when ``constraint`` cannot be enforced: a schema or grammar that does not
        compile, a kind the engine does not support. Cheap after the first call (cached)."""


def check_constraint(engine: object, constraint: Constraint | None) -> None:
    """``engine.check_constraint(constraint)`` where the engine has it; nothing for None."""
    if constraint is not None and isinstance(engine, ConstraintChecker):
        engine.check_constraint(constraint)


@runtime_checkable
class TokenCounter(Protocol):
    """An engine that can count a prompt's tokens before running it (one with a tokenizer)."""

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int | None:
        """The prompt tokens of ``messages`` as this engine would read them; None when not
        known now (e.g. the model is still loading). Called off the event loop."""


def count_tokens(engine: object, messages: Sequence[ChatMessage]) -> int | None:
    """``engine.count_tokens(messages)``, or None for an engine that cannot count (upstreams)."""
    return engine.count_tokens(messages) if isinstance(engine, TokenCounter) else None

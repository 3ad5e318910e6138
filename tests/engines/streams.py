"""Reading an engine's stream in tests, holding it to the Protocol's shape."""

from __future__ import annotations

from collections.abc import AsyncIterator

from streaming_llm.engines.base import (
    ChatMessage,
    Chunk,
    EngineRequest,
    Finished,
    GenerationOptions,
    PromptTokens,
    TextChunk,
)
from streaming_llm.errors import EngineError


async def drain(stream: AsyncIterator[Chunk]) -> tuple[list[str], Finished]:
    """The text pieces and the one ``Finished``; fails if anything follows it or it is missing,
    or if a ``PromptTokens`` comes other than once, first."""
    pieces: list[str] = []
    finished: Finished | None = None
    prompt: PromptTokens | None = None
    async for chunk in stream:
        assert finished is None, "nothing may follow Finished"
        if isinstance(chunk, PromptTokens):
            assert prompt is None and not pieces, "PromptTokens comes once, before any text"
            prompt = chunk
        elif isinstance(chunk, TextChunk):
            pieces.append(chunk.text)
        else:
            finished = chunk
    assert finished is not None
    if prompt is not None:
        assert prompt.count == finished.usage.prompt_tokens, (prompt, finished.usage)
    return pieces, finished


async def until_error(stream: AsyncIterator[Chunk]) -> tuple[list[str], EngineError]:
    """The text pieces streamed before the stream raised, and the error (fails if none)."""
    pieces: list[str] = []
    try:
        async for chunk in stream:
            if isinstance(chunk, PromptTokens):
                continue
            assert isinstance(chunk, TextChunk), f"expected an error, got {chunk!r}"
            pieces.append(chunk.text)
    except EngineError as exc:
        return pieces, exc
    raise AssertionError("the stream ended without an error")


MESSAGES = [
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "first question"),
    ChatMessage("assistant", "first answer"),
    ChatMessage("user", "second question"),
]


def engine_request(options: GenerationOptions | None = None, max_new_tokens: int = 64, *,
                   conversation_id: str = "c1", request_id: str = "r1") -> EngineRequest:
    """A turn with :data:`MESSAGES` as its history."""
    return EngineRequest(request_id=request_id, conversation_id=conversation_id,
                         messages=MESSAGES, options=options or GenerationOptions(),
                         max_new_tokens=max_new_tokens)

"""Reading an engine's stream in tests, holding it to the Protocol's shape."""

from __future__ import annotations

from collections.abc import AsyncIterator

from streaming_llm.engines.base import Chunk, Finished, PromptTokens, TextChunk


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

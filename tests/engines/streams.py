"""Reading an engine's stream in tests, holding it to the Protocol's shape."""

from __future__ import annotations

from collections.abc import AsyncIterator

from streaming_llm.engines.base import Chunk, Finished, TextChunk


async def drain(stream: AsyncIterator[Chunk]) -> tuple[list[str], Finished]:
    """The text pieces and the one ``Finished``; fails if anything follows it or it is missing."""
    pieces: list[str] = []
    finished: Finished | None = None
    async for chunk in stream:
        assert finished is None, "nothing may follow Finished"
        if isinstance(chunk, TextChunk):
            pieces.append(chunk.text)
        else:
            finished = chunk
    assert finished is not None
    return pieces, finished

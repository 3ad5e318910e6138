"""A scripted fake engine for route tests: it records requests and answers as told."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from streaming_llm.engines.base import (
    Chunk,
    EngineHealth,
    EngineRequest,
    Finished,
    TextChunk,
    Usage,
)
from streaming_llm.errors import EngineError


@dataclass
class ScriptedEngine:
    """Answers each request with ``pieces`` (``delay`` seconds apart), or raises ``fail_after``."""

    name: str = "scripted"
    pieces: list[str] = field(default_factory=lambda: ["Hello", ", ", "world", "!"])
    delay: float = 0.0
    reason: str = "stop"
    fail_after: int | None = None  # raise EngineError after this many pieces
    ready: bool = True
    refuse: EngineError | None = None  # what refusal() answers: a turn refused before storing
    requests: list[EngineRequest] = field(default_factory=list)
    closed_streams: int = 0
    forgotten: list[str] = field(default_factory=list)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def health(self) -> EngineHealth:
        return EngineHealth(ready=self.ready, model="scripted-model")

    def refusal(self, system: str | None = None) -> EngineError | None:
        return self.refuse

    def forget(self, conversation_id: str) -> None:
        self.forgotten.append(conversation_id)

    async def stream(self, request: EngineRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        try:
            for i, piece in enumerate(self.pieces):
                if self.fail_after is not None and i == self.fail_after:
                    raise EngineError("scripted failure", code="engine_error")
                if self.delay:
                    await asyncio.sleep(self.delay)
                yield TextChunk(piece)
            yield Finished(self.reason, Usage(prompt_tokens=len(request.messages),  # type: ignore[arg-type]
                                              completion_tokens=len(self.pieces)))
        finally:
            self.closed_streams += 1

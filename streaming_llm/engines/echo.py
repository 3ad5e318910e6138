"""``echo``: a documented test engine that answers with the user's own words.

One word per token (each piece keeps its trailing whitespace, so the pieces concatenate to the
message exactly), ``STREAMING_LLM_ECHO_DELAY_MS`` apart. Meant for client tests and load
benchmarks, never the default. ``max_new_tokens`` caps the words (finish reason ``length``) and a
stop string ends the answer before it (finish reason ``stop``), as a real engine would.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence

from ..errors import EngineError
from .base import (
    ChatMessage,
    Chunk,
    Constraint,
    EngineHealth,
    EngineRequest,
    Finished,
    PromptTokens,
    TextChunk,
    Usage,
)

_WORDS = re.compile(r"\S+\s*|\s+")


class EchoEngine:
    name = "echo"

    def __init__(self, delay_s: float = 0.01) -> None:
        self.delay_s = delay_s

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def health(self) -> EngineHealth:
        return EngineHealth(ready=True, model="echo", detail="test engine: answers with the user's words")

    def forget(self, conversation_id: str) -> None:
        return None

    def refusal(self, system: str | None = None) -> EngineError | None:
        return None  # always ready

    def check_constraint(self, constraint: Constraint) -> None:
        return None  # the echo engine repeats the user's words; it enforces nothing

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return sum(len(_WORDS.findall(m.content)) for m in messages)  # one word, one token

    async def stream(self, request: EngineRequest) -> AsyncIterator[Chunk]:
        message = request.messages[-1].content
        prompt_tokens = self.count_tokens(request.messages)
        yield PromptTokens(prompt_tokens)
        stops = request.options.stop or []
        started = time.perf_counter()
        text = ""
        count = 0
        for piece in _WORDS.findall(message):
            if count >= request.max_new_tokens:
                yield Finished("length", self._usage(prompt_tokens, count, started))
                return
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            else:
                await asyncio.sleep(0)  # still let the loop breathe between tokens
            candidate = text + piece
            hit = min((i for i in (candidate.find(s) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                if hit > len(text):
                    yield TextChunk(candidate[len(text):hit])
                    count += 1
                yield Finished("stop", self._usage(prompt_tokens, count, started))
                return
            text = candidate
            count += 1
            yield TextChunk(piece)
        yield Finished("stop", self._usage(prompt_tokens, count, started))

    @staticmethod
    def _usage(prompt_tokens: int, count: int, started: float) -> Usage:
        elapsed = time.perf_counter() - started
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=count,
            decode_tokens_per_s=round(count / elapsed, 2) if elapsed > 0 and count else None,
        )

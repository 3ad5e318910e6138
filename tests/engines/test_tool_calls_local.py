"""The two halves of tool calls together: the local engine's constrained call blocks, streamed
piece by piece, read back by the API's incremental parser (streaming_llm.chat.tool_calls) into
the calls and the OpenAI-shaped deltas the routes write."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from streaming_llm.chat.tool_calls import ArgumentsDelta, CallStart, ToolCallParser, feed_all
from streaming_llm.engines.base import (
    ChatMessage,
    Constraint,
    EngineRequest,
    GenerationOptions,
    ToolCall,
)

from .conftest import MakeEngine
from .streams import drain
from .test_constraints import TOOLS


async def test_constrained_calls_stream_into_the_parser(local_engines: MakeEngine,
                                                       llama_path: Path) -> None:
    engine = await local_engines(llama_path)
    history = [ChatMessage("user", "weather?"),
               ChatMessage("assistant", "", (ToolCall("call_0", "add", '{"a": 1, "b": 2}'),)),
               ChatMessage("tool", "3", tool_call_id="call_0"),
               ChatMessage("user", "and now?")]
    for seed in range(3):
        for parallel in (False, True):
            constraint = Constraint("tool_calls", tools=TOOLS, parallel=parallel)
            pieces, finished = await drain(engine.stream(EngineRequest(
                request_id=f"r{seed}{parallel}", conversation_id=f"c{seed}{parallel}",
                messages=history, options=GenerationOptions(temperature=0.8, seed=seed),
                max_new_tokens=120, constraint=constraint)))
            parser = ToolCallParser(f"r{seed}")
            events = feed_all(parser, pieces)
            if finished.reason != "stop":  # a parallel answer may run to the token limit
                assert parallel
                continue
            assert parser.content == "" and parser.calls
            assert len(parser.calls) == 1 or parallel
            for call in parser.calls:
                tool = next(t for t in TOOLS if t["name"] == call.name)
                jsonschema.validate(json.loads(call.arguments), tool["parameters"])
                start = next(e for e in events if isinstance(e, CallStart) and e.id == call.id)
                streamed = "".join(e.text for e in events
                                   if isinstance(e, ArgumentsDelta) and e.index == start.index)
                assert streamed == call.arguments

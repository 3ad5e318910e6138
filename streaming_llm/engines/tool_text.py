"""Tools as text: the generic form an answer carries its calls in, for every engine.

The Hermes / Qwen 2.5 convention, which many small models were tuned on: the tools offered are
described at the end of the system message, a call is a ``<tool_call>`` block holding
``{"name", "arguments"}``, a result a user message in ``<tool_response>``. Rendering history this
way needs no ``tool`` role, so every chat template takes it: the local engine's prompts, and the
upstream engines' fallback for an upstream that refuses tools natively
(:mod:`streaming_llm.engines.upstream`). The server reads the blocks back out of the answer
(:mod:`streaming_llm.chat.tool_calls`); an upstream engine that gets calls natively writes them
as blocks too (:func:`call_block`), so every engine's answer reads the same.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .base import ChatMessage, Constraint

Message = dict[str, str]

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
TOOLS_CLOSING = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def call_block(name: str, arguments: str) -> str:
    """One call in the generic form; ``arguments`` is the call's JSON object as text."""
    return (f'<tool_call>\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": '
            f"{arguments}}}\n</tool_call>")


def template_messages(messages: Sequence[ChatMessage], constraint: Constraint | None = None
                      ) -> list[Message]:
    """``messages`` as a chat template takes them, with tool calls and results in the generic
    text form above, so every template renders them (one that knows no ``tool`` role too):
    an assistant's calls follow its text, one block each, as the model writes them; consecutive
    results make one user message. With a ``tool_calls`` constraint the tools are described at
    the end of the system message (one is added when there is none)."""
    out: list[Message] = []
    for i, m in enumerate(messages):
        if m.role == "tool":
            block = f"<tool_response>\n{m.content}\n</tool_response>"
            if i > 0 and messages[i - 1].role == "tool":
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            continue
        content = m.content
        for call in m.tool_calls:
            block = call_block(call.name, call.arguments)
            content = f"{content}\n{block}" if content else block
        out.append({"role": m.role, "content": content})
    if constraint is not None and constraint.kind == "tool_calls" and constraint.tools:
        described = TOOLS_PREAMBLE + "\n".join(
            json.dumps({"type": "function", "function": t}, ensure_ascii=False)
            for t in constraint.tools) + TOOLS_CLOSING
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out

"""Rendering a conversation with the chat template and tokenizing it, reusing what is known.

The kept ids of a conversation are the tokenization of its rendered text; a new turn's rendered
prompt normally extends that text, and only the part from the last special token on is
tokenized again (:meth:`Prompts.encode_after`). In dense mode, :meth:`Prompts.fit_dense` leaves
the oldest turns out until the prompt fits the model's context.

Tools reach the prompt one of two ways (:attr:`Prompts.tool_format`, decided once per tokenizer
by :func:`template_tool_format`):

``template``
    The chat template supports tools and writes calls the way the answer is parsed and
    constrained (a Hermes ``<tool_call>`` block holding ``{"name", "arguments"}``, as the
    Qwen2.5 / Qwen3 / Hermes / SmolLM3 templates do): the offered tools go to
    ``apply_chat_template(..., tools=...)``, and history in transformers' standard shape (an
    assistant's ``tool_calls`` with ``function.name`` / ``function.arguments``, ``role: "tool"``
    messages with ``tool_call_id`` and ``name``), so the model reads tools, calls and results in
    the words it was tuned on.
``generic``
    Any other template, one that ignores ``tools`` (SmolLM2's), knows no ``tool`` role, or writes
    calls in another format (Llama 3.1's bare JSON, Mistral's ``[TOOL_CALLS]``): the tools and
    history in :mod:`..tool_text`'s generic text form, which every template renders. A model tuned
    on another call format is still constrained to the Hermes block (the only format the server
    parses): describing the tools in its own template while forcing another format would teach it
    one thing and make it write another.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Literal

from ...errors import ContextTooLong
from ..base import ChatMessage, Constraint
from ..constraints import TOOL_CALL_OPEN, parse_tool_calls
from ..tool_text import template_messages

__all__ = ["Message", "Prompts", "ToolFormat", "Tools", "template_messages",
           "template_tool_format"]

log = logging.getLogger("streaming_llm.engines.local")

Message = dict[str, Any]  # one message as apply_chat_template takes it
Tools = list[dict[str, Any]] | None  # apply_chat_template's tools=: OpenAI-shape function tools
ToolFormat = Literal["template", "generic"]

# What template_tool_format renders: a tool, a call of it and its result, with values that
# cannot appear in a template by chance.
_PROBE_TOOL: dict[str, Any] = {
    "name": "probe_tool_7f3a", "description": "probe description 7f3a",
    "parameters": {"type": "object", "properties": {"probe_arg": {"type": "string"}}}}
_PROBE_ARGUMENTS = {"probe_arg": "probe value 7f3a"}
_PROBE_RESULT = "probe result 7f3a"


def template_tool_format(tokenizer: Any) -> ToolFormat:
    """``template`` when ``tokenizer``'s chat template renders, given the standard shapes, the
    offered tools (``tools=``), an assistant's call as a Hermes ``<tool_call>`` block that
    :func:`~..constraints.parse_tool_calls` reads back as the same call, and a ``tool`` role
    result; else ``generic``.

    A behavioural check, as llama.cpp's chat-template capabilities are found (rendering probe
    messages and looking for them in the output) rather than by searching the template's source
    for ``tools``: a template may name the variable and still drop it, raise on a ``tool`` role,
    or write calls in a format the server does not read.
    """
    tools = [{"type": "function", "function": _PROBE_TOOL}]
    call = {"id": "call_probe_7f3a", "type": "function",
            "function": {"name": _PROBE_TOOL["name"], "arguments": _PROBE_ARGUMENTS}}
    chat = [{"role": "user", "content": "probe question 7f3a"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "name": _PROBE_TOOL["name"],
             "content": _PROBE_RESULT}]
    try:
        offered = tokenizer.apply_chat_template(chat[:1], tools=tools, tokenize=False,
                                                add_generation_prompt=True)
        plain = tokenizer.apply_chat_template(chat[:1], tokenize=False,
                                              add_generation_prompt=True)
        history = tokenizer.apply_chat_template(chat, tools=tools, tokenize=False,
                                                add_generation_prompt=True)
    except Exception:  # noqa: BLE001  # a template that refuses the shapes is not tool-aware
        return "generic"
    if not (isinstance(offered, str) and isinstance(plain, str) and isinstance(history, str)):
        return "generic"
    described = _PROBE_TOOL["description"] in offered and _PROBE_TOOL["name"] not in plain
    at, hermes = history.find(TOOL_CALL_OPEN), False
    while at >= 0 and not hermes:  # the tools' description may show the format first
        _, calls = parse_tool_calls(history[at:])
        hermes = bool(calls) and (calls[0].name, calls[0].arguments) == (
            _PROBE_TOOL["name"], _PROBE_ARGUMENTS)
        at = history.find(TOOL_CALL_OPEN, at + 1)
    return "template" if described and hermes and _PROBE_RESULT in history else "generic"


class Prompts:
    def __init__(self, tokenizer: Any, boundaries: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.boundaries = boundaries  # special tokens that start a fresh tokenization
        self.tool_format = template_tool_format(tokenizer)
        log.info("local engine: tools written in the %s form (%s)", self.tool_format,
                 "the chat template's own" if self.tool_format == "template"
                 else "the chat template has no Hermes tool calls")

    def chat(self, messages: Sequence[ChatMessage], constraint: Constraint | None = None,
             ) -> tuple[list[Message], Tools]:
        """``messages`` as the chat template takes them, and the tools to describe (those of a
        ``tool_calls`` constraint): for a tool-aware template in transformers' standard shapes
        with the tools apart; else in the generic text form, the tools in the system message
        (None)."""
        if self.tool_format == "generic":
            return template_messages(messages, constraint), None
        tools = None
        if constraint is not None and constraint.kind == "tool_calls" and constraint.tools:
            tools = [{"type": "function", "function": t} for t in constraint.tools]
        names: dict[str, str] = {}  # call id -> function name, for the results' ``name``
        out: list[Message] = []
        for m in messages:
            message: Message = {"role": m.role, "content": m.content}
            if m.tool_calls:
                message["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                    for c in m.tool_calls]
                names.update((c.id, c.name) for c in m.tool_calls)
            if m.role == "tool":
                message["tool_call_id"] = m.tool_call_id
                message["name"] = names.get(m.tool_call_id or "", "")
            out.append(message)
        return out, tools

    def render(self, messages: list[Message], *, generation_prompt: bool,
               tools: Tools = None) -> str:
        if tools is None:  # not tools=None: a template may test ``tools is defined``
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=generation_prompt, tokenize=False)
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False)

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt of ``messages`` offering no tools (what ``/v1`` counts)."""
        return self.render(self.chat(messages)[0], generation_prompt=True)

    def agent_prefix(self, messages: list[Message], tools: Tools = None) -> str:
        """Everything the chat template writes before the first user message, when the
        conversation opens with a system message (the agent's system prompt and Markdown
        context, and the tools a tool-aware template describes there); else "" (a template's
        own default system text is not the agent's)."""
        if not messages or messages[0]["role"] != "system":
            return ""
        try:
            return self.render(messages[:1], generation_prompt=False, tools=tools)
        except Exception:  # noqa: BLE001  # a template that insists on a user message: no pin
            return ""

    def encode_text(self, text: str) -> list[int]:
        # verbose=False: a long conversation is no mistake in streaming mode, so no warning that
        # it is longer than the model's maximum length.
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def encode_prompt(self, known_text: str | None, known_ids: Sequence[int], text: str,
                      ) -> list[int]:
        """Tokenize ``text``, the whole rendered conversation, reusing the kept tokenization
        ``known_ids`` of ``known_text`` (None: not canonical, tokenize everything)."""
        if known_text:
            return self.encode_after(known_text, known_ids, text)
        return self.encode_text(text)

    def encode_after(self, known_text: str, known_ids: Sequence[int], text: str) -> list[int]:
        """Tokenize ``text`` given that ``known_ids`` is the tokenization of ``known_text``.

        Tokenizers split text at special tokens before anything else, so the ids of a text cut
        just before a special token are the ids of the two parts. When ``text`` extends
        ``known_text``, only the part from the last special token on is tokenized (normally the
        new turn, or the assistant marker and the answer), so a long conversation's turn does not
        pay for its whole history again.
        """
        if not text.startswith(known_text):
            return self.encode_text(text)
        rest = text[len(known_text):]
        if rest.startswith(self.boundaries):
            return [*known_ids, *self.encode_text(rest)]
        cut = max((known_text.rfind(b) for b in self.boundaries), default=-1)
        if cut > 0:
            tail = self.encode_text(known_text[cut:])
            if 0 < len(tail) <= len(known_ids) and list(known_ids[-len(tail):]) == tail:
                return [*known_ids[:-len(tail)], *self.encode_text(text[cut:])]
        return self.encode_text(text)

    def fit_dense(self, known_text: str | None, known_ids: Sequence[int], messages: list[Message],
                  max_new: int, context: int, tools: Tools = None,
                  ) -> tuple[str, list[int], int, int]:
        """Leave out the oldest turns until prompt + ``max_new`` fit ``context`` positions.

        A turn is a user message with the replies that follow it; the system message and the new
        message always stay. Returns the text, the prompt ids, ``max_new`` (shortened only when
        even the shortest prompt leaves less room) and the number of turns left out.
        """
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        history, new = messages[len(head):-1], messages[-1:]
        turns: list[list[Message]] = []
        for m in history:
            if m["role"] == "user" or not turns:
                turns.append([m])
            else:
                turns[-1].append(m)

        def encode(drop: int) -> tuple[str, list[int]]:
            kept = [m for turn in turns[drop:] for m in turn]
            text = self.render([*head, *kept, *new], generation_prompt=True, tools=tools)
            return text, self.encode_prompt(known_text, known_ids, text)

        def fits(ids: list[int]) -> bool:
            return len(ids) + max_new <= context

        text, ids = encode(0)
        if fits(ids):
            return text, ids, max_new, 0
        lo, hi = 1, len(turns)  # find the fewest dropped turns that fit
        best: tuple[int, str, list[int]] | None = None
        while lo <= hi:
            mid = (lo + hi) // 2
            text, ids = encode(mid)
            if fits(ids):
                best, hi = (mid, text, ids), mid - 1
            else:
                lo = mid + 1
        if best is not None:
            return best[1], best[2], max_new, best[0]
        text, ids = encode(len(turns))
        if len(ids) >= context:
            raise ContextTooLong(
                f"the system prompt and the new message take {len(ids)} tokens; the model's "
                f"context is {context} (set STREAMING_LLM_STREAMING=true to stream past it)"
            )
        return text, ids, context - len(ids), len(turns)


def _arguments(text: str) -> Any:
    """A call's arguments as templates take them (an object, which they write with ``tojson``);
    the text itself when it is no JSON object (a call cut short by ``max_new_tokens``)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text

"""Tool calls: the tools a turn offers, and the calls read out of the model's answer.

Every engine writes a call in one generic text form, one block per call::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(the local engine is constrained to it, see :class:`~streaming_llm.engines.base.Constraint`;
the echo engine repeats a block the user wrote). :class:`ToolCallParser` reads that text as it
streams and turns it into events a route can write at once: text outside the blocks, then for
each call its start (index, id, name) and its arguments in pieces, OpenAI's and Anthropic's
streaming shapes alike. The same parser, fed the whole answer, gives what is stored
(:func:`parse`), so what a client streamed and what it later reads agree: call ids are derived
from the request id and the call's index, not drawn at random.

Whitespace right before a call, and at the end of an answer that made calls, is not text (a
model writes newlines between blocks); a block that never becomes a call (no ``"name"`` string
followed by an ``"arguments"`` object) stays text. A ``</tool_call>`` inside the arguments (in a
string) does not end the block: the arguments object is scanned to its closing brace first.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from ..engines.base import ChatMessage, Constraint, ToolCall, check_constraint
from ..errors import InvalidTools

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The head of a call, up to the first character of its arguments object; the lookahead makes
# the match independent of where the text was cut into pieces.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)')

ToolChoiceMode = Literal["auto", "none", "required"]


# --- the tools a turn offers --------------------------------------------------------------------
def check_tools(tools: Sequence[dict[str, Any]], *, max_tools: int, max_bytes: int,
                param: str = "tools", schema_key: str = "parameters") -> tuple[dict[str, Any], ...]:
    """``tools`` in the engine's shape (``{"name", "description", "parameters"}``), checked:
    names are unique and plain, each schema is a JSON object, and there are at most
    ``max_tools`` of at most ``max_bytes`` together. ``schema_key`` is where the given tools keep
    their schema (Anthropic's ``input_schema``)."""
    if len(tools) > max_tools:
        raise InvalidTools(f"{len(tools)} tools is more than this server takes ({max_tools}; "
                           "STREAMING_LLM_MAX_TOOLS)", param=param, code="too_many_tools")
    size = len(msgspec.json.encode(list(tools)))
    if size > max_bytes:
        raise InvalidTools(f"the tools take {size} bytes as JSON, more than this server takes "
                           f"({max_bytes}; STREAMING_LLM_MAX_TOOL_SCHEMA_BYTES)", param=param,
                           code="tools_too_large")
    seen: set[str] = set()
    out = []
    for i, tool in enumerate(tools):
        name = tool.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidTools("a tool name is 1 to 64 letters, digits, _ or -",
                               param=f"{param}[{i}].name")
        if name in seen:
            raise InvalidTools(f"two tools are named {name!r}", param=f"{param}[{i}].name")
        seen.add(name)
        schema = tool.get(schema_key)
        if schema is None:  # a function without arguments
            schema = {"type": "object", "properties": {}}
        if not isinstance(schema, dict):
            raise InvalidTools("a tool's schema is a JSON Schema object",
                               param=f"{param}[{i}].{schema_key}")
        description = tool.get("description") or ""
        if not isinstance(description, str):
            raise InvalidTools("a tool's description is a string",
                               param=f"{param}[{i}].description")
        out.append({"name": name, "description": description, "parameters": schema})
    return tuple(out)


@dataclass(frozen=True)
class ToolUse:
    """What a turn may do with tools: the engine's constraint, and whether several calls may
    come in one answer (``parallel_tool_calls``)."""

    constraint: Constraint
    parallel: bool = True

    @property
    def tools(self) -> tuple[dict[str, Any], ...]:
        return self.constraint.tools

    def parser(self, request_id: str) -> ToolCallParser:
        return ToolCallParser(request_id, max_calls=None if self.parallel else 1)


def tool_use(tools: tuple[dict[str, Any], ...], choice: ToolChoiceMode | str | None, *,
             parallel: bool = True, param: str = "tool_choice") -> ToolUse | None:
    """The tool use of a turn offering ``tools`` with ``choice``: ``auto`` (the default) lets
    the model answer in text or call; ``required`` makes it call one of them; a tool's name makes
    it call that one; ``none`` (or no tools) offers none. An unknown name is a 400 naming
    ``param``."""
    if choice == "none" or not tools:
        if choice not in (None, "none", "auto"):
            raise InvalidTools("tool_choice needs tools to choose from", param=param)
        return None
    if choice in (None, "auto"):
        return ToolUse(Constraint("tool_calls", tools=tools, lazy_trigger=OPEN,
                                  parallel=parallel), parallel)
    if choice == "required":
        return ToolUse(Constraint("tool_calls", tools=tools, parallel=parallel), parallel)
    named = [t for t in tools if t["name"] == choice]
    if not named:
        raise InvalidTools(f"tool_choice names {choice!r}, which is not one of the tools "
                           f"({', '.join(t['name'] for t in tools)})", param=param,
                           code="unknown_tool")
    return ToolUse(Constraint("tool_calls", tools=tuple(named), parallel=parallel), parallel)


async def checked_tool_use(use: ToolUse | None, engine: object, *,
                           response_format: Constraint | None = None) -> ToolUse | None:
    """``use``, once the engine can enforce it (each tool's schema compiles: else a 400 naming
    ``tools``), and refused beside a ``response_format``: an answer is one or the other."""
    if use is None:
        return None
    if response_format is not None:
        raise InvalidTools("tools and a response_format cannot be combined: an answer is either "
                           "calls or the structured text (send tool_choice: none to keep the "
                           "response_format)", param="response_format")
    await asyncio.to_thread(check_constraint, engine, use.constraint)  # off the loop: a compile
    return use


def check_results(history: Sequence[ChatMessage], results: Sequence[ChatMessage], *,
                  params: Sequence[str]) -> None:
    """Each tool result answers a call of the last assistant message of ``history`` that no
    earlier result answered; else a 400 naming the result's field (``params[i]``)."""
    last = max((i for i, m in enumerate(history) if m.role == "assistant"), default=None)
    open_ids: set[str | None] = set()
    if last is not None:
        open_ids = {c.id for c in history[last].tool_calls}
        open_ids -= {m.tool_call_id for m in history[last + 1:]}
    for result, param in zip(results, params, strict=True):
        if result.tool_call_id not in open_ids:
            raise InvalidTools(f"tool result for {result.tool_call_id!r}, which is no call of "
                               "the last assistant message waiting for a result",
                               param=param, code="unknown_tool_call")
        open_ids.discard(result.tool_call_id)


def call_id(request_id: str, index: int) -> str:
    """The id of a turn's ``index``-th call: the same wherever and however often it is parsed."""
    return "call_" + hashlib.sha256(f"{request_id}:{index}".encode()).hexdigest()[:24]


def calls_json(calls: Sequence[ToolCall]) -> str | None:
    """Stored form of a turn's calls (the ``turns.tool_calls`` column); None for none."""
    return msgspec.json.encode(list(calls)).decode() if calls else None


def calls_from_json(text: str | None) -> tuple[ToolCall, ...]:
    return msgspec.json.decode(text, type=tuple[ToolCall, ...]) if text else ()


def arguments_object(arguments: str) -> dict[str, Any]:
    """A call's arguments as an object (Anthropic's ``input``); {} when they are not one."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# --- reading calls out of the answer -------------------------------------------------------------
@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


Event = TextDelta | CallStart | ArgumentsDelta


@dataclass
class _Call:
    index: int
    id: str
    name: str
    start: int  # where the arguments object starts in the block's body
    sent: int = 0  # characters of the arguments given out
    done: bool = False  # the arguments object is closed
    # the scanner's state over the arguments object
    depth: int = 0
    in_string: bool = False
    escaped: bool = False


@dataclass
class ToolCallParser:
    """Feed it the answer's pieces (:meth:`feed`), then :meth:`close`; each returns the events
    the new text completes. ``calls`` and ``content`` hold the result so far. With
    ``max_calls``, calls past it are dropped (``parallel_tool_calls: false``)."""

    request_id: str
    max_calls: int | None = None
    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""
    # text not yet given out, or the current block's body
    _buffer: str = field(default="", init=False, repr=False)
    _in_block: bool = field(default=False, init=False, repr=False)
    _call: _Call | None = field(default=None, init=False, repr=False)
    # blocks that became calls, dropped ones included
    _count: int = field(default=0, init=False, repr=False)
    # the whitespace before the current block: text again if it is no call
    _gap: str = field(default="", init=False, repr=False)

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while True:
            if not self._in_block:
                at = self._buffer.find(OPEN)
                if at < 0:
                    self._text(events, self._safe_prefix(), final=False)
                    return events
                self._text(events, at, final=True)
                self._buffer = self._buffer[len(OPEN):]
                self._in_block = True
                continue
            self._advance(events, self._buffer)
            call = self._call
            if call is not None and not call.done:
                return events  # inside the arguments: a close tag there is an argument's text
            end = self._buffer.find(CLOSE, 0 if call is None else call.start + call.sent)
            if end < 0:
                return events
            body = self._buffer[:end]
            self._end_block(events, body)
            self._buffer = self._buffer[end + len(CLOSE):]
            self._in_block = False

    def close(self) -> list[Event]:
        """The answer is over: give out what was held back."""
        events: list[Event] = []
        if self._in_block:  # never closed: a started call ends here, anything else is text
            self._end_block(events, self._buffer, closed=False)
            self._buffer, self._in_block = "", False
        if (self._buffer and not (self.calls or self._count)) or self._buffer.strip():
            events.append(self._say(self._buffer))
        self._buffer = ""
        return events

    # text outside blocks ---------------------------------------------------------------------
    def _safe_prefix(self) -> int:
        """How much of the buffer is surely text: all but a tail that may start ``<tool_call>``
        or is whitespace that may stand before one."""
        cut = len(self._buffer)
        for n in range(min(len(OPEN) - 1, len(self._buffer)), 0, -1):
            if OPEN.startswith(self._buffer[-n:]):
                cut -= n
                break
        return len(self._buffer[:cut].rstrip())

    def _text(self, events: list[Event], upto: int, *, final: bool) -> None:
        """Give out the buffer's first ``upto`` characters as text; ``final``: a block starts
        there, so trailing whitespace is dropped."""
        text, self._buffer = self._buffer[:upto], self._buffer[upto:]
        if final:
            self._gap = text[len(text.rstrip()):]
            text = text.rstrip()
        if text:
            events.append(self._say(text))

    def _say(self, text: str) -> TextDelta:
        self.content += text
        return TextDelta(text)

    # blocks ----------------------------------------------------------------------------------
    def _advance(self, events: list[Event], body: str) -> None:
        call = self._call
        if call is None:
            head = _HEAD.match(body)
            if head is None:
                return
            name = json.loads(head.group(1))
            index = self._count
            self._count += 1
            if self.max_calls is not None and index >= self.max_calls:
                call = _Call(-1, "", name, head.end())  # read, then dropped
            else:
                call = _Call(len(self.calls), call_id(self.request_id, index), name, head.end())
                events.append(CallStart(call.index, call.id, name))
            self._call = call
        if call.done:
            return
        start = call.start + call.sent
        end = start
        for ch in body[start:]:
            end += 1
            if call.escaped:
                call.escaped = False
            elif call.in_string:
                call.in_string = ch != '"'
                call.escaped = ch == "\\"
            elif ch == '"':
                call.in_string = True
            elif ch in "{[":
                call.depth += 1
            elif ch in "}]":
                call.depth -= 1
                if call.depth == 0:
                    call.done = True
                    break
        if end > start:
            call.sent += end - start
            if call.index >= 0:
                events.append(ArgumentsDelta(call.index, body[start:end]))

    def _end_block(self, events: list[Event], body: str, *, closed: bool = True) -> None:
        call, self._call = self._call, None
        if call is None:  # not a call: the block is text, as written
            events.append(self._say(self._gap + OPEN + body + (CLOSE if closed else "")))
            return
        if call.index >= 0:
            arguments = body[call.start:call.start + call.sent]
            self.calls.append(ToolCall(call.id, call.name, arguments))


def parse(text: str, request_id: str, *, max_calls: int | None = None
          ) -> tuple[str, tuple[ToolCall, ...]]:
    """The text and the calls of a whole answer, as :class:`ToolCallParser` streams them."""
    parser = ToolCallParser(request_id, max_calls=max_calls)
    parser.feed(text)
    parser.close()
    return parser.content, tuple(parser.calls)


def feed_all(parser: ToolCallParser, pieces: Iterable[str]) -> list[Event]:
    events = [e for piece in pieces for e in parser.feed(piece)]
    return events + parser.close()

"""The tool-call parser: calls read out of streamed text the same however the text is cut."""

from __future__ import annotations

import json
import random

import pytest

from streaming_llm.chat.tool_calls import (
    ArgumentsDelta,
    CallStart,
    TextDelta,
    ToolCallParser,
    call_id,
    check_results,
    check_tools,
    feed_all,
    parse,
    tool_use,
)
from streaming_llm.engines.base import ChatMessage, ToolCall
from streaming_llm.errors import InvalidTools

ANSWER = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
          '"note": "a } and a \\" inside"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
          '"arguments": {}}\n</tool_call>\n')


def test_a_whole_answer_gives_its_text_and_calls() -> None:
    text, calls = parse(ANSWER, "req1")
    assert text == "Let me look."
    assert calls == (
        ToolCall(call_id("req1", 0), "get_weather",
                 '{"city": "Paris", "note": "a } and a \\" inside"}'),
        ToolCall(call_id("req1", 1), "get_time", "{}"))
    assert json.loads(calls[0].arguments)["note"] == 'a } and a " inside'
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id


@pytest.mark.parametrize("seed", range(40))
def test_any_cut_streams_the_same_result(seed: int) -> None:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(ANSWER)), rng.randint(1, 30)))
    pieces = [ANSWER[a:b] for a, b in zip([0, *cuts], [*cuts, len(ANSWER)], strict=True)]
    parser = ToolCallParser("req1")
    events = feed_all(parser, pieces)
    assert (parser.content, tuple(parser.calls)) == parse(ANSWER, "req1")
    # OpenAI's order: each call's id and name first, then its arguments in pieces
    starts = [e for e in events if isinstance(e, CallStart)]
    assert [(s.index, s.name) for s in starts] == [(0, "get_weather"), (1, "get_time")]
    for call in parser.calls:
        index = next(s.index for s in starts if s.id == call.id)
        first = events.index(next(s for s in starts if s.id == call.id))
        args = [e for e in events[first:] if isinstance(e, ArgumentsDelta) and e.index == index]
        assert "".join(a.text for a in args) == call.arguments
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Let me look."


@pytest.mark.parametrize("cut", range(1, 60, 7))
def test_a_close_tag_inside_the_arguments_does_not_end_the_call(cut: int) -> None:
    text = ('<tool_call>\n{"name": "save", "arguments": {"text": "a </tool_call> b"}}\n'
            "</tool_call> after")
    parser = ToolCallParser("r")
    feed_all(parser, [text[:cut], text[cut:]])
    assert parser.content == " after"
    assert parser.calls == [ToolCall(call_id("r", 0), "save", '{"text": "a </tool_call> b"}')]


def test_text_without_calls_passes_through_whole() -> None:
    for text in ("hello <tools> are < here ", "  spaced  ", "a <tool_call> that is no call"):
        assert parse(text, "r") == (text, ())


def test_a_block_that_is_no_call_stays_text() -> None:
    text = "x <tool_call>not json</tool_call> y"
    assert parse(text, "r") == (text, ())


def test_only_the_first_call_without_parallel_calls() -> None:
    text, calls = parse(ANSWER, "r", max_calls=1)
    assert [c.name for c in calls] == ["get_weather"] and text == "Let me look."


def test_an_answer_cut_inside_a_call_keeps_the_call_started() -> None:
    text, calls = parse('<tool_call>{"name": "f", "arguments": {"a": [1, 2', "r")
    assert text == "" and calls == (ToolCall(call_id("r", 0), "f", '{"a": [1, 2'),)


TOOLS = ({"name": "get_weather", "parameters": {"type": "object"}},)


def test_tool_choice() -> None:
    tools = check_tools(TOOLS, max_tools=4, max_bytes=1000)
    auto = tool_use(tools, "auto")
    assert auto is not None and auto.constraint.lazy_trigger == "<tool_call>"
    required = tool_use(tools, "required")
    assert required is not None and required.constraint.lazy_trigger is None
    assert tool_use(tools, "none") is None and tool_use((), None) is None
    with pytest.raises(InvalidTools) as info:
        tool_use(tools, "get_time", param="tool_choice.function.name")
    assert info.value.param == "tool_choice.function.name"


def test_tools_over_the_limits_are_refused() -> None:
    with pytest.raises(InvalidTools) as info:
        check_tools(TOOLS * 3, max_tools=2, max_bytes=10_000)
    assert info.value.code == "too_many_tools" and info.value.param == "tools"
    with pytest.raises(InvalidTools) as info:
        check_tools(TOOLS, max_tools=2, max_bytes=10)
    assert info.value.code == "tools_too_large"
    with pytest.raises(InvalidTools) as info:
        check_tools([{"name": "bad name"}], max_tools=2, max_bytes=1000)
    assert info.value.param == "tools[0].name"


def test_results_must_answer_an_open_call() -> None:
    call = ToolCall("call_a", "f", "{}")
    history = [ChatMessage("user", "hi"), ChatMessage("assistant", "", (call,))]
    check_results(history, [ChatMessage("tool", "1", tool_call_id="call_a")], params=["m[0]"])
    with pytest.raises(InvalidTools) as info:
        check_results(history, [ChatMessage("tool", "1", tool_call_id="call_b")], params=["m[0]"])
    assert info.value.param == "m[0]"
    answered = [*history, ChatMessage("tool", "1", tool_call_id="call_a")]
    with pytest.raises(InvalidTools):
        check_results(answered, [ChatMessage("tool", "2", tool_call_id="call_a")], params=["m[0]"])

"""Constrained decoding: grammars compile (or fail naming the field), masks keep every sampled
answer valid, and rows without a constraint are untouched by the rows with one."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from streaming_llm.engines.base import (
    ChatMessage,
    Constraint,
    EngineRequest,
    GenerationOptions,
    check_constraint,
)
from streaming_llm.engines.constraints import Grammars, advance, fill_masks, parse_tool_calls
from streaming_llm.engines.decoding import Sampler, sample_rows
from streaming_llm.engines.demo_model import build_tokenizer
from streaming_llm.engines.echo import EchoEngine
from streaming_llm.errors import InvalidConstraint

from .conftest import MakeEngine
from .streams import drain

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "mood": {"enum": ["happy", "sad", "neutral"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tag": {"type": "string", "maxLength": 6},
    },
    "required": ["mood", "score", "ok", "tag"],
    "additionalProperties": False,
}
TOOLS = (
    {"name": "get_weather", "description": "Weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                    "required": ["city"], "additionalProperties": False}},
    {"name": "add", "parameters": {"type": "object",
                                   "properties": {"a": {"type": "integer", "maximum": 999,
                                                        "minimum": 0},
                                                  "b": {"type": "integer", "maximum": 999,
                                                        "minimum": 0}},
                                   "required": ["a", "b"], "additionalProperties": False}},
)


@pytest.fixture(scope="module")
def grammars() -> Grammars:
    tok = build_tokenizer()
    return Grammars(tok, [tok.eos_token_id], len(tok), cache_size=3)


def walk(grammars: Grammars, constraint: Constraint, text: str) -> Any:
    """Feed ``text``'s tokens as if sampled, checking each was allowed; returns the state."""
    tok = grammars._hf
    state = grammars.state(constraint)
    for t in tok.encode(text, add_special_tokens=False):
        masks = fill_masks([state], grammars.vocab)
        assert masks is None or masks[0, t], tok.decode([t])
        advance([state], [t])
    return state


# --- compiling ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("constraint", "param", "words"), [
    (Constraint("json_schema", schema={"type": "nope"}), "response_format", "schema"),
    (Constraint("json_schema", schema={"type": "string", "format": "no-such-format"}),
     "response_format", "format"),
    (Constraint("regex", pattern="(("), "response_format", "pattern"),
    (Constraint("grammar", pattern="start: undefined_rule"), "response_format", "grammar"),
    (Constraint("tool_calls", tools=({"description": "no name"},)), "tools", "name"),
    (Constraint("tool_calls", tools=({"name": "f", "parameters": {"type": "nope"}},)), "tools",
     "tool parameters"),
    (Constraint("tool_calls", tools=TOOLS, lazy_trigger="CALL"), "tool_choice", "trigger"),
])
def test_a_constraint_that_does_not_compile_names_the_field(
        grammars: Grammars, constraint: Constraint, param: str, words: str) -> None:
    for _ in range(2):  # the failure is cached, and raised again the same way
        with pytest.raises(InvalidConstraint) as caught:
            grammars.check(constraint)
        assert caught.value.param == param and words in caught.value.message
        assert caught.value.status == 400 and caught.value.code == "invalid_response_format"


def test_compiled_grammars_are_cached_by_content_and_bounded(grammars: Grammars) -> None:
    before = grammars.compiled
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    grammars.state(Constraint("json_schema", schema=schema))
    grammars.state(Constraint("json_schema", schema=json.loads(json.dumps(schema))))
    assert grammars.compiled == before + 1  # the same schema, another dict: one compile
    for i in range(4):  # more than the cache holds: the first one is compiled again
        grammars.check(Constraint("regex", pattern=f"a{{{i + 1}}}"))
    grammars.check(Constraint("json_schema", schema=schema))
    assert grammars.compiled == before + 6


def test_json_schema_answer_ends_at_its_closing_brace(grammars: Grammars) -> None:
    state = walk(grammars, Constraint("json_schema", schema=SCHEMA),
                 '{"mood": "sad", "score": 7, "ok": true, "tag": "x"}')
    assert state.done and state.broken is None


def test_tool_call_is_the_documented_block_and_parses_back(grammars: Grammars) -> None:
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 22}}\n</tool_call>'
    single = walk(grammars, Constraint("tool_calls", tools=TOOLS, parallel=False), text)
    assert single.done
    assert not walk(grammars, Constraint("tool_calls", tools=TOOLS), text).done  # may go on
    assert parse_tool_calls("Sure. " + text) == ("Sure.", [
        parse_tool_calls(text)[1][0]])
    assert parse_tool_calls(text)[1][0].arguments == {"a": 1, "b": 22}


def test_a_lazy_tool_call_is_free_text_until_its_trigger(grammars: Grammars) -> None:
    constraint = Constraint("tool_calls", tools=TOOLS, lazy_trigger="<tool_call>", parallel=False)
    state = grammars.state(constraint)
    tok = grammars._hf
    free = tok.encode("Anything { goes } here ", add_special_tokens=False)
    for t in free:
        assert fill_masks([state], grammars.vocab) is None  # nothing constrained yet
        advance([state], [t])
    state2 = walk(grammars, constraint, 'Let me see. <tool_call>\n{"name": "get_weather", '
                                        '"arguments": {"city": "Oslo"}}\n</tool_call>')
    assert state2.active and state2.done and state2.broken is None
    masks = None
    state3 = grammars.state(constraint)
    for t in tok.encode("Look: <tool_call>\n", add_special_tokens=False):
        advance([state3], [t])
        masks = fill_masks([state3], grammars.vocab)
    assert masks is not None and state3.active
    assert not masks[0, tok.encode("x", add_special_tokens=False)[0]]  # the call's JSON only


def test_tool_call_tags_that_are_one_token_may_be_written_with_it() -> None:
    """Qwen2.5 / Qwen3 / Hermes vocabularies have ``<tool_call>`` as an added token, which their
    models write a call with: the grammar takes it (or the spelled-out tag), for a required call
    and for a lazy one the token starts."""
    tok = copy.deepcopy(build_tokenizer())
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    open_id, close_id = tok.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    grammars = Grammars(tok, [tok.eos_token_id], len(tok))
    body = tok.encode('\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n',
                      add_special_tokens=False)
    for lazy in (None, "<tool_call>"):
        constraint = Constraint("tool_calls", tools=TOOLS, lazy_trigger=lazy, parallel=False)
        state = grammars.state(constraint)
        for t in [*tok.encode("Let me add. ", add_special_tokens=False)] if lazy else []:
            advance([state], [t])
        for i, t in enumerate([open_id, *body, close_id]):
            masks = fill_masks([state], grammars.vocab)
            if lazy and i == 0:
                assert masks is None  # free text until the trigger
            else:
                assert masks is not None and masks[0, t], tok.decode([t])
            advance([state], [t])
        assert state.done and state.broken is None
        assert walk(grammars, constraint, '<tool_call>\n{"name": "add", "arguments": '
                                          '{"a": 1, "b": 2}}\n</tool_call>').done  # spelled out


# --- sampling with masks ------------------------------------------------------------------------
def test_masked_rows_sample_only_allowed_tokens_and_the_others_are_untouched() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 4
    masks = torch.ones(3, 50, dtype=torch.bool)
    masks[0] = False
    masks[0, [3, 17, 41]] = True
    masks[2] = False
    masks[2, 9] = True
    def samplers() -> list[Sampler]:
        return [Sampler(0.8, seed=1, repetition_penalty=1.3), Sampler(0.8, seed=2),
                Sampler(0.0)]
    histories = [[3, 3, 17], [], []]
    first, second = samplers(), samplers()
    free = [sample_rows(logits, first, histories) for _ in range(30)]
    masked = [sample_rows(logits, second, histories, masks) for _ in range(30)]
    assert {row[0] for row in masked} <= {3, 17, 41}
    assert {row[2] for row in masked} == {9}
    assert [row[1] for row in masked] == [row[1] for row in free]  # row 1 is all True


# --- the local engine on a tiny random model ------------------------------------------------------
def request(cid: str, constraint: Constraint | None, *, temperature: float, seed: int,
            max_new_tokens: int = 120) -> EngineRequest:
    return EngineRequest(request_id=f"r-{cid}", conversation_id=cid,
                         messages=[ChatMessage("user", "Answer in JSON, please.")],
                         options=GenerationOptions(temperature=temperature, seed=seed),
                         max_new_tokens=max_new_tokens, constraint=constraint)


async def test_constrained_answers_validate_greedy_and_sampled_beside_free_rows(
        local_engines: MakeEngine, llama_path: Path) -> None:
    engine = await local_engines(llama_path)
    schema = Constraint("json_schema", schema=SCHEMA)
    free_alone = await drain(engine.stream(request("free", None, temperature=0.8, seed=5)))
    runs = [request(f"s{i}", schema, temperature=0.8 if i else 0.0, seed=i) for i in range(6)]
    together = await asyncio.gather(
        drain(engine.stream(request("free2", None, temperature=0.8, seed=5))),
        *(drain(engine.stream(r)) for r in runs))
    free_together, constrained = together[0], together[1:]
    assert free_together[0] == free_alone[0]  # the same tokens as alone
    assert max(f.usage.batch_size or 0 for _, f in together) >= 2
    for pieces, finished in constrained:
        jsonschema.validate(json.loads("".join(pieces)), SCHEMA)
        assert finished.reason == "stop"
    assert len({"".join(p) for p, _ in constrained}) > 1  # sampled, not one fixed answer


async def test_regex_grammar_and_tool_calls_in_the_engine(local_engines: MakeEngine,
                                                          llama_path: Path) -> None:
    engine = await local_engines(llama_path)
    check_constraint(engine, Constraint("regex", pattern="[a-c]{2}"))
    with pytest.raises(InvalidConstraint):
        check_constraint(engine, Constraint("regex", pattern="(("))
    for seed in range(3):
        pieces, finished = await drain(engine.stream(request(
            f"re{seed}", Constraint("regex", pattern="(yes|no)-[0-9]{2}"), temperature=0.8,
            seed=seed)))
        text = "".join(pieces)
        assert text[:-3] in ("yes", "no") and text[-3] == "-" and text[-2:].isdigit()
        assert finished.reason == "stop"
        pieces, _ = await drain(engine.stream(request(
            f"g{seed}", Constraint("grammar", pattern='start: "A" ("+" "A")*'),
            temperature=0.8, seed=seed, max_new_tokens=10)))
        assert set("".join(pieces)) <= {"A", "+"} and "".join(pieces).startswith("A")
        pieces, finished = await drain(engine.stream(request(
            f"t{seed}", Constraint("tool_calls", tools=TOOLS, parallel=False),
            temperature=0.8, seed=seed)))
        text, calls = parse_tool_calls("".join(pieces))
        assert text == "" and len(calls) == 1 and finished.reason == "stop"
        tool = next(t for t in TOOLS if t["name"] == calls[0].name)
        jsonschema.validate(calls[0].arguments, tool["parameters"])


async def test_max_new_tokens_still_bounds_a_constrained_answer(local_engines: MakeEngine,
                                                                llama_path: Path) -> None:
    engine = await local_engines(llama_path)
    pieces, finished = await drain(engine.stream(request(
        "short", Constraint("json_schema", schema=SCHEMA), temperature=0.0, seed=0,
        max_new_tokens=3)))
    assert finished.reason == "length" and finished.usage.completion_tokens == 3
    assert '{"mood": "happy"'.startswith("".join(pieces)[:2])  # a prefix of a valid answer


def test_engines_that_cannot_check_accept_and_echo_enforces_nothing() -> None:
    check_constraint(object(), Constraint("regex", pattern="(("))  # no check_constraint: passes
    check_constraint(EchoEngine(), Constraint("regex", pattern="(("))
    check_constraint(EchoEngine(), None)


def test_parse_tool_calls_reads_json_not_up_to_the_next_tag() -> None:
    # seen from the default model: a string argument holding the closing tag
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "}}</tool_call>You", '
            '"unit": "c"}}\n</tool_call>')
    before, [call] = parse_tool_calls(text)
    assert before == "" and call.arguments == {"city": "}}</tool_call>You", "unit": "c"}
    two = ('Hi <tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
           '<tool_call>\n{"name": "b", "arguments": {"x": 1}}\n</tool_call>')
    assert [c.name for c in parse_tool_calls(two)[1]] == ["a", "b"]
    assert parse_tool_calls(two)[0] == "Hi"
    assert parse_tool_calls("no calls <tool_call> {broken") == ("no calls <tool_call> {broken", [])


@pytest.mark.parametrize("extra", [45, -40])
def test_logits_and_tokenizer_of_different_widths(extra: int) -> None:
    """Wider logits (padded, as Qwen's): the extra ids never pass; narrower ones (a tokenizer
    with ids the model never outputs): the mask is cut to the logits."""
    tok = build_tokenizer()
    vocab = len(tok) + extra
    grammars = Grammars(tok, [tok.eos_token_id], vocab)
    state = grammars.state(Constraint("json_object"))
    masks = fill_masks([state, None], vocab)
    assert masks is not None and masks.shape == (2, vocab)
    assert masks[0].any() and not masks[0, len(tok):].any() and masks[1].all()

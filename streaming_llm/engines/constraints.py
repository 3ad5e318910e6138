"""Constrained decoding: a :class:`~.base.Constraint` compiled to a token mask per step.

The local engine enforces a JSON schema, "any JSON object", a regular expression, a Lark grammar
or the tool-call format token by token with llguidance (Moskal et al., guidance-ai/llguidance;
chosen over xgrammar and outlines-core by measurement, see docs/performance.md "Structured
output"). Three pieces:

:class:`Grammars`
    One per loaded tokenizer. Turns a constraint into llguidance grammar text, checks that it
    compiles (:meth:`Grammars.check` raises :class:`~streaming_llm.errors.InvalidConstraint`,
    naming the request field) and keeps the compiled matchers in a bounded LRU cache keyed by a
    hash of the constraint; a turn gets a copy (:meth:`Grammars.state`), so the second request
    with the same schema compiles nothing.
:class:`ConstraintState`
    One per constrained turn, carried by the scheduler's request and shared with its turn. Each
    step the runner fills the row's bitmask (:func:`fill_masks`: every row of a step in one
    ``(rows, vocab)`` boolean tensor, applied by :func:`~.decoding.sample_rows` before the
    penalties and the temperature, so sampled answers are valid too) and advances the matcher
    with the sampled token (:func:`advance`). ``done`` says the grammar is complete and nothing
    may follow: the turn then ends with ``finish_reason`` ``stop`` (no run-on after a closing
    brace). ``max_new_tokens`` still bounds it (``length``, the text as generated).
Lazy tool calls (``tool_calls`` with ``lazy_trigger``)
    The answer is free text until the decoded output contains the trigger (``<tool_call>``);
    from the trigger's first byte on, the call is constrained (as llama.cpp's lazy grammars: the
    text from the trigger on is fed to the matcher, then every token is masked). Should that
    text not start a call (the token that completed the trigger carried bytes the format does
    not allow), the answer ends there, ``broken`` saying why.

The tool-call format, as Qwen2.5 / Qwen3 / Hermes write it (the prompt shows it through the
model's own chat template when that is tool-aware in this form, else in the generic text form:
:mod:`.local.prompts`): one block per call, blocks one after another for parallel calls::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``arguments`` matches the named tool's ``parameters`` schema. :func:`parse_tool_calls` reads
such an answer back.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidConstraint
from .base import Constraint

__all__ = ["TOOL_CALL_CLOSE", "TOOL_CALL_OPEN", "ConstraintState", "Grammars", "ToolCall",
           "advance", "fill_masks", "grammar_text", "parse_tool_calls", "tag_tokens"]

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
# JSON as ``json.dumps`` writes it (", " and ": "), no other whitespace: a small model cannot
# wander into endless spaces or newlines, and the answer ends at its closing brace.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ",
                                "key_separator": ": "}
CACHE_SIZE = 64  # compiled grammars kept (least recently used go first)
_BITS = torch.tensor([1 << i for i in range(32)], dtype=torch.int64).to(torch.int32)


def _llg() -> Any:
    import llguidance

    return llguidance


def _param(constraint: Constraint) -> str:
    return "tools" if constraint.kind == "tool_calls" else "response_format"


def _tool_schema(tool: dict[str, Any]) -> dict[str, Any]:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidConstraint("every tool needs a non-empty string name", param="tools")
    parameters = tool.get("parameters")
    if parameters is None:
        parameters = {"type": "object"}
    if not isinstance(parameters, dict):
        raise InvalidConstraint(f"tool {name!r}: parameters must be a JSON schema object",
                                param="tools")
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def tag_tokens(tokenizer: Any) -> dict[str, int]:
    """The tool-call tags that ``tokenizer`` has as one added token each (Qwen2.5, Qwen3 and
    Hermes vocabularies have ``<tool_call>`` and ``</tool_call>``), and whose text decoding keeps.

    llguidance takes every added token for a special one, which a grammar's string literal
    never matches: without naming these tokens the grammar would refuse the token such a model
    writes a call with (forcing it to spell the tag byte by byte), and a lazy call started with
    it could not be parsed."""
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    return {tag: added[tag] for tag in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
            if tag in added and tokenizer.decode([added[tag]], skip_special_tokens=True) == tag}


def grammar_text(constraint: Constraint, tags: dict[str, int] | None = None) -> str:
    """The llguidance grammar for ``constraint`` (not yet checked: :meth:`Grammars.check`);
    ``tags``: :func:`tag_tokens`, each tag then written as its text or as that token."""
    matcher = _llg().LLMatcher
    kind = constraint.kind
    if kind == "json_schema":
        if not isinstance(constraint.schema, dict):
            raise InvalidConstraint("a json_schema constraint needs a schema object")
        return str(matcher.grammar_from_json_schema(constraint.schema, defaults=JSON_OPTIONS))
    if kind == "json_object":
        return str(matcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS))
    if kind == "regex":
        if not constraint.pattern:
            raise InvalidConstraint("a regex constraint needs a pattern")
        return str(matcher.grammar_from_regex(constraint.pattern))
    if kind == "grammar":
        if not constraint.pattern:
            raise InvalidConstraint("a grammar constraint needs the grammar text")
        return str(matcher.grammar_from_lark(constraint.pattern))
    if kind == "tool_calls":
        if not constraint.tools:
            raise InvalidConstraint("a tool_calls constraint needs at least one tool",
                                    param="tools")
        if constraint.lazy_trigger is not None and not (
                constraint.lazy_trigger and TOOL_CALL_OPEN.startswith(constraint.lazy_trigger)):
            raise InvalidConstraint(
                f"the lazy trigger must start the tool-call format {TOOL_CALL_OPEN!r}, got "
                f"{constraint.lazy_trigger!r}", param="tool_choice")
        schemas = [_tool_schema(t) for t in constraint.tools]
        call = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        # Lark with llguidance's %json: the call's JSON is compiled like a response_format schema.
        repeat = '("\\n" block)*' if constraint.parallel else ""
        tag = {t: json.dumps(t) + (f" | <[{tags[t]}]>" if tags and t in tags else "")
               for t in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE)}
        lark = (f"%llguidance {{}}\n"
                f"start: block {repeat}\n"
                f"block: open \"\\n\" call \"\\n\" close\n"
                f"open: {tag[TOOL_CALL_OPEN]}\n"
                f"close: {tag[TOOL_CALL_CLOSE]}\n"
                f"call: %json {json.dumps({**call, 'x-guidance': JSON_OPTIONS})}\n")
        return str(matcher.grammar_from_lark(lark))
    raise InvalidConstraint(f"unknown constraint kind {kind!r}")


def constraint_key(constraint: Constraint) -> str:
    """A stable hash of what a constraint compiles to (the grammar cache's key)."""
    data = json.dumps([constraint.kind, constraint.schema, constraint.pattern,
                       list(constraint.tools), constraint.parallel], sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()


class Grammars:
    """Compiles constraints for one tokenizer, with a bounded LRU cache; thread-safe.

    ``tokenizer``: a fast transformers tokenizer; ``eos_ids``: the ids that end an answer (the
    matcher allows them once the grammar is complete); ``vocab``: the model's logits width.
    The llguidance tokenizer (about 1.5 s for a 49k vocabulary) is built on first use.
    """

    def __init__(self, tokenizer: Any, eos_ids: Iterable[int], vocab: int, *,
                 cache_size: int = CACHE_SIZE) -> None:
        # the mask's width: the logits', or the tokenizer's when larger (its extra ids never pass)
        self._hf, self._eos, self.vocab = tokenizer, sorted(eos_ids), max(vocab, len(tokenizer))
        self._tags = tag_tokens(tokenizer)
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        # key -> a compiled matcher never advanced (copied per turn), or the compile error
        self._cache: collections.OrderedDict[str, Any | InvalidConstraint] = \
            collections.OrderedDict()
        self.compiled = 0  # grammars compiled (cache misses)
        self.hits = 0
        self.compile_seconds = 0.0

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf, n_vocab=self.vocab, eos_token=self._eos)
            return self._tokenizer

    def check(self, constraint: Constraint) -> None:
        """Raise :class:`InvalidConstraint` when ``constraint`` does not compile."""
        self._compiled(constraint)

    def state(self, constraint: Constraint) -> ConstraintState:
        """A fresh matcher state for one turn (compiling on a cache miss)."""
        return ConstraintState(self, constraint, self._compiled(constraint).deep_copy())

    def _compiled(self, constraint: Constraint) -> Any:
        key = constraint_key(constraint)
        tokenizer = self.tokenizer
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                self.hits += 1
        if found is None:
            found = self._compile(constraint, tokenizer)
            with self._lock:
                self._cache[key] = found
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if isinstance(found, InvalidConstraint):
            raise InvalidConstraint(found.message, param=found.param)
        return found

    def _compile(self, constraint: Constraint, tokenizer: Any) -> Any:
        started = time.perf_counter()
        try:
            text = grammar_text(constraint, self._tags)
            matcher = _llg().LLMatcher(tokenizer, text, log_level=0)
            if matcher.is_error():
                name = {"json_schema": "schema", "json_object": "schema", "regex": "pattern",
                        "grammar": "grammar", "tool_calls": "tool parameters"}[constraint.kind]
                return InvalidConstraint(f"the {name} does not compile: {matcher.get_error()}",
                                         param=_param(constraint))
            return matcher
        except InvalidConstraint as exc:
            return exc
        except (ValueError, TypeError) as exc:  # e.g. a schema that is not JSON-serializable
            return InvalidConstraint(f"the constraint does not compile: {exc}",
                                     param=_param(constraint))
        finally:
            with self._lock:
                self.compiled += 1
                self.compile_seconds += time.perf_counter() - started


class ConstraintState:
    """One turn's matcher; see the module docstring. Used on the scheduler's thread only."""

    def __init__(self, grammars: Grammars, constraint: Constraint, matcher: Any) -> None:
        self.grammars, self.constraint = grammars, constraint
        self._matcher = matcher
        trigger = constraint.lazy_trigger if constraint.kind == "tool_calls" else None
        self._trigger = trigger.encode() if trigger else None
        self.active = self._trigger is None  # a lazy state waits for its trigger
        self._text = bytearray()  # the answer's bytes while waiting for the trigger
        self.done = False  # the grammar is complete and allows nothing more (or it broke)
        self.broken: str | None = None  # why the matcher gave up (a lazy call that cannot parse)

    def fill(self, row: torch.Tensor) -> bool:
        """Write the allowed tokens into ``row`` (int32 words, one bit per token); False when
        this step is unconstrained (a lazy state still waiting), the row then left as it was."""
        if not self.active or self.done:
            return False
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        return True

    def advance(self, token: int) -> None:
        """The sampled ``token`` is the answer's next one."""
        if self.done:
            return
        m = self._matcher
        if self.active:
            if not m.consume_token(token):
                self._give_up(m.get_error())
            elif m.is_stopped():
                self.done = True
            return
        assert self._trigger is not None
        seen = len(self._text)
        self._text += self.grammars.tokenizer.decode_bytes([token])
        at = self._text.find(self._trigger, max(0, seen - len(self._trigger) + 1))
        if at < 0:
            return
        self.active = True  # the call starts: constrain from the trigger's first byte on
        ids = self.grammars.tokenizer.tokenize_bytes(bytes(self._text[at:]))
        if m.try_consume_tokens(ids) != len(ids):
            self._give_up("the text after the trigger does not start a tool call")
        elif m.is_stopped():
            self.done = True

    def _give_up(self, why: str) -> None:
        self.broken, self.done = why or "the matcher failed", True


def fill_masks(states: Sequence[ConstraintState | None], vocab: int,
               device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The allowed tokens of every row of a step, ``(rows, vocab)`` booleans (True: allowed), or
    None when no row is constrained now (so an unconstrained step pays nothing)."""
    if not any(s is not None and s.active and not s.done for s in states):
        return None
    # A mask covers the grammar's vocabulary (the tokenizer's, when it is larger than the logits)
    width = max([vocab, *(s.grammars.vocab for s in states if s is not None)])
    words = (width + 31) // 32
    bitmask = torch.full((len(states), words), -1, dtype=torch.int32)  # all allowed
    for b, s in enumerate(states):
        if s is not None:
            s.fill(bitmask[b])
    allowed = (bitmask[:, :, None] & _BITS) != 0  # (rows, words, 32)
    return allowed.reshape(len(states), words * 32)[:, :vocab].to(device)


def advance(states: Sequence[ConstraintState | None], tokens: Sequence[int]) -> None:
    """Advance every constrained row with its sampled token."""
    for s, t in zip(states, tokens, strict=True):
        if s is not None:
            s.advance(t)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


_DECODER = json.JSONDecoder()


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split an answer into the text before its first call and the calls written in the generic
    format (a block that does not parse as ``{"name", "arguments"}`` ends the calls).

    Each call's JSON is decoded as JSON, not cut at the next closing tag: an argument may well
    contain ``</tool_call>`` inside a string."""
    calls: list[ToolCall] = []
    first = at = text.find(TOOL_CALL_OPEN)
    while at >= 0:
        start = _skip_space(text, at + len(TOOL_CALL_OPEN))
        try:
            data, end = _DECODER.raw_decode(text, start)
        except ValueError:
            break
        end = _skip_space(text, end)
        if not (text.startswith(TOOL_CALL_CLOSE, end) and isinstance(data, dict)
                and isinstance(data.get("name"), str)
                and isinstance(data.get("arguments", {}), dict)):
            break
        calls.append(ToolCall(data["name"], data.get("arguments", {})))
        at = _skip_space(text, end + len(TOOL_CALL_CLOSE))
        if not text.startswith(TOOL_CALL_OPEN, at):
            break
    if not calls:
        return text, []
    return text[:first].rstrip(), calls


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at

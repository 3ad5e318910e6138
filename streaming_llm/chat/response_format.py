"""OpenAI's ``response_format`` (``/v1/chat/completions`` and the socket's ``chat`` frame) as an
engine :class:`~streaming_llm.engines.base.Constraint`.

Accepted shapes (anything else is a 400 ``invalid_response_format`` with ``param``
``response_format``, before anything is stored):

- ``{"type": "text"}`` or absent: no constraint;
- ``{"type": "json_object"}``: any JSON object;
- ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``: an
  answer that validates against ``schema`` (always enforced, whatever ``strict`` says);
- extensions: ``{"type": "regex", "regex": "..."}`` and ``{"type": "grammar", "grammar": "..."}``
  (a Lark grammar in llguidance's dialect), local engine only.

``max_bytes`` bounds the schema (as compact JSON), the regex or the grammar.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ..engines.base import Constraint, check_constraint
from ..errors import InvalidConstraint

__all__ = ["checked_constraint", "constraint_from_response_format"]

PARAM = "response_format"
KINDS = ("text", "json_object", "json_schema", "regex", "grammar")


def _bad(message: str) -> InvalidConstraint:
    return InvalidConstraint(message, param=PARAM)


def _bounded(kind: str, text: str, max_bytes: int) -> None:
    size = len(text.encode())
    if size > max_bytes:
        raise _bad(f"the {kind} is {size} bytes, more than the {max_bytes} allowed "
                   "(STREAMING_LLM_MAX_SCHEMA_BYTES)")


def constraint_from_response_format(value: Any, *, max_bytes: int) -> Constraint | None:
    """The constraint ``value`` asks for (None for plain text); raises InvalidConstraint."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("response_format must be an object such as {\"type\": \"json_object\"}")
    kind = value.get("type")
    if kind not in KINDS:
        raise _bad(f"response_format.type must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise _bad("response_format.json_schema must be an object with a schema "
                       "({\"name\": ..., \"schema\": {...}})")
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise _bad("response_format.json_schema.schema must be a JSON schema object")
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise _bad("response_format.json_schema.name must be a string")
        _bounded("schema", json.dumps(schema, separators=(",", ":")), max_bytes)
        return Constraint("json_schema", schema=schema)
    text = value.get(kind)
    if not isinstance(text, str) or not text:
        raise _bad(f"response_format.{kind} must be a non-empty string")
    _bounded(kind, text, max_bytes)
    return Constraint("regex" if kind == "regex" else "grammar", pattern=text)


async def checked_constraint(value: Any, engine: object, *, max_bytes: int) -> Constraint | None:
    """:func:`constraint_from_response_format`, then the engine's check (a compile, off the event
    loop: the first one builds the grammar library's view of the vocabulary)."""
    constraint = constraint_from_response_format(value, max_bytes=max_bytes)
    if constraint is not None:
        await asyncio.to_thread(check_constraint, engine, constraint)
    return constraint

"""Id validation: agent ids become file names, so they are checked before anything else."""

from __future__ import annotations

import re

from .errors import InvalidId

AGENT_ID_RE = re.compile(r"[a-z0-9_-]{1,64}")
# Conversation ids are made by the server (``conv_<32 hex>``); anything else is refused early.
CONVERSATION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")


def is_agent_id(value: str) -> bool:
    return AGENT_ID_RE.fullmatch(value) is not None


def check_agent_id(value: str) -> str:
    if not is_agent_id(value):
        raise InvalidId(
            f"invalid agent id {value[:80]!r}: use 1-64 lower-case letters, digits, '-' or '_'"
        )
    return value


def check_conversation_id(value: str) -> str:
    if CONVERSATION_ID_RE.fullmatch(value) is None:
        raise InvalidId(f"invalid conversation id {value[:80]!r}")
    return value

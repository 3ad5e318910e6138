"""Limits: how much one request, one socket and the whole server may ask for.

Every limit is a setting (``STREAMING_LLM_MAX_*``) and every refusal is a clear error naming the
limit and the setting that raises it:

========================  =======================================  ===============================
limit                     where                                    refusal
========================  =======================================  ===============================
request body              :class:`~streaming_llm.http.body_limit.  ``413 payload_too_large``
                          BodySizeLimit` (HTTP middleware)
socket frame              :meth:`Limits.check_frame`               ``frame_too_large`` (socket stays
                                                                   open; 4x the limit: uvicorn
                                                                   closes it with 1009)
chat message              :meth:`Limits.check_chat`                ``message_too_large``
``max_new_tokens``        :meth:`Limits.check_chat`                ``max_new_tokens_too_large``
turns queued per socket   the chat socket's reader                 ``busy``
``/v1`` messages          :meth:`Limits.check_messages`            ``message_too_large``,
                                                                   ``too_many_messages``,
                                                                   ``request_too_large``
``/v1`` prompt tokens     :meth:`Limits.check_prompt_tokens`       ``prompt_too_large``
concurrent generations    :class:`~streaming_llm.chat.admission.   waits; past the line ``busy``
                          GenerationGate` (server-wide, per
                          client address)
agent fields              ``agents.AgentIn`` bounds (characters)   ``422 validation_error``
========================  =======================================  ===============================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import Busy, ServiceError
from ..settings import Settings


class LimitExceeded(ServiceError):
    """A request over a limit; ``param`` names the part that is (``messages[0].content``)."""

    code, status = "limit_exceeded", 400

    def __init__(self, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message, code=code)
        self.param = param


def ws_max_size(settings: Settings) -> int:
    """uvicorn's hard cap on a WebSocket message: frames between the protocol limit and this get
    a clear ``frame_too_large`` error and the socket stays open; beyond it the socket is closed."""
    return 4 * settings.max_frame_bytes


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int
    max_message_chars: int
    max_new_tokens: int
    max_queued_turns: int
    max_request_chars: int = 200_000
    max_messages: int = 1000
    max_prompt_tokens: int = 32_768
    max_schema_bytes: int = 65_536  # a response_format's schema, regex or grammar

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(max_frame_bytes=settings.max_frame_bytes,
                   max_message_chars=settings.max_message_chars,
                   max_new_tokens=settings.max_new_tokens_limit,
                   max_queued_turns=settings.max_queued_turns,
                   max_request_chars=settings.max_request_chars,
                   max_messages=settings.max_messages,
                   max_prompt_tokens=settings.max_prompt_tokens,
                   max_schema_bytes=settings.max_schema_bytes)

    def check_frame(self, text: str) -> None:
        # Characters are a lower bound of UTF-8 bytes: encode only when it could matter.
        size = len(text)
        if size <= self.max_frame_bytes // 4:
            return
        if size <= self.max_frame_bytes:
            size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_frame_bytes:
            raise LimitExceeded(
                f"frame of {size} bytes or more is larger than the limit of {self.max_frame_bytes} "
                "bytes (STREAMING_LLM_MAX_FRAME_BYTES)", code="frame_too_large")

    def check_chat(self, message: str, max_new_tokens: int | None, *,
                   param: str | None = None) -> None:
        """Check one chat request (socket frame or HTTP body) against the per-request limits."""
        if len(message) > self.max_message_chars:
            raise LimitExceeded(
                f"message of {len(message)} characters is longer than the limit of "
                f"{self.max_message_chars} (STREAMING_LLM_MAX_MESSAGE_CHARS)",
                code="message_too_large", param=param)
        if max_new_tokens is not None and max_new_tokens > self.max_new_tokens:
            raise LimitExceeded(
                f"options.max_new_tokens={max_new_tokens} is above the server's limit of "
                f"{self.max_new_tokens} (STREAMING_LLM_MAX_NEW_TOKENS_LIMIT)",
                code="max_new_tokens_too_large")

    def check_messages(self, contents: Sequence[str], max_new_tokens: int | None) -> None:
        """A ``/v1`` request carries its whole history: every message obeys the message limit,
        and their count and their characters together have limits of their own."""
        if len(contents) > self.max_messages:
            raise LimitExceeded(
                f"{len(contents)} messages are more than the limit of {self.max_messages} "
                "(STREAMING_LLM_MAX_MESSAGES)", code="too_many_messages", param="messages")
        for i, content in enumerate(contents):
            self.check_chat(content, None, param=f"messages[{i}].content")
        total = sum(len(c) for c in contents)
        if total > self.max_request_chars:
            raise LimitExceeded(
                f"the messages hold {total} characters together, more than the limit of "
                f"{self.max_request_chars} (STREAMING_LLM_MAX_REQUEST_CHARS)",
                code="request_too_large", param="messages")
        self.check_chat("", max_new_tokens)

    def check_prompt_tokens(self, count: int | None) -> None:
        """A ``/v1`` caller's history, as counted by the engine (None: it cannot count)."""
        if count is not None and count > self.max_prompt_tokens:
            raise LimitExceeded(
                f"the messages take {count} prompt tokens, more than the limit of "
                f"{self.max_prompt_tokens} (STREAMING_LLM_MAX_PROMPT_TOKENS)",
                code="prompt_too_large", param="messages")

    def check_queue(self, queued: int) -> None:
        if queued >= self.max_queued_turns:
            raise Busy(
                f"this socket already has {queued} turn(s) waiting behind the running one, the "
                f"limit (STREAMING_LLM_MAX_QUEUED_TURNS); send more when a turn has ended")

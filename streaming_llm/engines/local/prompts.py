"""Rendering a conversation with the chat template and tokenizing it, reusing what is known.

The kept ids of a conversation are the tokenization of its rendered text; a new turn's rendered
prompt normally extends that text, and only the part from the last special token on is
tokenized again (:meth:`Prompts.encode_after`). In dense mode, :meth:`Prompts.fit_dense` leaves
the oldest turns out until the prompt fits the model's context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...errors import ContextTooLong
from ..tool_text import Message, template_messages

__all__ = ["Message", "Prompts", "template_messages"]

class Prompts:
    def __init__(self, tokenizer: Any, boundaries: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.boundaries = boundaries  # special tokens that start a fresh tokenization

    def render(self, messages: list[Message], *, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False
        )

    def agent_prefix(self, messages: list[Message]) -> str:
        """Everything the chat template writes before the first user message, when the
        conversation opens with a system message (the agent's system prompt and Markdown
        context); else "" (a template's own default system text is not the agent's)."""
        if not messages or messages[0]["role"] != "system":
            return ""
        try:
            return self.render(messages[:1], generation_prompt=False)
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
                  max_new: int, context: int) -> tuple[str, list[int], int, int]:
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
            text = self.render([*head, *kept, *new], generation_prompt=True)
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

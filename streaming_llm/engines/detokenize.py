"""Token ids → text pieces for streaming: UTF-8-safe and stop-string aware.

:class:`IncrementalDecoder` turns generated token ids into text pieces as they arrive. It never
emits a broken character: with byte-level tokenizers one CJK character or emoji often spans
several tokens, and decoding a prefix of those gives U+FFFD, so text is held back while the decoded
tail ends in U+FFFD. It decodes a short window of ids (from ``prefix_offset``) rather than single
tokens, because tokenizers such as SentencePiece drop or add a leading space depending on what
precedes a token; both the old and the new window start at the same token, so that effect cancels
out (the approach of text-generation-inference and vLLM). The pieces concatenate to
``tokenizer.decode(ids)``.

:class:`StopMatcher` cuts the text at the first stop string. The stop string itself is never
emitted, and text that could be the start of one is held back until it is known not to be.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded each step
        self._read_offset = 0  # ids before this have been emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that is now final (often ``""``)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        text = self._decode(self.ids[self._prefix_offset:])
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """The text still held back, once no more ids will come (may end in U+FFFD)."""
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        text = self._decode(self.ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self.ids)
        return text[len(prefix):]


class StopMatcher:
    """Feed text pieces; get back what may be shown, and whether a stop string was reached."""

    def __init__(self, stops: Sequence[str] | None) -> None:
        self.stops = [s for s in (stops or []) if s]
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        pending = self._pending + text
        hits = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return pending[:min(hits)]
        hold = max((self._overlap(pending, s) for s in self.stops), default=0)
        self._pending = pending[len(pending) - hold:]
        return pending[:len(pending) - hold]

    def flush(self) -> str:
        """Text held back as a possible stop string start, once the answer ended without one."""
        text, self._pending = ("" if self.stopped else self._pending), ""
        return text

    @staticmethod
    def _overlap(text: str, stop: str) -> int:
        """Length of the longest end of ``text`` that is a proper beginning of ``stop``."""
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                return k
        return 0

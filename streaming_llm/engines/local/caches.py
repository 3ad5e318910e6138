"""Cache planning: which KV cache a turn feeds, laid out how, and what is kept for the next one.

:class:`Caches` is the one owner of the local engine's caches: the conversations' caches kept
between turns (:class:`~.store.ConversationStore`, LRU), the agents' pinned prefixes
(:class:`~.store.PrefixStore`) and the caches that live turns hold now. A turn asks it, on the
scheduler's thread:

``take``
    the conversation's kept cache (the turn owns it until it gives it back with ``keep``);
``pinned`` / ``layout``
    the agent prefix to pin (everything the chat template writes before the first user message)
    and how the cache is laid out for it: sinks = the pinned prefix (at least ``sink_tokens``),
    then as much recent window as fits the trained context. A prefix that leaves the window less
    than a quarter of the cache is refused (:class:`~streaming_llm.errors.AgentContextTooLong`);
``fresh``
    a new cache: a copy of the agent's kept prefix (prefilled once per agent version), or an empty
    one laid out for the agent;
``plan``
    how a cache comes to hold exactly the target ids: keep the longest common prefix, roll back
    (``crop(-n)``) what differs, or start afresh when the cache cannot roll back that far;
``keep`` / ``forget``
    hand the cache back for the next turn, unless the conversation was deleted meanwhile.

The event loop reads it too (health, ``forget``), so the shared parts lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import AgentContextTooLong
from ...settings import Settings
from .prompts import Message, Prompts
from .store import Conversation, ConversationStore, PrefixStore

__all__ = ["Caches", "Layout", "Plan"]


@dataclass(frozen=True)
class Layout:
    """How a streaming conversation's cache is laid out for the agent it talks to."""

    prefix: str  # the pinned agent prefix as rendered; "" when none is pinned
    prefix_ids: list[int]
    sinks: int  # max(sink_tokens, len(prefix_ids))
    window: int


@dataclass(frozen=True)
class Plan:
    """The conversation to feed, how many target ids it holds already (feed the rest) and how
    many of those came from a kept cache (``cached_tokens``)."""

    state: Conversation
    keep: int
    reused: int


@dataclass
class _Live:
    conversation_id: str
    state: Conversation | None
    forgotten: bool = False  # the conversation was deleted while a turn held its cache


class Caches:
    """The local engine's caches; see the module docstring."""

    def __init__(self, settings: Settings, model: Any, prompts: Prompts, *, context: int,
                 window: int) -> None:
        self.settings, self.model, self.prompts = settings, model, prompts
        self.context, self.window = context, window
        self.conversations = ConversationStore(settings.cached_conversations)
        self.prefixes = PrefixStore(settings.shared_prefixes)  # the scheduler's thread only
        self._lock = threading.Lock()  # guards _live and _closed
        self._live: dict[object, _Live] = {}  # by turn: what the turns the scheduler holds hold
        self._closed = False

    # -- a turn's conversation -------------------------------------------------------------------
    def take(self, owner: object, conversation_id: str) -> Conversation | None:
        """Remove and return the conversation's kept cache; ``owner`` (a turn) holds it now."""
        state = self.conversations.take(conversation_id)
        with self._lock:
            self._live[owner] = _Live(conversation_id, state)
        return state

    def hold(self, owner: object, state: Conversation) -> None:
        """``owner`` now holds ``state`` (a fresh or rebuilt cache): health counts its bytes."""
        with self._lock:
            if (live := self._live.get(owner)) is not None:
                live.state = state

    def keep(self, owner: object, state: Conversation | None) -> None:
        """``owner`` is done: keep ``state`` for the conversation's next turn (LRU), unless the
        conversation was deleted meanwhile or the engine closed; None drops it."""
        with self._lock:
            live = self._live.pop(owner, None)
            dropped = live is None or live.forgotten or self._closed
        if state is not None and not dropped:
            assert live is not None
            self.conversations.keep(live.conversation_id, state)

    def forget(self, conversation_id: str) -> None:
        """The conversation was deleted or edited: drop its cache, also the one a turn holds."""
        self.conversations.forget(conversation_id)
        with self._lock:
            for live in self._live.values():
                if live.conversation_id == conversation_id:
                    live.forgotten = True

    @property
    def live(self) -> int:
        """Turns holding a conversation's cache now (taken, not yet kept or dropped)."""
        with self._lock:
            return len(self._live)

    # -- the pinned agent prefix -----------------------------------------------------------------
    def pinned(self, messages: list[Message], prompt_text: str, prompt_ids: list[int],
               ) -> tuple[str, list[int]]:
        """The agent prefix to pin and its ids (a prefix of ``prompt_ids``), or ("", [])."""
        if not self.settings.pin_agent_prefix:
            return "", []
        prefix = self.prompts.agent_prefix(messages)
        if not prefix or not prompt_text.startswith(prefix):
            return "", []
        ids = self.prompts.encode_text(prefix)
        if prompt_ids[:len(ids)] != ids:  # the template tokenizes across the boundary
            return "", []
        return prefix, ids

    def layout(self, prefix: str, prefix_ids: list[int]) -> Layout:
        """Sinks = the pinned prefix (at least ``sink_tokens``), then as much window as fits."""
        sinks = max(self.settings.sink_tokens, len(prefix_ids))
        window = min(self.window, self.context - sinks)
        if 3 * window < sinks:  # the window would be less than a quarter of sinks + window
            raise AgentContextTooLong(
                f"the agent's system prompt and Markdown context take {len(prefix_ids)} tokens, "
                f"which leaves {max(window, 0)} tokens of a {sinks + max(window, 0)}-token cache "
                f"for the conversation (at least a quarter is needed; the model was trained on "
                f"{self.context} positions): shorten the agent's context, or raise "
                "STREAMING_LLM_WINDOW_TOKENS")
        return Layout(prefix, prefix_ids, sinks, window)

    def share_prefix(self, layout: Layout, state: Conversation) -> None:
        """``state`` holds exactly the agent's pinned prefix: keep a copy for its next conversation."""
        self.prefixes.put(layout.prefix, state)

    # -- planning --------------------------------------------------------------------------------
    def fresh(self, layout: Layout | None) -> tuple[Conversation, int]:
        """A fresh cache, and how many ids in it the agent's pinned prefix is (0: nothing to keep).

        With a pinned prefix kept for this agent, a copy of it (so the prefix is prefilled once
        per agent version); else an empty cache laid out for the agent, whose prefix, once fed,
        is kept (:meth:`share_prefix`).
        """
        if layout is None or not self.settings.streaming:
            from transformers import DynamicCache

            return Conversation(cache=DynamicCache(), ids=[]), 0
        if layout.prefix_ids and (shared := self.prefixes.get(layout.prefix)) is not None:
            return shared, 0
        from ..sink_cache import SinkCache

        cache = SinkCache.from_model(self.model, layout.sinks, layout.window)
        keep_prefix = len(layout.prefix_ids) if self.settings.shared_prefixes else 0
        return Conversation(cache=cache, ids=[]), keep_prefix

    @staticmethod
    def plan(state: Conversation | None, target: Sequence[int],
             fresh: Callable[[], Conversation], *, need_logits: bool) -> Plan:
        """How ``state`` comes to have consumed exactly ``target``.

        Keeps the longest common prefix of the kept ids and ``target`` when the cache can be
        rolled back to it, else starts a fresh cache (holding nothing or the agent's pinned
        prefix, a prefix of every target).
        """
        copied: int | None = None  # for a fresh cache: the tokens it got from a kept one
        if state is None:
            state = fresh()
            copied = state.copied
        keep = _common_prefix(state.ids, target)
        if need_logits and keep == len(target):
            keep -= 1  # the last token must go through the model again to give logits
        state.text = None
        if keep < len(state.ids) and not _rollback(state, keep):
            state = fresh()
            keep, copied = len(state.ids), state.copied
            assert list(target[:keep]) == state.ids and keep < len(target)
        return Plan(state, keep, keep if copied is None else min(keep, copied))

    # -- the engine's ----------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.conversations.clear()
        self.prefixes.clear()

    def health(self) -> dict[str, object]:
        """Counts and bytes for ``/health``."""
        states = self.conversations.states() + self.prefixes.states()
        with self._lock:
            states.extend(live.state for live in self._live.values() if live.state is not None)
        return {"cached_conversations": len(self.conversations),
                "kv_bytes": sum(cache_nbytes(s.cache) for s in states),
                "shared_prefixes": len(self.prefixes.states())}


def _rollback(state: Conversation, keep: int) -> bool:
    """Drop the cache's newest tokens so that it holds ``state.ids[:keep]``, if it can.

    ``crop(-n)`` removes the newest ``n`` tokens from a ``DynamicCache`` (every transformers 5.x
    release) and from a :class:`~streaming_llm.engines.sink_cache.SinkCache`, which refuses when
    some of them were evicted.
    """
    try:
        state.cache.crop(keep - len(state.ids))
    except ValueError:
        return False
    del state.ids[keep:]
    return True


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    if len(a) <= len(b) and list(a) == list(b[:len(a)]):  # the usual case, compared in C
        return len(a)
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def cache_nbytes(cache: Any) -> int:
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and hasattr(tensor, "nbytes"):
                total += tensor.nbytes
    return total

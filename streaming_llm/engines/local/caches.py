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

Tiers
    Memory holds at most ``STREAMING_LLM_CACHED_CONVERSATIONS`` caches and
    ``STREAMING_LLM_KV_MEMORY_BYTES`` bytes; the least recently used leaves for the disk tier
    (:mod:`.disk`), written off the scheduler's thread, and on a graceful stop every cached
    conversation is written too. Before a turn is submitted, :meth:`Caches.preload` (on the disk
    tier's thread, awaited by the event loop) brings its conversation back into memory, so the
    scheduler never waits for the disk. A turn's ``usage.cache_source`` says where its cache came
    from: ``memory``, ``disk``, ``rebuilt`` (no usable cache: a bounded rebuild) or ``new``.

Bounded rebuild
    When a conversation with history has no usable cache (never written, killed before the
    write, a file refused, another instance's conversation), :meth:`Caches.plan` rebuilds it from
    the pinned prefix (or the first ``sink_tokens``) plus only the most recent window of the
    history; the middle is counted as evicted without being computed
    (:meth:`~..sink_cache.SinkCache.skip`). The cost is one window's prefill, whatever the
    history's length. It is an approximation: the window's keys are computed without the evicted
    text in view, where the kept cache had seen it (docs/engines.md).

The event loop reads it too (health, ``forget``), so the shared parts lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import AgentContextTooLong
from ...settings import Settings
from .disk import DiskTier
from .prompts import Message, Prompts, Tools
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
    many of those came from a kept cache (``cached_tokens``).

    ``skip`` (a bounded rebuild): after ``skip[0]`` of the ids to feed, the ids ``skip[1]`` are
    counted as evicted without being fed. ``fresh``: the plan had to start a new cache.
    """

    state: Conversation
    keep: int
    reused: int
    skip: tuple[int, tuple[int, ...]] | None = None
    fresh: bool = False


@dataclass
class TierCounts:
    """Where turns found their caches (``/health``, ``/metrics``)."""

    memory: int = 0
    disk: int = 0
    rebuilt: int = 0
    new: int = 0


@dataclass
class _Live:
    conversation_id: str
    state: Conversation | None
    forgotten: bool = False  # the conversation was deleted while a turn held its cache


class Caches:
    """The local engine's caches; see the module docstring."""

    def __init__(self, settings: Settings, prompts: Prompts, new_cache: Callable[[int, int], Any],
                 *, context: int, window: int, memory_bytes: int | None = None,
                 disk: DiskTier | None = None) -> None:
        self.settings, self.prompts = settings, prompts
        # A sink cache of (sinks, window): the torch runtime's SinkCache, or llama.cpp's SeqCache
        self.new_cache = new_cache
        self.context, self.window = context, window
        self.conversations = ConversationStore(settings.cached_conversations, memory_bytes)
        self.prefixes = PrefixStore(settings.shared_prefixes)
        self.disk = disk if disk is not None and disk.enabled else None
        self.counts = TierCounts()
        self._lock = threading.Lock()  # guards _live, _closed and counts
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
            state.source = "memory"
            self._spill(self.conversations.keep(live.conversation_id, state))

    def forget(self, conversation_id: str) -> None:
        """The conversation was deleted: drop its cache, in memory, on disk and the one a turn
        holds."""
        self.conversations.forget(conversation_id)
        if self.disk is not None:
            self.disk.remove(conversation_id)
        with self._lock:
            for live in self._live.values():
                if live.conversation_id == conversation_id:
                    live.forgotten = True

    def preload(self, conversation_id: str) -> None:
        """Bring the conversation's cache into memory from the disk tier, if it is there (on the
        caller's thread, which waits for the read: the event loop awaits this in a thread, the
        scheduler never calls it)."""
        if self.disk is None or conversation_id in self.conversations:
            return
        with self._lock:
            if any(live.conversation_id == conversation_id for live in self._live.values()):
                return  # a turn holds it; it comes back to memory when that turn ends
        state = self.disk.reclaim(conversation_id)  # handed over, not written yet
        if state is None:
            state = self.disk.load(conversation_id).result()
        if state is not None:
            self._spill(self.conversations.keep(conversation_id, state))

    def counted(self, source: str) -> None:
        with self._lock:
            setattr(self.counts, source, getattr(self.counts, source) + 1)

    def _spill(self, evicted: list[tuple[str, Conversation]]) -> None:
        """Conversations that left memory go to the disk tier (written on its thread)."""
        if self.disk is None:
            return
        for cid, state in evicted:
            if (park := getattr(state.cache, "park", None)) is not None:
                park()  # llama.cpp: out of its sequence into bytes, which the disk tier writes
            self.disk.save_later(cid, state, self.prefixes.peek(state.prefix)
                                 if state.prefix else None)

    @property
    def live(self) -> int:
        """Turns holding a conversation's cache now (taken, not yet kept or dropped)."""
        with self._lock:
            return len(self._live)

    # -- the pinned agent prefix -----------------------------------------------------------------
    def pinned(self, messages: list[Message], prompt_text: str, prompt_ids: list[int],
               tools: Tools = None) -> tuple[str, list[int]]:
        """The agent prefix to pin and its ids (a prefix of ``prompt_ids``), or ("", []);
        ``tools`` as the prompt was rendered with (a tool-aware template describes them there)."""
        if not self.settings.pin_agent_prefix:
            return "", []
        prefix = self.prompts.agent_prefix(messages, tools)
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
        cache = self.new_cache(layout.sinks, layout.window)
        keep_prefix = len(layout.prefix_ids) if self.settings.shared_prefixes else 0
        return Conversation(cache=cache, ids=[]), keep_prefix

    def plan(self, state: Conversation | None, target: Sequence[int],
             fresh: Callable[[], Conversation], *, need_logits: bool, reserve: int = 0) -> Plan:
        """How ``state`` comes to have consumed exactly ``target``.

        Keeps the longest common prefix of the kept ids and ``target`` when the cache can be
        rolled back to it, else starts a fresh cache (holding nothing or the agent's pinned
        prefix, a prefix of every target) and rebuilds it bounded: the sinks, then only the most
        recent window of ``target`` (less ``reserve`` answer tokens, at most half the window),
        the middle counted as evicted.
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
        reused = keep if copied is None else min(keep, copied)
        if copied is None:
            return Plan(state, keep, reused)
        return Plan(state, keep, reused, skip=self._bounded(state, target, keep, reserve),
                    fresh=True)

    @staticmethod
    def _bounded(state: Conversation, target: Sequence[int], keep: int, reserve: int,
                 ) -> tuple[int, tuple[int, ...]] | None:
        """For a fresh sink cache: the ids to count as evicted instead of feeding them."""
        cache = state.cache
        if not hasattr(cache, "skip"):
            return None  # dense: the prompt already fits the context (oldest turns dropped)
        head = max(keep, cache.sink_tokens)  # fed first: the sinks
        window = cache.window_tokens
        tail = len(target) - (window - min(reserve, window // 2))  # fed last: the recent window
        if tail <= head:
            return None
        return head - keep, tuple(target[head:tail])

    # -- the engine's ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop keeping caches; with a disk tier, write every cached conversation first (a
        graceful stop: the next start finds them)."""
        with self._lock:
            self._closed = True
        kept = self.conversations.clear()
        if self.disk is not None:
            self.disk.close([(cid, state, self.prefixes.peek(state.prefix)
                              if state.prefix else None) for cid, state in kept])
        self.prefixes.clear()

    def health(self) -> dict[str, object]:
        """Counts, bytes and timings per tier for ``/health`` (and ``/metrics``)."""
        states = self.conversations.states() + self.prefixes.states()
        with self._lock:
            states.extend(live.state for live in self._live.values() if live.state is not None)
            counts = TierCounts(**vars(self.counts))
        report: dict[str, object] = {
            "cached_conversations": len(self.conversations),
            "kv_bytes": sum(s.nbytes() for s in states),
            "kv_memory_bytes": self.conversations.nbytes(),
            "kv_memory_bytes_limit": self.conversations.max_bytes or 0,
            "shared_prefixes": len(self.prefixes.states()),
            "cache_hits_memory": counts.memory, "cache_hits_disk": counts.disk,
            "cache_rebuilt": counts.rebuilt, "cache_new": counts.new,
        }
        if self.disk is not None:
            disk = self.disk.snapshot()
            report.update({
                "kv_disk_files": disk.files, "kv_disk_bytes": disk.bytes,
                "kv_disk_bytes_limit": self.disk.budget,
                "kv_disk_writes": disk.writes, "kv_disk_loads": disk.loads,
                "kv_disk_write_seconds": round(disk.write_seconds, 3),
                "kv_disk_load_seconds": round(disk.load_seconds, 3),
                "kv_disk_refused_files": disk.refused, "kv_disk_failed_writes": disk.failed_writes,
            })
        return report


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


"""What the local engine keeps between turns: per-conversation caches and shared agent prefixes.

A :class:`Conversation` is a KV cache plus the ids of every token it has consumed (evicted ones
included), oldest first, and the rendered text whose tokenization those ids are.

:class:`ConversationStore` keeps at most ``limit`` conversations and ``max_bytes`` of caches
(``STREAMING_LLM_CACHED_CONVERSATIONS``, ``STREAMING_LLM_KV_MEMORY_BYTES``); the least recently used
goes first, and :class:`~.caches.Caches` hands it to the disk tier (:mod:`.disk`). It is shared by the event loop (health, forget) and the scheduler's thread (take, keep),
so it locks.

:class:`PrefixStore` keeps, per rendered agent prefix (the system message as the chat template
writes it, so per agent and agent version; one engine serves one model), a cache holding exactly
that prefix. A new conversation starts from a copy instead of prefilling the prefix again. An
edited agent renders a different prefix, hence a new entry; old ones age out (LRU). Used on the
scheduler's thread only.

Both belong to :class:`~.caches.Caches`, which plans with them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class Conversation:
    cache: Any  # SinkCache (streaming) or DynamicCache (dense)
    ids: list[int]  # every token the cache has consumed, oldest first (evicted ones included)
    # The rendered chat text whose tokenization ``ids`` is; None while they are not canonical
    # (mid-answer, after a cancel).
    text: str | None = None
    copied: int = 0  # tokens copied from a kept agent prefix when the conversation started
    source: str = "memory"  # where the next turn finds it: "memory", or "disk" once read back
    prefix: str = ""  # the pinned agent prefix it was laid out for ("" when none)

    def nbytes(self) -> int:
        cache = self.cache
        if hasattr(cache, "nbytes"):
            return int(cache.nbytes())
        total = 0
        for layer in getattr(cache, "layers", ()):
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if tensor is not None and hasattr(tensor, "nbytes"):
                    total += tensor.nbytes
        return total


class ConversationStore:
    """At most ``limit`` conversations and ``max_bytes`` of caches; the least recently used go."""

    def __init__(self, limit: int, max_bytes: int | None = None) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: OrderedDict[str, Conversation] = OrderedDict()
        self._bytes: dict[str, int] = {}

    def take(self, cid: str) -> Conversation | None:
        """Remove and return the conversation's cache (a turn owns it until it keeps it again)."""
        with self._lock:
            self._bytes.pop(cid, None)
            return self._items.pop(cid, None)

    def keep(self, cid: str, state: Conversation) -> list[tuple[str, Conversation]]:
        """Keep ``state``; return the conversations that left memory to make room (LRU first)."""
        if self.limit == 0:
            return [(cid, state)]
        size = state.nbytes()
        with self._lock:
            self._items[cid] = state
            self._items.move_to_end(cid)
            self._bytes[cid] = size
            evicted = []
            while self._items and (len(self._items) > self.limit or (
                    self.max_bytes is not None and sum(self._bytes.values()) > self.max_bytes)):
                old, gone = self._items.popitem(last=False)
                self._bytes.pop(old, None)
                evicted.append((old, gone))
            return evicted

    def forget(self, cid: str) -> None:
        with self._lock:
            self._bytes.pop(cid, None)
            self._items.pop(cid, None)

    def clear(self) -> list[tuple[str, Conversation]]:
        with self._lock:
            items = list(self._items.items())
            self._items.clear()
            self._bytes.clear()
            return items

    def __contains__(self, cid: object) -> bool:
        with self._lock:
            return cid in self._items

    def __getitem__(self, cid: str) -> Conversation:
        with self._lock:
            return self._items[cid]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def nbytes(self) -> int:
        with self._lock:
            return sum(self._bytes.values())

    def states(self) -> list[Conversation]:
        with self._lock:
            return list(self._items.values())


class PrefixStore:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()  # the disk tier peeks from its own thread
        self._items: OrderedDict[str, Conversation] = OrderedDict()

    def get(self, prefix: str) -> Conversation | None:
        """A fresh copy of the conversation holding exactly ``prefix``, if kept."""
        with self._lock:
            kept = self._items.get(prefix)
            if kept is None:
                return None
            self._items.move_to_end(prefix)
        return Conversation(cache=kept.cache.clone(), ids=list(kept.ids), copied=len(kept.ids),
                            prefix=prefix)

    def peek(self, prefix: str) -> Conversation | None:
        """The kept prefix itself (never changed once kept: safe to read, never to write)."""
        with self._lock:
            return self._items.get(prefix)

    def put(self, prefix: str, state: Conversation) -> None:
        """Keep a copy of ``state``, which holds exactly ``prefix``."""
        if self.limit == 0:
            return
        copy = Conversation(cache=state.cache.clone(), ids=list(state.ids), prefix=prefix)
        with self._lock:
            self._items[prefix] = copy
            self._items.move_to_end(prefix)
            while len(self._items) > self.limit:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def states(self) -> list[Conversation]:
        with self._lock:
            return list(self._items.values())

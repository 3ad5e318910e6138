"""What the local engine keeps between turns: per-conversation caches and shared agent prefixes.

A :class:`Conversation` is a KV cache plus the ids of every token it has consumed (evicted ones
included), oldest first, and the rendered text whose tokenization those ids are.

:class:`ConversationStore` keeps at most ``limit`` conversations; the least recently used goes
first. It is shared by the event loop (health, forget) and the scheduler's thread (take, keep),
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


class ConversationStore:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._items: OrderedDict[str, Conversation] = OrderedDict()

    def take(self, cid: str) -> Conversation | None:
        """Remove and return the conversation's cache (a turn owns it until it keeps it again)."""
        with self._lock:
            return self._items.pop(cid, None)

    def keep(self, cid: str, state: Conversation) -> None:
        if self.limit == 0:
            return
        with self._lock:
            self._items[cid] = state
            self._items.move_to_end(cid)
            while len(self._items) > self.limit:
                self._items.popitem(last=False)

    def forget(self, cid: str) -> None:
        with self._lock:
            self._items.pop(cid, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __contains__(self, cid: object) -> bool:
        with self._lock:
            return cid in self._items

    def __getitem__(self, cid: str) -> Conversation:
        with self._lock:
            return self._items[cid]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def states(self) -> list[Conversation]:
        with self._lock:
            return list(self._items.values())


class PrefixStore:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[str, Conversation] = OrderedDict()

    def get(self, prefix: str) -> Conversation | None:
        """A fresh copy of the conversation holding exactly ``prefix``, if kept."""
        kept = self._items.get(prefix)
        if kept is None:
            return None
        self._items.move_to_end(prefix)
        return Conversation(cache=kept.cache.clone(), ids=list(kept.ids), copied=len(kept.ids))

    def put(self, prefix: str, state: Conversation) -> None:
        """Keep a copy of ``state``, which holds exactly ``prefix``."""
        if self.limit == 0:
            return
        self._items[prefix] = Conversation(cache=state.cache.clone(), ids=list(state.ids))
        self._items.move_to_end(prefix)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def states(self) -> list[Conversation]:
        return list(self._items.values())

"""The per-conversation caches the local engine keeps between turns: a small LRU.

A :class:`Conversation` is a KV cache plus the ids of every token it has consumed (evicted ones
included), oldest first, and the rendered text whose tokenization those ids are. At most
``limit`` conversations are kept; the least recently used goes first. The store is shared by the
event loop (health, forget) and the worker thread (take, keep), so it locks.
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


class ConversationStore:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._items: OrderedDict[str, Conversation] = OrderedDict()

    def take(self, cid: str) -> Conversation | None:
        """Remove and return the conversation's cache (the worker owns it during a turn)."""
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

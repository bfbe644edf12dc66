"""A bounded, thread-safe map that keeps the most recently used entries: the connector's
caches of work that passed (parses, bound plans, name checks), each emptied when what it
was worked out against changes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class RecentlyUsed(Generic[K, V]):
    """At most size entries, the least recently used dropped first. A generation (any
    object, compared by identity) names what the entries hold for: a lookup under a new one
    empties the map, and an entry worked out under an old one is not kept."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._generation: object = None
        self._lock = threading.Lock()

    def get(self, key: K, generation: object = None) -> V | None:
        """The value kept for key under generation (None when there is none)."""
        with self._lock:
            if generation is not self._generation:
                self._entries.clear()
                self._generation = generation
                return None
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: K, value: V, generation: object = None) -> None:
        """Keep value for key, unless generation is no longer the current one."""
        with self._lock:
            if generation is not self._generation:
                return
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

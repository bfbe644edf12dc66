"""Sandbox cursors kept with their TEMP views standing, for the next request that exposes
exactly the same views while the datasets stay as they are (sandbox_session.py takes and
gives them back; each request still runs in a read-only transaction of its own).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import duckdb

log = logging.getLogger(__name__)

# What a cursor's TEMP views are: each view's name and definition (the shaped copy it reads
# named in it), in name order.
ViewKey = tuple[tuple[str, str], ...]
IDLE_CURSORS = 8  # cursors kept with their views standing, across all view sets


class CursorPool:
    """Idle sandbox cursors by the TEMP views they hold, all made under one generation of
    the datasets (a lookup under a new one closes them all); thread-safe. A cursor is taken
    by one request at a time and given back only by a request whose query ran to its end."""

    def __init__(self, size: int = IDLE_CURSORS) -> None:
        self._size = size
        self._idle: OrderedDict[ViewKey, list[duckdb.DuckDBPyConnection]] = OrderedDict()
        self._count = 0
        self._generation: object = None
        self._lock = threading.Lock()

    def take(self, key: ViewKey, generation: object) -> duckdb.DuckDBPyConnection | None:
        """An idle cursor holding exactly the views key names, made under generation."""
        stale: list[duckdb.DuckDBPyConnection] = []
        with self._lock:
            if generation is not self._generation:
                stale = self._drain()
                self._generation = generation
            cursors = self._idle.get(key)
            cursor = cursors.pop() if cursors else None
            if cursor is not None:
                self._count -= 1
                if not cursors:
                    del self._idle[key]
        close_all(stale)
        return cursor

    def give(self, key: ViewKey, generation: object, cursor: duckdb.DuckDBPyConnection) -> None:
        """Keep cursor (out of any transaction) for key, unless generation is past; the
        least recently given cursors beyond the pool's size are closed."""
        surplus = [cursor]
        with self._lock:
            if generation is self._generation and self._size > 0:
                self._idle.setdefault(key, []).append(cursor)
                self._idle.move_to_end(key)
                self._count += 1
                surplus = []
                while self._count > self._size:
                    oldest = next(iter(self._idle))
                    surplus.append(self._idle[oldest].pop(0))
                    self._count -= 1
                    if not self._idle[oldest]:
                        del self._idle[oldest]
        close_all(surplus)

    def clear(self) -> None:
        """Close every idle cursor."""
        with self._lock:
            stale = self._drain()
        close_all(stale)

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def _drain(self) -> list[duckdb.DuckDBPyConnection]:
        cursors = [c for group in self._idle.values() for c in group]
        self._idle.clear()
        self._count = 0
        return cursors


def close_all(cursors: list[duckdb.DuckDBPyConnection]) -> None:
    for cursor in cursors:
        try:
            cursor.close()
        except duckdb.Error:
            log.debug("closing an idle sandbox cursor failed", exc_info=True)


@dataclass(frozen=True)
class SessionCursors:
    """Where a session's cursor comes from: new ones (USE'ing the member's file) and the
    pool of idle ones with their views, valid for the datasets as of generation."""

    new: Callable[[], duckdb.DuckDBPyConnection]
    pool: CursorPool
    generation: object

"""Giving memory back to the system once the server is quiet.

glibc's malloc keeps freed memory in its per-thread arenas; after a burst of requests that
is tens of MB the process holds while idle. `malloc_trim` returns the free pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

QUIET_SECONDS = 10.0


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
        return trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to trim this way


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Return free heap pages to the system (glibc); a no-op elsewhere."""
    if _TRIM is not None:
        _TRIM(0)


class QuietTrimmer:
    """Calls release_free_memory once after activity stops for QUIET_SECONDS."""

    def __init__(self, quiet_seconds: float = QUIET_SECONDS) -> None:
        self._quiet = quiet_seconds
        self._last_count = 0
        self._changed_at: float | None = None

    def observe(self, request_count: int) -> bool:
        """Note the requests served so far; trims (and returns True) once they stop."""
        now = time.monotonic()
        if request_count != self._last_count:
            self._last_count, self._changed_at = request_count, now
            return False
        if self._changed_at is not None and now - self._changed_at >= self._quiet:
            self._changed_at = None
            release_free_memory()
            log.debug("quiet for %.0f s: free memory returned to the system", self._quiet)
            return True
        return False

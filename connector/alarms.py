"""One long-lived thread that runs the connector's timed callbacks (query deadlines, repeated
interrupts).

A thread per query (threading.Timer) cannot start when the process is short of memory,
which is exactly when a deadline or a cancel must still work; one thread started with the
server can.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# A callback returns None when it is done, or the seconds after which to run it again.
AlarmCallback = Callable[[], float | None]


class Alarm:
    """One scheduled callback; cancel() stops it before its next run."""

    def __init__(self, callback: AlarmCallback) -> None:
        self.callback: AlarmCallback | None = callback

    @property
    def cancelled(self) -> bool:
        """Whether cancel() was called."""
        return self.callback is None

    def cancel(self) -> None:
        """Do not run the callback (again)."""
        # Dropping the callback frees what it holds (a query's session) now, not when the
        # alarm's time comes: cancelled deadlines wait in the queue until then.
        self.callback = None


class AlarmClock:
    """Runs callbacks at their time on one thread; callbacks must be short and not block."""

    def __init__(self, name: str = "alarms") -> None:
        self._name = name
        self._queue: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the clock's thread (once; before any call_later under memory pressure)."""
        with self._changed:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def call_later(self, delay: float, callback: AlarmCallback) -> Alarm:
        """Run callback after delay seconds on the clock's thread."""
        alarm = Alarm(callback)
        self._schedule(time.monotonic() + max(0.0, delay), alarm)
        return alarm

    def stop(self) -> None:
        """Stop the thread; alarms not yet run are dropped."""
        with self._changed:
            self._stopped = True
            self._queue.clear()
            self._changed.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _schedule(self, when: float, alarm: Alarm) -> None:
        with self._changed:
            if self._stopped:
                return
            heapq.heappush(self._queue, (when, next(self._order), alarm))
            self._changed.notify()
        if self._thread is None:
            self.start()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._stopped and (
                    not self._queue or self._queue[0][0] > time.monotonic()
                ):
                    wait = self._queue[0][0] - time.monotonic() if self._queue else None
                    self._changed.wait(wait)
                if self._stopped:
                    return
                _, _, alarm = heapq.heappop(self._queue)
            callback = alarm.callback
            if callback is None:
                continue
            try:
                again = callback()
            except Exception:
                # The clock serves every query: one failing callback must not stop it.
                log.exception("a timed callback failed")
                continue
            if again is not None and not alarm.cancelled:
                self._schedule(time.monotonic() + again, alarm)

"""Signals turned into messages the main thread reads when it is ready for them.

A Python signal handler runs in the main thread between two bytecodes, wherever that thread
is: inside `threading.Event.wait` it may hold the event's own (not re-entrant) lock, and in
a flood a handler interrupts another one, so a handler that calls `Event.set` or logs can
deadlock the process for good. Here the handler only raises a flag (one dict store, safe at
any bytecode), and the interpreter wakes the waiting main thread through a socket
(`signal.set_wakeup_fd`) whose bytes are only a wake-up call: they are dropped when a flood
fills the socket, the flags are not.
"""

from __future__ import annotations

import select
import signal
import socket
import time
from collections.abc import Iterable
from types import FrameType, TracebackType
from typing import Any

# A flag raised after the wake-up byte was read is seen at the latest this much later.
CHECK_SECONDS = 1.0


class SignalInbox:
    """Receives the given signals from entry until exit; main thread only. Several arrivals
    of one signal between two reads count as one, as the kernel's pending signals do."""

    def __init__(self, signals: Iterable[signal.Signals]) -> None:
        self._signals = tuple(signals)
        self._raised = dict.fromkeys(self._signals, False)
        self._reader, self._writer = socket.socketpair()
        for end in (self._reader, self._writer):
            end.setblocking(False)
        self._previous: dict[signal.Signals, Any] = {}
        self._previous_fd = -1

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        self._raised[signal.Signals(signum)] = True

    def __enter__(self) -> SignalInbox:
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for number in self._signals:
            self._previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        signal.set_wakeup_fd(self._previous_fd)
        self._reader.close()
        self._writer.close()

    def wait(self, timeout: float | None) -> list[signal.Signals]:
        """The signals received since the last call (in the order given at creation); waits
        up to timeout seconds (None: until one arrives) when none is pending."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            received = self._take()
            if received:
                return received
            pause = CHECK_SECONDS if deadline is None else deadline - time.monotonic()
            if pause <= 0:
                return []
            readable, _, _ = select.select([self._reader], [], [], min(pause, CHECK_SECONDS))
            if readable:
                self._drain()

    def _take(self) -> list[signal.Signals]:
        # A flag raised between the test and the reset merges with the one already seen.
        received = [number for number in self._signals if self._raised[number]]
        for number in received:
            self._raised[number] = False
        return received

    def _drain(self) -> None:
        while True:
            try:
                if not self._reader.recv(4096):
                    return
            except BlockingIOError:
                return

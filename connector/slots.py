"""Query slots: how many queries run at once, in total and per member.

A slot is taken when a query is admitted and given back as soon as its peer is gone
(cancelled, deadline passed, stream ended for stalling), not when DuckDB notices the
interrupt, which can take seconds. So that queries still stopping in DuckDB cannot pile up,
a second bound counts DuckDB executions until they really end: at most twice the number of
slots. A new query whose slot is free waits briefly for an execution to finish stopping
rather than being refused, since stopping ones end within a few seconds.

A query over the limit waits in a bounded queue (queue_length waiting at most, each for
queue_seconds at most) rather than being refused at once: bursts of peers are served in turn,
each member's queries in their order of arrival (a new query does not pass a waiting one of
its member, and a freed slot goes to the member's earliest place), so a wait is as long as
the queries ahead of it take, not a draw that some lose for longer than queue_seconds.
One member may fill the whole queue while nobody else waits; when another member's query
finds it full, the member holding the most places gives up its latest one (that query is
refused), so no member can keep the others out of the queue.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from connector.errors import QueryTimeout, ResourceExhausted

log = logging.getLogger(__name__)

EXECUTION_WAIT_SECONDS = 5.0  # longer than DuckDB takes to notice an interrupt (about 3 s)
ADMISSION_WAIT_SECONDS = 0.5  # covers a peer that left a moment ago and is not yet noticed
QUEUE_LENGTH = 64  # queries waiting for a slot at most (the rest are refused at once)


QUEUE_GIVEN_UP = (
    "your query waited for a slot, but the queue was needed for other members' queries (you "
    "held the most places in it); retry shortly, or send fewer queries at once"
)


@dataclass(eq=False)
class _Place:
    """One query's place in the queue, woken alone when it may take a slot (waking every
    waiting thread on each freed slot cost more than the queries it admitted)."""

    member: str
    turn: threading.Condition
    given_up: bool = False


class QuerySlots:
    """Admits queries within a total and a per-member bound; thread-safe."""

    def __init__(
        self,
        total: int,
        per_member: int,
        queue_length: int = QUEUE_LENGTH,
        queue_seconds: float = ADMISSION_WAIT_SECONDS,
    ) -> None:
        """queue_length queries may wait for a slot, each queue_seconds at most."""
        self.total = total
        self.per_member = min(per_member, total)
        self.max_executing = 2 * total
        self.queue_length = queue_length
        self.queue_seconds = queue_seconds
        self._places: list[_Place] = []  # the queue, in arrival order
        self._admitted = 0
        self._executing = 0
        self._by_member: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # told when an execution ends

    def acquire(
        self,
        member: str,
        admission_wait: float | None = None,
        execution_wait: float = EXECUTION_WAIT_SECONDS,
        deadline_seconds: float | None = None,
    ) -> Slot:
        """A slot for one of member's queries, waiting in the queue up to admission_wait
        (default queue_seconds); ResourceExhausted when none is free by then or the queue
        is full, and QueryTimeout when the peer's deadline passes while waiting."""
        if admission_wait is None:
            admission_wait = self.queue_seconds
        if deadline_seconds is not None:
            admission_wait = min(admission_wait, deadline_seconds)
            execution_wait = min(execution_wait, deadline_seconds)
        with self._changed:
            if not self._free_for(member) or any(p.member == member for p in self._places):
                self._queue(member, admission_wait)
            if self._by_member[member] >= self.per_member:
                raise ResourceExhausted(
                    f"you already run {self.per_member} queries at once on this connector, "
                    "the most one member may; wait for one to finish"
                )
            if self._admitted >= self.total:
                raise ResourceExhausted(
                    "this connector is answering its maximum number of queries; retry shortly"
                )
            self._admitted += 1
            self._by_member[member] += 1
            slot = Slot(self, member)
            if not self._changed.wait_for(
                lambda: self._executing < self.max_executing, execution_wait
            ):
                slot.leave()
                if deadline_seconds is not None and execution_wait >= deadline_seconds:
                    raise QueryTimeout(
                        "the query's deadline passed while it waited for this connector to "
                        "finish stopping abandoned queries"
                    )
                raise ResourceExhausted(
                    "this connector is still stopping abandoned queries; retry shortly"
                )
            self._executing += 1
        return slot

    def _queue(self, member: str, seconds: float) -> None:
        """Wait (lock held by the caller) until a slot is free for member, seconds at most."""
        if len(self._places) >= self.queue_length and not self._make_room_for(member):
            raise ResourceExhausted(
                f"no query slot is free and the queue of waiting queries is full "
                f"({len(self._places)} waiting); retry shortly"
            )
        place = _Place(member, threading.Condition(self._lock))
        self._places.append(place)
        first = False
        try:
            place.turn.wait_for(
                lambda: place.given_up or (self._free_for(member) and self._first_of(place)),
                seconds,
            )
            first = not place.given_up and self._first_of(place)
        finally:
            if not place.given_up:
                self._places.remove(place)
                self._wake_turns()  # the member's next place may be first now
        if place.given_up:
            raise ResourceExhausted(QUEUE_GIVEN_UP)
        if not first and self._free_for(member):
            raise ResourceExhausted(
                f"your queries waiting ahead of this one did not all get a slot within "
                f"{seconds:g} s; retry shortly, or send fewer queries at once"
            )

    def _make_room_for(self, member: str) -> bool:
        """Take the latest place of the member holding the most, if it holds more than
        member would with one more; True when a place was freed."""
        if not self._places:
            return False
        held = Counter(place.member for place in self._places)
        most, count = held.most_common(1)[0]
        if most == member or count <= held[member] + 1:
            return False
        latest = next(p for p in reversed(self._places) if p.member == most)
        latest.given_up = True
        self._places.remove(latest)
        latest.turn.notify()
        return True

    def _wake_turns(self) -> None:
        """Wake each member's earliest place if a slot is free for it (lock held)."""
        seen: set[str] = set()
        for place in self._places:
            if place.member not in seen:
                seen.add(place.member)
                if self._free_for(place.member):
                    place.turn.notify()

    def _first_of(self, place: _Place) -> bool:
        """Whether place is its member's earliest place in the queue (lock held)."""
        return next(p for p in self._places if p.member == place.member) is place

    def waiting(self) -> int:
        """Queries waiting for a slot now."""
        with self._changed:
            return len(self._places)

    def _free_for(self, member: str) -> bool:
        return self._admitted < self.total and self._by_member[member] < self.per_member

    def in_use(self, member: str | None = None) -> int:
        """Admitted queries (of member, when given)."""
        with self._changed:
            return self._admitted if member is None else self._by_member[member]

    def executing(self) -> int:
        """Queries DuckDB may still be running, including those stopping."""
        with self._changed:
            return self._executing

    def _leave(self, member: str) -> None:
        with self._changed:
            self._admitted -= 1
            self._by_member[member] -= 1
            if not self._by_member[member]:
                del self._by_member[member]
            self._wake_turns()

    def _end_execution(self) -> None:
        with self._changed:
            self._executing -= 1
            self._changed.notify_all()


class Slot:
    """One admitted query: leave() when its peer is gone, finish() when DuckDB is done."""

    def __init__(self, slots: QuerySlots, member: str) -> None:
        self._slots = slots
        self._member = member
        self._lock = threading.Lock()
        self._left = False
        self._finished = False

    def leave(self) -> None:
        """The peer is gone (or the query ended): the slot is free for others. Idempotent."""
        with self._lock:
            if self._left:
                return
            self._left = True
        self._slots._leave(self._member)

    def finish(self) -> None:
        """DuckDB no longer runs the query: frees the slot and the execution. Idempotent."""
        self.leave()
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._slots._end_execution()


class Stallable(Protocol):
    """A running answer the stall watch can end."""

    @property
    def done(self) -> bool: ...

    def waiting_for_peer(self) -> float: ...

    def stall(self) -> None: ...


class StallWatch:
    """Ends answers whose peer has not taken the next piece for stall_seconds, freeing
    their slot (a peer that opens streams and never reads would otherwise hold them)."""

    def __init__(self, stall_seconds: float) -> None:
        self.stall_seconds = stall_seconds
        self._runs: set[Stallable] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        """Start the watch's thread; the server does so at start, while memory is plentiful,
        so that answers are still watched when no new thread can start."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="stall-watch", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Stop watching (the server is stopping)."""
        self._stopped.set()

    def watch(self, run: Stallable) -> None:
        """Watch run until it is done."""
        with self._lock:
            self._runs.add(run)
        self.start()

    def _loop(self) -> None:
        interval = min(1.0, self.stall_seconds / 4)
        while not self._stopped.wait(interval):
            with self._lock:
                self._runs = {r for r in self._runs if not r.done}
                stalled = [r for r in self._runs if r.waiting_for_peer() > self.stall_seconds]
            for run in stalled:
                try:
                    run.stall()
                except Exception:
                    # The watch must outlive one answer that fails to end.
                    log.exception("could not end a stalled answer")

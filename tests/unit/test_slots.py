"""Query slots: a total and a per-member bound, freed when the peer leaves, while the
number of DuckDB executions (including those still stopping) stays bounded."""

from __future__ import annotations

import threading
import time

import pytest

from connector.errors import ResourceExhausted
from connector.slots import QuerySlots


def test_one_member_cannot_take_every_slot() -> None:
    slots = QuerySlots(total=4, per_member=2)
    held = [slots.acquire("a"), slots.acquire("a")]
    with pytest.raises(ResourceExhausted, match="the most one member may"):
        slots.acquire("a", admission_wait=0)
    held += [slots.acquire("b"), slots.acquire("c")]
    with pytest.raises(ResourceExhausted, match="maximum number of queries"):
        slots.acquire("d", admission_wait=0)
    held[0].finish()
    slots.acquire("d", admission_wait=0)
    assert (slots.in_use(), slots.in_use("a")) == (4, 1)


def test_a_slot_is_free_when_the_peer_leaves_but_executions_stay_bounded() -> None:
    slots = QuerySlots(total=1, per_member=1)
    first = slots.acquire("a")
    first.leave()  # the peer is gone; DuckDB still stops the query
    second = slots.acquire("b", admission_wait=0)
    second.leave()
    assert (slots.in_use(), slots.executing()) == (0, 2)
    with pytest.raises(ResourceExhausted, match="still stopping"):
        slots.acquire("c", admission_wait=0, execution_wait=0.05)
    assert (slots.in_use(), slots.executing()) == (0, 2)
    threading.Timer(0.2, first.finish).start()
    started = time.monotonic()
    third = slots.acquire("c", admission_wait=0, execution_wait=5)
    assert 0.1 < time.monotonic() - started < 3
    assert slots.executing() == 2
    for slot in (second, third, third):
        slot.finish()  # finishing twice changes nothing
    assert (slots.in_use(), slots.executing()) == (0, 0)


def test_a_query_waits_briefly_for_a_slot_its_previous_peer_just_left() -> None:
    slots = QuerySlots(total=1, per_member=1)
    first = slots.acquire("a")
    threading.Timer(0.1, first.leave).start()
    slots.acquire("a", admission_wait=2)
    assert slots.in_use("a") == 1


def test_concurrent_acquires_never_pass_the_bounds() -> None:
    slots = QuerySlots(total=5, per_member=2)
    peak = {"in_use": 0, "member": 0}
    errors: list[str] = []

    def worker(member: str) -> None:
        for _ in range(50):
            try:
                slot = slots.acquire(member, admission_wait=0.01, execution_wait=0.01)
            except ResourceExhausted as exc:
                errors.append(str(exc))
                continue
            peak["in_use"] = max(peak["in_use"], slots.in_use())
            peak["member"] = max(peak["member"], slots.in_use(member))
            slot.leave()
            slot.finish()

    threads = [threading.Thread(target=worker, args=(f"m{i % 3}",)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak["in_use"] <= 5 and peak["member"] <= 2
    assert (slots.in_use(), slots.executing()) == (0, 0)


def _wait_in_queue(slots: QuerySlots, member: str, outcomes: list[str]) -> threading.Thread:
    def wait() -> None:
        try:
            slots.acquire(member, admission_wait=10).finish()
            outcomes.append(f"{member}: admitted")
        except ResourceExhausted as refused:
            outcomes.append(f"{member}: {refused.message[:40]}")

    thread = threading.Thread(target=wait)
    thread.start()
    return thread


def test_one_member_may_fill_the_queue_but_not_keep_another_member_out() -> None:
    slots = QuerySlots(total=1, per_member=1, queue_length=3)
    running = slots.acquire("a")
    outcomes: list[str] = []
    waiters = []
    for _ in range(3):
        waiters.append(_wait_in_queue(slots, "a", outcomes))
        while slots.waiting() < len(waiters):
            time.sleep(0.01)
    waiters.append(_wait_in_queue(slots, "b", outcomes))  # a gives up its latest place
    while not outcomes:
        time.sleep(0.01)
    assert len(outcomes) == 1 and outcomes[0].startswith("a: your query waited for a slot")
    waiters.append(_wait_in_queue(slots, "c", outcomes))  # a held 2 places, c none
    while len(outcomes) < 2:
        time.sleep(0.01)
    assert outcomes[1].startswith("a: your query waited for a slot")
    # One place each now: a fourth member would take nobody's place.
    with pytest.raises(ResourceExhausted, match="queue of waiting queries is full"):
        slots.acquire("d", admission_wait=1)
    assert slots.waiting() == 3
    running.finish()
    for waiter in waiters:
        waiter.join(timeout=10)
    assert sorted(outcomes[2:]) == ["a: admitted", "b: admitted", "c: admitted"]


def test_no_queue_refuses_at_once() -> None:
    slots = QuerySlots(total=1, per_member=1, queue_length=0)
    held = slots.acquire("a")
    for member in ("a", "b"):
        with pytest.raises(ResourceExhausted, match="queue of waiting queries is full"):
            slots.acquire(member, admission_wait=1)
    held.finish()


def test_a_members_queries_are_admitted_in_their_order_of_arrival() -> None:
    slots = QuerySlots(total=2, per_member=1, queue_length=8)
    running = slots.acquire("a")
    order: list[int] = []
    lock = threading.Lock()

    def wait(n: int) -> None:
        slot = slots.acquire("a", admission_wait=10)
        with lock:
            order.append(n)
        slot.finish()

    waiters = []
    for n in range(4):
        waiters.append(threading.Thread(target=wait, args=(n,)))
        waiters[-1].start()
        while slots.waiting() < n + 1:
            time.sleep(0.01)
    running.finish()
    for waiter in waiters:
        waiter.join(timeout=10)
    assert order == [0, 1, 2, 3]


def test_a_new_query_does_not_pass_a_waiting_one_of_its_member() -> None:
    slots = QuerySlots(total=2, per_member=1, queue_length=8)
    running = slots.acquire("a")
    admitted: list[str] = []
    waiter = threading.Thread(target=lambda: admitted.append(_admit(slots, "queued")))
    waiter.start()
    while slots.waiting() < 1:
        time.sleep(0.01)
    # The slot frees and a new query of the same member comes before the waiter wakes
    # (the lock is reentrant: this thread goes on holding it).
    with slots._changed:
        running.finish()
        with pytest.raises(ResourceExhausted):
            slots.acquire("a", admission_wait=0)
    waiter.join(timeout=10)
    assert admitted == ["queued"]
    assert slots.in_use() == 0


def _admit(slots: QuerySlots, name: str) -> str:
    slots.acquire("a", admission_wait=10).finish()
    return name

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

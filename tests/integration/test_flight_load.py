"""Many requests of one member on the Flight SQL port: a DoGet that finds the member's share
of answers still being sent waits for one to end (as a query waits for a slot), within the
slots' queue bounds, instead of being refused at once; a refusal after the wait is on record."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pyarrow import flight

from connector.audit_chain import read_entries
from connector.config import load_settings
from connector.server import RunningServer
from tests.conftest import Member, Space
from tests.integration.test_flight_sql import (
    PURPOSE,
    fetch,
    flight_client,
    flight_space,
    headers,
    statement,
)
from tests.integration.test_flight_stop import hold_unread

TINY = "SELECT plant, defects FROM part_defects"


@pytest.fixture(scope="module")
def load_space(
    module_dir: Path, dataspace: Path, module_serve: Callable[[Member], RunningServer]
) -> Space:
    return flight_space(module_dir, dataspace, module_serve)


@pytest.fixture
def one_answer_each(load_space: Space) -> Iterator[Space]:
    """load_space with one answer (and query) at once per member; put back afterwards."""
    slots = load_space.server.provider.slots
    saved = (slots.per_member, slots.queue_seconds)
    slots.per_member = 1
    try:
        yield load_space
    finally:
        slots.per_member, slots.queue_seconds = saved


def ticket(client: flight.FlightClient) -> flight.Ticket:
    return client.get_flight_info(statement(TINY), headers(PURPOSE)).endpoints[0].ticket


def test_a_doget_waits_for_the_members_answer_being_sent_to_end(one_answer_each: Space) -> None:
    space = one_answer_each
    space.server.provider.slots.queue_seconds = 20.0
    client = flight_client(space.server, space.grantee)
    held = hold_unread(client)
    waiting = ticket(client)
    rows: list[int] = []
    asker = threading.Thread(
        target=lambda: rows.append(fetch(client.do_get(waiting)).table.num_rows)
    )
    asker.start()
    time.sleep(0.5)
    assert not rows, "answered while the member's share of answers was still being sent"
    held.cancel()  # the peer gives up its first answer: the waiting one goes on
    asker.join(timeout=20)
    assert rows == [200]


def test_a_doget_still_waiting_after_the_queue_time_is_refused_on_record(
    one_answer_each: Space,
) -> None:
    space = one_answer_each
    space.server.provider.slots.queue_seconds = 0.3
    client = flight_client(space.server, space.grantee)
    held = hold_unread(client)
    try:
        waiting = ticket(client)
        began = time.monotonic()
        with pytest.raises(flight.FlightServerError, match=r"none ended within 0\.3 s"):
            client.do_get(waiting).read_all()
        assert time.monotonic() - began >= 0.3
    finally:
        held.cancel()
    entries = [
        e
        for e in read_entries(load_settings(space.provider.home).audit_log)
        if e.get("kind") == "query" and e.get("type") == "request"
    ]
    refused = [e for e in entries if "none ended within" in " ".join(e["reasons"])]
    assert [(e["member_id"], e["outcome"]) for e in refused] == [("supplier-a", "exhausted")]

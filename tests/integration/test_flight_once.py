"""A Flight SQL query is decided once: DoGet runs its ticket's query on the decision
GetFlightInfo took (and a prepared statement's runs on CreatePreparedStatement's) while
nothing that decision depends on changed; a reload, a revocation, a data commit or the clock
passing a policy's validity between the two calls makes it decided again, as at first."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyarrow import flight

from connector.audit_chain import read_entries
from connector.config import Revocations, load_settings
from connector.errors import PermissionDenied
from connector.flight_tickets import POLICIES_CHANGED
from connector.server import RunningServer
from tests.conftest import Member, Space, home_put_back, run_cli, write_defects_csv
from tests.integration.test_flight_sql import (
    PURPOSE,
    fetch,
    flight_client,
    flight_space,
    headers,
    prepare,
    refusal,
    run_prepared,
    statement,
)

SQL = "SELECT plant, defects FROM part_defects"
# What a decision records in a request's audit entry: the same on both wires.
DECIDED = ("datasets", "columns", "decision", "reasons", "policies", "obligations", "versions")


@pytest.fixture(scope="module")
def once_space(
    module_dir: Path, dataspace: Path, module_serve: Callable[[Member], RunningServer]
) -> Space:
    return flight_space(module_dir, dataspace, module_serve)


@pytest.fixture
def restored(once_space: Space) -> Iterator[Space]:
    """once_space, its policies, connector.toml and clock put back afterwards."""
    provider = once_space.server.provider
    clock, revoked = provider.clock, provider.revoked
    with home_put_back(once_space):
        try:
            yield once_space
        finally:
            provider.clock, provider.revoked = clock, revoked


def decisions_taken(space: Space) -> int:
    """Decisions the server's Provider asked for (from the cache or the policy engine)."""
    cache = space.server.provider.decisions
    return cache.hits + cache.misses


def query_entries(member: Member) -> list[dict[str, Any]]:
    return [
        e
        for e in read_entries(load_settings(member.home).audit_log)
        if e.get("kind") == "query" and e.get("type") == "request"
    ]


def ticket(client: flight.FlightClient, sql: str = SQL) -> flight.Ticket:
    return client.get_flight_info(statement(sql), headers(PURPOSE)).endpoints[0].ticket


def test_a_ticket_redeemed_with_nothing_changed_is_decided_once(once_space: Space) -> None:
    client = flight_client(once_space.server, once_space.grantee)
    expected = once_space.peer().query(SQL, PURPOSE)
    before = decisions_taken(once_space)
    answer = fetch(client.do_get(ticket(client)))
    assert decisions_taken(once_space) == before + 1
    assert answer.table.equals(expected)
    grpc_entry, flight_entry = query_entries(once_space.provider)[-2:]
    assert flight_entry["outcome"] == "answered"
    assert {k: flight_entry[k] for k in DECIDED} == {k: grpc_entry[k] for k in DECIDED}


def test_a_prepared_statement_runs_on_its_decision_while_nothing_changed(
    once_space: Space,
) -> None:
    client = flight_client(once_space.server, once_space.grantee)
    expected = once_space.peer().query(SQL, PURPOSE)
    before = decisions_taken(once_space)
    handle = prepare(client, SQL)
    assert run_prepared(client, handle).table.equals(expected)
    assert run_prepared(client, handle).table.equals(expected)
    assert decisions_taken(once_space) == before + 1
    entries = query_entries(once_space.provider)[-2:]
    assert [e["outcome"] for e in entries] == ["answered", "answered"]
    assert all(e["decision"] == "allow" and e["columns"] for e in entries)


def test_a_grant_withdrawn_between_the_two_calls_is_refused_on_record(restored: Space) -> None:
    client = flight_client(restored.server, restored.grantee)
    issued = ticket(client)
    prepared = prepare(client, SQL)
    (restored.provider.home / "policies" / "quality.yaml").unlink()
    restored.server.reload()
    with pytest.raises(flight.FlightUnauthorizedError) as denied:
        client.do_get(issued).read_all()
    assert refusal(denied.value)["reasons"][0] == POLICIES_CHANGED
    entry = query_entries(restored.provider)[-1]
    assert (entry["outcome"], entry["reasons"][0]) == ("denied", POLICIES_CHANGED)
    with pytest.raises(flight.FlightUnauthorizedError):
        run_prepared(client, prepared)  # its decision is not reused either
    assert query_entries(restored.provider)[-1]["outcome"] == "denied"


def test_a_policy_expiring_between_the_two_calls_is_refused_at_doget(restored: Space) -> None:
    provider = restored.server.provider
    until = provider.policies.snapshot.by_id["quality-benchmark"].valid_until
    second = dt.timedelta(seconds=1)
    client = flight_client(restored.server, restored.grantee)
    provider.clock = lambda: until - second
    issued = ticket(client)
    prepared = prepare(client, SQL)
    provider.clock = lambda: until
    with pytest.raises(PermissionDenied) as grpc_denied:
        restored.peer().query(SQL, PURPOSE)
    with pytest.raises(flight.FlightUnauthorizedError) as denied:
        client.do_get(issued).read_all()
    assert refusal(denied.value)["reasons"] == grpc_denied.value.reasons
    assert query_entries(restored.provider)[-1]["outcome"] == "denied"
    with pytest.raises(flight.FlightUnauthorizedError) as prepared_denied:
        run_prepared(client, prepared)
    assert refusal(prepared_denied.value)["reasons"] == grpc_denied.value.reasons


def test_a_revocation_between_the_two_calls_decides_again(restored: Space) -> None:
    client = flight_client(restored.server, restored.grantee)
    rows = restored.peer().query(SQL, PURPOSE).num_rows
    issued = ticket(client)
    provider = restored.server.provider
    # What a reload of connector.toml does (server.py): new revocations, the same policies.
    provider.revoked = Revocations(members=frozenset({"supplier-b"}))
    before = decisions_taken(restored)
    assert fetch(client.do_get(issued)).table.num_rows == rows
    assert decisions_taken(restored) == before + 1


def test_a_data_commit_between_the_two_calls_decides_again(
    once_space: Space, tmp_path: Path
) -> None:
    client = flight_client(once_space.server, once_space.grantee)
    rows = once_space.peer().query(SQL, PURPOSE).num_rows
    issued = ticket(client)
    more = write_defects_csv(tmp_path / "more.csv", 7)
    home = once_space.provider.home
    assert run_cli("ingest", "--home", home, more, "--dataset", "part_defects", "--append") == 0
    before = decisions_taken(once_space)
    answer = fetch(client.do_get(issued))
    assert decisions_taken(once_space) == before + 1
    assert answer.table.num_rows == rows + 7
    expected = once_space.peer().query(SQL, PURPOSE)
    assert answer.table.equals(expected)
    flight_entry, grpc_entry = query_entries(once_space.provider)[-2:]
    assert flight_entry["versions"] == grpc_entry["versions"]


def test_a_reload_that_keeps_the_grant_decides_again_once(once_space: Space) -> None:
    client = flight_client(once_space.server, once_space.grantee)
    issued = ticket(client)
    once_space.server.provider.policies.reload()  # a new snapshot of the same policies
    before = decisions_taken(once_space)
    answer = fetch(client.do_get(issued))
    assert decisions_taken(once_space) == before + 1
    assert answer.table.equals(once_space.peer().query(SQL, PURPOSE))


def test_a_prepared_statement_decided_again_keeps_the_new_decision(once_space: Space) -> None:
    client = flight_client(once_space.server, once_space.grantee)
    expected = once_space.peer().query(SQL, PURPOSE)
    handle = prepare(client, SQL)
    once_space.server.provider.policies.reload()  # a new snapshot of the same policies
    before = decisions_taken(once_space)
    assert run_prepared(client, handle).table.equals(expected)  # decided again
    assert run_prepared(client, handle).table.equals(expected)  # on that decision
    assert decisions_taken(once_space) == before + 1

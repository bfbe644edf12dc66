"""The hostile-SQL tables over Arrow Flight SQL (pyarrow's FlightClient, mutual TLS): every
attack is refused with a Flight error that leaks nothing, and the endpoint goes on answering."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pyarrow import flight

from connector._proto import flight_sql_pb2 as sql_pb
from connector.flight_sql import pack
from connector.server import RunningServer
from tests.conftest import (
    Member,
    Space,
    from_template,
    policy_text,
    space_homes,
    write_defects_csv,
)
from tests.integration.test_flight_sql import flight_client, flight_query, turn_flight_on
from tests.security.test_hostile_sql import PURPOSE, SECRETS, TABLES, over_the_wire

ATTACKS = [attack for table in TABLES for attack in over_the_wire(table, 6)]


LONG_NAME = "supplier_quality_incoming_inspections_2026_plant_regensburg"


def _homes(directory: Path, make: Callable[[str], Member]) -> list[Member]:
    members = space_homes(directory, make)
    provider = members[0]
    # A long dataset name: what a backtracking pattern match needs to take minutes.
    provider.ingest(write_defects_csv(directory / "long.csv", 4), LONG_NAME)
    grant = policy_text("long", members="[supplier-a]", datasets=f"[{LONG_NAME}]")
    provider.write_policy("long.yaml", grant)
    turn_flight_on(provider)
    return members


@pytest.fixture(scope="module")
def flight_space(
    module_dir: Path, dataspace: Path, module_serve: Callable[[Member], RunningServer]
) -> Space:
    provider, grantee, outsider = from_template(
        module_dir / "s", dataspace, "flight-hostile", _homes
    )
    return Space(provider, grantee, outsider, module_serve(provider))


@pytest.fixture(scope="module")
def client(flight_space: Space) -> flight.FlightClient:
    return flight_client(flight_space.server, flight_space.grantee)


@pytest.mark.parametrize(("prop", "sql"), ATTACKS, ids=[p for p, _ in ATTACKS])
def test_attack_over_flight_is_refused_and_the_endpoint_goes_on(
    client: flight.FlightClient, prop: str, sql: str
) -> None:
    with pytest.raises(flight.FlightError) as refused:
        flight_query(client, sql, PURPOSE)
    text = f"{refused.value} {refused.value.extra_info!r}"
    assert "Traceback" not in text, f"{prop}: the refusal shows the server's code: {text}"
    for secret in SECRETS:
        assert secret not in text, f"{prop}: the refusal leaks {secret!r}: {text}"
    answer = flight_query(client, "SELECT count(*) AS n FROM part_defects", PURPOSE)
    assert answer.table["n"][0].as_py() == 200


@pytest.mark.parametrize(
    "pattern",
    ["%_" * 12 + "!", "%i" * 12 + "!", "_%" * 128, "%" * 256 + "z"],
    ids=["many %_", "many %i", "many _%", "all %"],
)
def test_a_table_name_pattern_cannot_stall_the_endpoint(
    client: flight.FlightClient, pattern: str
) -> None:
    # GetTables' LIKE patterns are the peer's: once matched by a backtracking regular
    # expression, "%a%a...b" held the server (and its GIL) for minutes.
    command = sql_pb.CommandGetTables(table_name_filter_pattern=pattern)
    options = flight.FlightCallOptions(timeout=5)
    started = time.monotonic()
    info = client.get_flight_info(flight.FlightDescriptor.for_command(pack(command)), options)
    table = client.do_get(info.endpoints[0].ticket, options).read_all()
    assert time.monotonic() - started < 5
    assert table.column("table_name").to_pylist() == []


def test_a_metadata_command_kept_with_its_ticket_is_small(client: flight.FlightClient) -> None:
    # Tickets are kept by the connector, 64 per member: a metadata ticket must not hold
    # a megabyte of the peer's bytes each.
    command = sql_pb.CommandGetTables(table_types=["TABLE"] * 20_000)
    with pytest.raises(flight.FlightServerError, match="at most 16384 bytes"):
        client.get_flight_info(flight.FlightDescriptor.for_command(pack(command)))

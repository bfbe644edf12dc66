"""The hostile-SQL tables over Arrow Flight SQL (pyarrow's FlightClient, mutual TLS): every
attack is refused with a Flight error that leaks nothing, and the endpoint goes on answering."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pyarrow import flight

from connector.server import RunningServer
from tests.conftest import Member, Space, from_template, space_homes
from tests.integration.test_flight_sql import flight_client, flight_query, turn_flight_on
from tests.security.test_hostile_sql import PURPOSE, SECRETS, TABLES, over_the_wire

ATTACKS = [attack for table in TABLES for attack in over_the_wire(table, 6)]


def _homes(directory: Path, make: Callable[[str], Member]) -> list[Member]:
    members = space_homes(directory, make)
    turn_flight_on(members[0])
    return members


@pytest.fixture(scope="module")
def flight_space(
    module_dir: Path, dataspace: Path, module_serve: Callable[[Member], RunningServer]
) -> Space:
    provider, grantee, outsider = from_template(module_dir / "s", dataspace, "flight-plain", _homes)
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

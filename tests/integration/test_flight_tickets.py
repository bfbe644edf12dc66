"""Flight SQL tickets: single-use, the issuing member's only, short-lived, and void when the
policies that allowed the query change; each refusal is on record. And who gets in at all:
another CA's certificate never completes the handshake; revoked members are refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from pyarrow import flight

from connector.config import DEFAULT_FLIGHT_LISTEN, load_settings
from connector.errors import PermissionDenied, ResourceExhausted
from connector.flight_tickets import HandleBook, Plan
from connector.identity import create_dataspace_ca
from connector.server import RunningServer
from tests.conftest import Member, Space, from_template, init_member, policy_text, run_cli
from tests.integration.test_flight_sql import (
    PURPOSE,
    fetch,
    flight_client,
    flight_homes,
    flight_query,
    headers,
    statement,
    uri,
)

SQL = "SELECT plant, defects FROM part_defects"


@pytest.fixture
def fspace(tmp_path: Path, dataspace: Path, serve: Callable[[Member], RunningServer]) -> Space:
    provider, grantee, outsider = from_template(tmp_path, dataspace, "flight-space", flight_homes)
    return Space(provider, grantee, outsider, serve(provider))


def refusals(member: Member) -> list[dict[str, object]]:
    lines = (member.home / "audit" / "audit.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    return [e for e in entries if e.get("outcome") not in (None, "answered")]


def test_a_ticket_is_redeemed_once_by_its_member_only(fspace: Space) -> None:
    client = flight_client(fspace.server, fspace.grantee)
    info = client.get_flight_info(statement(SQL), headers(PURPOSE))
    ticket = info.endpoints[0].ticket
    assert fetch(client.do_get(ticket)).table.num_rows == 200
    with pytest.raises(flight.FlightUnauthorizedError, match="not valid") as replayed:
        client.do_get(ticket).read_all()
    assert "Traceback" not in str(replayed.value)
    stolen = client.get_flight_info(statement(SQL), headers(PURPOSE)).endpoints[0].ticket
    thief = flight_client(fspace.server, fspace.outsider)
    with pytest.raises(flight.FlightUnauthorizedError, match="not valid"):
        thief.do_get(stolen).read_all()
    with pytest.raises(flight.FlightUnauthorizedError, match="not valid"):
        client.do_get(stolen).read_all()  # shown by another member: void for its owner too
    refused = [(e["member_id"], e["outcome"]) for e in refusals(fspace.provider)]
    assert refused == [("supplier-a", "denied"), ("supplier-b", "denied"), ("supplier-a", "denied")]


def test_a_ticket_is_void_when_the_grant_is_withdrawn_or_changed(fspace: Space) -> None:
    client = flight_client(fspace.server, fspace.grantee)
    changed = client.get_flight_info(statement(SQL), headers(PURPOSE)).endpoints[0].ticket
    narrower = policy_text("quality-benchmark", members="[supplier-a]", version=2)
    fspace.provider.write_policy("quality.yaml", narrower + "limits: {max_rows_per_query: 5}\n")
    fspace.server.reload()
    with pytest.raises(flight.FlightUnauthorizedError, match="policies that allowed"):
        client.do_get(changed).read_all()
    withdrawn = client.get_flight_info(statement(SQL), headers(PURPOSE)).endpoints[0].ticket
    (fspace.provider.home / "policies" / "quality.yaml").unlink()
    fspace.server.reload()
    with pytest.raises(flight.FlightUnauthorizedError, match="policies that allowed"):
        client.do_get(withdrawn).read_all()
    assert [e["outcome"] for e in refusals(fspace.provider)] == ["denied", "denied"]


def test_tickets_expire_and_are_bounded_per_member() -> None:
    now = [0.0]
    book: HandleBook[Plan] = HandleBook(60.0, single_use=True, per_member=2, clock=lambda: now[0])
    plan = Plan("a", PURPOSE, SQL, "r1")
    first = book.issue(plan)
    book.issue(plan)
    with pytest.raises(ResourceExhausted, match="most this connector keeps"):
        book.issue(plan)
    with pytest.raises(ResourceExhausted, match="most this connector keeps"):
        book.check_room("a")  # asked before a new decision is taken
    book.check_room("b")
    book.issue(Plan("b", PURPOSE, SQL, "r2"))  # another member's allowance is its own
    now[0] = 61.0
    with pytest.raises(PermissionDenied):
        book.take(first, "a")
    assert len(book) == 0


def test_another_cas_certificate_never_completes_the_handshake(
    tmp_path: Path, fspace: Space
) -> None:
    other_ca = tmp_path / "other-ca"
    create_dataspace_ca(other_ca, "test-space")  # same data-space name, another key
    stranger = init_member(tmp_path / "strangers", "supplier-a", other_ca)
    client = flight_client(fspace.server, stranger)
    with pytest.raises(flight.FlightUnavailableError):
        flight_query(client, SQL)
    assert refusals(fspace.provider) == []  # it never reached the connector


def test_revoked_members_are_refused_and_a_revoked_serial_closes_the_port(
    fspace: Space,
) -> None:
    config = fspace.provider.home / "connector.toml"
    text = config.read_text()
    config.write_text(text.replace("members = []", 'members = ["supplier-b"]'))
    fspace.server.reload()
    with pytest.raises(flight.FlightUnauthenticatedError, match="revoked"):
        flight_query(flight_client(fspace.server, fspace.outsider), SQL)
    assert flight_query(flight_client(fspace.server, fspace.grantee), SQL).table.num_rows == 200
    config.write_text(text.replace("serials = []", 'serials = ["0a:ff"]'))
    fspace.server.reload()
    with pytest.raises(flight.FlightUnauthenticatedError, match="by serial"):
        flight_query(flight_client(fspace.server, fspace.grantee), SQL)
    outcomes = [(e["member_id"], e["outcome"]) for e in refusals(fspace.provider)]
    assert outcomes == [("supplier-b", "unauthenticated"), ("supplier-a", "unauthenticated")]
    assert uri(fspace.server).startswith("grpc+tls://")


def test_init_writes_the_flight_port_on_by_default(tmp_path: Path, dataspace: Path) -> None:
    made = {
        "default": (),
        "chosen": ("--flight-listen", "0.0.0.0:7443"),
        "off": ("--flight-listen", ""),
    }
    for name, extra in made.items():
        home = tmp_path / name
        assert run_cli("init", home, "--member", f"m-{name}", "--dataspace", dataspace, *extra) == 0
    listens = {name: load_settings(tmp_path / name).flight.listen for name in made}
    assert listens == {"default": DEFAULT_FLIGHT_LISTEN, "chosen": "0.0.0.0:7443", "off": ""}

"""Stopping a server while a Flight SQL peer holds an answer it does not read: pyarrow
cannot cancel that call, so neither stop() nor SIGTERM may wait for it."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pyarrow import flight

from connector.audit_chain import read_entries, verify_log
from connector.identity import load_ed25519_public
from connector.server import RunningServer
from tests.conftest import Member, ServerProcess, Space, from_template
from tests.integration.test_flight_sql import (
    PURPOSE,
    flight_client,
    flight_homes,
    headers,
    statement,
)

# About 80 MB of Arrow: far more than the transport buffers while nobody reads.
LARGE = (
    "SELECT a.plant, a.part_no, a.week, b.part_no AS other FROM part_defects a, "
    "part_defects b, part_defects c WHERE c.defects < 2"
)


def hold_unread(client: flight.FlightClient) -> flight.FlightStreamReader:
    info = client.get_flight_info(statement(LARGE), headers(PURPOSE))
    reader = client.do_get(info.endpoints[0].ticket)
    reader.read_chunk()
    return reader


@pytest.fixture
def fspace(tmp_path: Path, dataspace: Path, serve: Callable[[Member], RunningServer]) -> Space:
    provider, grantee, outsider = from_template(tmp_path, dataspace, "flight-space", flight_homes)
    return Space(provider, grantee, outsider, serve(provider))


@pytest.fixture
def short_queue_fspace(
    tmp_path: Path, dataspace: Path, serve: Callable[[Member], RunningServer]
) -> Space:
    """fspace with queue_seconds 0.3: a request over the member's share is refused after
    waiting that long for a free place (5 s by default), for the same reason."""
    provider, grantee, outsider = from_template(tmp_path, dataspace, "flight-space", flight_homes)
    config = provider.home / "connector.toml"
    text = config.read_text()
    assert "queue_seconds = 5 " in text
    config.write_text(text.replace("queue_seconds = 5 ", "queue_seconds = 0.3 "))
    return Space(provider, grantee, outsider, serve(provider))


def test_stop_does_not_wait_for_a_peer_that_stopped_reading(fspace: Space) -> None:
    client = flight_client(fspace.server, fspace.grantee)
    reader = hold_unread(client)
    # A second answer the peer goes on reading: stopped at the end of the grace.
    info = client.get_flight_info(statement(LARGE), headers(PURPOSE))
    reading = client.do_get(info.endpoints[0].ticket)
    ended: list[BaseException] = []

    def read_on() -> None:
        try:
            while True:
                reading.read_chunk()
                time.sleep(0.01)
        except (flight.FlightError, StopIteration) as error:
            ended.append(error)

    reader_thread = threading.Thread(target=read_on, daemon=True)
    reader_thread.start()
    stopper = threading.Thread(target=fspace.server.stop, kwargs={"grace": 1})
    stopper.start()
    stopper.join(timeout=20)
    assert not stopper.is_alive(), "stop() waits for a peer that does not read"
    reader_thread.join(timeout=10)
    reader.cancel()
    assert ended and "shutting down" in str(ended[0])
    # Both answers are on record, neither lost when the log closed behind them.
    log = fspace.provider.home / "audit" / "audit.jsonl"
    queries = [e for e in read_entries(log) if e.get("kind") == "query" and e["type"] == "request"]
    assert [e["outcome"] for e in queries] == ["shutdown", "shutdown"]
    key = load_ed25519_public(fspace.provider.home / "keys" / "receipt.key.pub")
    verdict = verify_log(log, key)
    assert verdict.intact, verdict.message


@pytest.mark.slow
def test_sigterm_ends_the_process_while_a_flight_peer_does_not_read(
    tmp_path: Path, dataspace: Path
) -> None:
    # The homes of fspace, served only by the process (no in-process server to stop first).
    provider, grantee, _ = from_template(tmp_path, dataspace, "flight-space", flight_homes)
    process = ServerProcess(provider.home, flight_listen="127.0.0.1:0")
    try:
        uri = f"grpc+tls://localhost:{process.flight_port}"
        identity = grantee.identity()
        client = flight.FlightClient(
            uri,
            tls_root_certs=identity.ca_pem,
            cert_chain=identity.cert_pem,
            private_key=identity.key_pem,
        )
        reader = hold_unread(client)
        process.process.send_signal(signal.SIGTERM)
        code = process.exit_code(40)
        assert code == 0, process.log()[-3000:]
        reader.cancel()
    finally:
        process.close()


def test_answers_a_member_does_not_read_count_against_its_share(
    short_queue_fspace: Space,
) -> None:
    fspace = short_queue_fspace
    # pyarrow keeps a call whose peer stopped reading (and its thread) until the peer goes,
    # even once the stall watch stopped the query: one member must not pile them up.
    client = flight_client(fspace.server, fspace.grantee)
    share = fspace.server.provider.slots.per_member
    readers = [hold_unread(client) for _ in range(share)]
    try:
        info = client.get_flight_info(statement(LARGE), headers(PURPOSE))
        with pytest.raises(flight.FlightError, match="answers at once on this port"):
            client.do_get(info.endpoints[0].ticket).read_all()
    finally:
        for reader in readers:
            reader.cancel()

"""`connector serve` as a real process: signals, reloads, and ingesting while it runs."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connector.audit_chain import read_entries
from connector.client import Peer
from connector.errors import PermissionDenied, StoreBusy
from connector.store import list_datasets
from connector.store_ingest import ingest
from tests.conftest import (
    Member,
    ProviderPair,
    ServerProcess,
    run_cli,
    wait_for,
    write_defects_csv,
)

# Each test starts `connector serve` as a new Python process (about 2 s alone).
pytestmark = pytest.mark.slow


@pytest.fixture
def server_process() -> Iterator[Callable[[Member], ServerProcess]]:
    started: list[ServerProcess] = []

    def start(member: Member) -> ServerProcess:
        server = ServerProcess(member.home)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def provider_and_grantee(provider_pair: ProviderPair) -> tuple[Member, Member]:
    return provider_pair()


def test_sigterm_stops_cleanly(
    provider_and_grantee: tuple[Member, Member],
    server_process: Callable[[Member], ServerProcess],
) -> None:
    provider, grantee = provider_and_grantee
    server = server_process(provider)
    with Peer(f"127.0.0.1:{server.port}", grantee.identity()) as peer:
        assert [d.name for d in peer.catalog()] == ["part_defects"]
        with pytest.raises(PermissionDenied):
            peer.query("SELECT * FROM part_defects", "no-such-purpose")
    server.process.send_signal(signal.SIGTERM)
    assert server.exit_code() == 0
    # What an operator compares with the audit log: both requests arrived, both on record.
    assert "stopped after 2 connector requests since start" in server.log()
    entries = [e for e in read_entries(provider.home / "audit" / "audit.jsonl")]
    assert [e.get("kind") for e in entries if e["type"] == "request"] == ["catalog", "query"]


def test_sighup_reloads_policies_at_once(
    provider_and_grantee: tuple[Member, Member],
    server_process: Callable[[Member], ServerProcess],
) -> None:
    provider, grantee = provider_and_grantee
    server = server_process(provider)
    (provider.home / "policies" / "q.yaml").unlink()
    os.kill(server.process.pid, signal.SIGHUP)
    with Peer(f"127.0.0.1:{server.port}", grantee.identity()) as peer:
        wait_for(lambda: peer.catalog() == [], timeout=5)
    assert "SIGHUP received" in server.log()
    server.process.send_signal(signal.SIGINT)
    assert server.exit_code() == 0


def test_a_flood_of_sighups_then_sigterm_stops_cleanly(
    provider_and_grantee: tuple[Member, Member],
    server_process: Callable[[Member], ServerProcess],
) -> None:
    # A handler that takes a lock (Event.set, logging) deadlocks when a signal interrupts the
    # main thread, or another handler, holding that lock: the server then never stops.
    provider, _grantee = provider_and_grantee
    server = server_process(provider)
    flood_until = time.monotonic() + 1.0
    while time.monotonic() < flood_until:
        os.kill(server.process.pid, signal.SIGHUP)
    server.process.send_signal(signal.SIGTERM)
    assert server.exit_code() == 0
    assert "SIGHUP received, reloading" in server.log()
    assert "SIGTERM received, stopping" in server.log()


def test_ingest_while_serving_goes_through_the_server_process(
    tmp_path: Path,
    provider_and_grantee: tuple[Member, Member],
    server_process: Callable[[Member], ServerProcess],
) -> None:
    provider, grantee = provider_and_grantee
    server = server_process(provider)
    database = provider.home / "data.duckdb"
    more = write_defects_csv(tmp_path / "more.csv", 10)
    # Opening the file directly is refused (the server is its single writer) ...
    with pytest.raises(StoreBusy) as busy:
        ingest(database, more, "part_defects", description=None, mode="append")
    assert "connector ingest" in str(busy.value)
    # ... while `connector ingest` hands the file to the server over its socket.
    args = ("ingest", "--home", provider.home, more, "--dataset", "part_defects", "--append")
    assert run_cli(*args) == 0
    assert run_cli("datasets", "--home", provider.home) == 0
    with Peer(f"127.0.0.1:{server.port}", grantee.identity()) as peer:
        assert peer.query("SELECT count(*) AS n FROM part_defects", "quality-benchmarking")[
            "n"
        ].to_pylist() == [210]
        assert [d.version for d in peer.catalog()] == [2]
    server.process.send_signal(signal.SIGTERM)
    assert server.exit_code() == 0
    assert [(d.rows, d.version) for d in list_datasets(database)] == [(210, 2)]
    assert not (provider.home / "state" / "ingest" / "ingest.sock").exists()

"""An OPA server that goes away, comes back empty, answers nonsense or keeps old policies:
requests are refused as UNAVAILABLE (never allowed), health says NOT_SERVING, and both
recover by themselves once OPA answers from this connector's policies again.

Run over mTLS against real servers whose engine is `opa`, pointed at a small
OPA-compatible endpoint (tests/opa_endpoint.py): no OPA binary can be installed here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from connector.errors import PermissionDenied, Unavailable
from connector.server import RunningServer
from tests.conftest import (
    Member,
    connect,
    from_template,
    policy_text,
    write_defects_csv,
)
from tests.opa_endpoint import OpaState, opa_endpoint

PURPOSE = "quality-benchmarking"
SQL = "SELECT plant FROM part_defects LIMIT 2"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _homes(directory: Path, make: Callable[[str], Member]) -> list[Member]:
    """carmaker with part_defects and policy q granting supplier-a column plant."""
    provider, grantee = make("carmaker"), make("supplier-a")
    provider.ingest(write_defects_csv(directory / "defects.csv"), "part_defects")
    provider.write_policy("q.yaml", policy_text("q", members="[supplier-a]", columns="[plant]"))
    return [provider, grantee]


def _members(tmp_path: Path, dataspace: Path) -> tuple[Member, Member]:
    """A copy of _homes for one test (made once per session), before any server runs."""
    provider, grantee = from_template(tmp_path, dataspace, "opa-availability", _homes)
    return provider, grantee


def _provider(provider: Member, url: str) -> Member:
    """provider, its policies decided by the OPA server at url."""
    config = provider.home / "connector.toml"
    config.write_text(
        config.read_text().replace('engine = "embedded"', f'engine = "opa"\nopa_url = "{url}"')
    )
    return provider


def _channel(server: RunningServer, member: Member) -> grpc.Channel:
    identity = member.identity()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.cert_pem,
    )
    return grpc.secure_channel(f"127.0.0.1:{server.port}", credentials)


def _health(server: RunningServer, member: Member) -> int:
    with _channel(server, member) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status: int = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        return status


def _await_health(server: RunningServer, member: Member, wanted: int) -> None:
    """Return once the health service reports wanted: its Watch stream sends the status now
    and each change, so no polling; the test fails if it does not within 15 s."""
    with _channel(server, member) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            for answer in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=15):
                if answer.status == wanted:
                    return
        except grpc.RpcError as ended:
            pytest.fail(f"health did not report status {wanted} within 15 s: {ended.code()}")
    pytest.fail(f"the health stream ended before it reported status {wanted}")


def _refused_as_unavailable(server: RunningServer, member: Member) -> str:
    with connect(server, member) as peer, pytest.raises(Unavailable) as refused:
        peer.query(SQL, PURPOSE)
    return str(refused.value)


def _audit_reasons(server: RunningServer) -> list[str]:
    lines = server.settings.audit_log.read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]
    return [r for e in entries if e.get("outcome") == "unavailable" for r in e.get("reasons", [])]


def test_opa_stopped_and_restarted_empty_is_unavailable_then_recovers(
    tmp_path: Path,
    dataspace: Path,
    serve: Callable[[Member], RunningServer],
) -> None:
    carmaker, grantee = _members(tmp_path, dataspace)
    endpoint = opa_endpoint()
    url, _ = endpoint.__enter__()
    port = int(url.rsplit(":", 1)[1])
    provider = _provider(carmaker, url)
    server = serve(provider)
    try:
        with connect(server, grantee) as peer:
            assert peer.query(SQL, PURPOSE).num_rows == 2
        assert _health(server, grantee) == SERVING

        started = time.monotonic()
        endpoint.__exit__(None, None, None)  # OPA stops
        assert time.monotonic() - started < 1.0  # the endpoint stops at once
        text = _refused_as_unavailable(server, grantee)
        assert "policy engine is unavailable" in text and str(port) not in text
        _await_health(server, grantee, NOT_SERVING)
        # The owner's record names the OPA server that failed.
        assert any(f"OPA server at {url}" in r for r in _audit_reasons(server))

        # OPA comes back on the same address holding nothing (a restart loses every push).
        endpoint = opa_endpoint(port=port)
        _, state = endpoint.__enter__()
        _await_health(server, grantee, SERVING)
        assert state.modules and state.data  # pushed again, without a reload
        with connect(server, grantee) as peer:
            assert peer.query(SQL, PURPOSE).num_rows == 2
            with pytest.raises(PermissionDenied, match="column part_no"):
                peer.query("SELECT part_no FROM part_defects", PURPOSE)
            assert [d.name for d in peer.catalog()] == ["part_defects"]
    finally:
        endpoint.__exit__(None, None, None)


def test_opa_that_answers_nonsense_is_unavailable_never_allowed(
    tmp_path: Path,
    dataspace: Path,
    serve: Callable[[Member], RunningServer],
) -> None:
    carmaker, grantee = _members(tmp_path, dataspace)
    with opa_endpoint() as (url, state):
        server = serve(_provider(carmaker, url))
        state.nonsense = True
        _refused_as_unavailable(server, grantee)
        with connect(server, grantee) as peer, pytest.raises(Unavailable):
            peer.catalog()
        _await_health(server, grantee, NOT_SERVING)
        state.nonsense = False
        _await_health(server, grantee, SERVING)
        with connect(server, grantee) as peer:
            assert peer.query(SQL, PURPOSE).num_rows == 2


def test_opa_that_keeps_an_old_revision_is_not_obeyed(
    tmp_path: Path,
    dataspace: Path,
    serve: Callable[[Member], RunningServer],
) -> None:
    carmaker, grantee = _members(tmp_path, dataspace)
    with opa_endpoint(OpaState()) as (url, state):
        provider = _provider(carmaker, url)
        server = serve(provider)
        with connect(server, grantee) as peer:
            assert peer.query(SQL, PURPOSE).num_rows == 2
        # OPA acknowledges pushes but keeps the old policies, which still grant `plant`.
        state.frozen = True
        provider.write_policy(
            "q.yaml", policy_text("q", members="[supplier-a]", columns="[week]", version=2)
        )
        server.reload()
        assert _refused_as_unavailable(server, grantee)
        assert _health(server, grantee) == NOT_SERVING
        state.frozen = False
        _await_health(server, grantee, SERVING)
        with connect(server, grantee) as peer:
            with pytest.raises(PermissionDenied, match="column plant"):
                peer.query(SQL, PURPOSE)
            assert peer.query("SELECT week FROM part_defects LIMIT 1", PURPOSE).num_rows == 1


def test_connector_started_while_opa_is_down_serves_once_it_is_up(
    tmp_path: Path,
    dataspace: Path,
    serve: Callable[[Member], RunningServer],
) -> None:
    carmaker, grantee = _members(tmp_path, dataspace)
    with opa_endpoint() as (url, _):
        port = int(url.rsplit(":", 1)[1])
    provider = _provider(carmaker, url)
    server = serve(provider)  # OPA is not running
    assert _health(server, grantee) == NOT_SERVING
    _refused_as_unavailable(server, grantee)
    with opa_endpoint(port=port):
        _await_health(server, grantee, SERVING)
        with connect(server, grantee) as peer:
            assert peer.query(SQL, PURPOSE).num_rows == 2


def test_a_peer_retrying_while_opa_is_down_cannot_flood_the_server_log(
    tmp_path: Path,
    dataspace: Path,
    serve: Callable[[Member], RunningServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    carmaker, grantee = _members(tmp_path, dataspace)
    with opa_endpoint() as (url, _):
        pass  # its port is free again: OPA is down
    server = serve(_provider(carmaker, url))
    caplog.clear()
    with connect(server, grantee) as peer:
        for _ in range(40):
            with pytest.raises(Unavailable):
                peer.query(SQL, PURPOSE)
    failures = [r for r in caplog.records if "the policy engine failed" in r.getMessage()]
    assert 1 <= len(failures) <= 6, [r.getMessage() for r in failures]
    assert len(_audit_reasons(server)) == 40  # every refusal is still on record

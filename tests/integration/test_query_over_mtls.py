"""A peer discovers and queries a provider over mutual TLS, only where a signed policy allows."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pyarrow as pa
import pytest

from connector._proto.connector.v1 import connector_pb2 as pb
from connector._proto.connector.v1 import connector_pb2_grpc as pb_grpc
from connector.client import Peer, receipt_of
from connector.errors import (
    NotAuthenticated,
    PeerError,
    PermissionDenied,
    QueryRejected,
    QueryTimeout,
    ResourceExhausted,
)
from connector.identity import create_dataspace_ca, issue_member_certificate
from connector.server import RunningServer
from tests.conftest import (
    Member,
    ProviderPair,
    Space,
    connect,
    policy_text,
    wait_for,
)

GRANTED = ["plant", "part_no", "defect_code", "defects", "week"]
PURPOSE = "quality-benchmarking"


def test_catalog_lists_only_granted_datasets_and_columns(shared_space: Space) -> None:
    with shared_space.peer() as peer:
        catalog = peer.catalog()
    assert [d.name for d in catalog] == ["part_defects"]
    entry = catalog[0]
    assert [name for name, _ in entry.columns] == GRANTED
    assert entry.purposes == (PURPOSE,)
    assert [(p.id, p.version) for p in entry.policies] == [("quality-benchmark", 1)]
    assert entry.description == "Weekly defects"


def test_catalog_is_empty_for_a_member_without_policy(shared_space: Space) -> None:
    with shared_space.peer(shared_space.outsider) as peer:
        assert peer.catalog() == []


def test_query_answers_with_arrow_and_a_verified_receipt(shared_space: Space) -> None:
    sql = "SELECT plant, sum(defects) AS defects FROM part_defects GROUP BY plant ORDER BY plant"
    with shared_space.peer() as peer:
        result = peer.fetch(sql, PURPOSE, request_id="req-42")
    assert result.table.column_names == ["plant", "defects"]
    assert result.table.column("plant").to_pylist() == [
        "Dingolfing",
        "Leipzig",
        "Munich",
        "Regensburg",
    ]
    receipt = result.receipt
    assert receipt.client_reference == "req-42" != receipt.request_id  # the id is the provider's
    assert receipt.member_id == "supplier-a"
    assert receipt.provider_id == "carmaker"
    assert receipt.rows == 4
    assert receipt.query_sha256 == hashlib.sha256(sql.encode()).hexdigest()
    assert receipt.result_sha256 == hashlib.sha256(result.arrow_ipc).hexdigest()
    assert [(p.id, p.version) for p in receipt.policies] == [("quality-benchmark", 1)]
    assert not receipt.truncated


def test_select_star_expands_to_the_granted_columns(shared_space: Space) -> None:
    with shared_space.peer() as peer:
        table = peer.query("SELECT * FROM part_defects", PURPOSE)
    assert table.column_names == GRANTED
    assert table.num_rows == 200
    assert receipt_of(table).rows == 200


def test_refused_for_purpose_with_the_reason(shared_space: Space) -> None:
    with shared_space.peer() as peer, pytest.raises(PermissionDenied) as refused:
        peer.query("SELECT plant FROM part_defects", "marketing")
    assert any("purpose" in r and "marketing" in r for r in refused.value.reasons)


def test_refused_for_a_column_with_the_reason(shared_space: Space) -> None:
    with shared_space.peer() as peer, pytest.raises(PermissionDenied) as refused:
        peer.query("SELECT plant, supplier_price FROM part_defects", PURPOSE)
    assert any("supplier_price" in r for r in refused.value.reasons)


def test_a_hidden_column_cannot_be_used_in_where_either(shared_space: Space) -> None:
    with shared_space.peer() as peer, pytest.raises(PermissionDenied) as refused:
        peer.query("SELECT plant FROM part_defects WHERE supplier_price > 300", PURPOSE)
    assert any("supplier_price" in r for r in refused.value.reasons)


def test_valid_certificate_without_policy_is_refused_without_leaking_terms(
    shared_space: Space,
) -> None:
    outsider = shared_space.outsider
    with shared_space.peer(outsider) as peer, pytest.raises(PermissionDenied) as refused:
        peer.query("SELECT plant FROM part_defects", PURPOSE)
    text = " ".join(refused.value.reasons)
    assert "no policy grants dataset part_defects to you" in text
    assert "supplier-a" not in text and "quality-benchmark" not in text


def test_unknown_dataset_is_refused_like_an_ungranted_one(shared_space: Space) -> None:
    with shared_space.peer() as peer, pytest.raises(PermissionDenied) as refused:
        peer.query("SELECT * FROM salaries", PURPOSE)
    assert "no policy grants dataset salaries to you" in " ".join(refused.value.reasons)


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        ("SELECT * FROM read_csv('/etc/passwd')", "read_csv"),
        ("SELECT 1; DROP TABLE part_defects", "one"),
        ("SELECT * FROM datasets.part_defects", "qualified"),
        ("SELECT current_setting('memory_limit')", "current_setting"),
        ("SELEC plant FROM part_defects", "syntax"),
    ],
)
def test_forbidden_sql_is_invalid_argument(shared_space: Space, sql: str, words: str) -> None:
    with shared_space.peer() as peer, pytest.raises(QueryRejected) as rejected:
        peer.query(sql, PURPOSE)
    assert words in str(rejected.value).lower()


def test_rejection_names_the_position(shared_space: Space) -> None:
    with shared_space.peer() as peer, pytest.raises(QueryRejected) as rejected:
        peer.query("SELECT plant, read_text('/etc/hosts') FROM part_defects", PURPOSE)
    assert "at character" in str(rejected.value)


def test_max_rows_cuts_the_result_and_says_so(shared_space: Space) -> None:
    with shared_space.peer() as peer:
        result = peer.fetch("SELECT * FROM part_defects", PURPOSE, max_rows=7)
    assert result.table.num_rows == 7
    assert result.receipt.truncated
    assert result.receipt.rows == 7


def test_explain_gives_the_decision_and_relations(shared_space: Space) -> None:
    with shared_space.peer() as peer:
        allowed = peer.explain("SELECT plant FROM part_defects", PURPOSE)
        denied = peer.explain("SELECT supplier_price FROM part_defects", PURPOSE)
    assert allowed.allow
    assert allowed.datasets == ("part_defects",)
    assert allowed.relations[0].dataset == "part_defects"
    assert list(allowed.relations[0].columns) == GRANTED
    assert not denied.allow
    assert any("supplier_price" in r for r in denied.reasons)


def test_a_large_result_streams_in_many_batches(tmp_path: Path, shared_space: Space) -> None:
    sql = "SELECT a.plant, b.week FROM part_defects a CROSS JOIN part_defects b"
    with shared_space.peer() as peer:
        messages = list(peer.stream(sql, PURPOSE))
    pieces = [m.arrow_ipc for m in messages if not m.HasField("receipt")]
    assert messages[-1].HasField("receipt")
    assert len(pieces) > 1
    table = pa.ipc.open_stream(b"".join(pieces)).read_all()
    assert table.num_rows == 200 * 200


def test_server_keeps_serving_after_errors_and_under_concurrency(shared_space: Space) -> None:
    failures: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with shared_space.peer() as peer:
                if i % 3 == 0:
                    with pytest.raises(QueryRejected):
                        peer.query("SELECT * FROM glob('/*')", PURPOSE)
                else:
                    assert peer.query("SELECT count(*) AS n FROM part_defects", PURPOSE)[
                        "n"
                    ].to_pylist() == [200]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


SLOW = (
    "SELECT count(*) FROM part_defects a, part_defects b, part_defects c, part_defects d "
    "WHERE a.plant || b.plant || c.plant || d.plant = 'x'"
)


def test_client_deadline_interrupts_the_query_and_the_server_goes_on(shared_space: Space) -> None:
    started = time.monotonic()
    with shared_space.peer(timeout=0.5) as peer, pytest.raises(QueryTimeout):
        peer.query(SLOW, PURPOSE)
    with shared_space.peer() as peer:
        assert peer.query("SELECT count(*) AS n FROM part_defects", PURPOSE).num_rows == 1
    # The second query could run only once the first was interrupted (2 DuckDB threads).
    assert time.monotonic() - started < 20


def test_server_time_limit_ends_a_query_with_deadline_exceeded(
    provider_pair: ProviderPair, serve: Callable[[Member], RunningServer]
) -> None:
    provider, grantee = provider_pair(
        settings={"max_query_seconds = 30": "max_query_seconds = 0.5"}
    )
    server = serve(provider)
    with connect(server, grantee) as peer:
        with pytest.raises(QueryTimeout, match="time limit"):
            peer.query(SLOW, PURPOSE)
        assert peer.query("SELECT count(*) AS n FROM part_defects", PURPOSE).num_rows == 1


def test_policy_reload_on_file_change(
    provider_pair: ProviderPair,
    make_member: Callable[[str], Member],
    serve: Callable[[Member], RunningServer],
) -> None:
    # The watcher polls every reload_seconds (2 by default): shortened, the behaviour is the same.
    provider, _ = provider_pair(settings={"reload_seconds = 2": "reload_seconds = 0.2"})
    outsider = make_member("supplier-b")
    with connect(serve(provider), outsider) as peer:
        assert peer.catalog() == []
        provider.write_policy(
            "outsider.yaml", policy_text("supplier-b-access", members="[supplier-b]")
        )
        wait_for(lambda: len(peer.catalog()) == 1)
        (provider.home / "policies" / "outsider.yaml").unlink()
        wait_for(lambda: peer.catalog() == [])


def test_tampered_policy_is_not_loaded(space: Space) -> None:
    path = space.provider.home / "policies" / "quality.yaml"
    path.write_text(path.read_text().replace("[supplier-a]", "[supplier-a, supplier-b]"))
    space.server.reload()
    with space.peer(space.outsider) as peer:
        assert peer.catalog() == []
    with space.peer() as peer:
        assert peer.catalog() == []


def test_unsigned_and_expired_policies_grant_nothing(space: Space) -> None:
    space.provider.write_policy(
        "unsigned.yaml", policy_text("unsigned", members="[supplier-b]"), sign=False
    )
    space.provider.write_policy(
        "expired.yaml",
        policy_text(
            "expired", members="[supplier-b]", valid_from="2020-01-01", valid_until="2021-01-01"
        ),
    )
    space.server.reload()
    with space.peer(space.outsider) as peer:
        assert peer.catalog() == []


def _channel(space: Space, creds: grpc.ChannelCredentials) -> pb_grpc.ConnectorStub:
    channel = grpc.secure_channel(f"127.0.0.1:{space.server.port}", creds)
    return pb_grpc.ConnectorStub(channel)


def test_client_without_certificate_never_reaches_the_service(shared_space: Space) -> None:
    ca = (shared_space.grantee.home / "tls" / "ca.pem").read_bytes()
    stub = _channel(shared_space, grpc.ssl_channel_credentials(root_certificates=ca))
    with pytest.raises(grpc.RpcError) as failed:
        stub.GetCatalog(pb.CatalogRequest(), timeout=10)
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE


def test_client_from_another_ca_never_reaches_the_service(
    tmp_path: Path, shared_space: Space
) -> None:
    create_dataspace_ca(tmp_path / "rogue", "test-space")
    issue_member_certificate(tmp_path / "rogue", "supplier-a", tmp_path / "rogue-member")
    identity = shared_space.grantee.identity()
    stub = _channel(
        shared_space,
        grpc.ssl_channel_credentials(
            root_certificates=identity.ca_pem,
            private_key=(tmp_path / "rogue-member" / "key.pem").read_bytes(),
            certificate_chain=(tmp_path / "rogue-member" / "cert.pem").read_bytes(),
        ),
    )
    with pytest.raises(grpc.RpcError) as failed:
        stub.GetCatalog(pb.CatalogRequest(), timeout=10)
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE


def test_peer_sees_unreachable_provider_clearly(shared_space: Space) -> None:
    from connector.client import Peer

    with (
        Peer("127.0.0.1:1", shared_space.grantee.identity(), timeout=5) as peer,
        pytest.raises(PeerError, match="unreachable"),
    ):
        peer.catalog()


def test_revoked_member_is_refused_at_once_after_reload(space: Space) -> None:
    config = space.provider.home / "connector.toml"
    with space.peer() as peer:
        assert len(peer.catalog()) == 1
        config.write_text(config.read_text().replace("members = []", 'members = ["supplier-a"]'))
        space.server.reload()
        with pytest.raises(NotAuthenticated) as refused:
            peer.catalog()
    assert "revoked" in str(refused.value)


def test_revoked_certificate_serial_is_refused(space: Space) -> None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((space.grantee.home / "tls" / "cert.pem").read_bytes())
    config = space.provider.home / "connector.toml"
    config.write_text(
        config.read_text().replace("serials = []", f'serials = ["{cert.serial_number:x}"]')
    )
    space.server.reload()
    stub = _channel(
        space,
        grpc.ssl_channel_credentials(
            root_certificates=space.grantee.identity().ca_pem,
            private_key=space.grantee.identity().key_pem,
            certificate_chain=space.grantee.identity().cert_pem,
        ),
    )
    with pytest.raises(grpc.RpcError) as failed:
        stub.GetCatalog(pb.CatalogRequest(), timeout=10)
    assert failed.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_a_running_query_survives_a_policy_reload(space: Space) -> None:
    sql = "SELECT a.plant, b.week FROM part_defects a CROSS JOIN part_defects b"
    with space.peer() as peer:
        stream = peer.stream(sql, PURPOSE)
        first = next(stream)
        (space.provider.home / "policies" / "quality.yaml").unlink()
        space.server.reload()
        rest = list(stream)
        assert peer.catalog() == []
    pieces = [m.arrow_ipc for m in [first, *rest] if not m.HasField("receipt")]
    assert rest[-1].HasField("receipt")
    assert len(rest) > 30
    assert pa.ipc.open_stream(b"".join(pieces)).read_all().num_rows == 200 * 200


def test_a_cancelled_query_is_interrupted_and_frees_its_slot(
    provider_pair: ProviderPair, serve: Callable[[Member], RunningServer]
) -> None:
    # A query that finds the one slot taken waits queue_seconds (5 by default) before it is
    # refused: shortened, the slot held by the endless query is refused just the same.
    provider, grantee = provider_pair(
        settings={
            "max_concurrent_queries = 8": "max_concurrent_queries = 1",
            "queue_seconds = 5 ": "queue_seconds = 0.2 ",
        },
    )
    server = serve(provider)
    identity = grantee.identity()
    stub = _channel(
        Space(provider, grantee, grantee, server),
        grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem),
    )
    # 200^5 rows counted: nothing is sent before it ends, so the server's thread stays
    # inside DuckDB, and only the cancellation can stop it before max_query_seconds (30 s).
    endless = (
        "SELECT count(*) FROM part_defects a, part_defects b, part_defects c, part_defects d, "
        "part_defects e WHERE hash(a.week, b.week, c.week, d.week, e.week) = 42"
    )
    call = stub.Query(pb.QueryRequest(sql=endless, purpose=PURPOSE), timeout=60)
    slots = server.provider.slots
    wait_for(lambda: slots.executing() == 1)
    with connect(server, grantee) as peer:
        assert not _answers(peer)
        call.cancel()
        wait_for(lambda: slots.executing() == 0, timeout=5)  # DuckDB stopped
        assert _answers(peer)


def _answers(peer: Peer) -> bool:
    """True if the provider answers a small query, False if every query slot is taken."""
    try:
        table = peer.query("SELECT count(*) AS n FROM part_defects", PURPOSE)
    except ResourceExhausted:
        return False
    return bool(table["n"][0].as_py() == 200)


def test_trusted_certificate_without_member_id_is_unauthenticated(
    tmp_path: Path, dataspace: Path, shared_space: Space
) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_cert = x509.load_pem_x509_certificate((dataspace / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((dataspace / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "supplier-a")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("supplier-a")]), False)
        .sign(ca_key, hashes.SHA256())
    )
    stub = _channel(
        shared_space,
        grpc.ssl_channel_credentials(
            root_certificates=(dataspace / "ca.pem").read_bytes(),
            private_key=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            certificate_chain=cert.public_bytes(serialization.Encoding.PEM),
        ),
    )
    with pytest.raises(grpc.RpcError) as failed:
        stub.GetCatalog(pb.CatalogRequest(), timeout=10)
    assert failed.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "spiffe://DATASPACE/member/ID" in (failed.value.details() or "")


def test_obligations_travel_in_receipt_and_arrow_schema(space: Space) -> None:
    space.provider.write_policy(
        "quality.yaml",
        policy_text("quality-benchmark", members="[supplier-a]", version=2)
        + "obligations: {delete_within_days: 90, attribution: 'Source: carmaker'}\n",
    )
    space.server.reload()
    with space.peer() as peer:
        table = peer.query("SELECT plant FROM part_defects", PURPOSE)
    expected = {"delete_within_days": 90, "attribution": ["Source: carmaker"], "terms": []}
    assert receipt_of(table).obligations == expected
    metadata = table.schema.metadata
    assert json.loads(metadata[b"connector.obligations"]) == expected
    assert json.loads(metadata[b"connector.policies"]) == ["quality-benchmark@2"]

"""The .proto alone is enough to use a connector; the checked-in stubs are not stale."""

from __future__ import annotations

import filecmp
import importlib
import subprocess
import sys
from pathlib import Path

import grpc
import pyarrow as pa
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import Space

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path)], check=True
    )
    generated = tmp_path / "connector" / "v1"
    checked_in = ROOT / "connector" / "_proto" / "connector" / "v1"
    names = sorted(p.name for p in generated.iterdir() if p.is_file())
    assert names == sorted(p.name for p in checked_in.iterdir() if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(generated, checked_in, names, shallow=False)
    assert (mismatch, errors) == ([], []), "stubs are stale: run `make protos`"
    flight_sql = ["flight_sql_pb2.py", "flight_sql_pb2.pyi"]
    _, mismatch, errors = filecmp.cmpfiles(
        tmp_path, ROOT / "connector" / "_proto", flight_sql, shallow=False
    )
    assert (mismatch, errors) == ([], []), "Flight SQL stubs are stale: run `make protos`"


def _stubs_from_proto_only(out: Path) -> tuple[object, object]:
    """Compile the .proto with plain protoc into a folder and import it, as another team would."""
    from grpc_tools import protoc

    well_known = Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        [
            "protoc",
            f"-I{ROOT / 'protos'}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(ROOT / "protos" / "connector" / "v1" / "connector.proto"),
        ]
    )
    assert status == 0
    # A separate top-level package name, so nothing of the project's own package is used.
    package = out / "foreign"
    (out / "connector").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(path.read_text().replace("from connector.v1", "from foreign.v1"))
    (package / "__init__.py").touch()
    (package / "v1" / "__init__.py").touch()
    sys.path.insert(0, str(out))
    try:
        return (
            importlib.import_module("foreign.v1.connector_pb2"),
            importlib.import_module("foreign.v1.connector_pb2_grpc"),
        )
    finally:
        sys.path.remove(str(out))


@pytest.mark.usefixtures("space")
def test_a_client_generated_from_the_proto_alone_queries(tmp_path: Path, space: Space) -> None:
    messages, services = _stubs_from_proto_only(tmp_path)
    identity = space.grantee.identity()
    channel = grpc.secure_channel(
        f"localhost:{space.server.port}",
        grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem),
    )
    stub = services.ConnectorStub(channel)  # type: ignore[attr-defined]
    catalog = stub.GetCatalog(messages.CatalogRequest(), timeout=10)  # type: ignore[attr-defined]
    assert [d.name for d in catalog.datasets] == ["part_defects"]
    request = messages.QueryRequest(  # type: ignore[attr-defined]
        sql="SELECT plant, defects FROM part_defects", purpose="quality-benchmarking"
    )
    responses = list(stub.Query(request, timeout=10))
    assert responses[-1].WhichOneof("payload") == "receipt"
    data = b"".join(r.arrow_ipc for r in responses[:-1])
    table = pa.ipc.open_stream(data).read_all()
    assert table.num_rows == 200
    assert responses[-1].receipt.rows == 200
    channel.close()


def test_health_and_reflection_are_served(space: Space) -> None:
    identity = space.grantee.identity()
    channel = grpc.secure_channel(
        f"127.0.0.1:{space.server.port}",
        grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem),
    )
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "connector.v1.Connector"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "connector.v1.Connector" in names
    channel.close()

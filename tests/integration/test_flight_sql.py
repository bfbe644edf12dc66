"""Arrow Flight SQL with real clients (ADBC DB-API and pyarrow's FlightClient) over mutual TLS:
the same answers, refusals and receipts as the gRPC Query, under the same policies."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import adbc_driver_manager
import pyarrow as pa
import pytest
from adbc_driver_flightsql import DatabaseOptions
from google.protobuf import any_pb2
from pyarrow import flight

from connector._proto import flight_sql_pb2 as sql_pb
from connector.audit_chain import read_entries
from connector.errors import ConnectorError, PermissionDenied
from connector.flight_sql import pack
from connector.receipt import ReceiptBundle, verify_bundle
from connector.server import RunningServer
from tests.conftest import (
    Member,
    Space,
    from_template,
    policy_text,
    run_cli,
    space_homes,
    wait_for,
)

PURPOSE = "quality-benchmarking"
VIEW = "plant-view"
BENCH = "benchmark"
TIGHT = "tight"
MASKED = policy_text(
    "masked-view",
    members="[supplier-a]",
    purposes=f"[{VIEW}]",
    columns="[plant, defect_code, defects, week]",
) + (
    "  mask: {part_no: hash}\n"
    "rows:\n  where:\n    plant: [Regensburg, Dingolfing]\n"
    "limits: {max_rows_per_query: 30}\n"
)
AGGREGATE = (
    policy_text(
        "benchmark", members="[supplier-b]", purposes=f"[{BENCH}]", columns="[plant, defects]"
    )
    + "aggregate_only: {min_group_size: 8}\n"
)
TIGHT_POLICY = (
    policy_text("tight", members="[supplier-b]", purposes=f"[{TIGHT}]", columns="[plant, defects]")
    + "limits: {queries_per_day: 2}\n"
)


def flight_homes(directory: Path, make: Callable[[str], Member]) -> list[Member]:
    """The `space` homes with more policies, and the Flight SQL port on (port 0)."""
    members = space_homes(directory, make)
    provider = members[0]
    provider.write_policy("masked.yaml", MASKED)
    provider.write_policy("benchmark.yaml", AGGREGATE)
    provider.write_policy("tight.yaml", TIGHT_POLICY)
    turn_flight_on(provider)
    return members


def turn_flight_on(member: Member) -> None:
    config = member.home / "connector.toml"
    text = config.read_text()
    assert 'listen = ""' in text
    config.write_text(text.replace('listen = ""', 'listen = "127.0.0.1:0"'))


def flight_space(
    module_dir: Path, dataspace: Path, serve: Callable[[Member], RunningServer]
) -> Space:
    """A provider with its Flight SQL port on, its grantee and an outsider; served."""
    provider, grantee, outsider = from_template(
        module_dir / "space", dataspace, "flight-space", flight_homes
    )
    return Space(provider, grantee, outsider, serve(provider))


@pytest.fixture(scope="module")
def fspace(
    module_dir: Path, dataspace: Path, module_serve: Callable[[Member], RunningServer]
) -> Space:
    return flight_space(module_dir, dataspace, module_serve)


def uri(server: RunningServer) -> str:
    assert server.flight is not None
    return f"grpc+tls://localhost:{server.flight.port}"


def flight_client(server: RunningServer, member: Member) -> flight.FlightClient:
    identity = member.identity()
    return flight.FlightClient(
        uri(server),
        tls_root_certs=identity.ca_pem,
        cert_chain=identity.cert_pem,
        private_key=identity.key_pem,
    )


@contextmanager
def adbc(server: RunningServer, member: Member, purpose: str = PURPOSE) -> Iterator[Any]:
    # Imported here: the DB-API module loads pandas (0.8 s), which every pytest worker would
    # pay at collection though only the worker that runs these tests needs it.
    import adbc_driver_flightsql.dbapi as flightsql

    identity = member.identity()
    options = {
        DatabaseOptions.TLS_ROOT_CERTS.value: identity.ca_pem.decode(),
        DatabaseOptions.MTLS_CERT_CHAIN.value: identity.cert_pem.decode(),
        DatabaseOptions.MTLS_PRIVATE_KEY.value: identity.key_pem.decode(),
        f"{DatabaseOptions.RPC_CALL_HEADER_PREFIX.value}x-connector-purpose": purpose,
    }
    with (
        flightsql.connect(uri(server), db_kwargs=options, autocommit=True) as connection,
        connection.cursor() as cursor,
    ):
        yield cursor


def statement(sql: str) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(pack(sql_pb.CommandStatementQuery(query=sql)))


def headers(purpose: str) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(headers=[(b"x-connector-purpose", purpose.encode())])


@dataclass
class FlightAnswer:
    """What a FlightClient received: the batches, their schema and the last app_metadata."""

    batches: list[pa.RecordBatch]
    schema: pa.Schema
    metadata: bytes

    @property
    def table(self) -> pa.Table:
        return pa.Table.from_batches(self.batches, schema=self.schema)

    def ipc_bytes(self) -> bytes:
        """The non-empty batches encoded again as one Arrow IPC stream (what the digest covers)."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.schema) as writer:
            for batch in self.batches:
                if batch.num_rows:
                    writer.write_batch(batch)
        data: bytes = sink.getvalue().to_pybytes()
        return data


def fetch(reader: flight.FlightStreamReader) -> FlightAnswer:
    batches, metadata = [], b""
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            break
        if chunk.data is not None:
            batches.append(chunk.data)
        if chunk.app_metadata is not None:
            metadata = chunk.app_metadata.to_pybytes()
    return FlightAnswer(batches, reader.schema, metadata)


def flight_query(client: flight.FlightClient, sql: str, purpose: str = PURPOSE) -> FlightAnswer:
    info = client.get_flight_info(statement(sql), headers(purpose))
    return fetch(client.do_get(info.endpoints[0].ticket, headers(purpose)))


def refusal(error: flight.FlightError) -> dict[str, Any]:
    detail: dict[str, Any] = json.loads(error.extra_info)
    assert "Traceback" not in str(error)
    return detail


def grpc_reasons(space: Space, member: Member, sql: str, purpose: str) -> list[str]:
    with pytest.raises(PermissionDenied) as denied:
        space.peer(member).query(sql, purpose)
    return denied.value.reasons


SQL = (
    "SELECT plant, part_no, defects, week FROM part_defects ORDER BY plant, part_no, week, defects"
)


def test_adbc_answers_equal_the_grpc_query(fspace: Space) -> None:
    expected = fspace.peer().query(SQL, PURPOSE)
    with adbc(fspace.server, fspace.grantee) as cursor:
        cursor.execute(SQL)
        table = cursor.fetch_arrow_table()
        cursor.execute(SQL)
        frame = cursor.fetch_df()
    assert table.num_rows == 200
    assert table.to_pylist() == expected.to_pylist()
    assert table.schema.metadata[b"connector.policies"] == b'["quality-benchmark@1"]'
    assert frame.to_dict("records") == expected.to_pandas().to_dict("records")


def test_flight_client_gets_the_answer_and_a_receipt_over_its_digest(
    fspace: Space, tmp_path: Path
) -> None:
    big = "SELECT a.plant, a.week, b.defects FROM part_defects a JOIN part_defects b USING (plant)"
    answer = flight_query(flight_client(fspace.server, fspace.grantee), big)
    assert answer.table.num_rows == 10_000
    assert len(answer.batches) > 1  # batch_rows = 1000 in this space: the digest spans several
    bundle = ReceiptBundle(**json.loads(answer.metadata))
    fields = verify_bundle(bundle, fspace.grantee.identity().ca_pem, answer.ipc_bytes())
    # The same check from the command line: the app_metadata saved as a receipt file.
    (tmp_path / "r.json").write_bytes(answer.metadata)
    (tmp_path / "r.arrow").write_bytes(answer.ipc_bytes())
    ca = fspace.grantee.home / "tls" / "ca.pem"
    assert (
        run_cli(
            "receipt", "verify", tmp_path / "r.json", "--data", tmp_path / "r.arrow", "--ca", ca
        )
        == 0
    )
    (tmp_path / "r.arrow").write_bytes(answer.ipc_bytes().replace(b"Leipzig", b"Leipzlg"))
    assert (
        run_cli(
            "receipt", "verify", tmp_path / "r.json", "--data", tmp_path / "r.arrow", "--ca", ca
        )
        != 0
    )
    assert (fields.rows, fields.member_id, fields.purpose) == (10_000, "supplier-a", PURPOSE)
    entries = [json.loads(line) for line in audit_lines(fspace.provider)]
    (entry,) = [
        e
        for e in entries
        if e.get("request_id") == fields.request_id and "kind" in e and e.get("type") != "opened"
    ]
    assert (entry["outcome"], entry["rows"], entry["result_sha256"]) == (
        "answered",
        10_000,
        fields.result_sha256,
    )


def audit_lines(member: Member) -> list[str]:
    return (member.home / "audit" / "audit.jsonl").read_text().splitlines()


def test_a_small_answer_is_on_record_whole_before_it_is_sent_a_long_one_opened_first(
    fspace: Space,
) -> None:
    """As on gRPC: one entry (one fsync) for an answer small enough to be held whole; an
    "opened" entry before the first byte of a longer one, then its final entry."""
    client = flight_client(fspace.server, fspace.grantee)
    small = flight_query(client, "SELECT plant FROM part_defects LIMIT 3")
    big_sql = "SELECT a.plant, a.part_no, b.week FROM part_defects a, part_defects b"
    big = flight_query(client, big_sql)
    assert len(big.ipc_bytes()) > 256 * 1024 > len(small.ipc_bytes())
    entries = [json.loads(line) for line in audit_lines(fspace.provider)]
    for answer, kinds in ((small, ["request"]), (big, ["opened", "request"])):
        bundle = ReceiptBundle(**json.loads(answer.metadata))
        ca = fspace.grantee.identity().ca_pem
        request_id = verify_bundle(bundle, ca, answer.ipc_bytes()).request_id
        mine = [e for e in entries if e.get("request_id") == request_id]
        assert [e["type"] for e in mine] == kinds
        assert mine[-1]["outcome"] == "answered"


def test_masks_filters_and_row_limits_hold_as_on_grpc(fspace: Space) -> None:
    sql = "SELECT plant, part_no, defects FROM part_defects ORDER BY ALL"
    expected = fspace.peer().query(sql, VIEW)
    with adbc(fspace.server, fspace.grantee, VIEW) as cursor:
        cursor.execute(sql)
        table = cursor.fetch_arrow_table()
    assert table.to_pylist() == expected.to_pylist()
    assert table.num_rows == 30  # max_rows_per_query
    assert set(table.column("plant").to_pylist()) <= {"Regensburg", "Dingolfing"}
    assert all(len(p) == 64 and not p.startswith("P-") for p in table.column("part_no").to_pylist())


def test_aggregate_only_answers_aggregates_and_refuses_rows_as_grpc(fspace: Space) -> None:
    b = fspace.outsider  # supplier-b: aggregate-only on part_defects
    sql = "SELECT plant, sum(defects) AS total FROM part_defects GROUP BY plant ORDER BY plant"
    expected = fspace.peer(b).query(sql, BENCH)
    answer = flight_query(flight_client(fspace.server, b), sql, BENCH)
    assert answer.table.to_pylist() == expected.to_pylist()
    raw = "SELECT plant, defects FROM part_defects"
    with pytest.raises(flight.FlightError) as refused:
        flight_query(flight_client(fspace.server, b), raw, BENCH)
    with pytest.raises(ConnectorError) as on_grpc:
        fspace.peer(b).query(raw, BENCH)
    assert refusal(refused.value)["reasons"][0] in str(on_grpc.value)


@pytest.mark.parametrize(
    ("sql", "purpose"),
    [
        ("SELECT plant, defects FROM part_defects", "marketing"),
        ("SELECT plant, supplier_price FROM part_defects", PURPOSE),
    ],
    ids=["wrong purpose", "ungranted column"],
)
def test_refusals_carry_the_grpc_reasons(fspace: Space, sql: str, purpose: str) -> None:
    reasons = grpc_reasons(fspace, fspace.grantee, sql, purpose)
    with pytest.raises(flight.FlightUnauthorizedError) as refused:
        flight_query(flight_client(fspace.server, fspace.grantee), sql, purpose)
    detail = refusal(refused.value)
    assert (detail["status"], detail["reasons"]) == ("PERMISSION_DENIED", reasons)
    with (
        adbc(fspace.server, fspace.grantee, purpose) as cursor,
        pytest.raises(adbc_driver_manager.Error) as on_adbc,
    ):
        cursor.execute(sql)
    assert reasons[0] in str(on_adbc.value)


def test_a_query_without_purpose_header_is_told_the_header(fspace: Space) -> None:
    client = flight_client(fspace.server, fspace.grantee)
    with pytest.raises(flight.FlightServerError, match="x-connector-purpose") as refused:
        client.get_flight_info(statement("SELECT plant FROM part_defects"))
    assert refusal(refused.value)["status"] == "INVALID_ARGUMENT"


def test_quotas_count_both_wires_together(fspace: Space) -> None:
    b = fspace.outsider
    sql = "SELECT plant, defects FROM part_defects"
    assert fspace.peer(b).query(sql, TIGHT).num_rows == 200
    assert flight_query(flight_client(fspace.server, b), sql, TIGHT).table.num_rows == 200
    with pytest.raises(flight.FlightServerError) as refused:
        flight_query(flight_client(fspace.server, b), sql, TIGHT)
    assert refusal(refused.value)["status"] == "RESOURCE_EXHAUSTED"


def test_get_tables_lists_only_what_the_catalog_shows(fspace: Space) -> None:
    with adbc(fspace.server, fspace.grantee) as cursor:
        objects = cursor.connection.adbc_get_objects(depth="tables").read_all().to_pylist()
    tables = [
        t["table_name"]
        for c in objects
        for s in c["catalog_db_schemas"] or []
        for t in s["db_schema_tables"] or []
    ]
    assert tables == ["part_defects"]
    nothing = tables_of(fspace.server, fspace.provider)  # the owner's own id: no grant
    assert nothing == []


def tables_of(server: RunningServer, member: Member) -> list[str]:
    client = flight_client(server, member)
    command = sql_pb.CommandGetTables(include_schema=True)
    info = client.get_flight_info(flight.FlightDescriptor.for_command(pack(command)))
    table = client.do_get(info.endpoints[0].ticket).read_all()
    return [str(name) for name in table.column("table_name").to_pylist()]


def test_get_tables_with_schema_shows_granted_columns_only(fspace: Space) -> None:
    client = flight_client(fspace.server, fspace.grantee)
    command = sql_pb.CommandGetTables(include_schema=True)
    info = client.get_flight_info(
        flight.FlightDescriptor.for_command(pack(command)), headers(PURPOSE)
    )
    table = client.do_get(info.endpoints[0].ticket).read_all()
    schema = pa.ipc.read_schema(pa.py_buffer(table.column("table_schema")[0].as_py()))
    assert schema.names == ["plant", "part_no", "defect_code", "defects", "week"]


def test_sql_info_and_table_types(fspace: Space) -> None:
    client = flight_client(fspace.server, fspace.grantee)
    for command, column in (
        (sql_pb.CommandGetSqlInfo(info=[0, 3]), "info_name"),
        (sql_pb.CommandGetTableTypes(), "table_type"),
    ):
        info = client.get_flight_info(flight.FlightDescriptor.for_command(pack(command)))
        table = client.do_get(info.endpoints[0].ticket).read_all()
        assert table.column(column).to_pylist() in ([0, 3], ["TABLE"])


@pytest.mark.parametrize(
    "command",
    [sql_pb.ActionClosePreparedStatementRequest(), b"not an Any"],
    ids=["unsupported command", "garbage"],
)
def test_other_commands_are_refused_clearly(fspace: Space, command: Any) -> None:
    client = flight_client(fspace.server, fspace.grantee)
    log = fspace.provider.home / "audit" / "audit.jsonl"
    before = len(list(read_entries(log))) if log.exists() else 0
    body = pack(command) if not isinstance(command, bytes) else command
    with pytest.raises(flight.FlightServerError) as refused:
        client.get_flight_info(flight.FlightDescriptor.for_command(body))
    assert "UNIMPLEMENTED" in str(refused.value) or "INVALID_ARGUMENT" in str(refused.value)
    assert "Traceback" not in str(refused.value)
    with pytest.raises(flight.FlightServerError, match="UNIMPLEMENTED"):
        list(client.do_action(flight.Action("DropEverything", b"")))
    with pytest.raises(flight.FlightServerError, match="UNIMPLEMENTED"):
        list(client.list_flights())
    # pyarrow sends a traceback with any error raised by GetSchema: it answers an empty
    # schema that says why instead.
    schema = client.get_schema(statement("SELECT plant FROM part_defects")).schema
    assert schema.names == []
    assert b"UNIMPLEMENTED" in schema.metadata[b"connector.unimplemented"]
    writer, _ = client.do_put(statement("SELECT 1"), pa.schema([("a", pa.int64())]))
    with pytest.raises(flight.FlightServerError, match="UNIMPLEMENTED") as put:
        writer.write_table(pa.table({"a": [1]}))
        writer.close()
    assert "Traceback" not in str(put.value)
    actions = {a.type for a in client.list_actions()}
    assert actions == {"CreatePreparedStatement", "ClosePreparedStatement", "CloseSession"}
    # Every refused call is on record, with the member and why: probes leave a trace.
    refused_calls = [
        " ".join(e["reasons"])
        for e in list(read_entries(log))[before:]
        if e["type"] == "request" and e.get("outcome") == "rejected"
    ]
    for what in ("the action 'DropEverything'", "ListFlights", "GetSchema", "DoPut"):
        assert sum(f"does not implement {what}" in r for r in refused_calls) == 1, what
    if not isinstance(command, bytes):
        assert any("does not implement the command" in r for r in refused_calls)


def test_an_empty_answer_still_ends_with_its_receipt(fspace: Space) -> None:
    sql = "SELECT plant, defects FROM part_defects WHERE defects < 0"
    answer = flight_query(flight_client(fspace.server, fspace.grantee), sql)
    assert answer.table.num_rows == 0 and answer.schema.names == ["plant", "defects"]
    bundle = ReceiptBundle(**json.loads(answer.metadata))
    fields = verify_bundle(bundle, fspace.grantee.identity().ca_pem, answer.ipc_bytes())
    assert fields.rows == 0


def test_a_peer_that_stops_reading_is_on_record(fspace: Space) -> None:
    client = flight_client(fspace.server, fspace.grantee)
    # Far more than the transport buffers, so that the answer cannot be all sent already.
    big = (
        "SELECT a.plant, a.part_no, a.week, b.part_no AS other FROM part_defects a, "
        "part_defects b, part_defects c WHERE c.defects < 2"
    )
    info = client.get_flight_info(statement(big), headers(PURPOSE))
    reader = client.do_get(info.endpoints[0].ticket)
    reader.read_chunk()
    reader.cancel()
    del reader
    request_id = ""

    def cancelled() -> bool:
        nonlocal request_id
        for line in audit_lines(fspace.provider):
            entry = json.loads(line)
            if entry.get("outcome") == "cancelled" and entry.get("member_id") == "supplier-a":
                request_id = entry["request_id"]
                return True
        return False

    wait_for(cancelled)
    assert request_id


def prepare(client: flight.FlightClient, sql: str, purpose: str = PURPOSE) -> bytes:
    request = pack(sql_pb.ActionCreatePreparedStatementRequest(query=sql))
    (result,) = client.do_action(
        flight.Action("CreatePreparedStatement", request), headers(purpose)
    )
    wrapper = any_pb2.Any.FromString(result.body.to_pybytes())
    prepared = sql_pb.ActionCreatePreparedStatementResult.FromString(wrapper.value)
    return prepared.prepared_statement_handle


def run_prepared(client: flight.FlightClient, handle: bytes) -> FlightAnswer:
    command = pack(sql_pb.CommandPreparedStatementQuery(prepared_statement_handle=handle))
    info = client.get_flight_info(flight.FlightDescriptor.for_command(command))
    return fetch(client.do_get(info.endpoints[0].ticket))


def test_prepared_statements_run_again_for_their_member_until_closed(fspace: Space) -> None:
    client = flight_client(fspace.server, fspace.grantee)
    handle = prepare(client, "SELECT plant FROM part_defects")
    assert run_prepared(client, handle).table.num_rows == 200
    assert run_prepared(client, handle).table.num_rows == 200  # runs again each time
    with pytest.raises(flight.FlightUnauthorizedError, match="prepared statement is not valid"):
        run_prepared(flight_client(fspace.server, fspace.outsider), handle)
    handle = prepare(client, "SELECT plant FROM part_defects")
    close = pack(sql_pb.ActionClosePreparedStatementRequest(prepared_statement_handle=handle))
    list(client.do_action(flight.Action("ClosePreparedStatement", close)))
    with pytest.raises(flight.FlightUnauthorizedError, match="prepared statement is not valid"):
        run_prepared(client, handle)
    sql = "SELECT plant, supplier_price FROM part_defects"
    reasons = grpc_reasons(fspace, fspace.grantee, sql, PURPOSE)
    with pytest.raises(flight.FlightUnauthorizedError) as refused:
        prepare(client, sql)
    assert refusal(refused.value)["reasons"] == reasons

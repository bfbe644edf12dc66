"""Attacks on the record itself, over mTLS against real servers: flooding the audit log,
answers that leave without a record, requests that never reach a handler, an unwritable log.

Each request a peer sends must be on record (one by one, or counted in an aggregate entry
for a member's refusals beyond a burst); the log grows by at most what peers send; no byte
of an answer leaves before its "opened" entry is on disk, and the final entry says what was
handed to the transport.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from connector._proto.connector.v1 import connector_pb2 as pb
from connector.audit_chain import read_entries, verify_log
from connector.errors import ConnectorError
from connector.identity import load_ed25519_public
from connector.server import RunningServer
from tests.conftest import (
    Member,
    ProviderPair,
    ServerProcess,
    Space,
    build_space,
    policy_text,
    run_cli,
    wait_for,
)

PURPOSE = "quality-benchmarking"
QUERY = "/connector.v1.Connector/Query"
EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # Arrow IPC end-of-stream marker
CONTROL_CYCLE = "".join(chr(1 + j) for j in range(31)) * (128 * 1024 // 31 + 2)


def _channel(port: int, member: Member, *options: tuple[str, int]) -> grpc.Channel:
    identity = member.identity()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.cert_pem,
    )
    return grpc.secure_channel(
        f"127.0.0.1:{port}",
        credentials,
        options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            *options,
        ],
    )


def _raw_query(channel: grpc.Channel) -> Any:
    """A Query call that sends bytes as they are (no client-side checks or encoding)."""
    return channel.unary_stream(
        QUERY,
        request_serializer=lambda raw: raw,
        response_deserializer=pb.QueryResponse.FromString,
    )


def _request(sql: str, request_id: str = "") -> bytes:
    return pb.QueryRequest(sql=sql, purpose=PURPOSE, request_id=request_id).SerializeToString()


def _log_path(member: Member) -> Path:
    return member.home / "audit" / "audit.jsonl"


def _entries(member: Member) -> list[dict[str, Any]]:
    return list(read_entries(_log_path(member)))


def _verify(member: Member) -> str:
    key = load_ed25519_public(member.home / "keys" / "receipt.key.pub")
    verdict = verify_log(_log_path(member), key)
    assert verdict.intact, verdict.message
    return verdict.message


def _recorded_requests(entries: list[dict[str, Any]], member_id: str) -> int:
    """Requests of member on record: one by one, plus those counted in aggregates."""
    single = sum(1 for e in entries if e["type"] == "request" and e["member_id"] == member_id)
    counted = sum(
        int(e["count"]) for e in entries if e["type"] == "refusals" and e["member_id"] == member_id
    )
    return single + counted


def _let_requests_settle(member: Member, requests: int, timeout: float = 5.0) -> None:
    """Give a server's handlers time to record the requests sent before it is killed: until
    that many request entries are on disk, or timeout seconds (the checks that follow say
    what is missing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _log_path(member).exists():
            entries = _entries(member)
            if sum(1 for e in entries if e["type"] == "request") >= requests:
                return
        time.sleep(0.05)


# -- 1. flooding ------------------------------------------------------------------------


def test_oversized_control_character_queries_cannot_flood_the_log(space: Space) -> None:
    """A member with no grant sends large queries of control characters: the log grows by
    at most 1x the bytes sent (today the whole SQL is stored, JSON-escaped to ~6x)."""
    before = _log_path(space.provider).stat().st_size if _log_path(space.provider).exists() else 0
    sent = 0
    with _channel(space.server.port, space.outsider) as channel:
        call = _raw_query(channel)
        for i in range(24):
            # chr(1 + (i + j) % 31) for j in range(128 KiB), cut from a repeated cycle.
            sql = "SELECT " + CONTROL_CYCLE[i % 31 : i % 31 + 128 * 1024]
            raw = _request(sql)
            sent += len(raw)
            with pytest.raises(grpc.RpcError) as refused:
                list(call(raw, timeout=30))
            assert refused.value.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
    space.server.stop(grace=1)  # writes the pending aggregate entries
    grown = _log_path(space.provider).stat().st_size - before
    print(f"log grew {grown} bytes for {sent} bytes sent ({grown / sent:.4f}x)")
    assert grown <= sent * 1.0, f"log grew {grown} bytes for {sent} bytes sent"
    entries = _entries(space.provider)
    assert _recorded_requests(entries, "supplier-b") == 24  # never silently
    for entry in entries:
        if entry["type"] == "request":
            assert entry["query"] == ""  # never whole
            assert entry["query_length"] == 7 + 128 * 1024
            assert len(entry["query_sha256"]) == 64
            assert "\\x01" in entry["query_prefix"] or "\\x0" in entry["query_prefix"]
    _verify(space.provider)


def test_many_small_refused_requests_are_throttled_and_counted(
    tmp_path: Path,
    make_member: Callable[[str], Member],
    serve: Callable[[Member], RunningServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Hundreds of small refused requests: recorded one by one up to a burst, then refused
    quickly and counted in aggregate entries; the log grows by at most 1x what was sent."""

    def with_default_allowance(member_id: str) -> Member:
        member = make_member(member_id)  # the tests' homes allow 400 (conftest): back to 20
        config = member.home / "connector.toml"
        config.write_text(config.read_text().replace("refusal_burst = 400", "refusal_burst = 20"))
        return member

    space = build_space(tmp_path, with_default_allowance, serve)
    before = _log_path(space.provider).stat().st_size if _log_path(space.provider).exists() else 0
    sent, codes = 0, set()
    with _channel(space.server.port, space.outsider) as channel:
        call = _raw_query(channel)
        for i in range(400):
            raw = _request(f"SELECT * FROM read_csv('/etc/passwd{i}')")
            sent += len(raw)
            with pytest.raises(grpc.RpcError) as refused:
                list(call(raw, timeout=30))
            codes.add(refused.value.code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes  # the member is throttled
    with space.peer() as peer:  # another member is not
        assert peer.query("SELECT plant FROM part_defects LIMIT 1", PURPOSE).num_rows == 1
    space.server.stop(grace=1)
    grown = _log_path(space.provider).stat().st_size - before
    with capsys.disabled():
        print(f"log grew {grown} bytes for {sent} bytes sent ({grown / sent:.4f}x)")
    assert grown <= sent * 1.0, f"log grew {grown} bytes for {sent} bytes sent"
    entries = _entries(space.provider)
    assert _recorded_requests(entries, "supplier-b") == 400
    aggregates = [e for e in entries if e["type"] == "refusals"]
    assert aggregates and all(set(e["outcomes"]) <= {"rejected", "exhausted"} for e in aggregates)
    _verify(space.provider)
    capsys.readouterr()
    assert run_cli("audit", "show", "--home", space.provider.home, "--member", "supplier-b") == 0
    assert "more refused requests counted, not listed" in capsys.readouterr().out


def test_invalid_utf8_sql_is_recorded_and_refused(space: Space) -> None:
    """gRPC's own decoding used to fail first: INTERNAL to the peer and no audit entry."""
    sql = b"SELECT plant FROM t WHERE plant = '\xff\xfe\x1b[31m'"
    raw = b"\x0a" + bytes([len(sql)]) + sql + b"\x12" + bytes([len(PURPOSE)]) + PURPOSE.encode()
    with _channel(space.server.port, space.grantee) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            list(_raw_query(channel)(raw, timeout=30))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UTF-8" in (refused.value.details() or "")
    with space.peer() as peer:  # the server keeps serving
        assert peer.query("SELECT plant FROM part_defects LIMIT 1", PURPOSE).num_rows == 1
    first = next(e for e in _entries(space.provider) if e["type"] == "request")
    assert (first["member_id"], first["outcome"]) == ("supplier-a", "rejected")
    assert first["query"] == ""
    assert first["query_sha256"] == hashlib.sha256(sql).hexdigest()
    assert first["query_length"] == len(sql)
    assert "\\xff" in first["query_prefix"] and "\x1b" not in first["query_prefix"]


# -- 2. nothing leaves before it is on record; the end records what was handed over ------


def _stream_and_cancel(space: Space, request_id: str) -> tuple[int, bytes, str]:
    """Read every data piece of a large answer, then cancel before the receipt."""
    sql = "SELECT a.plant, a.part_no, b.week, b.defects FROM part_defects a, part_defects b"
    received = b""
    rows = 0
    with _channel(space.server.port, space.grantee) as channel:
        call = _raw_query(channel)(_request(sql, request_id), timeout=60)
        for message in call:
            assert message.HasField("arrow_ipc"), "the receipt came before the cancel"
            received += message.arrow_ipc
            if message.arrow_ipc != EOS:
                reader = pa.ipc.open_stream(received + EOS)
                rows = reader.read_all().num_rows
            if rows == 200 * 200:
                call.cancel()  # every row is here; the receipt is not
                break
    return rows, received, sql


def test_a_peer_that_cancels_at_the_end_is_on_record_with_what_it_got(space: Space) -> None:
    for attempt in range(4):
        request_id = f"cancel-at-end-{attempt}"
        rows, received, _ = _stream_and_cancel(space, request_id)
        assert rows == 200 * 200

        def final(rid: str = request_id) -> dict[str, Any] | None:
            return next(
                (
                    e
                    for e in _entries(space.provider)
                    if e["type"] == "request" and e.get("client_reference", e["request_id"]) == rid
                ),
                None,
            )

        wait_for(lambda: final() is not None)
        entry = final()
        assert entry is not None
        assert entry["outcome"] in ("cancelled", "answered"), entry
        assert entry["rows"] == 200 * 200, entry
        # What was handed to the transport: what the peer read, perhaps with the 8-byte end
        # marker it did not wait for.
        candidates = {received, received + EOS}
        handed = next((c for c in candidates if len(c) == entry["bytes"]), None)
        assert handed is not None, (entry["bytes"], len(received))
        assert entry["result_sha256"] == hashlib.sha256(handed).hexdigest()
        opened = [
            e
            for e in _entries(space.provider)
            if e["type"] == "opened" and e["request_id"] == entry["request_id"]
        ]
        assert len(opened) == 1 and opened[0]["seq"] < entry["seq"]
        assert entry["opened_seq"] == opened[0]["seq"]
    _verify(space.provider)


def test_a_peer_that_leaves_after_the_first_of_many_held_pieces_is_on_record_with_it(
    provider_pair: ProviderPair, serve: Any
) -> None:
    """Small batches: several pieces are worked out before the first is sent (the answer
    may be held whole); the record names exactly the bytes that were handed over."""
    provider, grantee = provider_pair(settings={"batch_rows = 65536": "batch_rows = 500"})
    server = serve(provider)
    sql = (
        "SELECT a.plant, a.part_no, b.week, b.defects FROM part_defects a, part_defects b "
        "ORDER BY ALL"
    )
    # Without bandwidth probes the peer's flow-control window stays at 64 KiB: however long
    # this thread is held up between its first read and its cancel (a busy machine), the
    # server cannot hand the transport the whole 1.4 MB answer and finish first.
    with _channel(server.port, grantee, ("grpc.http2.bdp_probe", 0)) as channel:
        call = _raw_query(channel)(_request(sql, "leaves-early"), timeout=60)
        first = next(iter(call)).arrow_ipc
        call.cancel()
        whole = b"".join(m.arrow_ipc for m in _raw_query(channel)(_request(sql, "all"), timeout=60))
    assert 0 < len(first) < 256 * 1024 < len(whole)  # one piece of many, not the whole answer

    def final() -> dict[str, Any] | None:
        return next(
            (e for e in _entries(provider) if e.get("client_reference") == "leaves-early"), None
        )

    wait_for(lambda: final() is not None)
    entry = final()
    assert entry is not None and entry["outcome"] == "cancelled", entry
    # What reached the transport, which may be more than the peer read before it left.
    handed = whole[: entry["bytes"]]
    assert handed.startswith(first) and len(handed) < len(whole)
    assert entry["result_sha256"] == hashlib.sha256(handed).hexdigest()
    assert 0 < entry["rows"] < 200 * 200
    _verify(provider)


def test_an_answer_over_the_message_limit_has_its_own_outcome(
    provider_pair: ProviderPair, serve: Any
) -> None:
    provider, grantee = provider_pair(
        settings={"batch_rows = 65536": "batch_rows = 65536\nmax_message_bytes = 1024"}
    )
    server = serve(provider)
    with _channel(server.port, grantee) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            list(_raw_query(channel)(_request("SELECT * FROM part_defects", "big-1"), timeout=30))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "message limit" in (refused.value.details() or "")
    entry = next(e for e in _entries(provider) if e["type"] == "request")
    assert entry["outcome"] == "too_large"
    assert (entry["rows"], entry["bytes"], entry["result_sha256"]) == (0, 0, "")


# -- 3. an unwritable log: refuse, NOT_SERVING, chain intact, recover by itself ----------


def _health(port: int, member: Member) -> int:
    with _channel(port, member) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status: int = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        return status


def _query_code(port: int, member: Member, request_id: str) -> grpc.StatusCode:
    sql = "SELECT plant, count(*) AS n FROM part_defects GROUP BY plant"
    with _channel(port, member) as channel:
        try:
            list(_raw_query(channel)(_request(sql, request_id), timeout=30))
        except grpc.RpcError as error:
            code: grpc.StatusCode = error.code()
            return code
    return grpc.StatusCode.OK


def test_a_log_that_cannot_be_written_refuses_and_recovers(provider_pair: ProviderPair) -> None:
    provider, grantee = provider_pair()
    server = ServerProcess(provider.home)
    try:
        assert _query_code(server.port, grantee, "before") == grpc.StatusCode.OK
        size = _log_path(provider).stat().st_size
        # The file-size limit (as a full disk would) stops the log a few bytes further on.
        resource.prlimit(
            server.process.pid, resource.RLIMIT_FSIZE, (size + 200, resource.RLIM_INFINITY)
        )
        for i in range(3):
            assert _query_code(server.port, grantee, f"during-{i}") == grpc.StatusCode.UNAVAILABLE
        assert _health(server.port, grantee) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _log_path(provider).stat().st_size == size  # no torn line left behind
        _verify(provider)
        resource.prlimit(
            server.process.pid,
            resource.RLIMIT_FSIZE,
            (resource.RLIM_INFINITY, resource.RLIM_INFINITY),
        )
        wait_for(lambda: _health(server.port, grantee) == health_pb2.HealthCheckResponse.SERVING)
        assert _query_code(server.port, grantee, "after") == grpc.StatusCode.OK
    finally:
        server.close()
    entries = _entries(provider)
    outages = [e for e in entries if e["type"] == "outage"]
    assert len(outages) == 1
    assert outages[0]["cause"] == "the file-size limit is reached"
    assert outages[0]["refused"] == {"supplier-a": 3}
    ids = [e["client_reference"] for e in entries if e["type"] == "request"]
    assert ids == ["before", "after"]
    assert "Traceback" not in server.log()
    _verify(provider)


# -- 4. every request on record, even those that never reach a worker in time -----------


@pytest.mark.slow
def test_short_deadlines_under_load_leave_every_request_on_record(space: Space) -> None:
    slow = "SELECT count(*) AS n FROM part_defects a, part_defects b, part_defects c"
    sent = [0]
    lock = threading.Lock()

    def peer_load(worker: int) -> None:
        rng = random.Random(worker)
        with _channel(space.server.port, space.grantee) as channel:
            # The connection is made first: a call whose deadline passes while the client is
            # still connecting never reaches the server, so it is not a request sent.
            grpc.channel_ready_future(channel).result(timeout=30)
            call = _raw_query(channel)
            for i in range(8):
                with lock:
                    sent[0] += 1
                with contextlib.suppress(grpc.RpcError):
                    list(call(_request(slow, f"w{worker}-{i}"), timeout=rng.uniform(0.02, 0.2)))

    threads = [threading.Thread(target=peer_load, args=(w,)) for w in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    space.server.service.wait_until_idle(5)  # handlers of requests given up still recording
    space.server.stop(grace=5)
    entries = _entries(space.provider)
    # Every request that reached the connector is on record. One whose 20 ms deadline passes
    # in this busy test process before it is sent never reaches it (seen beside the memory
    # blow-up tests: 254 of 256 arrived): that is counted on neither side.
    arrived = space.server.service.arrivals
    assert _recorded_requests(entries, "supplier-a") == arrived
    assert sent[0] == 256 and 0.9 * sent[0] <= arrived <= sent[0]
    outcomes = {e["outcome"] for e in entries if e["type"] == "request"}
    assert "failed" not in outcomes, outcomes
    _verify(space.provider)


def test_requests_over_the_concurrency_limits_are_refused_on_record(
    provider_pair: ProviderPair, serve: Any
) -> None:
    """More concurrent requests than the server takes: the ones turned away (by the query
    slots or the in-flight limit; gRPC's own limit used to refuse them without a trace)
    are on record too."""
    provider, grantee = provider_pair(
        settings={
            "max_concurrent_queries = 8": "max_concurrent_queries = 1",
            # A short queue: the rest are refused, by it or by the in-flight limit.
            "queue_length = 64": "queue_length = 4",
        }
    )
    server = serve(provider)
    slow = "SELECT count(*) AS n FROM part_defects a, part_defects b, part_defects c"
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()
    start = threading.Barrier(48)

    def one(worker: int) -> None:
        with _channel(server.port, grantee) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            start.wait()
            try:
                list(_raw_query(channel)(_request(slow, f"c{worker}"), timeout=20))
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
            with lock:
                codes.append(code)

    threads = [threading.Thread(target=one, args=(w,)) for w in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    server.stop(grace=5)
    assert _recorded_requests(_entries(provider), "supplier-a") == len(codes) == 48
    _verify(provider)


# -- 5. interrupts are outcomes, not failures -------------------------------------------


@pytest.mark.slow
def test_interrupted_reads_are_timeouts_not_failures(provider_pair: ProviderPair) -> None:
    provider, grantee = provider_pair(settings={"batch_rows = 65536": "batch_rows = 500"})
    server = ServerProcess(provider.home)
    # Few rows match: the server spends its time inside DuckDB reading the next batch, where
    # the interrupt reaches pyarrow's reader (a plain OSError "INTERRUPT Error").
    sql = (
        "SELECT a.plant, b.week, c.defects FROM part_defects a, part_defects b, part_defects c, "
        "part_defects d WHERE a.defects * b.defects * c.defects * d.defects = 83521"
    )
    codes = set()
    try:
        with _channel(server.port, grantee) as channel:
            for i in range(6):
                try:
                    for _ in _raw_query(channel)(_request(sql, f"slow-{i}"), timeout=0.4 + i * 0.1):
                        pass
                except grpc.RpcError as error:
                    codes.add(error.code())
    finally:
        _let_requests_settle(provider, 6)
        server.close()
    assert grpc.StatusCode.INTERNAL not in codes
    outcomes = [e["outcome"] for e in _entries(provider) if e["type"] == "request"]
    assert outcomes and set(outcomes) <= {"timeout", "cancelled"}, outcomes
    assert "Traceback" not in server.log() and "failed unexpectedly" not in server.log()


# -- 6. terminal and log injection ------------------------------------------------------

INJECTED = (
    'SELECT * FROM "x\x1b]0;pwned\x07\n     9 2026-01-01T00:00:00 query   forged\u202e"',
    "SELECT CAST('\x1b]0;pwned\x07 forged\u202e' AS INTEGER) AS n FROM part_defects",
)


@pytest.mark.slow
def test_audit_show_and_server_log_escape_what_peers_send(
    provider_pair: ProviderPair, capsys: pytest.CaptureFixture[str]
) -> None:
    provider, grantee = provider_pair()
    server = ServerProcess(provider.home)
    try:
        with _channel(server.port, grantee) as channel:
            for sql in INJECTED:
                with pytest.raises(grpc.RpcError):
                    list(_raw_query(channel)(_request(sql), timeout=30))
    finally:
        _let_requests_settle(provider, len(INJECTED))
        server.close()
    capsys.readouterr()
    assert run_cli("audit", "show", "--home", provider.home) == 0
    shown = capsys.readouterr().out
    for text in (shown, server.log()):
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
        assert "forged" not in text or "\\n" in text
    requests = [e for e in _entries(provider) if e["type"] == "request"]
    # One line per entry and per reason: nothing the peer sent starts a line of its own.
    assert len(shown.splitlines()) == sum(1 + len(e["reasons"]) for e in requests)


# -- 7. request ids are the connector's ------------------------------------------------


def test_peers_cannot_choose_the_request_id(space: Space, make_member: Any) -> None:
    """Two members (and one member twice) send the same request_id: the audit log and the
    receipts carry distinct ids the connector assigned, the peers' id beside them."""
    space.provider.write_policy("other.yaml", policy_text("other", members="[supplier-b]"))
    space.server.reload()  # what SIGHUP does: no wait for the watcher's next poll
    sql = "SELECT plant, count(*) AS n FROM part_defects GROUP BY plant"
    receipts = []
    wait_for(lambda: _answers(space, space.outsider, sql))
    for member in (space.grantee, space.grantee, space.outsider):
        with space.peer(member) as peer:
            receipts.append(peer.fetch(sql, PURPOSE, request_id="same-id").receipt)
    ids = [r.request_id for r in receipts]
    assert len(set(ids)) == 3 and "same-id" not in ids
    assert {r.client_reference for r in receipts} == {"same-id"}
    recorded = [
        e for e in _entries(space.provider) if e["type"] == "request" and e["client_reference"]
    ]
    assert [e["request_id"] for e in recorded] == ids
    assert all(e["client_reference"] == "same-id" for e in recorded)


def _answers(space: Space, member: Member, sql: str) -> bool:
    with space.peer(member) as peer:
        try:
            peer.query(sql, PURPOSE)
        except ConnectorError:
            return False
    return True

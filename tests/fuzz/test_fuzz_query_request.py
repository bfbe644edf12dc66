"""Fuzz target: the QueryRequest handler of a real server over mutual TLS.

Generated and mutated QueryRequest messages (and raw bytes that are no message at all) go to
one server. Whatever arrives, the answer is a stream that ends with a receipt or a status the
connector chose on purpose: never INTERNAL or UNKNOWN, never a hang, and the server keeps
answering a normal query. Every request is on record in the audit log.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector._proto.connector.v1 import connector_pb2 as pb
from tests.conftest import Space

QUERY = "/connector.v1.Connector/Query"
PURPOSE = "quality-benchmarking"
ON_PURPOSE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
FRAGMENTS = [
    "SELECT", "plant", "defects", "supplier_price", "FROM", "part_defects", "WHERE", "GROUP BY",
    "ORDER BY", "LIMIT", "(", ")", ",", "*", "#2", "COLUMNS('.*')", "count(*)", "sum(defects)",
    "'x'", "1e308", "9" * 40, "--", "/*", "*/", ";", "UNION", "read_csv('/etc/passwd')",
    "repeat(plant, 100000)", "\x00", "é", "\u202e", "$$", "\"", "'",
]  # fmt: skip

sql_text = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=25).map(" ".join),
    st.text(max_size=300),
)
messages = st.builds(
    lambda sql, purpose, max_rows, request_id: pb.QueryRequest(
        sql=sql, purpose=purpose, max_rows=max_rows, request_id=request_id
    ).SerializeToString(),
    sql_text,
    st.one_of(st.just(PURPOSE), st.text(max_size=200)),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.text(max_size=200),
)
raw_bytes = st.binary(max_size=512)


def _length(size: int) -> bytes:
    out = bytearray()
    while True:
        out.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            return bytes(out)


# A well-formed message whose sql field holds any bytes, invalid UTF-8 included (which no
# protobuf library writes, but a hostile peer can).
sql_bytes = st.binary(max_size=300).map(
    lambda data: b"\x0a" + _length(len(data)) + data + b"\x12\x14" + PURPOSE.encode()
)


@pytest.fixture(scope="module")
def channel(shared_space: Space) -> Iterator[grpc.Channel]:
    identity = shared_space.grantee.identity()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.cert_pem,
    )
    with grpc.secure_channel(f"127.0.0.1:{shared_space.server.port}", credentials) as opened:
        yield opened


def _send(channel: grpc.Channel, raw: bytes) -> grpc.StatusCode:
    call: Any = channel.unary_stream(
        QUERY, request_serializer=lambda data: data, response_deserializer=lambda data: data
    )
    try:
        for _ in call(raw, timeout=30):
            pass
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


@given(raw=st.one_of(messages, raw_bytes, sql_bytes))
def test_any_query_request_gets_an_answer_on_purpose(channel: grpc.Channel, raw: bytes) -> None:
    assert _send(channel, raw) in ON_PURPOSE


def test_the_server_still_answers_after_the_fuzzing(
    channel: grpc.Channel, shared_space: Space
) -> None:
    ok = pb.QueryRequest(sql="SELECT count(*) FROM part_defects", purpose=PURPOSE)
    # After thousands of refusals (the long run) the fuzzing member may be throttled by the
    # audit log's rate limit on refusals; that is an answer on purpose too.
    assert _send(channel, ok.SerializeToString()) in (
        grpc.StatusCode.OK,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    with shared_space.peer(shared_space.outsider) as other:  # other members are answered
        assert other.catalog() == []

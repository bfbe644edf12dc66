"""Fuzz the Flight SQL command reader: any bytes a peer sends as a command, ticket or action
body are read as one of our messages or refused with QueryRejected / UnsupportedCommand,
and a metadata command read is answered with a table (never another exception)."""

from __future__ import annotations

import re

import pyarrow as pa
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from connector._proto import flight_sql_pb2 as sql_pb
from connector.errors import QueryRejected
from connector.flight_sql import (
    ListedTable,
    UnsupportedCommand,
    like,
    metadata_table,
    pack,
    unpack,
)
from connector.store import ColumnInfo

VALID = [
    pack(sql_pb.CommandStatementQuery(query="SELECT plant FROM part_defects")),
    pack(sql_pb.CommandGetTables(table_name_filter_pattern="part%", include_schema=True)),
    pack(sql_pb.CommandGetDbSchemas(db_schema_filter_pattern="_")),
    pack(sql_pb.CommandGetSqlInfo(info=[0, 1, 3, 999])),
    pack(sql_pb.CommandGetTableTypes()),
]
LISTED = [ListedTable("part_defects", (ColumnInfo("plant", "VARCHAR"), ColumnInfo("n", "BIGINT")))]


@st.composite
def mutated_command(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@given(st.one_of(mutated_command(), st.binary(max_size=300)))
def test_any_command_bytes_are_read_or_refused(data: bytes) -> None:
    try:
        command = unpack(data)
    except (QueryRejected, UnsupportedCommand):
        return
    assert isinstance(command, Message)
    if isinstance(command, (sql_pb.CommandStatementQuery, sql_pb.CommandPreparedStatementQuery)):
        return
    assert isinstance(metadata_table(command, lambda: LISTED), pa.Table)


@given(st.text("ab%_.", max_size=10), st.text("ab.\n", max_size=10))
def test_like_matches_as_sql_like_does(pattern: str, text: str) -> None:
    # The reference: the backtracking regular expression that like() replaces (fine on
    # inputs this short).
    regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    assert like(pattern, text) == (re.fullmatch(regex, text, flags=re.DOTALL) is not None)

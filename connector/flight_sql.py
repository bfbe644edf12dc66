"""The Arrow Flight SQL messages the connector speaks, and the tables its metadata calls answer.

Commands arrive as a `google.protobuf.Any` (the FlightDescriptor's cmd, or an action body);
the type URL names the message. Only the messages in protos/flight_sql.proto are read; any
other command is refused by name. Nothing here decides anything: flight.py hands each
request to the Provider.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import duckdb
import pyarrow as pa
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from connector import __version__
from connector._proto import flight_sql_pb2 as sql_pb
from connector.errors import QueryRejected
from connector.store import ColumnInfo

TYPE_PREFIX = "type.googleapis.com/arrow.flight.protocol.sql."
MAX_COMMAND_BYTES = 1024 * 1024  # a descriptor or action body larger than this is refused
MAX_METADATA_BYTES = 16 * 1024  # a metadata command is kept with its ticket: kept small

# The commands read from a FlightDescriptor (GetFlightInfo), by message name.
COMMANDS: dict[str, type[Message]] = {
    m.DESCRIPTOR.name: m
    for m in (
        sql_pb.CommandGetSqlInfo,
        sql_pb.CommandGetCatalogs,
        sql_pb.CommandGetDbSchemas,
        sql_pb.CommandGetTables,
        sql_pb.CommandGetTableTypes,
        sql_pb.CommandStatementQuery,
        sql_pb.CommandPreparedStatementQuery,
    )
}
CREATE_PREPARED = "CreatePreparedStatement"
CLOSE_PREPARED = "ClosePreparedStatement"
CLOSE_SESSION = "CloseSession"

# SqlInfo ids (Flight SQL specification, "Server Information") and what this connector says.
SQL_INFO: dict[int, str | bool] = {
    0: "connector",  # FLIGHT_SQL_SERVER_NAME
    1: __version__,  # FLIGHT_SQL_SERVER_VERSION
    2: pa.__version__,  # FLIGHT_SQL_SERVER_ARROW_VERSION
    3: True,  # FLIGHT_SQL_SERVER_READ_ONLY
    4: True,  # FLIGHT_SQL_SERVER_SQL
    5: False,  # FLIGHT_SQL_SERVER_SUBSTRAIT
}
TABLE_TYPE = "TABLE"

_SQL_INFO_VALUE = pa.dense_union(
    [
        pa.field("string_value", pa.utf8()),
        pa.field("bool_value", pa.bool_()),
        pa.field("bigint_value", pa.int64()),
        pa.field("int32_bitmask", pa.int32()),
        pa.field("string_list", pa.list_(pa.field("string_data", pa.utf8()))),
        pa.field(
            "int32_to_int32_list_map",
            pa.map_(pa.int32(), pa.list_(pa.field("$data$", pa.int32()))),
        ),
    ]
)
SQL_INFO_SCHEMA = pa.schema(
    [pa.field("info_name", pa.uint32(), nullable=False), pa.field("value", _SQL_INFO_VALUE)]
)
CATALOGS_SCHEMA = pa.schema([pa.field("catalog_name", pa.utf8(), nullable=False)])
DB_SCHEMAS_SCHEMA = pa.schema(
    [pa.field("catalog_name", pa.utf8()), pa.field("db_schema_name", pa.utf8(), nullable=False)]
)
TABLE_TYPES_SCHEMA = pa.schema([pa.field("table_type", pa.utf8(), nullable=False)])
_TABLES_FIELDS = [
    pa.field("catalog_name", pa.utf8()),
    pa.field("db_schema_name", pa.utf8()),
    pa.field("table_name", pa.utf8(), nullable=False),
    pa.field("table_type", pa.utf8(), nullable=False),
]
TABLES_SCHEMA = pa.schema(_TABLES_FIELDS)
TABLES_WITH_SCHEMA = pa.schema([*_TABLES_FIELDS, pa.field("table_schema", pa.binary(), False)])


class UnsupportedCommand(Exception):
    """A well-formed Flight SQL command this connector does not implement (named)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def pack(message: Message) -> bytes:
    """message inside a serialised google.protobuf.Any, as Flight SQL carries it."""
    wrapper = any_pb2.Any()
    wrapper.Pack(message, type_url_prefix="type.googleapis.com/")
    return wrapper.SerializeToString()


def only(kind: type[Message]) -> dict[str, type[Message]]:
    """The `known` argument of unpack() for one message kind."""
    return {kind.DESCRIPTOR.name: kind}


def unpack(data: bytes, known: dict[str, type[Message]] = COMMANDS) -> Message:
    """The command inside a serialised Any: QueryRejected when it is not one, and
    UnsupportedCommand (with its name) when it is a command not in known."""
    if len(data) > MAX_COMMAND_BYTES:
        raise QueryRejected(f"the command is over {MAX_COMMAND_BYTES} bytes; send a shorter one")
    wrapper = any_pb2.Any()
    try:
        wrapper.ParseFromString(data)
    except DecodeError:
        raise QueryRejected(
            "the command is not a Flight SQL command (a serialised google.protobuf.Any)"
        ) from None
    name = wrapper.type_url.rsplit("/", 1)[-1]
    if not wrapper.type_url.startswith(TYPE_PREFIX):
        raise UnsupportedCommand(name[:80] or "(no type)")
    kind = known.get(name.removeprefix("arrow.flight.protocol.sql."))
    if kind is None:
        raise UnsupportedCommand(name[:120])
    message = kind()
    try:
        message.ParseFromString(wrapper.value)
    except DecodeError:
        raise QueryRejected(f"the {kind.DESCRIPTOR.name} command could not be decoded") from None
    return message


def sql_info_table(wanted: Sequence[int]) -> pa.Table:
    """GetSqlInfo's answer: the facts asked for that this connector knows (all when none)."""
    ids = [i for i in (wanted or SQL_INFO) if i in SQL_INFO]
    strings = [v for i in ids if isinstance(v := SQL_INFO[i], str)]
    bools = [v for i in ids if isinstance(v := SQL_INFO[i], bool)]
    codes, offsets, seen = [], [], {0: 0, 1: 0}
    for i in ids:
        code = 1 if isinstance(SQL_INFO[i], bool) else 0
        codes.append(code)
        offsets.append(seen[code])
        seen[code] += 1
    children = [
        pa.array(strings, pa.utf8()),
        pa.array(bools, pa.bool_()),
        *(pa.array([], f.type) for f in list(_SQL_INFO_VALUE)[2:]),
    ]
    value = pa.UnionArray.from_dense(
        pa.array(codes, pa.int8()),
        pa.array(offsets, pa.int32()),
        children,
        [f.name for f in _SQL_INFO_VALUE],
    )
    return pa.Table.from_arrays([pa.array(ids, pa.uint32()), value], schema=SQL_INFO_SCHEMA)


def catalogs_table() -> pa.Table:
    """GetCatalogs: the connector has no catalogs (datasets are named without one)."""
    return CATALOGS_SCHEMA.empty_table()


def db_schemas_table(command: sql_pb.CommandGetDbSchemas) -> pa.Table:
    """GetDbSchemas: one schema without a name (clients list tables per schema)."""
    found = not (command.HasField("catalog") and command.catalog)
    found = found and _like(command, "db_schema_filter_pattern", "")
    names = [""] if found else []
    return pa.table(
        {"catalog_name": [None] * len(names), "db_schema_name": names}, schema=DB_SCHEMAS_SCHEMA
    )


def table_types_table() -> pa.Table:
    """GetTableTypes: every dataset is a TABLE."""
    return pa.table({"table_type": [TABLE_TYPE]}, schema=TABLE_TYPES_SCHEMA)


@dataclass(frozen=True)
class ListedTable:
    """One dataset as GetTables lists it: its name and the columns the catalog shows."""

    name: str
    columns: tuple[ColumnInfo, ...]


def checked_metadata(data: bytes) -> bytes:
    """A metadata command's bytes, to keep with its ticket; QueryRejected when over the limit."""
    if len(data) > MAX_METADATA_BYTES:
        raise QueryRejected(
            f"a metadata command may have at most {MAX_METADATA_BYTES} bytes; send fewer "
            "table types or a shorter pattern"
        )
    return data


def metadata_table(command: Message, listed: Callable[[], Iterable[ListedTable]]) -> pa.Table:
    """The answer to a metadata command; listed() gives the datasets GetTables may show."""
    if isinstance(command, sql_pb.CommandGetSqlInfo):
        return sql_info_table(list(command.info))
    if isinstance(command, sql_pb.CommandGetCatalogs):
        return catalogs_table()
    if isinstance(command, sql_pb.CommandGetDbSchemas):
        return db_schemas_table(command)
    if isinstance(command, sql_pb.CommandGetTableTypes):
        return table_types_table()
    if isinstance(command, sql_pb.CommandGetTables):
        return tables_table(listed(), command)
    raise UnsupportedCommand(type(command).__name__)


def tables_table(listed: Iterable[ListedTable], command: sql_pb.CommandGetTables) -> pa.Table:
    """GetTables: the datasets listed (once each), narrowed by the command's LIKE filters."""
    unique = {t.name: t for t in reversed(list(listed))}.values()  # the first of each name
    wanted = [
        t
        for t in sorted(unique, key=lambda t: t.name)
        if _in_scope(command) and _like(command, "table_name_filter_pattern", t.name)
    ]
    if command.table_types and TABLE_TYPE not in command.table_types:
        wanted = []
    columns: dict[str, list[object]] = {
        "catalog_name": [None] * len(wanted),
        "db_schema_name": [""] * len(wanted),
        "table_name": [t.name for t in wanted],
        "table_type": [TABLE_TYPE] * len(wanted),
    }
    if not command.include_schema:
        return pa.table(columns, schema=TABLES_SCHEMA)
    columns["table_schema"] = [arrow_schema(t.columns).serialize().to_pybytes() for t in wanted]
    return pa.table(columns, schema=TABLES_WITH_SCHEMA)


def _in_scope(command: sql_pb.CommandGetTables) -> bool:
    # Datasets have no catalog and no schema: a filter naming one finds nothing.
    if command.HasField("catalog") and command.catalog:
        return False
    return _like(command, "db_schema_filter_pattern", "")


def _like(command: Message, field: str, value: str) -> bool:
    return not command.HasField(field) or like(getattr(command, field), value)


def like(pattern: str, text: str) -> bool:
    """SQL LIKE without escapes: % any run of characters, _ any one character. The pattern
    is the peer's: matched in time linear in len(pattern) * len(text), never by a
    backtracking regular expression (which "%_%_%_...!" makes take minutes)."""
    at = matched = resume = 0
    star = -1  # the pattern position after the last %, and the text position it resumed at
    while matched < len(text):
        if at < len(pattern) and pattern[at] in ("_", text[matched]) and pattern[at] != "%":
            at, matched = at + 1, matched + 1
        elif at < len(pattern) and pattern[at] == "%":
            star, resume = at + 1, matched
            at = star
        elif star >= 0:
            resume += 1
            at, matched = star, resume
        else:
            return False
    return all(c == "%" for c in pattern[at:])


_TYPE_TEXT = re.compile(r"[A-Za-z0-9_(), \[\]]+")


def arrow_schema(columns: Sequence[ColumnInfo]) -> pa.Schema:
    """The Arrow schema of columns typed in DuckDB's words (as DuckDB itself converts them)."""
    fields = []
    with duckdb.connect(":memory:") as con:
        con.execute("SET enable_external_access = false")
        for column in columns:
            if not _TYPE_TEXT.fullmatch(column.type):
                fields.append(pa.field(column.name, pa.utf8()))
                continue
            typed = con.sql(f"SELECT CAST(NULL AS {column.type}) AS c LIMIT 0")
            fields.append(pa.field(column.name, typed.to_arrow_table().schema.field(0).type))
    return pa.schema(fields)

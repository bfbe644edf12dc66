"""The guard's parser: one locked-down in-memory DuckDB that only parses and serialises, and
a peer's text read into the syntax tree of one SELECT, or refused with the position."""

from __future__ import annotations

import json
import threading
from typing import Any

import duckdb

from connector.errors import QueryRejected
from connector.sqltree import error_position


def _parser_database() -> duckdb.DuckDBPyConnection:
    """The locked-down in-memory database that only parses and serialises."""
    con = duckdb.connect(":memory:", config={"threads": 1})
    for statement in (
        "SET enable_external_access = false",
        "SET autoload_known_extensions = false",
        "SET autoinstall_known_extensions = false",
        "SET lock_configuration = true",
    ):
        con.execute(statement)
    return con


# One database for all threads: each DuckDB database starts threads of its own, whose
# stacks would count against the server's address-space limit (process_memory.py).
_PARSER_DATABASE = _parser_database()


class _ParserConnection(threading.local):
    """One cursor per thread on the shared parser database: a database per thread cost
    about 6 MB and 9 threads each, kept for the life of the server's worker threads."""

    def __init__(self) -> None:
        self.con = _PARSER_DATABASE.cursor()


_PARSER = _ParserConnection()


def parser_connection() -> duckdb.DuckDBPyConnection:
    """This thread's locked-down in-memory connection, which only parses and serialises."""
    return _PARSER.con


def parse_select(sql: str) -> dict[str, Any]:
    """The syntax tree of sql's one SELECT statement (DuckDB's serialised form), or
    QueryRejected saying what is wrong and where."""
    con = _PARSER.con
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise _syntax_error(exc, _error_position(con, sql)) from None
    if len(statements) != 1:
        raise QueryRejected(
            f"send exactly one statement, not {len(statements)} (no ';' between statements)"
        )
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryRejected(f"only SELECT is allowed, not {kind.name}", position=0)
    try:
        text = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
    except duckdb.Error as exc:
        raise _syntax_error(exc) from None
    document = json.loads(text)
    if document.get("error"):
        message = str(document.get("error_message", "the query could not be parsed"))
        first = message.splitlines()[0]
        text = first if first.startswith("syntax error") else f"syntax error: {first}"
        raise QueryRejected(text, position=error_position(document))
    nodes = document.get("statements", [])
    if len(nodes) != 1 or not isinstance(nodes[0].get("node"), dict):
        raise QueryRejected("send exactly one SELECT statement")
    node: dict[str, Any] = nodes[0]["node"]
    return node


def _syntax_error(exc: duckdb.Error, position: int | None = None) -> QueryRejected:
    first = str(exc).splitlines()[0] if str(exc) else "the query could not be parsed"
    first = first.replace("Parser Error: ", "")
    if "expression depth" in first:
        return QueryRejected("the query is nested too deeply")
    text = first if first.startswith("syntax error") else f"syntax error: {first}"
    return QueryRejected(text, position=position)


def _error_position(con: duckdb.DuckDBPyConnection, sql: str) -> int | None:
    """Where DuckDB's parser stopped: its serialised error carries the position, which the
    exception's text only draws as a caret."""
    try:
        text = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
        document = json.loads(text)
    except (duckdb.Error, ValueError, IndexError):
        return None
    return error_position(document) if isinstance(document, dict) else None

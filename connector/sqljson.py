"""A peer's SQL as DuckDB's parsed-query JSON, and an edited tree back to SQL.

Both go through the guard's locked-down parser connection; the rewrites of the aggregate-only
and noise rules (aggregates.py, noise.py) edit the tree in between, reading it through
sqltree.py.
"""

from __future__ import annotations

import json
from typing import Any

import duckdb

from connector.errors import QueryRejected
from connector.sqlparser import parser_connection


def serialised_query(sql: str) -> dict[str, Any]:
    """The parsed query as `json_serialize_sql` gives it; QueryRejected unless it is one
    statement DuckDB can parse."""
    try:
        text = parser_connection().execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
        document: dict[str, Any] = json.loads(text)
    except (duckdb.Error, ValueError):
        raise QueryRejected("the query could not be parsed") from None
    if document.get("error") or len(document.get("statements") or []) != 1:
        raise QueryRejected("send exactly one SELECT statement")
    return document


def query_sql(document: dict[str, Any]) -> str:
    """The SQL of a (rewritten) serialised query; duckdb.Error when DuckDB cannot read it."""
    rewritten = (
        parser_connection()
        .execute("SELECT json_deserialize_sql(?)", [json.dumps(document)])
        .fetchall()[0][0]
    )
    return str(rewritten)

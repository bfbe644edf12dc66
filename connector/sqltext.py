"""SQL text the connector writes itself: quoted identifiers, string and typed literals.

Every name or value that reaches SQL the connector runs (dataset and column names, file
paths, row-filter values from policy files) is rendered here, and nowhere else.
"""

from __future__ import annotations

import datetime as dt
import math

SqlValue = str | int | float | bool | dt.date | dt.datetime


def quote_identifier(name: str) -> str:
    """A DuckDB identifier in double quotes, inner quotes doubled."""
    return '"' + name.replace('"', '""') + '"'


def sql_string(text: str) -> str:
    """A DuckDB string literal, inner quotes doubled."""
    return "'" + text.replace("'", "''") + "'"


def sql_literal(value: SqlValue) -> str:
    """A typed SQL literal for a value read from a policy file."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("a row-filter number must be finite")
        return repr(value)
    if isinstance(value, dt.datetime):
        return f"TIMESTAMPTZ '{value.isoformat()}'"
    if isinstance(value, dt.date):
        return f"DATE '{value.isoformat()}'"
    return sql_string(value)

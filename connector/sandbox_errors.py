"""DuckDB's errors as a peer may see them: fixed texts that echo no data and no hidden name.

DuckDB's own messages carry values (a failed cast prints the string it could not convert)
and names the peer did not write; these texts are what a peer gets instead.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import duckdb

from connector.errors import (
    ConnectorError,
    PermissionDenied,
    QueryRejected,
    ResourceExhausted,
    StoreError,
)
from connector.refusals import column_refusal
from connector.sqltree import error_position

log = logging.getLogger(__name__)

OUT_OF_MEMORY = "the query needs more memory than this connector allows; aggregate or filter more"
_OUT_OF_MEMORY_TEXTS = ("out of memory", "bad allocation", "bad_alloc", "failed to allocate")

# DuckDB error classes a peer may learn about, with a fixed text that echoes no data.
_SAFE_MESSAGES: tuple[tuple[type[duckdb.Error], str], ...] = (
    (duckdb.ConversionException, "a value could not be converted to the requested type"),
    (duckdb.OutOfRangeException, "a value was out of range for its type"),
    (duckdb.TypeMismatchException, "a value had the wrong type for an operation"),
    (duckdb.InvalidInputException, "a function was given invalid input"),
)

UNAVAILABLE_NAME = (
    "the query names a column, table or function that is not available to you; "
    "use the columns and datasets of your catalog"
)

# Errors caused by the peer's query (INVALID_ARGUMENT), not by the connector.
PEER_FAULTS = (
    duckdb.ConversionException,
    duckdb.OutOfRangeException,
    duckdb.InvalidInputException,
    duckdb.TypeMismatchException,
    duckdb.BinderException,
    duckdb.CatalogException,
    duckdb.ParserException,
)


def peer_message(exc: duckdb.Error) -> str:
    """A message for the peer that carries no data values and no names it did not write."""
    for kind, text in _SAFE_MESSAGES:
        if isinstance(exc, kind):
            return text
    if isinstance(exc, duckdb.BinderException | duckdb.CatalogException):
        return UNAVAILABLE_NAME
    if isinstance(exc, duckdb.ParserException):
        return "the query could not be parsed"
    return "the query failed while running"


def plan_error_message(plan: Mapping[str, object]) -> str:
    """The peer's message for a plan that json_serialize_plan could not produce."""
    kind = str(plan.get("error_type", ""))
    if kind in ("binder", "catalog"):
        return UNAVAILABLE_NAME
    if kind == "parser":
        return "the query could not be parsed"
    return "the query cannot be planned in the sandbox"


_QUALIFIED_MISSING = re.compile(
    r'^[A-Za-z][A-Za-z ]* "[^"]*" does not have a column named "([^"]+)"'
)


def plan_refusal(plan: Mapping[str, object], datasets: Sequence[str]) -> ConnectorError:
    """The refusal for a query DuckDB could not bind: a missing column reads exactly as a
    hidden one does (refusals.py); other names and syntax errors say what and where."""
    name = str(plan.get("name", ""))
    subtype = str(plan.get("error_subtype", ""))
    position = error_position(plan)
    if plan.get("error_type") == "binder" and not name:
        # A qualified reference (t.x) comes without the structured name field; the message
        # then names only what the peer wrote: the qualifier and the column.
        found = _QUALIFIED_MISSING.search(str(plan.get("error_message", "")))
        if found:
            name, subtype = found.group(1), "COLUMN_NOT_FOUND"
    if plan.get("error_type") == "binder" and subtype == "COLUMN_NOT_FOUND" and name:
        return PermissionDenied([column_refusal(name.lower(), datasets)])
    if plan.get("error_type") == "catalog" and subtype == "MISSING_ENTRY" and name:
        kind = str(plan.get("type", "")).lower()
        if kind == "table":
            return QueryRejected(
                f"{name} is not a dataset in your catalog for this purpose", position=position
            )
        return QueryRejected(f"{kind or 'name'} {name} does not exist", position=position)
    return QueryRejected(plan_error_message(plan), position=position)


@contextmanager
def sandbox_failures() -> Iterator[None]:
    """DuckDB's and Python's errors outside a running query (cursors, views) as the
    connector's own: memory running short is RESOURCE_EXHAUSTED, never INTERNAL."""
    try:
        yield
    except (duckdb.Error, MemoryError, RuntimeError) as exc:
        if out_of_memory(exc):
            raise ResourceExhausted(OUT_OF_MEMORY) from None
        log.warning("the sandbox failed outside a query: %s", exc)
        raise StoreError(
            peer_message(exc) if isinstance(exc, duckdb.Error) else "the sandbox failed"
        ) from None


def out_of_memory(exc: Exception) -> bool:
    """A failed allocation, whichever layer reports it (DuckDB, Arrow or Python); a thread
    that cannot start has no memory for its stack."""
    if isinstance(exc, duckdb.OutOfMemoryException | MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        return "can't start new thread" in str(exc)
    text = str(exc).lower()
    return any(t in text for t in _OUT_OF_MEMORY_TEXTS)

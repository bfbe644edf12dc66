"""The sandboxed read path for peers' queries on the member's DuckDB file.

The file is opened read-only once and locked down as SECURITY.md lists. Each request gets
its own cursor with TEMP views that show only what its policy grants; the bound plan is
checked to scan nothing else; results stream batch by batch; errors echo no data.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import duckdb
import pyarrow as pa

from connector.errors import (
    QueryCancelled,
    QueryRejected,
    QueryTimeout,
    ResourceExhausted,
    StoreError,
)
from connector.store import DatasetInfo, busy_or_error, quote_identifier, read_metadata

log = logging.getLogger(__name__)

INTERRUPT_REPEATS = 200
INTERRUPT_INTERVAL = 0.05


class ExposedRelation(Protocol):
    """What the sandbox needs of an enforced relation (see enforce.Relation)."""

    @property
    def dataset(self) -> str: ...
    @property
    def columns(self) -> tuple[str, ...]: ...
    @property
    def sql(self) -> str: ...


@dataclass(frozen=True)
class SandboxLimits:
    """Bounds on every peer query."""

    memory_limit: str = "1GB"
    threads: int = 2
    max_query_seconds: float = 30.0


def _lock_down(con: duckdb.DuckDBPyConnection, limits: SandboxLimits) -> None:
    """The lock-down order from SECURITY.md; after the last SET, no setting can change."""
    statements = [
        "SET enable_external_access = false",
        f"SET memory_limit = '{limits.memory_limit}'",
        f"SET threads = {int(limits.threads)}",
        "SET max_temp_directory_size = '0B'",
        f"SET max_execution_time = {max(1, int(limits.max_query_seconds * 1000))}",
        "SET autoload_known_extensions = false",
        "SET autoinstall_known_extensions = false",
        "SET allow_community_extensions = false",
        "SET python_enable_replacements = false",
        "SET lock_configuration = true",
    ]
    for statement in statements:
        con.execute(statement)


class Store:
    """The server's read path: the database opened read-only once, shared by sessions."""

    def __init__(self, db_path: Path, limits: SandboxLimits) -> None:
        if not db_path.exists():
            raise StoreError(f"{db_path} does not exist: run `connector init` first")
        try:
            self._db = duckdb.connect(str(db_path), read_only=True)
        except duckdb.Error as exc:
            raise busy_or_error(exc, db_path) from None
        try:
            self._datasets = read_metadata(self._db)
        except duckdb.CatalogException:
            self._datasets = {}
        _lock_down(self._db, limits)
        self.limits = limits

    def datasets(self) -> Mapping[str, DatasetInfo]:
        """The datasets as they were when the store was opened."""
        return self._datasets

    def session(self) -> SandboxSession:
        """A fresh cursor for one request; its TEMP views vanish with it."""
        return SandboxSession(self._db.cursor())

    def close(self) -> None:
        """Close the database."""
        self._db.close()


# DuckDB error classes a peer may learn about, with a fixed text that echoes no data.
_SAFE_MESSAGES: tuple[tuple[type[duckdb.Error], str], ...] = (
    (duckdb.ConversionException, "a value could not be converted to the requested type"),
    (duckdb.OutOfRangeException, "a value was out of range for its type"),
    (duckdb.TypeMismatchException, "a value had the wrong type for an operation"),
    (duckdb.InvalidInputException, "a function was given invalid input"),
)


_PEER_FAULTS = (
    duckdb.ConversionException,
    duckdb.OutOfRangeException,
    duckdb.InvalidInputException,
    duckdb.TypeMismatchException,
    duckdb.BinderException,
    duckdb.CatalogException,
    duckdb.ParserException,
)


def _peer_message(exc: duckdb.Error) -> str:
    """A message for the peer that carries no data values and no names it did not write."""
    for kind, text in _SAFE_MESSAGES:
        if isinstance(exc, kind):
            return text
    if isinstance(exc, duckdb.BinderException | duckdb.CatalogException):
        return (
            "the query names a column, table or function that is not available to you; "
            "use the columns and datasets of your catalog"
        )
    if isinstance(exc, duckdb.ParserException):
        return "the query could not be parsed"
    return "the query failed while running"


class SandboxSession:
    """One request's cursor: exposes per-request views, checks the plan, streams results."""

    def __init__(self, cursor: duckdb.DuckDBPyConnection) -> None:
        self._cursor = cursor
        self._running = threading.Event()
        self._cancelled = threading.Event()
        self._closed = False
        self._timed_out = False
        self._lock = threading.Lock()

    def expose(self, relations: Sequence[ExposedRelation]) -> None:
        """Create the TEMP view of each relation under its dataset name."""
        for relation in relations:
            self._cursor.execute(
                f"CREATE TEMP VIEW {quote_identifier(relation.dataset)} AS {relation.sql}"
            )

    def verify_plan(self, sql: str, relations: Sequence[ExposedRelation]) -> None:
        """Second layer: the bound plan may scan only exposed columns of exposed datasets."""
        allowed = {r.dataset: set(r.columns) for r in relations}
        try:
            rows = self._cursor.execute("SELECT json_serialize_plan(?)", [sql]).fetchall()
        except duckdb.Error as exc:
            raise QueryRejected(_peer_message(exc)) from None
        plan = json.loads(rows[0][0]) if rows else {"error": True}
        if plan.get("error"):
            raise QueryRejected(_plan_error(plan))
        for scan in _scans(plan):
            _check_scan(scan, allowed)

    def stream(self, sql: str, batch_rows: int, timeout: float | None) -> ResultStream:
        """Run sql and return its batches as they come (memory bounded by batch_rows)."""
        timer = threading.Timer(timeout, self._time_up) if timeout else None
        self._running.set()
        if timer:
            timer.daemon = True
            timer.start()
        try:
            reader = self._cursor.sql(sql).to_arrow_reader(batch_rows)
        except duckdb.Error as exc:
            if timer:
                timer.cancel()
            raise self._map(exc) from None
        return ResultStream(reader, self, timer)

    def _time_up(self) -> None:
        self._timed_out = True
        self.interrupt()

    def _map(self, exc: duckdb.Error) -> Exception:
        text = str(exc)
        if self._timed_out or "execution time" in text.lower():
            return QueryTimeout("the query ran past its time limit and was stopped")
        if isinstance(exc, duckdb.InterruptException) or self._cancelled.is_set():
            return QueryCancelled("the query was cancelled")
        if isinstance(exc, duckdb.OutOfMemoryException):
            return ResourceExhausted(
                "the query needs more memory than this connector allows; aggregate or filter more"
            )
        log.info("peer query failed in DuckDB: %s", text.splitlines()[0] if text else exc)
        if isinstance(exc, _PEER_FAULTS):
            return QueryRejected(_peer_message(exc))
        return StoreError(_peer_message(exc))

    def interrupt(self) -> None:
        """Stop the running query; repeated until DuckDB has noticed (SECURITY.md)."""
        with self._lock:
            if self._closed or not self._running.is_set() or self._cancelled.is_set():
                return
            self._cancelled.set()
        # An interrupt that arrives before DuckDB starts executing is lost: repeat it.
        threading.Thread(target=self._keep_interrupting, name="interrupt", daemon=True).start()

    def _keep_interrupting(self) -> None:
        for _ in range(INTERRUPT_REPEATS):
            with self._lock:
                if self._closed or not self._running.is_set():
                    return
                self._cursor.interrupt()
            time.sleep(INTERRUPT_INTERVAL)

    def finished(self) -> None:
        """The query is done; interrupts no longer apply."""
        self._running.clear()

    def close(self) -> None:
        """Close the cursor (and its TEMP views)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._running.clear()
        try:
            self._cursor.close()
        except duckdb.Error:
            log.debug("closing a sandbox cursor failed", exc_info=True)


class ResultStream:
    """The schema and record batches of a running query."""

    def __init__(
        self,
        reader: pa.RecordBatchReader,
        session: SandboxSession,
        timer: threading.Timer | None,
    ) -> None:
        self.schema: pa.Schema = reader.schema
        self._reader = reader
        self._session = session
        self._timer = timer

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        try:
            while True:
                if self._session._cancelled.is_set():
                    raise self._session._map(duckdb.InterruptException("interrupted"))
                try:
                    batch = self._reader.read_next_batch()
                except StopIteration:
                    return
                except duckdb.Error as exc:
                    raise self._session._map(exc) from None
                except pa.ArrowException as exc:
                    raise self._session._map(duckdb.Error(str(exc))) from None
                yield batch
        finally:
            if self._timer:
                self._timer.cancel()
            self._session.finished()


def _plan_error(plan: Mapping[str, object]) -> str:
    kind = str(plan.get("error_type", ""))
    if kind in ("binder", "catalog"):
        return (
            "the query names a column, table or function that is not available to you; "
            "use the columns and datasets of your catalog"
        )
    if kind == "parser":
        return "the query could not be parsed"
    return "the query cannot be planned in the sandbox"


def _scans(node: object) -> Iterator[Mapping[str, object]]:
    """Every LOGICAL_GET (and other leaf reader) in a serialised plan."""
    if isinstance(node, dict):
        if node.get("type") == "LOGICAL_GET":
            yield node
        for value in node.values():
            yield from _scans(value)
    elif isinstance(node, list):
        for item in node:
            yield from _scans(item)


def _check_scan(scan: Mapping[str, object], allowed: Mapping[str, set[str]]) -> None:
    function = scan.get("qname", {})
    name = function.get("path", [""])[-1] if isinstance(function, dict) else ""
    if name != "seq_scan":
        raise QueryRejected(f"the query reads through {name or 'a table function'}, not a dataset")
    data = scan.get("function_data")
    if not isinstance(data, dict) or data.get("schema") != "datasets":
        raise QueryRejected("the query reads a table that is not one of your datasets")
    table = str(data.get("table"))
    if table not in allowed:
        raise QueryRejected(f"the query reads dataset {table}, which is not granted to you")
    names = scan.get("names")
    indexes = scan.get("column_indexes")
    if not isinstance(names, list) or not isinstance(indexes, list):
        raise QueryRejected("the sandbox could not check which columns the query reads")
    for entry in indexes:
        index = entry.get("index") if isinstance(entry, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(names):
            raise QueryRejected("the query reads a hidden column of a dataset")
        if str(names[index]) not in allowed[table]:
            raise QueryRejected(f"the query reads column {names[index]} of {table}, not granted")

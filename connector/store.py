"""The member's DuckDB file: ingest, dataset metadata, and the sandboxed read path for peers.

Datasets are tables `datasets."<name>"`; their metadata lives in `_connector.datasets`.
Peers never name these: each request gets TEMP views (on its own cursor) that show only what
its policy grants, and the query runs on a connection locked down as SECURITY.md lists.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import duckdb
import pyarrow as pa

from connector.errors import (
    DataError,
    QueryCancelled,
    QueryRejected,
    QueryTimeout,
    ResourceExhausted,
    StoreBusy,
    StoreError,
)

log = logging.getLogger(__name__)

INTERRUPT_REPEATS = 200
INTERRUPT_INTERVAL = 0.05
DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".json": "json",
    ".ndjson": "json",
    ".jsonl": "json",
}
_READERS = {"csv": "read_csv_auto", "parquet": "read_parquet", "json": "read_json_auto"}
_METADATA_DDL = """
CREATE SCHEMA IF NOT EXISTS datasets;
CREATE SCHEMA IF NOT EXISTS _connector;
CREATE TABLE IF NOT EXISTS _connector.datasets (
    name VARCHAR PRIMARY KEY, description VARCHAR NOT NULL, rows BIGINT NOT NULL,
    columns_json VARCHAR NOT NULL, source VARCHAR NOT NULL, mode VARCHAR NOT NULL,
    ingested_at TIMESTAMPTZ NOT NULL
);
"""


@dataclass(frozen=True)
class ColumnInfo:
    """A dataset column: lower-case name and DuckDB type."""

    name: str
    type: str


@dataclass(frozen=True)
class DatasetInfo:
    """What the store records about a dataset."""

    name: str
    description: str
    rows: int
    columns: tuple[ColumnInfo, ...]
    ingested_at: dt.datetime


class ExposedRelation(Protocol):
    """What the sandbox needs of an enforced relation (see enforce.Relation)."""

    @property
    def dataset(self) -> str: ...
    @property
    def columns(self) -> tuple[str, ...]: ...
    @property
    def sql(self) -> str: ...


def quote_identifier(name: str) -> str:
    """A DuckDB identifier in double quotes, inner quotes doubled."""
    return '"' + name.replace('"', '""') + '"'


def _busy_or_error(exc: duckdb.Error, path: Path) -> Exception:
    text = str(exc)
    if "lock" in text.lower():
        pid = re.search(r"PID (\d+)", text)
        holder = f" (process {pid.group(1)})" if pid else ""
        return StoreBusy(
            f"{path} is in use by a running connector{holder}; stop the server, run the "
            "command again, then start the server"
        )
    return StoreError(f"cannot open {path}: {text.splitlines()[0]}")


def create_database(path: Path) -> None:
    """Create an empty member database with the metadata schema."""
    with _open_writable(path) as con:
        con.execute(_METADATA_DDL)


def _open_writable(path: Path) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(path))
    except duckdb.Error as exc:
        raise _busy_or_error(exc, path) from None


def _file_format(source: Path, file_format: str | None) -> str:
    fmt = file_format or FORMATS.get(source.suffix.lower())
    if fmt not in _READERS:
        raise DataError(
            f"cannot tell the format of {source.name}: use a .csv, .parquet or .json file, "
            "or pass --format csv|parquet|json"
        )
    return fmt


def _columns_of(con: duckdb.DuckDBPyConnection, table: str) -> tuple[ColumnInfo, ...]:
    rows = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() "
        "WHERE schema_name = 'datasets' AND table_name = ? ORDER BY column_index",
        [table],
    ).fetchall()
    return tuple(ColumnInfo(str(n), str(t)) for n, t in rows)


def _staged_columns(con: duckdb.DuckDBPyConnection) -> list[str]:
    # DuckDB's readers already rename names that collide case-insensitively (A, a -> A, a_1).
    return [str(d[0]) for d in con.execute("SELECT * FROM staged LIMIT 0").description]


def ingest(
    db_path: Path,
    source: Path,
    dataset: str,
    *,
    description: str | None,
    mode: Literal["replace", "append"],
    file_format: str | None = None,
) -> DatasetInfo:
    """Load source into dataset in one transaction: all rows or none."""
    if not DATASET_NAME.fullmatch(dataset):
        raise DataError(
            f"invalid dataset name {dataset!r}: use 1-63 lower-case letters, digits and _, "
            "starting with a letter"
        )
    if not source.is_file():
        raise DataError(f"{source} does not exist or is not a file")
    reader = _READERS[_file_format(source, file_format)]
    with _open_writable(db_path) as con:
        con.execute(_METADATA_DDL)
        try:
            literal = "'" + str(source).replace("'", "''") + "'"
            con.execute(f"CREATE TEMP VIEW staged AS SELECT * FROM {reader}({literal})")
            names = _staged_columns(con)
        except duckdb.Error as exc:
            raise DataError(f"cannot read {source}: {str(exc).splitlines()[0]}") from None
        select = ", ".join(f"{quote_identifier(n)} AS {quote_identifier(n.lower())}" for n in names)
        target = f"datasets.{quote_identifier(dataset)}"
        con.execute("BEGIN TRANSACTION")
        try:
            existing = _columns_of(con, dataset)
            if mode == "append" and existing:
                appended = _append_select(existing, names, dataset)
                con.execute(f"INSERT INTO {target} SELECT {appended} FROM staged")
            else:
                con.execute(f"CREATE OR REPLACE TABLE {target} AS SELECT {select} FROM staged")
            info = _record(con, dataset, description, source, mode)
            con.execute("COMMIT")
        except duckdb.Error as exc:
            con.execute("ROLLBACK")
            raise DataError(
                f"cannot load {source.name} into {dataset}: {str(exc).splitlines()[0]}; "
                "nothing was changed"
            ) from None
        except BaseException:
            con.execute("ROLLBACK")
            raise
    log.info("dataset %s: %s from %s, now %d rows", dataset, mode, source, info.rows)
    return info


def _append_select(existing: tuple[ColumnInfo, ...], names: list[str], dataset: str) -> str:
    """The SELECT that appends the staged rows: same columns, cast to the dataset's types."""
    if [n.lower() for n in names] != [c.name for c in existing]:
        have = ", ".join(c.name for c in existing)
        raise DataError(
            f"cannot append to {dataset}: its columns are ({have}) but the file has "
            f"({', '.join(names)}); fix the file or use --replace"
        )
    return ", ".join(
        f"CAST({quote_identifier(n)} AS {c.type}) AS {quote_identifier(c.name)}"
        for n, c in zip(names, existing, strict=True)
    )


def _record(
    con: duckdb.DuckDBPyConnection,
    dataset: str,
    description: str | None,
    source: Path,
    mode: str,
) -> DatasetInfo:
    rows = con.execute(f"SELECT count(*) FROM datasets.{quote_identifier(dataset)}").fetchone()
    old = con.execute(
        "SELECT description FROM _connector.datasets WHERE name = ?", [dataset]
    ).fetchone()
    text = description if description is not None else (old[0] if old else "")
    columns = _columns_of(con, dataset)
    now = dt.datetime.now(dt.UTC)
    con.execute(
        "INSERT OR REPLACE INTO _connector.datasets VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            dataset,
            text,
            rows[0] if rows else 0,
            json.dumps([[c.name, c.type] for c in columns]),
            source.name,
            mode,
            now,
        ],
    )
    return DatasetInfo(dataset, text, int(rows[0]) if rows else 0, columns, now)


def _read_metadata(con: duckdb.DuckDBPyConnection) -> dict[str, DatasetInfo]:
    rows = con.execute(
        "SELECT name, description, rows, columns_json, ingested_at FROM _connector.datasets "
        "ORDER BY name"
    ).fetchall()
    return {
        name: DatasetInfo(
            name, desc, int(count), tuple(ColumnInfo(n, t) for n, t in json.loads(cols)), when
        )
        for name, desc, count, cols, when in rows
    }


def list_datasets(db_path: Path) -> list[DatasetInfo]:
    """The datasets in a member database (opened read-only)."""
    if not db_path.exists():
        raise StoreError(f"{db_path} does not exist: run `connector init` first")
    try:
        con = duckdb.connect(str(db_path), read_only=True)
    except duckdb.Error as exc:
        raise _busy_or_error(exc, db_path) from None
    with con:
        try:
            return list(_read_metadata(con).values())
        except duckdb.CatalogException:
            return []


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
            raise _busy_or_error(exc, db_path) from None
        try:
            self._datasets = _read_metadata(self._db)
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

"""The sandboxed read path for peers' queries on the member's DuckDB file.

The file is opened read-only once and locked down as SECURITY.md lists. Each request gets
its own cursor with TEMP views that show only what its policy grants; the bound plan is
checked to scan nothing else; results stream batch by batch; errors echo no data.

Shaped relations (masks, row filters, aggregate-only) are built once as tables of a scratch
database attached before the lock-down (`shaped`: a file remade at every start, so copies
larger than memory spill to disk). A query on a shaped dataset may scan only its shaped
table, never the stored one: with the guard switched off, no SQL reaches a clear value or a
filtered-out row, and no filter on a clear value can be timed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import duckdb
import pyarrow as pa

from connector.errors import (
    PermissionDenied,
    QueryCancelled,
    QueryRejected,
    QueryTimeout,
    ResourceExhausted,
    StoreError,
)
from connector.shaping import (
    AGGREGATE_ONLY_FUNCTIONS,
    EXTREMUM_FUNCTIONS,
    is_measurement_type,
)
from connector.store import (
    DatasetInfo,
    busy_or_error,
    quote_identifier,
    read_metadata,
    sql_string,
)

log = logging.getLogger(__name__)

INTERRUPT_REPEATS = 200
INTERRUPT_INTERVAL = 0.05
STORED_CATALOG = "stored"  # the member's file, attached read-only
SHAPED_CATALOG = "shaped"  # the scratch database of shaped copies
MAX_SHAPED_COPIES = 64


class ExposedRelation(Protocol):
    """What the sandbox needs of an enforced relation (see enforce.Relation)."""

    @property
    def dataset(self) -> str: ...
    @property
    def column_names(self) -> tuple[str, ...]: ...
    @property
    def sql(self) -> str: ...
    @property
    def shaped_table(self) -> str: ...
    @property
    def min_group_size(self) -> int: ...


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

    def __init__(
        self,
        db_path: Path,
        limits: SandboxLimits,
        shaped_path: Path | None = None,
        *,
        max_shaped_copies: int = MAX_SHAPED_COPIES,
    ) -> None:
        if not db_path.exists():
            raise StoreError(f"{db_path} does not exist: run `connector init` first")
        # An in-memory connection with the member's file attached read-only and the scratch
        # database of shaped copies (in memory when no path is given), both before the
        # lock-down: afterwards ATTACH is refused.
        self._db = duckdb.connect(":memory:")
        try:
            self._db.execute(f"ATTACH {sql_string(str(db_path))} AS {STORED_CATALOG} (READ_ONLY)")
        except duckdb.Error as exc:
            self._db.close()
            raise busy_or_error(exc, db_path) from None
        self._attach_scratch(shaped_path)
        self._db.execute(f"USE {STORED_CATALOG}")
        try:
            self._datasets = read_metadata(self._db)
        except duckdb.CatalogException:
            self._datasets = {}
        _lock_down(self._db, limits)
        self.limits = limits
        # Shaped copy -> sessions using it, least recently used first.
        self._copies: OrderedDict[str, int] = OrderedDict()
        self._max_copies = max_shaped_copies
        self._shaping = threading.Lock()

    def _attach_scratch(self, path: Path | None) -> None:
        if path is None:
            self._db.execute(f"ATTACH ':memory:' AS {SHAPED_CATALOG}")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db.execute(f"ATTACH {sql_string(str(path))} AS {SHAPED_CATALOG}")
            # Copies from the last run may follow older policies: start empty.
            stale = self._db.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = ?",
                [SHAPED_CATALOG],
            ).fetchall()
            for (table,) in stale:
                self._db.execute(f"DROP TABLE {_shaped_name(table)}")
        except duckdb.Error as exc:
            self._db.close()
            raise StoreError(
                f"cannot create the scratch database {path} for shaped copies: {exc}; "
                "check that the folder is writable and no other connector uses this home"
            ) from None

    def datasets(self) -> Mapping[str, DatasetInfo]:
        """The datasets as they were when the store was opened."""
        return self._datasets

    def session(self) -> SandboxSession:
        """A fresh cursor for one request; its TEMP views vanish with it."""
        return SandboxSession(self._cursor(), self)

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor that reads names such as datasets."x" in the member's file."""
        cursor = self._db.cursor()
        cursor.execute(f"USE {STORED_CATALOG}")
        return cursor

    def acquire_shaped(self, relation: ExposedRelation) -> str:
        """The qualified name of relation's shaped copy, built on first use and kept from
        being dropped until release_shaped(relation.shaped_table).

        The stored data cannot change while the server holds the file, so a copy stays valid;
        beyond max_shaped_copies the least recently used unused copies are dropped (a copy
        of a changed policy is never used again).
        """
        name = relation.shaped_table
        with self._shaping:
            if name not in self._copies:
                self._build(relation)
                self._copies[name] = 0
            self._copies[name] += 1
            self._copies.move_to_end(name)
            self._drop_unused_beyond_limit()
        return _shaped_name(name)

    def release_shaped(self, name: str) -> None:
        """A session no longer reads the shaped copy name."""
        with self._shaping:
            if self._copies.get(name, 0) > 0:
                self._copies[name] -= 1

    def _build(self, relation: ExposedRelation) -> None:
        cursor = self._cursor()
        try:
            cursor.execute(f"CREATE TABLE {_shaped_name(relation.shaped_table)} AS {relation.sql}")
        except duckdb.OutOfMemoryException:
            raise ResourceExhausted(
                f"dataset {relation.dataset} as your policy shapes it does not fit in this "
                "connector's memory limit; ask the owner"
            ) from None
        except duckdb.Error as exc:
            # The owner's policy does not fit the data (a filter value of the wrong type).
            log.error("cannot shape dataset %s as its policy says: %s", relation.dataset, exc)
            raise PermissionDenied(
                [
                    f"the policy for dataset {relation.dataset} cannot be applied to its "
                    "data (a row filter or mask does not fit the column types); ask the "
                    "owner to fix the policy"
                ]
            ) from None
        finally:
            cursor.close()
        log.info("built the shaped copy %s of dataset %s", relation.shaped_table, relation.dataset)

    def _drop_unused_beyond_limit(self) -> None:
        unused = [name for name, users in self._copies.items() if users == 0]
        for name in unused[: max(0, len(self._copies) - self._max_copies)]:
            cursor = self._cursor()
            try:
                cursor.execute(f"DROP TABLE {_shaped_name(name)}")
            except duckdb.Error:
                # Only disk is at stake: keep serving; the copy is tried again next time.
                log.warning("could not drop the shaped copy %s", name, exc_info=True)
                continue
            finally:
                cursor.close()
            del self._copies[name]
            log.info("dropped the least recently used shaped copy %s", name)

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

    def __init__(self, cursor: duckdb.DuckDBPyConnection, store: Store) -> None:
        self._cursor = cursor
        self._store = store
        self._copies: list[str] = []
        self._running = threading.Event()
        self._cancelled = threading.Event()
        self._closed = False
        self._timed_out = False
        self._lock = threading.Lock()

    def expose(self, relations: Sequence[ExposedRelation]) -> None:
        """Create the TEMP view of each relation under its dataset name."""
        for relation in relations:
            source = relation.sql
            if relation.shaped_table:
                shaped = self._store.acquire_shaped(relation)  # our own name, a hash
                self._copies.append(relation.shaped_table)
                source = f"SELECT * FROM {shaped}"  # noqa: S608
            self._cursor.execute(
                f"CREATE TEMP VIEW {quote_identifier(relation.dataset)} AS {source}"
            )

    def verify_plan(self, sql: str, relations: Sequence[ExposedRelation]) -> None:
        """Second layer: one SELECT whose bound plan scans only what the relations expose,
        and reads aggregate-only relations only in the aggregate form."""
        self._one_select(sql)
        try:
            rows = self._cursor.execute("SELECT json_serialize_plan(?)", [sql]).fetchall()
        except duckdb.Error as exc:
            raise QueryRejected(_peer_message(exc)) from None
        plan = json.loads(rows[0][0]) if rows else {"error": True}
        if plan.get("error"):
            raise QueryRejected(_plan_error(plan))
        allowed = {_source_of(r): r for r in relations}
        for scan, ancestors in _scans(plan, ()):
            relation = _check_scan(scan, allowed)
            if relation.min_group_size:
                check_aggregate_scan(ancestors, relation.min_group_size)

    def _one_select(self, sql: str) -> None:
        # The shaped database is writable: nothing but one SELECT may reach the planner.
        try:
            statements = self._cursor.extract_statements(sql)
        except duckdb.Error as exc:
            raise QueryRejected(_peer_message(exc)) from None
        if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
            raise QueryRejected("send exactly one SELECT statement")

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
        for name in self._copies:
            self._store.release_shaped(name)


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


def _shaped_name(table: str) -> str:
    return f"{SHAPED_CATALOG}.main.{quote_identifier(table)}"


def _source_of(relation: ExposedRelation) -> tuple[str, str, str]:
    """The (catalog, schema, table) a relation's scans must name."""
    if relation.shaped_table:
        return (SHAPED_CATALOG, "main", relation.shaped_table)
    return (STORED_CATALOG, "datasets", relation.dataset)


Ancestors = tuple[Mapping[str, Any], ...]


def _scans(node: object, ancestors: Ancestors) -> Iterator[tuple[Mapping[str, Any], Ancestors]]:
    """Every LOGICAL_GET of a serialised plan, with its operators from the nearest up."""
    if isinstance(node, dict):
        kind = str(node.get("type", ""))
        if kind.startswith("LOGICAL_"):
            if any(word in kind for word in _WRITING_OPERATORS):
                raise QueryRejected("only SELECT is allowed")
            if kind == "LOGICAL_GET":
                yield node, ancestors
            ancestors = (node, *ancestors)
        for value in node.values():
            yield from _scans(value, ancestors)
    elif isinstance(node, list):
        for item in node:
            yield from _scans(item, ancestors)


_WRITING_OPERATORS = (
    "INSERT", "DELETE", "UPDATE", "CREATE", "ALTER", "DROP", "COPY", "EXPORT", "ATTACH",
    "DETACH", "PRAGMA", "SET", "RESET", "LOAD", "TRANSACTION", "VACUUM", "SIMPLE", "MERGE",
)  # fmt: skip


def _check_scan(
    scan: Mapping[str, Any], allowed: Mapping[tuple[str, str, str], ExposedRelation]
) -> ExposedRelation:
    """The relation a scan reads; QueryRejected unless it reads exposed columns of one."""
    function = scan.get("qname", {})
    name = function.get("path", [""])[-1] if isinstance(function, dict) else ""
    if name != "seq_scan":
        raise QueryRejected(f"the query reads through {name or 'a table function'}, not a dataset")
    data = scan.get("function_data")
    if not isinstance(data, dict):
        raise QueryRejected("the query reads a table that is not one of your datasets")
    source = (str(data.get("catalog")), str(data.get("schema")), str(data.get("table")))
    relation = allowed.get(source)
    if relation is None:
        raise QueryRejected("the query reads a table that is not one of your datasets as granted")
    names = scan.get("names")
    indexes = scan.get("column_indexes")
    if not isinstance(names, list) or not isinstance(indexes, list):
        raise QueryRejected("the sandbox could not check which columns the query reads")
    visible = set(relation.column_names)
    for entry in indexes:
        index = entry.get("index") if isinstance(entry, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(names):
            raise QueryRejected("the query reads a hidden column of a dataset")
        if str(names[index]) not in visible:
            raise QueryRejected(
                f"the query reads column {names[index]} of {relation.dataset}, not granted"
            )
    return relation


def check_aggregate_scan(ancestors: Ancestors, min_group_size: int) -> None:
    """A scan of an aggregate-only relation must feed, through column-only steps, one
    aggregate of allowed functions over plain columns, whose every group is kept only when
    count(*) >= min_group_size."""
    refused = QueryRejected(
        "this dataset is aggregate-only: group by granted columns, use only count, sum, avg, "
        f"min, max, stddev or variance of plain columns; groups under {min_group_size} rows "
        "are dropped"
    )
    steps = iter(ancestors)
    for node in steps:
        kind = node.get("type")
        if kind == "LOGICAL_FILTER":
            continue
        if kind == "LOGICAL_PROJECTION" and all(_is_ref(e) for e in node.get("expressions", [])):
            continue
        if kind != "LOGICAL_AGGREGATE_AND_GROUP_BY":
            raise refused
        aggregate = node
        break
    else:
        raise refused
    groups = aggregate.get("groups") or []
    expressions = aggregate.get("expressions") or []
    if not all(_is_ref(g) for g in groups) or not all(_allowed_aggregate(e) for e in expressions):
        raise refused
    count_outputs = {
        len(groups) + i for i, e in enumerate(expressions) if _function_name(e) == "count_star"
    }
    having = next(steps, None)
    if having is None or having.get("type") != "LOGICAL_FILTER":
        raise refused
    if not any(
        _is_min_count(e, count_outputs, min_group_size)
        for e in _conjuncts(having.get("expressions", []))
    ):
        raise refused


def _is_ref(expression: Any) -> bool:
    return isinstance(expression, dict) and expression.get("expression_class") == "BOUND_REF"


def _function_name(expression: Mapping[str, Any]) -> str:
    path = (expression.get("qname") or {}).get("path") or [""]
    return str(path[-1])


def _allowed_aggregate(expression: Any) -> bool:
    if not isinstance(expression, dict) or expression.get("expression_class") != "BOUND_AGGREGATE":
        return False
    name = _function_name(expression)
    children = expression.get("children") or []
    if name not in AGGREGATE_ONLY_FUNCTIONS or expression.get("filter") is not None:
        return False
    if expression.get("order_bys") or not all(_is_ref(c) for c in children):
        return False
    if name in EXTREMUM_FUNCTIONS:
        types = [a.get("id", "") for a in expression.get("arguments") or [] if isinstance(a, dict)]
        return bool(types) and all(is_measurement_type(str(t)) for t in types)
    return True


def _conjuncts(expressions: list[Any]) -> Iterator[Mapping[str, Any]]:
    for expression in expressions:
        if not isinstance(expression, dict):
            continue
        if expression.get("type") == "CONJUNCTION_AND":
            yield from _conjuncts(expression.get("children") or [])
        else:
            yield expression


def _is_min_count(expression: Mapping[str, Any], counts: set[int], minimum: int) -> bool:
    """expression is `count(*) >= N` with N >= minimum, count(*) of the aggregate below."""
    children = expression.get("children") or []
    if expression.get("type") != "COMPARE_GREATERTHANOREQUALTO" or len(children) != 2:
        return False
    left, right = children
    if not _is_ref(left) or left.get("index") not in counts:
        return False
    value = _constant(right)
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _constant(expression: Any) -> Any:
    if not isinstance(expression, dict):
        return None
    if expression.get("expression_class") == "BOUND_CONSTANT":
        value = expression.get("value") or {}
        return None if value.get("is_null") else value.get("value")
    if _function_name(expression) == "__cast" and len(expression.get("children") or []) == 1:
        return _constant(expression["children"][0])
    return None

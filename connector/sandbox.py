"""The sandboxed read path for peers' queries on the member's DuckDB file.

The file is attached to an in-memory connection that is locked down as the project's
SECURITY.md describes: read-only, except in the running server, which is also the file's
single writer for live ingest (ingest_service.py). Each request gets its own cursor in a
read-only transaction (DuckDB refuses any write in it) with TEMP views that show only what
its policy grants; the bound plan is checked (plancheck.py) to scan nothing else; results
stream batch by batch; errors echo no data (sandbox_errors.py).

A query on a shaped dataset (masks, row filters, aggregate-only) may scan only its shaped
copy (shaped_copies.py), never the stored table: with the guard switched off, no SQL reaches
a clear value or a filtered-out row, and no filter on a clear value can be timed.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import duckdb
import pyarrow as pa

from connector.alarms import Alarm, AlarmClock
from connector.arrow_stream import narrowed, narrowed_schema
from connector.commit_gate import CommitGate
from connector.errors import (
    QueryCancelled,
    QueryRejected,
    QueryTimeout,
    ResourceExhausted,
    StoreError,
)
from connector.plancheck import ExposedRelation, SourceName, check_plan_text
from connector.sandbox_errors import PEER_FAULTS, peer_message, plan_refusal
from connector.shaped_copies import (
    MAX_SHAPED_COPIES,
    SHAPED_CATALOG,
    ShapedCopies,
    attach_scratch,
)
from connector.sqltext import quote_identifier, sql_string
from connector.sqltree import plan_document
from connector.store import (
    ColumnInfo,
    DatasetInfo,
    busy_or_error,
    prepare_metadata,
    read_metadata,
)
from connector.version_log import VersionInfo, read_versions, rows_at

log = logging.getLogger(__name__)


class TypedRelation(Protocol):
    """A relation's name and its columns with their types (see enforce.Relation)."""

    @property
    def dataset(self) -> str: ...
    @property
    def columns(self) -> tuple[ColumnInfo, ...]: ...


INTERRUPT_REPEATS = 200
INTERRUPT_INTERVAL = 0.05
STORED_CATALOG = "stored"  # the member's file, attached read-only
CHECKED_NAMES = 1024  # texts whose names bound against their stand-ins, kept (LRU)
MAX_CHECKED_LENGTH = 16_384  # longer texts are bound every time
OUT_OF_MEMORY = "the query needs more memory than this connector allows; aggregate or filter more"
# How an allocation that failed inside DuckDB can be worded when it is not raised as
# OutOfMemoryException (a failed allocation at the process's address-space limit).
_OUT_OF_MEMORY_TEXTS = ("out of memory", "bad allocation", "bad_alloc", "failed to allocate")


@dataclass(frozen=True)
class SandboxLimits:
    """Bounds on every peer query."""

    memory_limit: str = "1GB"
    threads: int = 2
    max_query_seconds: float = 30.0


def _lock_down(con: duckdb.DuckDBPyConnection, limits: SandboxLimits) -> None:
    """The lock-down order of SECURITY.md; after the last SET, no setting can change."""
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


class SandboxDatabase:
    """The server's read path: the database opened read-only once, shared by sessions."""

    def __init__(
        self,
        db_path: Path,
        limits: SandboxLimits,
        shaped_path: Path | None = None,
        *,
        max_shaped_copies: int = MAX_SHAPED_COPIES,
        writable: bool = False,
    ) -> None:
        """writable: the server's own instance, which also loads new data (see writer());
        peers' sessions then read in read-only transactions."""
        if not db_path.exists():
            raise StoreError(f"{db_path} does not exist: run `connector init` first")
        # An in-memory connection with the member's file attached (read-only unless this is
        # the live server's single writer) and the scratch database of shaped copies (in
        # memory when no path is given), both before the lock-down: afterwards ATTACH is
        # refused.
        self._db = duckdb.connect(":memory:")
        mode = "" if writable else " (READ_ONLY)"
        try:
            self._db.execute(f"ATTACH {sql_string(str(db_path))} AS {STORED_CATALOG}{mode}")
        except duckdb.Error as exc:
            self._db.close()
            raise busy_or_error(exc, db_path) from None
        try:
            attach_scratch(self._db, shaped_path)
        except StoreError:
            self._db.close()
            raise
        self._db.execute(f"USE {STORED_CATALOG}")
        if writable:
            try:
                prepare_metadata(self._db)
            except duckdb.Error as exc:
                self._db.close()
                raise StoreError(f"cannot prepare {db_path} for live ingest: {exc}") from None
        self.writable = writable
        self.path = db_path
        self._datasets = self._read_datasets()
        _lock_down(self._db, limits)
        self._names_lock = threading.Lock()
        self._names_passed: OrderedDict[_NamesKey, None] = OrderedDict()
        self._names_for: object = self._datasets
        self.limits = limits
        self.shaped = ShapedCopies(self._cursor, max_shaped_copies)
        self.gate = CommitGate()
        # Deadlines and interrupts run on this one thread, started now while memory is
        # plentiful: a query must still be stoppable when no new thread can start.
        self._alarms = AlarmClock("query-alarms")
        self._alarms.start()

    def _read_datasets(self) -> Mapping[str, DatasetInfo]:
        cursor = self._cursor()
        try:
            return read_metadata(cursor)
        except duckdb.CatalogException:
            return {}
        finally:
            cursor.close()

    def refresh(self) -> None:
        """Read the datasets' metadata again (after a commit, inside the gate's turn)."""
        self._datasets = self._read_datasets()
        self.shaped.keep_versions({name: info.version for name, info in self._datasets.items()})

    def writer(self) -> duckdb.DuckDBPyConnection:
        """A cursor that writes the member's datasets (the live ingest's; never a peer's)."""
        if not self.writable:
            raise StoreError("this sandbox opened the member's file read-only")
        return self._cursor()

    def versions(self, dataset: str) -> list[VersionInfo]:
        """The dataset's version log (the owner's tools only; never a peer's)."""
        cursor = self._cursor()
        try:
            return read_versions(cursor, dataset)
        except duckdb.CatalogException:
            return []
        finally:
            cursor.close()

    def rows_at(self, dataset: str, version: int) -> int | None:
        """The rows dataset had at version (None: no such version is recorded)."""
        cursor = self._cursor()
        try:
            return rows_at(cursor, dataset, version)
        except duckdb.CatalogException:
            return None
        finally:
            cursor.close()

    def datasets(self) -> Mapping[str, DatasetInfo]:
        """The datasets as they were when the database was opened."""
        return self._datasets

    def session(self) -> SandboxSession:
        """A fresh cursor for one request in a read-only transaction (nothing it runs can
        write the member's data); its TEMP views vanish with it."""
        with _sandbox_errors():
            cursor = self._cursor()
            try:
                cursor.execute("BEGIN TRANSACTION READ ONLY")
            except BaseException:
                cursor.close()
                raise
            return SandboxSession(cursor, self.shaped, self._alarms)

    def check_names(
        self, sql: str, relations: Sequence[TypedRelation], datasets: Sequence[str]
    ) -> None:
        """Bind sql against empty stand-ins of the relations (their names and types only):
        every name the query uses resolves, or the same refusal Query would give. Explain
        and Query both bind this way before any data or shaped copy is touched, so neither
        answers nor timing tell a hidden name from one that does not exist.

        A text that bound against the same stand-ins under the same datasets is not bound
        again (only passes are kept: a refusal is worked out again each time)."""
        key = _names_key(sql, relations, datasets)
        with self._names_lock:
            if self._names_for is not self._datasets:
                self._names_passed.clear()
                self._names_for = self._datasets
            if key is not None and key in self._names_passed:
                self._names_passed.move_to_end(key)
                return
            generation = self._names_for
        self._bind_names(sql, relations, datasets)
        if key is not None:
            with self._names_lock:
                if self._names_for is generation:
                    self._names_passed[key] = None
                    while len(self._names_passed) > CHECKED_NAMES:
                        self._names_passed.popitem(last=False)

    def _bind_names(
        self, sql: str, relations: Sequence[TypedRelation], datasets: Sequence[str]
    ) -> None:
        with _sandbox_errors():
            cursor = self._cursor()
        try:
            with _sandbox_errors():
                for relation in relations:
                    columns = ", ".join(
                        f"CAST(NULL AS {c.type}) AS {quote_identifier(c.name)}"
                        for c in relation.columns
                    )
                    cursor.execute(
                        f"CREATE TEMP VIEW {quote_identifier(relation.dataset)} AS "
                        f"SELECT {columns or 'NULL AS _'} LIMIT 0"
                    )
            bound_plan(cursor, sql, datasets)
        finally:
            cursor.close()

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor that reads names such as datasets."x" in the member's file."""
        cursor = self._db.cursor()
        cursor.execute(f"USE {STORED_CATALOG}")
        return cursor

    def close(self) -> None:
        """Close the database."""
        self._alarms.stop()
        self._db.close()


class SandboxSession:
    """One request's cursor: exposes per-request views, checks the plan, streams results."""

    def __init__(
        self, cursor: duckdb.DuckDBPyConnection, shaped: ShapedCopies, alarms: AlarmClock
    ) -> None:
        self._cursor = cursor
        self._shaped = shaped
        self._alarms = alarms
        self._interrupts = 0
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
                shaped = self._shaped.acquire(relation)  # our own name, a hash
                self._copies.append(relation.shaped_table)
                source = f"SELECT * FROM {shaped}"  # noqa: S608
            with _sandbox_errors():
                self._cursor.execute(
                    f"CREATE TEMP VIEW {quote_identifier(relation.dataset)} AS {source}"
                )

    def verify_plan(
        self, sql: str, relations: Sequence[ExposedRelation], datasets: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Second layer: one SELECT whose bound plan scans only what the relations expose,
        and reads aggregate-only relations only in the aggregate form; returns the plan."""
        text, plan = bound_plan_text(self._cursor, sql, datasets or [r.dataset for r in relations])
        check_plan_text(text, plan, {_source_of(r): r for r in relations})
        return plan

    def stream(self, sql: str, batch_rows: int, timeout: float | None) -> ResultStream:
        """Run sql and return its batches as they come (memory bounded by batch_rows)."""
        self._running.set()
        deadline = self._alarms.call_later(timeout, self._time_up) if timeout else None
        try:
            reader = self._cursor.sql(sql).to_arrow_reader(batch_rows)
        except (duckdb.Error, pa.ArrowException, OSError, MemoryError, RuntimeError) as exc:
            if deadline:
                deadline.cancel()
            raise self._map(exc) from None
        return ResultStream(reader, self, deadline)

    def _time_up(self) -> None:
        self._timed_out = True
        self.interrupt()

    def _map(self, exc: Exception) -> Exception:
        text = str(exc)
        # pyarrow re-raises DuckDB's interrupt as a plain OSError: its text is all that is left.
        interrupted = isinstance(exc, duckdb.InterruptException) or "INTERRUPT" in text
        if self._timed_out or (interrupted and not self._cancelled.is_set()):
            # An interrupt nobody here asked for is DuckDB's own max_execution_time.
            return QueryTimeout("the query ran past its time limit and was stopped")
        if interrupted or self._cancelled.is_set():
            return QueryCancelled("the query was cancelled")
        if _out_of_memory(exc):
            return ResourceExhausted(OUT_OF_MEMORY)
        if not isinstance(exc, duckdb.Error):
            log.warning("peer query failed outside DuckDB: %r", exc)
            return StoreError("the query failed while running")
        log.info("peer query failed in DuckDB: %s", text.splitlines()[0] if text else exc)
        if isinstance(exc, PEER_FAULTS):
            return QueryRejected(peer_message(exc))
        return StoreError(peer_message(exc))

    def interrupt(self) -> None:
        """Stop the running query; repeated until DuckDB has noticed (SECURITY.md)."""
        with self._lock:
            if self._closed or not self._running.is_set() or self._cancelled.is_set():
                return
            self._cancelled.set()
        # An interrupt that arrives before DuckDB starts executing is lost: repeat it.
        self._alarms.call_later(0.0, self._interrupt_again)

    def _interrupt_again(self) -> float | None:
        with self._lock:
            if self._closed or not self._running.is_set() or self._interrupts >= INTERRUPT_REPEATS:
                return None
            self._interrupts += 1
            self._cursor.interrupt()  # sets a flag in DuckDB: returns at once
        return INTERRUPT_INTERVAL

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
            self._shaped.release(name)


class ResultStream:
    """The schema and record batches of a running query."""

    def __init__(
        self,
        reader: pa.RecordBatchReader,
        session: SandboxSession,
        deadline: Alarm | None,
    ) -> None:
        self.schema: pa.Schema = narrowed_schema(reader.schema)
        self._reader = reader
        self._session = session
        self._deadline = deadline

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        try:
            while True:
                if self._session._cancelled.is_set():
                    raise self._session._map(duckdb.InterruptException("interrupted"))
                try:
                    batch = self._reader.read_next_batch()
                except StopIteration:
                    return
                except (duckdb.Error, pa.ArrowException, MemoryError, OSError) as exc:
                    # pyarrow reports DuckDB's interrupt ("INTERRUPT Error") and a failed
                    # allocation in DuckDB's reader as plain OSErrors: _map reads them all.
                    raise self._session._map(exc) from None
                try:
                    batch = narrowed(batch, self.schema)
                except pa.ArrowInvalid:
                    raise QueryRejected(
                        "a whole number in the result does not fit in 64 bits; cast it in the "
                        "query (to DOUBLE or VARCHAR)"
                    ) from None
                yield batch
        finally:
            if self._deadline:
                self._deadline.cancel()
            self._session.finished()


_NamesKey = tuple[str, tuple[tuple[str, tuple[tuple[str, str], ...]], ...], tuple[str, ...]]


def _names_key(
    sql: str, relations: Sequence[TypedRelation], datasets: Sequence[str]
) -> _NamesKey | None:
    """What check_names depends on besides the datasets: the text and the stand-ins."""
    if type(sql) is not str or len(sql) > MAX_CHECKED_LENGTH:
        return None
    stand_ins = tuple(
        (str(r.dataset), tuple((str(c.name), str(c.type)) for c in r.columns)) for r in relations
    )
    return sql, stand_ins, tuple(str(d) for d in datasets)


def bound_plan(
    cursor: duckdb.DuckDBPyConnection, sql: str, datasets: Sequence[str]
) -> dict[str, Any]:
    """The bound plan of one SELECT as DuckDB serialises it; refusals for what cannot bind."""
    return bound_plan_text(cursor, sql, datasets)[1]


def bound_plan_text(
    cursor: duckdb.DuckDBPyConnection, sql: str, datasets: Sequence[str]
) -> tuple[str, dict[str, Any]]:
    """The bound plan's serialised text and its parse; refusals for what cannot bind."""
    # The shaped database is writable: nothing but one SELECT may reach the planner.
    try:
        statements = cursor.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryRejected(peer_message(exc)) from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise QueryRejected("send exactly one SELECT statement")
    try:
        rows = cursor.execute("SELECT json_serialize_plan(?)", [sql]).fetchall()
    except duckdb.Error as exc:
        raise QueryRejected(peer_message(exc)) from None
    text = rows[0][0] if rows else None
    plan = plan_document(text)
    if plan.get("error"):
        raise plan_refusal(plan, datasets)
    return str(text), plan


@contextmanager
def _sandbox_errors() -> Iterator[None]:
    """DuckDB's and Python's errors outside a running query (cursors, views) as the
    connector's own: memory running short is RESOURCE_EXHAUSTED, never INTERNAL."""
    try:
        yield
    except (duckdb.Error, MemoryError, RuntimeError) as exc:
        if _out_of_memory(exc):
            raise ResourceExhausted(OUT_OF_MEMORY) from None
        log.warning("the sandbox failed outside a query: %s", exc)
        raise StoreError(
            peer_message(exc) if isinstance(exc, duckdb.Error) else "the sandbox failed"
        ) from None


def _out_of_memory(exc: Exception) -> bool:
    """A failed allocation, whichever layer reports it (DuckDB, Arrow or Python); a thread
    that cannot start has no memory for its stack."""
    if isinstance(exc, duckdb.OutOfMemoryException | MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        return "can't start new thread" in str(exc)
    text = str(exc).lower()
    return any(t in text for t in _OUT_OF_MEMORY_TEXTS)


def _source_of(relation: ExposedRelation) -> SourceName:
    """The (catalog, schema, table) a relation's scans must name."""
    if relation.shaped_table:
        return (SHAPED_CATALOG, "main", relation.shaped_table)
    return (STORED_CATALOG, "datasets", relation.dataset)

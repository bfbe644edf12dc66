"""One peer request's sandbox cursor: its views, the plan check, the streamed result, and
stopping it (deadline, cancel) from the sandbox's one alarm thread.

A cursor whose query ran to its end is kept (sandbox_cursors.CursorPool) with its TEMP views
standing, for the next request that exposes exactly the same views while the datasets stay
as they are; each request still runs in a read-only transaction of its own, rolled back at its end.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from connector.alarms import Alarm, AlarmClock
from connector.arrow_stream import narrowed, narrowed_schema
from connector.errors import (
    QueryCancelled,
    QueryRejected,
    QueryTimeout,
    ResourceExhausted,
    StoreError,
)
from connector.packing import packed_in_plan
from connector.plancheck import ExposedRelation, SourceName, bound_plan_text, check_plan_text
from connector.recent import RecentlyUsed
from connector.sandbox_cursors import SessionCursors, ViewKey, close_all
from connector.sandbox_errors import (
    OUT_OF_MEMORY,
    PEER_FAULTS,
    out_of_memory,
    peer_message,
    sandbox_failures,
)
from connector.shaped_copies import SHAPED_CATALOG, ShapedCopies
from connector.sqltext import quote_identifier

log = logging.getLogger(__name__)

INTERRUPT_REPEATS = 200
INTERRUPT_INTERVAL = 0.05
STORED_CATALOG = "stored"  # the member's file, attached read-only
BEGIN_READ_ONLY = "BEGIN TRANSACTION READ ONLY"


# A query's text, the datasets it names, and each exposed relation (dataset, definition,
# shaped copy, group minimum, columns): all a bound plan and its check depend on, once the
# datasets are fixed (PassedPlans.generation).
PlanKey = tuple[bytes, tuple[str, ...], tuple[tuple[str, str, str, int, tuple[str, ...]], ...]]


# Functions a SELECT may call (the plan check lets them through) that leave state in the
# cursor for its next query: such a cursor is never kept for another request.
CONNECTION_STATE_FUNCTIONS = ("setseed",)


@dataclass(frozen=True)
class CheckedPlan:
    """A bound plan that passed the check, with what the sandbox needs to know of it."""

    plan: dict[str, Any]
    keeps_state: bool  # it leaves state in its cursor (never kept for another request)
    packing: str  # how it packs many rows into one ("" when it does not)


@dataclass(frozen=True)
class PassedPlans:
    """The sandbox's plans that passed the check, and the datasets they were bound against."""

    plans: RecentlyUsed[PlanKey, CheckedPlan]
    generation: object


def _keeps_state(plan_text: str) -> bool:
    """Whether a bound plan calls a function that changes its cursor for later queries (the
    plan names each function it calls, also one reached through query())."""
    return any(f'"{name}"' in plan_text for name in CONNECTION_STATE_FUNCTIONS)


def _plan_key(sql: str, relations: Sequence[ExposedRelation], datasets: Sequence[str]) -> PlanKey:
    exposed = sorted(
        (r.dataset, r.sql, r.shaped_table, r.min_group_size, tuple(r.column_names))
        for r in relations
    )
    return hashlib.sha256(sql.encode("utf-8")).digest(), tuple(datasets), tuple(exposed)


class SandboxSession:
    """One request's cursor: exposes per-request views, checks the plan, streams results."""

    def __init__(
        self,
        cursors: SessionCursors,
        shaped: ShapedCopies,
        alarms: AlarmClock,
        passed: PassedPlans,
    ) -> None:
        self._cursors = cursors
        self._current: duckdb.DuckDBPyConnection | None = None
        self._views: ViewKey | None = None  # set while the cursor may go back to the pool
        self._passed = passed
        self._shaped = shaped
        self._alarms = alarms
        self._interrupts = 0
        self._copies: list[str] = []
        self._running = threading.Event()
        self._cancelled = threading.Event()
        self._drained = False  # the query's result was read to its end
        self._reusable_sql: str | None = None  # checked by verify_plan: leaves no state
        self._reusable = False  # the query run is that one
        self._closed = False
        self._timed_out = False
        self._lock = threading.Lock()

    @property
    def _cursor(self) -> duckdb.DuckDBPyConnection:
        """The session's cursor, in its read-only transaction (a new one, never pooled,
        when asked for before expose)."""
        if self._current is None:
            with sandbox_failures():
                cursor = self._cursors.new()
                try:
                    cursor.execute(BEGIN_READ_ONLY)
                except BaseException:
                    cursor.close()
                    raise
            self._current = cursor
        return self._current

    def expose(self, relations: Sequence[ExposedRelation]) -> None:
        """Show each relation as a TEMP view under its dataset name, then begin the read-only
        transaction: on a pooled cursor whose views are exactly these, else on a new one."""
        sources = []
        for relation in relations:
            source = relation.sql
            if relation.shaped_table:
                shaped = self._shaped.acquire(relation)  # our own name, a hash
                self._copies.append(relation.shaped_table)
                source = f"SELECT * FROM {shaped}"  # noqa: S608
            sources.append((quote_identifier(relation.dataset), source))
        if self._current is not None:  # already in its transaction: views of its own
            for name, source in sources:
                with sandbox_failures():
                    self._current.execute(f"CREATE TEMP VIEW {name} AS {source}")
            return
        key: ViewKey = tuple(sorted(sources))
        cursors = self._cursors
        with sandbox_failures():
            cursor = cursors.pool.take(key, cursors.generation)
            if cursor is None:
                cursor = cursors.new()
                try:
                    for name, source in key:  # outside any transaction: they stay
                        cursor.execute(f"CREATE TEMP VIEW {name} AS {source}")
                except BaseException:
                    cursor.close()
                    raise
            try:
                cursor.execute(BEGIN_READ_ONLY)
            except BaseException:
                cursor.close()
                raise
        self._current, self._views = cursor, key

    def verify_plan(
        self, sql: str, relations: Sequence[ExposedRelation], datasets: Sequence[str] = ()
    ) -> CheckedPlan:
        """Second layer: one SELECT whose bound plan scans only what the relations expose,
        and reads aggregate-only relations only in the aggregate form; the checked plan."""
        names = datasets or [r.dataset for r in relations]
        key = _plan_key(sql, relations, names)
        # The same query over the same relations binds to the same plan: bound and checked
        # once while the datasets stay as they are (a refusal is worked out each time).
        known = self._passed.plans.get(key, self._passed.generation)
        if known is None:
            text, plan = bound_plan_text(self._cursor, sql, names)
            check_plan_text(text, plan, {source_of(r): r for r in relations})
            known = CheckedPlan(plan, _keeps_state(text), packed_in_plan(plan))
            self._passed.plans.put(key, known, self._passed.generation)
        if not known.keeps_state:
            self._reusable_sql = sql
        return known

    def stream(self, sql: str, batch_rows: int, timeout: float | None) -> ResultStream:
        """Run sql and return its batches as they come (memory bounded by batch_rows)."""
        self._running.set()
        # Only a query checked to leave nothing in the cursor lets it be kept afterwards.
        self._reusable = sql == self._reusable_sql
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
        if out_of_memory(exc):
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
            if self._current is not None:
                self._current.interrupt()  # sets a flag in DuckDB: returns at once
        return INTERRUPT_INTERVAL

    def finished(self, drained: bool = False) -> None:
        """The query is done (drained: its result was read to the end); interrupts no
        longer apply."""
        with self._lock:
            self._drained = drained
            self._running.clear()

    def close(self) -> None:
        """End the session: its cursor goes back to the pool (transaction rolled back, views
        standing) if its query passed verify_plan leaving no state in it and ran to its end
        untouched by any interrupt; else it is closed with its TEMP views."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # no interrupt of this session reaches the cursor from now
            self._running.clear()
            reusable = (
                self._views is not None
                and self._reusable
                and self._drained
                and not self._cancelled.is_set()
                and not self._timed_out
                and self._interrupts == 0
            )
        cursor, self._current = self._current, None
        if cursor is not None:
            if reusable and self._views is not None and _rolled_back(cursor):
                self._cursors.pool.give(self._views, self._cursors.generation, cursor)
            else:
                close_all([cursor])
        for name in self._copies:
            self._shaped.release(name)


def _rolled_back(cursor: duckdb.DuckDBPyConnection) -> bool:
    """End cursor's read-only transaction, undoing anything done in it; False if that fails."""
    try:
        cursor.execute("ROLLBACK")
    except duckdb.Error:
        log.debug("ending a sandbox transaction failed", exc_info=True)
        return False
    return True


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
        drained = False
        try:
            while True:
                if self._session._cancelled.is_set():
                    raise self._session._map(duckdb.InterruptException("interrupted"))
                try:
                    batch = self._reader.read_next_batch()
                except StopIteration:
                    drained = True
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
            self._session.finished(drained)


def source_of(relation: ExposedRelation) -> SourceName:
    """The (catalog, schema, table) a relation's scans must name."""
    if relation.shaped_table:
        return (SHAPED_CATALOG, "main", relation.shaped_table)
    return (STORED_CATALOG, "datasets", relation.dataset)

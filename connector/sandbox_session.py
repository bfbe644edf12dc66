"""One peer request's sandbox cursor: its views, the plan check, the streamed result, and
stopping it (deadline, cancel) from the sandbox's one alarm thread."""

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
from connector.plancheck import ExposedRelation, SourceName, bound_plan_text, check_plan_text
from connector.recent import RecentlyUsed
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


# A query's text, the datasets it names, and each exposed relation (dataset, definition,
# shaped copy, group minimum, columns): all a bound plan and its check depend on, once the
# datasets are fixed (PassedPlans.generation).
PlanKey = tuple[bytes, tuple[str, ...], tuple[tuple[str, str, str, int, tuple[str, ...]], ...]]


@dataclass(frozen=True)
class PassedPlans:
    """The sandbox's plans that passed the check, and the datasets they were bound against."""

    plans: RecentlyUsed[PlanKey, dict[str, Any]]
    generation: object


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
        cursor: duckdb.DuckDBPyConnection,
        shaped: ShapedCopies,
        alarms: AlarmClock,
        passed: PassedPlans,
    ) -> None:
        self._cursor = cursor
        self._passed = passed
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
            with sandbox_failures():
                self._cursor.execute(
                    f"CREATE TEMP VIEW {quote_identifier(relation.dataset)} AS {source}"
                )

    def verify_plan(
        self, sql: str, relations: Sequence[ExposedRelation], datasets: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Second layer: one SELECT whose bound plan scans only what the relations expose,
        and reads aggregate-only relations only in the aggregate form; returns the plan."""
        names = datasets or [r.dataset for r in relations]
        key = _plan_key(sql, relations, names)
        # The same query over the same relations binds to the same plan: bound and checked
        # once while the datasets stay as they are (a refusal is worked out each time).
        known = self._passed.plans.get(key, self._passed.generation)
        if known is not None:
            return known
        text, plan = bound_plan_text(self._cursor, sql, names)
        check_plan_text(text, plan, {source_of(r): r for r in relations})
        self._passed.plans.put(key, plan, self._passed.generation)
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


def source_of(relation: ExposedRelation) -> SourceName:
    """The (catalog, schema, table) a relation's scans must name."""
    if relation.shaped_table:
        return (SHAPED_CATALOG, "main", relation.shaped_table)
    return (STORED_CATALOG, "datasets", relation.dataset)

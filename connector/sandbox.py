"""The sandboxed read path for peers' queries on the member's DuckDB file.

The file is attached to an in-memory connection that is locked down as the project's
SECURITY.md describes: read-only, except in the running server, which is also the file's
single writer for live ingest (ingest_service.py). Each request runs in a read-only
transaction of its own (DuckDB refuses any write in it) on a cursor whose TEMP views show
only what its policy grants (a cursor is reused only for exactly the same views, under the
same datasets); the bound plan is checked (plancheck.py) to scan nothing else; results
stream batch by batch; errors echo no data (sandbox_errors.py).

A query on a shaped dataset (masks, row filters, aggregate-only) may scan only its shaped
copy (shaped_copies.py), never the stored table: with the guard switched off, no SQL reaches
a clear value or a filtered-out row, and no filter on a clear value can be timed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import duckdb

from connector.alarms import AlarmClock
from connector.commit_gate import CommitGate
from connector.errors import (
    StoreError,
    first_line,
)
from connector.plancheck import bound_plan
from connector.recent import RecentlyUsed
from connector.sandbox_cursors import IDLE_CURSORS, CursorPool, SessionCursors
from connector.sandbox_errors import sandbox_failures
from connector.sandbox_session import (
    STORED_CATALOG,
    CheckedPlan,
    PassedPlans,
    PlanKey,
    SandboxSession,
)
from connector.shaped_copies import (
    MAX_SHAPED_COPIES,
    ShapedCopies,
    attach_scratch,
)
from connector.sqltext import quote_identifier, sql_string
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


CHECKED_NAMES = 1024  # texts whose names bound against their stand-ins, kept (LRU)
CHECKED_PLANS = 1024  # bound plans that passed the plan check, by query and relations (LRU)
MAX_CHECKED_LENGTH = 16_384  # longer texts are bound every time
# How an allocation that failed inside DuckDB can be worded when it is not raised as
# OutOfMemoryException (a failed allocation at the process's address-space limit).


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
        idle_cursors: int = IDLE_CURSORS,
    ) -> None:
        """writable: the server's own instance, which also loads new data (see writer());
        peers' sessions then read in read-only transactions. idle_cursors: how many
        sessions' cursors are kept with their views for the next identical view set."""
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
        self._stale = False  # the metadata held is older than the data (refresh failed)
        self._datasets = self._read_datasets()
        _lock_down(self._db, limits)
        # Work that passed against the datasets as they are: emptied by a commit.
        self._names_passed: RecentlyUsed[_NamesKey, bool] = RecentlyUsed(CHECKED_NAMES)
        self._plans_passed: RecentlyUsed[PlanKey, CheckedPlan] = RecentlyUsed(CHECKED_PLANS)
        self._idle = CursorPool(idle_cursors)
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
        # Until this succeeds, the metadata held is older than the data: its versions would
        # serve shaped copies built from the data before the commit.
        self._stale = True
        self._datasets = self._read_datasets()
        self.shaped.keep_versions({name: info.version for name, info in self._datasets.items()})
        self._stale = False

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
        """The datasets as of the last commit; read again first when reading them after
        that commit failed (StoreError while it still fails: nothing stale is served)."""
        if self._stale:
            try:
                self.refresh()
            except (duckdb.Error, MemoryError) as exc:
                raise StoreError(
                    "the connector could not read its datasets after the last ingest "
                    f"({first_line(exc)}); "
                    "try again shortly"
                ) from None
        return self._datasets

    def session(self) -> SandboxSession:
        """One request's session: its cursor runs in a read-only transaction (nothing it runs
        can write the member's data), with TEMP views of exactly its relations. The cursor
        comes from the pool of idle ones holding those views under the datasets as they are
        (a commit empties the pool), or is new."""
        generation = self._datasets
        cursors = SessionCursors(self._cursor, self._idle, generation)
        passed = PassedPlans(self._plans_passed, generation)
        return SandboxSession(cursors, self.shaped, self._alarms, passed)

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
        generation = self._datasets
        if key is not None and self._names_passed.get(key, generation):
            return
        self._bind_names(sql, relations, datasets)
        if key is not None:
            self._names_passed.put(key, True, generation)

    def _bind_names(
        self, sql: str, relations: Sequence[TypedRelation], datasets: Sequence[str]
    ) -> None:
        with sandbox_failures():
            cursor = self._cursor()
        try:
            with sandbox_failures():
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
        self._idle.clear()
        self._db.close()


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

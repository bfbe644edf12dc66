"""Shaped copies: each shaped grant's dataset (masks applied, rows filtered) built once.

The copies are tables of a scratch database (`shaped`) attached to the sandbox before its
lock-down, so copies larger than memory spill to disk. A copy is built on its first use and
kept while sessions read it; beyond a maximum number, the least recently used copies that no
session reads are dropped (a copy of a changed policy is never used again).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import duckdb

from connector.errors import PermissionDenied, ResourceExhausted, StoreError
from connector.plancheck import ExposedRelation
from connector.sqltext import quote_identifier, sql_string

log = logging.getLogger(__name__)

SHAPED_CATALOG = "shaped"  # the scratch database of shaped copies
MAX_SHAPED_COPIES = 64


def shaped_name(table: str) -> str:
    """The qualified name of a shaped copy's table."""
    return f"{SHAPED_CATALOG}.main.{quote_identifier(table)}"


def attach_scratch(db: duckdb.DuckDBPyConnection, path: Path | None) -> None:
    """Attach the scratch database (in memory when path is None), emptied: copies from the
    last run may follow older policies."""
    if path is None:
        db.execute(f"ATTACH ':memory:' AS {SHAPED_CATALOG}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db.execute(f"ATTACH {sql_string(str(path))} AS {SHAPED_CATALOG}")
        stale = db.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = ?",
            [SHAPED_CATALOG],
        ).fetchall()
        for (table,) in stale:
            db.execute(f"DROP TABLE {shaped_name(table)}")
    except duckdb.Error as exc:
        raise StoreError(
            f"cannot create the scratch database {path} for shaped copies: {exc}; "
            "check that the folder is writable and no other connector uses this home"
        ) from None


class ShapedCopies:
    """The shaped copies built so far and how many sessions read each; thread-safe."""

    def __init__(
        self,
        cursor: Callable[[], duckdb.DuckDBPyConnection],
        max_copies: int = MAX_SHAPED_COPIES,
    ) -> None:
        self._cursor = cursor
        # Shaped copy -> sessions using it, least recently used first.
        self._copies: OrderedDict[str, int] = OrderedDict()
        self._max_copies = max_copies
        self._lock = threading.Lock()

    def acquire(self, relation: ExposedRelation) -> str:
        """The qualified name of relation's shaped copy, built on first use and kept from
        being dropped until release(relation.shaped_table)."""
        name = relation.shaped_table
        with self._lock:
            if name not in self._copies:
                self._build(relation)
                self._copies[name] = 0
            self._copies[name] += 1
            self._copies.move_to_end(name)
            self._drop_unused_beyond_limit()
        return shaped_name(name)

    def release(self, name: str) -> None:
        """A session no longer reads the shaped copy name."""
        with self._lock:
            if self._copies.get(name, 0) > 0:
                self._copies[name] -= 1

    def _build(self, relation: ExposedRelation) -> None:
        cursor = self._cursor()
        try:
            cursor.execute(f"CREATE TABLE {shaped_name(relation.shaped_table)} AS {relation.sql}")
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
                cursor.execute(f"DROP TABLE {shaped_name(name)}")
            except duckdb.Error:
                # Only disk is at stake: keep serving; the copy is tried again next time.
                log.warning("could not drop the shaped copy %s", name, exc_info=True)
                continue
            finally:
                cursor.close()
            del self._copies[name]
            log.info("dropped the least recently used shaped copy %s", name)

"""Shaped copies: each shaped grant's dataset (masks applied, rows filtered) built once.

The copies are tables of a scratch database (`shaped`) attached to the sandbox before its
lock-down, so copies larger than memory spill to disk. The scratch file is made anew at
start (with its .wal): copies from the last run may follow older policies, and an emptied
file would keep its size. A copy is built on its first use and kept while sessions read it.
Copies are bounded in number and in bytes: beyond either bound the least recently used
copies no session reads are dropped (the file stays within the byte bound plus the copies in
use and the most recent one). When the policies in force change, copies that no policy in
force can use (their dataset and shaping are no longer granted) are dropped as soon as no
session reads them. Dropped copies' blocks are reused once the scratch database is
checkpointed, which DuckDB allows only at a moment no query reads a copy.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import duckdb

from connector.errors import PermissionDenied, ResourceExhausted, StoreError
from connector.plancheck import ExposedRelation
from connector.sqltext import quote_identifier, sql_string

log = logging.getLogger(__name__)

SHAPED_CATALOG = "shaped"  # the scratch database of shaped copies
MAX_SHAPED_COPIES = 64
MAX_SHAPED_BYTES = 1024**3
CELL_BYTES = 8  # the least a value takes, for copies too small to fill a block

# A copy is reachable while some policy in force grants its dataset with its shaping.
ReachKey = tuple[str, str]  # (dataset, canonical text of the shaping)


class _CanonicalShaping(Protocol):
    def canonical(self) -> str: ...


@runtime_checkable
class _ShapedRelation(Protocol):
    @property
    def dataset(self) -> str: ...
    @property
    def shaping(self) -> _CanonicalShaping: ...
    @property
    def version(self) -> int: ...


def shaped_name(table: str) -> str:
    """The qualified name of a shaped copy's table."""
    return f"{SHAPED_CATALOG}.main.{quote_identifier(table)}"


def attach_scratch(db: duckdb.DuckDBPyConnection, path: Path | None) -> None:
    """Attach the scratch database (in memory when path is None), made anew: copies from the
    last run may follow older policies, and an emptied file would keep its size."""
    if path is None:
        db.execute(f"ATTACH ':memory:' AS {SHAPED_CATALOG}")
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            # Opening it first fails while another connector holds it: never delete its file.
            db.execute(f"ATTACH {sql_string(str(path))} AS {SHAPED_CATALOG}")
            db.execute(f"DETACH {SHAPED_CATALOG}")
        for stale in (path, path.with_name(path.name + ".wal")):
            stale.unlink(missing_ok=True)
        db.execute(f"ATTACH {sql_string(str(path))} AS {SHAPED_CATALOG}")
    except (OSError, duckdb.Error) as exc:
        raise StoreError(
            f"cannot create the scratch database {path} for shaped copies: {exc}; "
            "check that the folder is writable and no other connector uses this home"
        ) from None


@dataclass
class _Copy:
    """One shaped copy: who reads it, its size, and whether a policy in force can use it."""

    key: ReachKey | None
    users: int = 0
    bytes: int = 0
    reachable: bool = True
    version: int = 0  # the dataset's version it was built from (0: not known)


class ShapedCopies:
    """The shaped copies built so far and how many sessions read each; thread-safe."""

    def __init__(
        self,
        cursor: Callable[[], duckdb.DuckDBPyConnection],
        max_copies: int = MAX_SHAPED_COPIES,
        max_bytes: int = MAX_SHAPED_BYTES,
    ) -> None:
        self._cursor = cursor
        # Shaped copy -> its state, least recently used first.
        self._copies: OrderedDict[str, _Copy] = OrderedDict()
        self._max_copies = max_copies
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._checkpoint_due = False  # dropped copies' blocks are reusable after a checkpoint
        self._versions: dict[str, int] | None = None  # each dataset's version (None: unknown)

    def acquire(self, relation: ExposedRelation) -> str:
        """The qualified name of relation's shaped copy, built on first use and kept from
        being dropped until release(relation.shaped_table)."""
        name = relation.shaped_table
        with self._lock:
            copy = self._copies.get(name)
            if copy is None or not copy.reachable:
                # An unreachable copy asked for again is reachable after all (a policy was
                # restored): keep using it.
                if copy is None:
                    copy = self._build(relation)
                    self._copies[name] = copy
                copy.reachable = True
            copy.users += 1
            self._copies.move_to_end(name)
            self._drop_unused()
        return shaped_name(name)

    def release(self, name: str) -> None:
        """A session no longer reads the shaped copy name."""
        with self._lock:
            copy = self._copies.get(name)
            if copy is not None and copy.users > 0:
                copy.users -= 1
                self._drop_unused()

    def keep_reachable(self, reachable: Set[ReachKey]) -> None:
        """The policies changed: drop the copies none of them can use (once unused)."""
        with self._lock:
            for copy in self._copies.values():
                copy.reachable = copy.key in reachable and self._current(copy)
            self._drop_unused()

    def keep_versions(self, versions: Mapping[str, int]) -> None:
        """New data was loaded: drop the copies built from an older version of a dataset
        (once unused). No request asks for them again: a copy's name holds its version."""
        with self._lock:
            self._versions = dict(versions)
            for copy in self._copies.values():
                if not self._current(copy):
                    copy.reachable = False
            self._drop_unused()

    def _current(self, copy: _Copy) -> bool:
        """False when the copy was built from an older version of its dataset."""
        if copy.key is None or not copy.version or self._versions is None:
            return True
        return copy.version == self._versions.get(copy.key[0])

    @property
    def total_bytes(self) -> int:
        """The bytes the copies take (measured when each was built)."""
        with self._lock:
            return sum(c.bytes for c in self._copies.values())

    def names(self) -> list[str]:
        """The shaped copies kept now, least recently used first."""
        with self._lock:
            return list(self._copies)

    def _build(self, relation: ExposedRelation) -> _Copy:
        cursor = self._cursor()
        try:
            before = _used_bytes(cursor)
            cursor.execute(f"CREATE TABLE {shaped_name(relation.shaped_table)} AS {relation.sql}")
            size = max(_used_bytes(cursor) - before, _least_bytes(cursor, relation.shaped_table))
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
        log.info(
            "built the shaped copy %s of dataset %s (%d bytes)",
            relation.shaped_table,
            relation.dataset,
            size,
        )
        if isinstance(relation, _ShapedRelation):
            key = (relation.dataset, relation.shaping.canonical())
            return _Copy(key, bytes=size, version=relation.version)
        return _Copy(None, bytes=size)

    def _drop_unused(self) -> None:
        """Drop unused copies no policy can use, then the least recently used unused ones
        while the copies pass their bounds in number or bytes. The most recently used copy
        stays even when it alone passes the byte bound: the next query would rebuild it."""
        recent = next(reversed(self._copies), None)
        unused = [n for n, copy in self._copies.items() if copy.users == 0 and n != recent]
        doomed = [n for n, copy in self._copies.items() if copy.users == 0 and not copy.reachable]
        count = len(self._copies) - len(doomed)
        size = sum(c.bytes for n, c in self._copies.items() if n not in doomed)
        for name in unused:
            if count <= self._max_copies and size <= self.max_bytes:
                break
            if name not in doomed:
                doomed.append(name)
                count, size = count - 1, size - self._copies[name].bytes
        if [name for name in doomed if self._drop(name)]:
            self._checkpoint_due = True
        # DuckDB refuses to checkpoint while a query reads a copy: try when none does.
        if self._checkpoint_due and not any(c.users for c in self._copies.values()):
            self._checkpoint_due = not _checkpoint(self._cursor)

    def _drop(self, name: str) -> bool:
        cursor = self._cursor()
        try:
            cursor.execute(f"DROP TABLE {shaped_name(name)}")
        except duckdb.Error:
            # Only disk is at stake: keep serving; the copy is tried again next time.
            log.warning("could not drop the shaped copy %s", name, exc_info=True)
            return False
        finally:
            cursor.close()
        copy = self._copies.pop(name)
        why = "no policy in force uses it" if not copy.reachable else "least recently used"
        log.info("dropped the shaped copy %s (%s, %d bytes)", name, why, copy.bytes)
        return True


def _used_bytes(cursor: duckdb.DuckDBPyConnection) -> int:
    """Bytes of the scratch database's used blocks."""
    row = cursor.execute(
        "SELECT used_blocks * block_size FROM pragma_database_size() WHERE database_name = ?",
        [SHAPED_CATALOG],
    ).fetchone()
    return int(row[0] or 0) if row else 0


def _least_bytes(cursor: duckdb.DuckDBPyConnection, table: str) -> int:
    """A floor on a table's size (rows times columns times a cell), for the copies in memory
    or too small to take a block of their own."""
    row = cursor.execute(
        "SELECT estimated_size * column_count FROM duckdb_tables() "
        "WHERE database_name = ? AND table_name = ?",
        [SHAPED_CATALOG, table],
    ).fetchone()
    return int(row[0] or 0) * CELL_BYTES if row else 0


def _checkpoint(cursor_of: Callable[[], duckdb.DuckDBPyConnection]) -> bool:
    """Checkpoint the scratch database, so that later copies reuse dropped copies' blocks."""
    cursor = cursor_of()
    try:
        cursor.execute(f"CHECKPOINT {SHAPED_CATALOG}")
    except duckdb.Error as exc:
        log.debug("checkpoint of the shaped copies postponed: %s", exc)
        return False
    finally:
        cursor.close()
    return True

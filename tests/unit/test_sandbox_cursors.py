"""Sandbox cursors kept with their TEMP views for the next request with exactly the same
views: reused only then, never after new data was committed, never after an interrupt, and
every request still in a read-only transaction of its own whose changes are undone."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from connector.enforce import Relation, relation_for
from connector.errors import PermissionDenied, QueryCancelled, QueryTimeout, StoreError
from connector.sandbox import SandboxDatabase, SandboxLimits
from connector.sandbox_cursors import CursorPool
from connector.sandbox_session import SandboxSession
from connector.shaping import REDACTED, RowFilter, Shaping
from connector.store import DatasetInfo, create_database
from connector.store_ingest import LoadRequest, ingest, load, stage

CSV = "plant,defects,price\nRegensburg,3,10.5\nLeipzig,5,11.0\n"
KEY = b"k" * 32
# Billions of rows to look at over 3,000 rows: runs until stopped.
SLOW = "SELECT count(*) FROM big a, big b, big c WHERE a.plant || b.plant || c.plant = 'x'"


def _database(directory: Path) -> Path:
    path = directory / "data.duckdb"
    create_database(path)
    (directory / "d.csv").write_text(CSV)
    ingest(path, directory / "d.csv", "parts", description=None, mode="replace")
    (directory / "big.csv").write_text("plant\n" + "".join(f"P-{i}\n" for i in range(3000)))
    ingest(path, directory / "big.csv", "big", description=None, mode="replace")
    return path


@pytest.fixture(scope="module")
def store(module_dir: Path) -> Iterator[SandboxDatabase]:
    sandbox = SandboxDatabase(_database(module_dir), SandboxLimits())
    yield sandbox
    sandbox.close()


@pytest.fixture
def info(store: SandboxDatabase) -> DatasetInfo:
    return store.datasets()["parts"]


@pytest.fixture
def big(store: SandboxDatabase) -> Relation:
    return _relation(store.datasets()["big"], {"plant"})


def _relation(info: DatasetInfo, columns: set[str], shaping: Shaping | None = None) -> Relation:
    return relation_for(info, columns, shaping or Shaping(), KEY)


def _open(store: SandboxDatabase, relation: Relation) -> SandboxSession:
    session = store.session()
    session.expose([relation])
    return session


def _rows(
    session: SandboxSession, relation: Relation, sql: str, timeout: float = 5.0
) -> list[tuple[object, ...]]:
    """The rows of sql, checked (verify_plan) and run as a peer's query is."""
    session.verify_plan(sql, [relation])
    rows: list[tuple[object, ...]] = []
    for batch in session.stream(sql, 1024, timeout):
        rows.extend(tuple(r.values()) for r in batch.to_pylist())
    return rows


def _run(
    store: SandboxDatabase, relation: Relation, sql: str
) -> tuple[duckdb.DuckDBPyConnection, list[tuple[object, ...]]]:
    """The cursor a query ran on, and its rows (run to the end: the cursor is kept)."""
    session = _open(store, relation)
    try:
        return session._cursor, _rows(session, relation, sql)
    finally:
        session.close()


def test_the_same_views_reuse_the_cursor_in_a_new_transaction(
    store: SandboxDatabase, info: DatasetInfo
) -> None:
    relation = _relation(info, {"plant", "defects"})
    first, rows = _run(store, relation, "SELECT sum(defects) FROM parts")
    again, same = _run(store, relation, "SELECT sum(defects) FROM parts")
    assert again is first and rows == same == [(8,)]
    session = _open(store, relation)
    try:
        assert session._cursor is first
        with pytest.raises(duckdb.Error, match="read-only"):
            session._cursor.execute("INSERT INTO datasets.parts VALUES ('x', 1, 1.0)")
    finally:
        session.close()


def test_other_views_never_get_the_cursor_and_see_only_their_own(
    store: SandboxDatabase, info: DatasetInfo
) -> None:
    narrow = _relation(info, {"plant"})
    wide = _relation(info, {"plant", "defects"})
    masked = _relation(info, {"plant", "defects"}, Shaping(masks=(("plant", "redact"),)))
    filtered = _relation(
        info, {"plant", "defects"}, Shaping(filters=(RowFilter("plant", ("Leipzig",)),))
    )
    cursors = {}
    for name, relation in (
        ("wide", wide),
        ("narrow", narrow),
        ("masked", masked),
        ("filtered", filtered),
    ):
        cursors[name], _ = _run(store, relation, "SELECT * FROM parts")
    assert len({id(c) for c in cursors.values()}) == 4
    # The wide view stands in a kept cursor; the narrow view's query still cannot see it.
    session = _open(store, narrow)
    try:
        assert session._cursor is cursors["narrow"]
        with pytest.raises(duckdb.Error, match="defects"):
            session._cursor.execute("SELECT defects FROM parts").fetchall()
    finally:
        session.close()
    _, rows = _run(store, masked, "SELECT DISTINCT plant FROM parts")
    assert rows == [(REDACTED,)]
    _, rows = _run(store, filtered, "SELECT plant FROM parts")
    assert rows == [("Leipzig",)]


def test_what_a_request_changes_in_its_transaction_is_gone_for_the_next(
    store: SandboxDatabase, info: DatasetInfo
) -> None:
    relation = _relation(info, {"plant", "defects"})
    session = _open(store, relation)
    try:
        cursor = session._cursor
        cursor.execute("CREATE TEMP TABLE left_behind AS SELECT 1 AS x")
        cursor.execute("CREATE OR REPLACE TEMP VIEW parts AS SELECT 'forged' AS plant")
        _rows(session, relation, "SELECT 1")
    finally:
        session.close()
    again, rows = _run(store, relation, "SELECT plant FROM parts ORDER BY plant")
    assert again is cursor and rows == [("Leipzig",), ("Regensburg",)]
    session = _open(store, relation)
    try:
        with pytest.raises(duckdb.Error, match="left_behind"):
            session._cursor.execute("SELECT * FROM left_behind").fetchall()
    finally:
        session.close()


def test_a_query_not_read_to_its_end_or_refused_does_not_keep_its_cursor(
    store: SandboxDatabase, big: Relation
) -> None:
    session = _open(store, big)
    cursor = session._cursor
    many = "SELECT a.plant FROM big a, big b"
    session.verify_plan(many, [big])
    next(iter(session.stream(many, 10, 5.0)))  # cut short, as a row limit does
    session.close()
    session = _open(store, big)
    try:
        assert session._cursor is not cursor
        refused = session._cursor
        with pytest.raises(PermissionDenied, match="no_such_column"):
            _rows(session, big, "SELECT no_such_column FROM big")
    finally:
        session.close()
    session = _open(store, big)
    try:
        assert session._cursor is not refused
    finally:
        session.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT setseed(0.5)",
        "SELECT plant, setseed(0.5) AS s FROM parts",
        'SELECT "SETSEED"(0.5)',
        "SELECT * FROM query('SELECT setseed(0.5)')",
    ],
)
def test_a_query_that_seeds_its_cursor_does_not_keep_it(
    store: SandboxDatabase, info: DatasetInfo, sql: str
) -> None:
    # The guard refuses setseed; the plan check lets it through: the sandbox alone must
    # keep a seed one member set from another member's random().
    relation = _relation(info, {"plant"})
    seeded, _ = _run(store, relation, sql)
    again, _ = _run(store, relation, "SELECT plant FROM parts")
    assert again is not seeded
    assert _run(store, relation, "SELECT plant FROM parts")[0] is again  # kept this time


def test_an_interrupted_cursor_is_not_kept_and_a_kept_one_still_stops(
    store: SandboxDatabase, big: Relation
) -> None:
    session = _open(store, big)
    stopped = session._cursor
    try:
        threading.Timer(0.2, session.interrupt).start()
        with pytest.raises(QueryCancelled):
            _rows(session, big, SLOW, timeout=30)
    finally:
        session.close()
    kept, rows = _run(store, big, "SELECT count(*) FROM big")
    assert kept is not stopped and rows == [(3000,)]
    # The kept cursor's next query is stopped by its own deadline; the cursor is not kept.
    session = _open(store, big)
    try:
        assert session._cursor is kept
        started = time.monotonic()
        with pytest.raises(QueryTimeout):
            _rows(session, big, SLOW, timeout=0.3)
        assert time.monotonic() - started < 10
    finally:
        session.close()
    after, rows = _run(store, big, "SELECT count(*) FROM big")
    assert after is not kept and rows == [(3000,)]


def test_an_interrupt_after_close_never_reaches_the_cursor_s_next_query(
    store: SandboxDatabase, big: Relation
) -> None:
    session = _open(store, big)
    cursor = session._cursor
    _rows(session, big, "SELECT count(*) FROM big")
    session.close()
    session.interrupt()  # a late cancel of the finished request: nothing to stop
    again = _open(store, big)
    try:
        assert again._cursor is cursor
        assert _rows(again, big, "SELECT count(*) FROM big a, big b") == [(9_000_000,)]
    finally:
        again.close()


def test_a_commit_empties_the_pool_and_new_data_is_read(tmp_path: Path) -> None:
    sandbox = SandboxDatabase(_database(tmp_path), SandboxLimits(), writable=True)
    try:
        relation = _relation(sandbox.datasets()["parts"], {"plant", "defects"})
        before, rows = _run(sandbox, relation, "SELECT count(*) FROM parts")
        assert rows == [(2,)]
        writer = sandbox.writer()
        request = LoadRequest(tmp_path / "d.csv", "parts", "append")
        with stage(request) as staged:
            load(writer, staged, request)
        writer.close()
        sandbox.refresh()
        after, rows = _run(sandbox, relation, "SELECT count(*) FROM parts")
        assert after is not before and rows == [(4,)]
        # A reshaped dataset (other columns) under the same name: views made anew.
        (tmp_path / "r.csv").write_text("plant,week\nBremen,1\n")
        request = LoadRequest(tmp_path / "r.csv", "parts", "replace")
        writer = sandbox.writer()
        with stage(request) as staged:
            load(writer, staged, request)
        writer.close()
        sandbox.refresh()
        reshaped = _relation(sandbox.datasets()["parts"], {"plant", "week"})
        newest, rows = _run(sandbox, reshaped, "SELECT plant, week FROM parts")
        assert newest is not after and rows == [("Bremen", 1)]
    finally:
        sandbox.close()


def test_the_pool_keeps_at_most_its_size_and_closes_the_rest() -> None:
    pool = CursorPool(2)
    db = duckdb.connect()
    generation = object()
    cursors = [db.cursor() for _ in range(3)]
    assert pool.take((("a", "x"),), generation) is None
    for i, cursor in enumerate(cursors):
        pool.give(((f"v{i}", "x"),), generation, cursor)
    assert len(pool) == 2
    with pytest.raises(duckdb.Error):
        cursors[0].execute("SELECT 1")  # the least recently kept was closed
    assert pool.take((("v2", "x"),), generation) is cursors[2]
    assert pool.take((("v2", "x"),), generation) is None
    pool.give((("late", "x"),), object(), cursors[2])  # made under a past generation
    assert len(pool) == 1
    assert pool.take((("v1", "x"),), object()) is None  # a new generation closes them all
    assert len(pool) == 0
    with pytest.raises(duckdb.Error):
        cursors[1].execute("SELECT 1")
    db.close()


def test_a_failed_session_start_is_a_store_error(store: SandboxDatabase, info: DatasetInfo) -> None:
    relation = _relation(info, {"plant"})
    bad = dataclasses.replace(relation, sql="SELECT no_such FROM datasets.parts")
    with pytest.raises(StoreError):
        _open(store, bad).close()

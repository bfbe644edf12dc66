"""The DuckDB store: ingest in one transaction, and a sandbox that stops attacks on its own.

The sandbox tests call the store directly, without the SQL guard, to show that the second
layer (locked-down connection, per-request views, plan check) holds alone.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connector.enforce import Relation, relation_for, relations_for
from connector.errors import (
    DataError,
    PermissionDenied,
    QueryCancelled,
    QueryRejected,
    QueryTimeout,
    StoreError,
)
from connector.policy.engine import Decision, Grant
from connector.sandbox import SandboxDatabase, SandboxLimits
from connector.shaping import Shaping
from connector.store import create_database, list_datasets
from connector.store_ingest import ingest


@dataclass(frozen=True)
class UsagePolicyStub:
    """Only the part of a usage policy that enforcement reads."""

    shaping: Shaping


CSV = "plant,Defects,price\nRegensburg,3,10.5\nLeipzig,5,11.0\n"


def _database(directory: Path) -> Path:
    path = directory / "data.duckdb"
    create_database(path)
    (directory / "d.csv").write_text(CSV)
    ingest(path, directory / "d.csv", "parts", description="Parts", mode="replace")
    return path


@pytest.fixture(scope="module")
def fresh_database(module_dir: Path) -> Path:
    """A database as _database makes it, made once: `database` hands out copies of it."""
    folder = module_dir / "fresh"
    folder.mkdir()
    return _database(folder)


@pytest.fixture
def database(tmp_path: Path, fresh_database: Path) -> Path:
    """A database of the test's own: for tests that ingest into it.

    A copy of the file (closed, so complete in itself) instead of creating it and ingesting
    again: the same state for a copy's cost, not two DuckDB opens and an ingest.
    """
    for name in ("data.duckdb", "d.csv"):
        shutil.copyfile(fresh_database.with_name(name), tmp_path / name)
    return tmp_path / "data.duckdb"


@pytest.fixture(scope="module")
def read_only_database(module_dir: Path) -> Path:
    """One database for the module's tests that only query it (refused changes included)."""
    return _database(module_dir)


def test_ingest_csv_parquet_and_json(tmp_path: Path, database: Path) -> None:
    duckdb.sql(f"COPY (SELECT 1 AS a, 'x' AS b) TO '{tmp_path / 'x.parquet'}' (FORMAT parquet)")
    (tmp_path / "x.json").write_text(json.dumps({"a": 2, "b": "y"}) + "\n")
    parquet = ingest(database, tmp_path / "x.parquet", "px", description=None, mode="replace")
    assert (parquet.rows, [c.name for c in parquet.columns]) == (1, ["a", "b"])
    both = ingest(database, tmp_path / "x.json", "px", description=None, mode="append")
    assert both.rows == 2
    infos = {i.name: i for i in list_datasets(database)}
    assert infos["parts"].description == "Parts"
    assert [c.name for c in infos["parts"].columns] == ["plant", "defects", "price"]


def test_append_with_other_columns_is_refused_and_changes_nothing(
    tmp_path: Path, database: Path
) -> None:
    (tmp_path / "other.csv").write_text("plant,count\nx,1\n")
    with pytest.raises(DataError, match="cannot append to parts: its columns are"):
        ingest(database, tmp_path / "other.csv", "parts", description=None, mode="append")
    (info,) = list_datasets(database)
    assert info.rows == 2


@pytest.mark.parametrize(
    ("name", "file", "words"),
    [
        ("Bad-Name", "d.csv", "invalid dataset name"),
        ("ok", "missing.csv", "does not exist"),
        ("ok", "notes.txt", "cannot tell the format"),
        ("ok", "broken.parquet", "cannot read"),
    ],
)
def test_ingest_errors_say_what_to_do(
    tmp_path: Path, database: Path, name: str, file: str, words: str
) -> None:
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=words):
        ingest(database, tmp_path / file, name, description=None, mode="replace")
    assert [i.name for i in list_datasets(database)] == ["parts"]


def test_columns_are_lower_cased_and_case_collisions_renamed(
    tmp_path: Path, database: Path
) -> None:
    pq.write_table(pa.table({"A": [1], "a": [2]}), tmp_path / "dup.parquet")
    info = ingest(database, tmp_path / "dup.parquet", "dup", description=None, mode="replace")
    assert [c.name for c in info.columns] == ["a", "a_1"]


def test_append_that_cannot_be_cast_changes_nothing(tmp_path: Path, database: Path) -> None:
    (tmp_path / "bad.csv").write_text("plant,defects,price\nMunich,many,1.0\n")
    with pytest.raises(DataError, match="nothing was changed"):
        ingest(database, tmp_path / "bad.csv", "parts", description=None, mode="append")
    (info,) = list_datasets(database)
    assert info.rows == 2


MASK_KEY = b"k" * 32


@pytest.fixture(scope="module")
def granted(read_only_database: Path) -> tuple[Relation, ...]:
    (info,) = list_datasets(read_only_database)
    return (relation_for(info, {"plant", "defects"}, Shaping(), MASK_KEY),)


@pytest.fixture(scope="module")
def sandbox(read_only_database: Path) -> Iterator[SandboxDatabase]:
    """One sandbox store with default limits for the module's attacks: each test checks
    that it still serves after its attack (and so after all the attacks before it)."""
    store = SandboxDatabase(read_only_database, SandboxLimits())
    yield store
    store.close()


def _run(
    store: SandboxDatabase, sql: str, relations: tuple[Relation, ...], timeout: float = 5.0
) -> list[tuple[object, ...]]:
    session = store.session()
    try:
        session.expose(relations)
        session.verify_plan(sql, relations)
        rows: list[tuple[object, ...]] = []
        for batch in session.stream(sql, 1024, timeout):
            rows.extend(tuple(r.values()) for r in batch.to_pylist())
        return rows
    finally:
        session.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hosts')",
        "SELECT * FROM glob('/*')",
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM read_parquet('https://example.com/x.parquet')",
        "SELECT price FROM datasets.parts",
        "SELECT * FROM datasets.parts",
        "SELECT * FROM query('SELECT price FROM datasets.parts')",
        "SELECT * FROM query_table('datasets.parts')",
        "SELECT * FROM duckdb_tables()",
        "SELECT * FROM duckdb_settings()",
        "SELECT * FROM _connector.datasets",
        "SELECT price FROM parts",
    ],
)
def test_sandbox_alone_stops_file_access_and_hidden_columns(
    sandbox: SandboxDatabase, granted: tuple[Relation, ...], sql: str
) -> None:
    # A hidden column is refused as "not allowed", as the policy decision words it.
    with pytest.raises((QueryRejected, StoreError, PermissionDenied)):
        _run(sandbox, sql, granted)
    assert _run(sandbox, "SELECT count(*) FROM parts", granted) == [(2,)]


@pytest.mark.parametrize(
    "sql",
    ["SET enable_external_access = true", "SET lock_configuration = false", "RESET memory_limit"],
)
def test_sandbox_configuration_is_locked(sandbox: SandboxDatabase, sql: str) -> None:
    session = sandbox.session()
    try:
        with pytest.raises(duckdb.Error):
            session._cursor.execute(sql)
    finally:
        session.close()


def test_errors_do_not_echo_data_values(
    sandbox: SandboxDatabase, granted: tuple[Relation, ...]
) -> None:
    with pytest.raises(QueryRejected) as failed:
        _run(sandbox, "SELECT CAST(plant AS INTEGER) FROM parts", granted)
    assert "Regensburg" not in str(failed.value)
    with pytest.raises(QueryRejected) as unknown:
        _run(sandbox, "SELECT * FROM nothing_here", granted)
    assert "datasets." not in str(unknown.value)
    assert "Did you mean" not in str(unknown.value)


def test_time_limit_interrupts_and_the_store_keeps_serving(
    read_only_database: Path, granted: tuple[Relation, ...]
) -> None:
    limits = SandboxLimits(max_query_seconds=0.2)
    store = SandboxDatabase(read_only_database, limits)
    slow = (
        "WITH RECURSIVE t(n) AS (SELECT 1 FROM parts UNION ALL SELECT n + 1 FROM t) "
        "SELECT count(*) FROM t"
    )
    try:
        with pytest.raises(QueryTimeout):  # the deadline the server sets: its time limit
            _run(store, slow, granted, limits.max_query_seconds)
        assert _run(store, "SELECT plant FROM parts ORDER BY plant", granted) == [
            ("Leipzig",),
            ("Regensburg",),
        ]
    finally:
        store.close()


def test_relations_expose_only_granted_columns_in_dataset_order(read_only_database: Path) -> None:
    decision = Decision(True, (), (Grant("parts", ("price", "plant", "nope"), (("p", 1),)),))
    datasets = {i.name: i for i in list_datasets(read_only_database)}
    policies = {"p": UsagePolicyStub(Shaping())}
    (relation,) = relations_for(decision, datasets, policies, MASK_KEY)
    assert relation.column_names == ("plant", "price")
    assert relation.sql == 'SELECT "plant", "price" FROM datasets."parts"'
    assert relation.shaped_table == ""


def test_deadline_and_cancel_still_stop_a_query_when_no_thread_can_start(
    read_only_database: Path, granted: tuple[Relation, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    # At the process's address-space limit Python cannot start a thread; a query's deadline
    # and a peer's cancel must still stop DuckDB then (they run on the sandbox's own clock).
    store = SandboxDatabase(read_only_database, SandboxLimits(max_query_seconds=30))
    slow = "SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b"

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    try:
        monkeypatch.setattr(threading.Thread, "start", no_thread)
        session = store.session()
        try:
            session.expose(granted)
            started = time.monotonic()
            with pytest.raises(QueryTimeout):
                list(session.stream(slow, 1024, 0.1))
            assert time.monotonic() - started < 10
        finally:
            session.close()
        session = store.session()
        try:
            session.expose(granted)
            monkeypatch.undo()  # the test's own thread that cancels; the sandbox starts none
            threading.Timer(0.3, session.interrupt).start()
            monkeypatch.setattr(threading.Thread, "start", no_thread)
            with pytest.raises(QueryCancelled):
                list(session.stream(slow, 1024, None))
        finally:
            session.close()
        monkeypatch.undo()
        assert _run(store, "SELECT count(*) FROM parts", granted) == [(2,)]
    finally:
        store.close()

"""Dataset versions, the commit gate, and the writable sandbox the live server uses."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path
from typing import Literal

import duckdb
import pytest

from connector.commit_gate import CommitGate
from connector.enforce import RowRange, relation_for
from connector.errors import AlreadyLoaded, DataError, LoadedNotRead, QueryRejected, StoreError
from connector.incremental import row_ranges
from connector.ingest_service import LiveIngest
from connector.sandbox import SandboxDatabase, SandboxLimits
from connector.shaping import Shaping
from connector.store import DatasetInfo, create_database, list_datasets
from connector.store_ingest import LoadRequest, ingest, ingest_request, load, stage
from connector.version_log import list_versions

CSV = "plant,defects\nRegensburg,3\nLeipzig,5\n"


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "data.duckdb"
    create_database(path)
    (tmp_path / "d.csv").write_text(CSV)
    return path


def test_every_ingest_increases_the_version_and_a_replace_restarts_appends(
    database: Path, tmp_path: Path
) -> None:
    source = tmp_path / "d.csv"
    modes: list[Literal["replace", "append"]] = ["replace", "append", "append", "replace", "append"]
    for mode in modes:
        ingest(database, source, "parts", description=None, mode=mode)
    (info,) = list_datasets(database)
    assert (info.version, info.replaced_at, info.rows) == (5, 4, 4)


def test_content_loaded_before_is_refused_with_where_it_came_from(
    database: Path, tmp_path: Path
) -> None:
    source = tmp_path / "d.csv"
    request = LoadRequest(source, "parts", "append", sha256="ab" * 32, once=True)
    ingest_request(database, request)
    with pytest.raises(AlreadyLoaded) as again:
        ingest_request(database, request)
    assert again.value.source == "d.csv"
    assert "version 1" in again.value.message
    (info,) = list_datasets(database)
    assert (info.version, info.rows) == (1, 2)
    (version,) = list_versions(database, "parts")
    assert (version.version, version.source, version.sha256) == (1, "d.csv", "ab" * 32)


def test_a_file_that_fails_midway_changes_nothing(database: Path, tmp_path: Path) -> None:
    ingest(database, tmp_path / "d.csv", "parts", description=None, mode="replace")
    bad = tmp_path / "bad.csv"
    bad.write_text("plant,defects\nLeipzig,7\nMunich,many\n")
    with pytest.raises(DataError):
        ingest(database, bad, "parts", description=None, mode="append")
    (info,) = list_datasets(database)
    assert (info.version, info.rows) == (1, 2)


def test_the_writable_sandbox_sees_a_commit_only_after_it_and_peers_cannot_write(
    database: Path, tmp_path: Path
) -> None:
    ingest(database, tmp_path / "d.csv", "parts", description=None, mode="replace")
    sandbox = SandboxDatabase(database, SandboxLimits(), writable=True)
    try:
        info = sandbox.datasets()["parts"]
        old = relation_for(info, {"plant", "defects"}, Shaping(), b"k" * 32)
        session = sandbox.session()
        session.expose([old])
        reader = session.stream("SELECT count(*) FROM parts", 10, 5.0)
        writer = sandbox.writer()
        with stage(LoadRequest(tmp_path / "d.csv", "parts", "append")) as staged:
            load(writer, staged, LoadRequest(tmp_path / "d.csv", "parts", "append"))
        writer.close()
        # The running query keeps its snapshot; the metadata changes at refresh only.
        assert [b.column(0)[0].as_py() for b in reader] == [2]
        assert sandbox.datasets()["parts"].version == 1
        sandbox.refresh()
        assert (sandbox.datasets()["parts"].version, sandbox.rows_at("parts", 1)) == (2, 2)
        # A peer's session is a read-only transaction, whatever SQL reaches it.
        with pytest.raises(duckdb.Error, match="read-only"):
            session._cursor.execute("INSERT INTO datasets.parts VALUES ('x', 1)")
        session.close()
        since = relation_for(
            sandbox.datasets()["parts"], {"plant"}, Shaping(), b"k" * 32, RowRange(1, 2, 4)
        )
        assert (
            since.shaped_table
            and since.shaped_table
            != relation_for(info, {"plant"}, Shaping(), b"k" * 32, RowRange(1, 2, 4)).shaped_table
        )  # the version is part of a copy's name
    finally:
        sandbox.close()


def test_a_waiting_commit_goes_before_new_passes_and_after_held_ones() -> None:
    gate = CommitGate()
    held = gate.enter()
    order: list[str] = []

    def commit() -> None:
        with gate.commit():
            order.append("commit")

    def later_pass() -> None:
        gate.enter().leave()
        order.append("later pass")

    committer = threading.Thread(target=commit)
    committer.start()
    while not gate._commits_waiting:
        time.sleep(0.001)
    latecomer = threading.Thread(target=later_pass)
    latecomer.start()
    time.sleep(0.05)
    assert order == []  # the commit waits for the held pass; the new pass for the commit
    held.leave()
    held.leave()  # leaving twice is harmless
    committer.join(5)
    latecomer.join(5)
    assert order == ["commit", "later pass"]
    assert gate.generation == 1
    assert held.generation == 0


def test_types_arrive_as_read_through_the_arrow_hand_over(database: Path, tmp_path: Path) -> None:
    source = tmp_path / "x.parquet"
    duckdb.execute(
        "COPY (SELECT uuid() AS u, '{\"k\": 1}'::JSON AS j, 1.5::DECIMAL(10, 3) AS d, "
        "TIMESTAMPTZ '2026-01-01 10:00:00+01' AS tz, [1, 2] AS l, {'a': 1} AS s, true AS b) "
        f"TO '{source}' (FORMAT parquet)"
    )
    info = ingest(database, source, "typed", description=None, mode="replace")
    assert [c.type for c in info.columns] == [
        "UUID",
        "JSON",
        "DECIMAL(10,3)",
        "TIMESTAMP WITH TIME ZONE",
        "INTEGER[]",
        "STRUCT(a INTEGER)",
        "BOOLEAN",
    ]


def test_row_ranges_name_every_reason_a_since_version_read_is_refused() -> None:
    info = DatasetInfo("d", "", 30, (), dt.datetime.now(dt.UTC), version=6, replaced_at=3)
    known = {3: 10, 4: 12, 5: 20, 6: 30}
    datasets = {"d": info}

    def rows(since: int) -> dict[str, RowRange]:
        return row_ranges(since, ("d",), datasets, lambda _, v: known.get(v))

    assert row_ranges(0, ("d", "e"), datasets, lambda _, v: None) == {}
    assert rows(4) == {"d": RowRange(4, 12, 30)}
    assert rows(6) == {"d": RowRange(6, 30, 30)}  # nothing new yet: an empty answer
    with pytest.raises(QueryRejected, match="replaced at version 3"):
        rows(2)
    with pytest.raises(QueryRejected, match="ahead of it"):
        rows(7)
    with pytest.raises(QueryRejected, match="one dataset"):
        row_ranges(4, ("d", "e"), datasets, lambda _, v: known.get(v))
    del known[5]
    with pytest.raises(QueryRejected, match="not in its version log"):
        rows(5)


def test_a_refresh_that_fails_after_the_commit_says_so_and_serves_nothing_stale(
    database: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: reading the metadata after COMMIT fails (as it may at the memory
    # limit). The data is in: "nothing was changed" would have the file loaded twice.
    ingest(database, tmp_path / "d.csv", "parts", description=None, mode="replace")
    sandbox = SandboxDatabase(database, SandboxLimits(), writable=True)
    read = SandboxDatabase._read_datasets
    failures = iter([True, True, False])

    def flaky(self: SandboxDatabase) -> object:
        if next(failures, False):
            raise duckdb.IOException("IO Error: injected")
        return read(self)

    try:
        live = LiveIngest(sandbox)
        monkeypatch.setattr(SandboxDatabase, "_read_datasets", flaky)
        with pytest.raises(LoadedNotRead, match="loaded and committed") as refused:
            live.load(LoadRequest(tmp_path / "d.csv", "parts", "append"))
        assert "nothing was changed" not in str(refused.value)
        with pytest.raises(StoreError, match="could not read its datasets"):
            sandbox.datasets()  # version 1's metadata would serve version 1's shaped copies
        assert sandbox.datasets()["parts"].version == 2
    finally:
        sandbox.close()
    assert list_datasets(database)[0].rows == 4

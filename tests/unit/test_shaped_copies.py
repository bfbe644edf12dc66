"""Shaped copies: dropped when no policy in force can use them (once unused), and the
scratch file made anew at start, its .wal included."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from connector.enforce import Relation, RowRange, relation_for
from connector.errors import PermissionDenied
from connector.sandbox import SandboxDatabase, SandboxLimits
from connector.shaping import RowFilter, Shaping
from connector.store import ColumnInfo, DatasetInfo
from tests.unit.test_shaped_sandbox import KEY, _parts_database, _run

NOW = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)

COUNT = "SELECT count(*) AS n FROM parts"


def _only(info: object, *plants: str) -> Relation:
    shaping = Shaping(filters=(RowFilter("plant", values=plants),))
    return relation_for(info, {"plant", "serial"}, shaping, KEY)  # type: ignore[arg-type]


def test_copies_no_policy_can_use_are_dropped_once_unused(tmp_path: Path) -> None:
    path, info = _parts_database(tmp_path, "plant,serial\nA,S-1\nB,S-2\nC,S-3\n")
    a, b = _only(info, "A"), _only(info, "B")
    store = SandboxDatabase(path, SandboxLimits(), tmp_path / "shaped.duckdb")
    shaped = store.shaped
    try:
        assert _run(store, COUNT, a) == [{"n": 1}]
        held = store.session()
        held.expose([b])  # a query still reads B's copy
        shaped.keep_reachable({("parts", a.shaping.canonical())})
        assert shaped.names() == [a.shaped_table, b.shaped_table]
        shaped.keep_reachable(set())  # the policies changed again: neither is granted
        assert shaped.names() == [b.shaped_table]  # A went at once, B waits for its reader
        held.close()
        assert shaped.names() == []
        # A policy that grants a shaping again brings its copy back on first use.
        assert _run(store, COUNT, a) == [{"n": 1}]
        assert shaped.names() == [a.shaped_table]
    finally:
        store.close()


def test_the_scratch_file_and_its_wal_are_made_anew_at_start(tmp_path: Path) -> None:
    path, info = _parts_database(tmp_path, "plant,serial\nA,S-1\nB,S-2\n")
    scratch = tmp_path / "state" / "shaped.duckdb"
    store = SandboxDatabase(path, SandboxLimits(), scratch)
    try:
        assert _run(store, COUNT, _only(info, "A")) == [{"n": 1}]
    finally:
        store.close()
    wal = scratch.with_name(scratch.name + ".wal")
    with scratch.open("ab") as grown:
        grown.write(b"\0" * 3_000_000)  # what an emptied file would keep
    wal.write_bytes(b"stale")
    reopened = SandboxDatabase(path, SandboxLimits(), scratch)
    try:
        assert scratch.stat().st_size < 1_000_000
        assert not wal.exists() or wal.read_bytes() != b"stale"
        assert reopened.shaped.names() == []
        assert _run(reopened, COUNT, _only(info, "B")) == [{"n": 1}]
    finally:
        reopened.close()


def test_a_dataset_with_a_rowid_column_is_not_read_by_version() -> None:
    # Loaded before the name was reserved: the row range would select by the data column.
    info = DatasetInfo(
        "old", "", 3, (ColumnInfo("rowid", "BIGINT"), ColumnInfo("plant", "VARCHAR")), NOW
    )
    with pytest.raises(PermissionDenied, match="column named rowid"):
        relation_for(info, {"plant"}, Shaping(), KEY, RowRange(1, 2, 3))
    assert "rowid" not in relation_for(info, {"plant"}, Shaping(), KEY).sql.split("FROM")[0]

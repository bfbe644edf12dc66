"""Shaped relations in the sandbox alone (no SQL guard): masks, row filters, aggregate-only.

Each query here goes straight to the store, as an attacker's SQL would if the guard let it
through; the shaped copy and the plan check must hold by themselves.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from connector.enforce import Relation, relation_for, shaping_of
from connector.errors import ConfigError, PermissionDenied, QueryRejected, StoreError
from connector.sandbox import SandboxDatabase, SandboxLimits
from connector.shaping import REDACTED, RowFilter, Shaping, hmac_sql, load_mask_key
from connector.store import DatasetInfo, create_database, list_datasets
from connector.store_ingest import ingest

KEY = bytes(range(32))
ROWS = 100


def _parts_database(tmp_path: Path, csv: str) -> tuple[Path, DatasetInfo]:
    """A member's database holding csv as dataset parts."""
    path = tmp_path / "data.duckdb"
    create_database(path)
    (tmp_path / "p.csv").write_text(csv)
    ingest(path, tmp_path / "p.csv", "parts", description=None, mode="replace")
    return path, list_datasets(path)[0]


@pytest.fixture(scope="module")
def parts(module_dir: Path) -> Iterator[tuple[SandboxDatabase, DatasetInfo]]:
    """One parts database for the module: the tests only query it (attempts to change it
    are refused, and each is followed by a count of what is there)."""
    lines = ["id,plant,serial,price,week"]
    for i in range(ROWS):
        week = dt.date(2026, 1, 5) + dt.timedelta(weeks=i % 20)
        lines.append(f"{i},{'ABCD'[i % 4]},S-{i:04d},{100 + i}.5,{week}")
    path, info = _parts_database(module_dir, "\n".join(lines) + "\n")
    store = SandboxDatabase(path, SandboxLimits())
    yield store, info
    store.close()


def _run(store: SandboxDatabase, sql: str, relation: Relation) -> list[dict[str, object]]:
    session = store.session()
    try:
        session.expose([relation])
        session.verify_plan(sql, [relation])
        rows: list[dict[str, object]] = []
        for batch in session.stream(sql, 1024, 10.0):
            rows.extend(batch.to_pylist())
        return rows
    finally:
        session.close()


MASKED = Shaping(
    masks=(("serial", "hash"), ("price", "null"), ("week", "redact")),
    filters=(RowFilter("plant", values=("A", "B")), RowFilter("id", bounds=(("lt", 60),))),
)
COLUMNS = {"id", "plant", "serial", "price", "week"}


def test_hmac_in_sql_equals_rfc_2104(parts: tuple[SandboxDatabase, DatasetInfo]) -> None:
    store, _ = parts
    cursor = store.session()._cursor
    for text in ("S-0001", "", "ü€", "\\x41", "a'b"):
        got = cursor.execute(f"SELECT {hmac_sql('?', KEY)}", [text]).fetchone()
        assert got == (hmac.new(KEY, text.encode(), hashlib.sha256).hexdigest(),)


def test_masks_and_row_filters_are_applied(parts: tuple[SandboxDatabase, DatasetInfo]) -> None:
    store, info = parts
    relation = relation_for(info, COLUMNS, MASKED, KEY)
    rows = _run(store, "SELECT * FROM parts ORDER BY id", relation)
    assert [r["id"] for r in rows] == [i for i in range(60) if i % 4 in (0, 1)]
    first = rows[0]
    assert first["serial"] == hmac.new(KEY, b"S-0000", hashlib.sha256).hexdigest()
    assert (first["price"], first["week"], first["plant"]) == (None, REDACTED, "A")
    assert "hmac_sha256(<connector mask key>, serial)" in relation.description
    assert KEY.hex()[:16] not in relation.description


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        # A filter or join on a clear value finds nothing: only hashes are there to compare.
        ("SELECT count(*) AS n FROM parts WHERE serial = 'S-0004'", 0),
        ("SELECT count(*) AS n FROM parts WHERE serial LIKE 'S-%'", 0),
        ("SELECT count(*) AS n FROM parts WHERE plant = 'C'", 0),
        ("SELECT count(*) AS n FROM parts WHERE id >= 60", 0),
        ("SELECT count(*) AS n FROM parts WHERE price IS NOT NULL", 0),
        ("SELECT count(DISTINCT week) AS n FROM parts", 1),
        (
            "WITH c AS (SELECT serial FROM parts) SELECT count(*) AS n FROM c "
            "WHERE serial = 'S-0000'",
            0,
        ),
        ("SELECT count(*) AS n FROM parts a JOIN parts b ON a.serial = b.serial", 30),
    ],
)
def test_clear_values_and_filtered_rows_are_not_there(
    parts: tuple[SandboxDatabase, DatasetInfo], sql: str, expected: int
) -> None:
    store, info = parts
    relation = relation_for(info, COLUMNS, MASKED, KEY)
    assert _run(store, sql, relation) == [{"n": expected}]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT serial FROM datasets.parts",
        "SELECT count(*) FROM datasets.parts WHERE plant = 'C'",
        "SELECT * FROM stored.datasets.parts",
        "SELECT count(*) FROM parts p WHERE EXISTS (SELECT 1 FROM datasets.parts d "
        "WHERE d.serial = 'S-0004')",
        "SELECT * FROM query_table('datasets.parts')",
        "SELECT * FROM memory.main.nothing",
        "CREATE TABLE memory.main.x AS SELECT 1",
        "INSERT INTO memory.main.x VALUES (1)",
        "SELECT 1; DROP TABLE parts",
        "USE memory",
    ],
)
def test_the_stored_table_is_out_of_reach_of_a_shaped_grant(
    parts: tuple[SandboxDatabase, DatasetInfo], sql: str
) -> None:
    store, info = parts
    relation = relation_for(info, COLUMNS, MASKED, KEY)
    with pytest.raises((QueryRejected, StoreError)):
        _run(store, sql, relation)
    assert _run(store, "SELECT count(*) AS n FROM parts", relation) == [{"n": 30}]


AGGREGATE = Shaping(masks=(("serial", "hash"),), min_group_size=5)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (
            "SELECT plant, count(*) AS n, sum(price) AS s FROM parts GROUP BY plant "
            "HAVING count(*) >= 5 ORDER BY plant",
            [
                {
                    "plant": p,
                    "n": 25,
                    "s": sum(100.5 + i for i in range(ROWS) if "ABCD"[i % 4] == p),
                }
                for p in "ABCD"
            ],
        ),
        # A group per unique key has one row each: every group is dropped.
        ("SELECT id, count(*) AS n FROM parts GROUP BY id HAVING count(*) >= 5", []),
        ("SELECT serial, count(*) AS n FROM parts GROUP BY serial HAVING count(*) >= 7", []),
        ("SELECT count(*) AS n FROM parts HAVING count(*) >= 5 AND count(*) = 1", []),
        # A filter on a grouping column keeps or drops whole groups.
        (
            "SELECT plant, count(*) AS n FROM (SELECT * FROM parts WHERE plant = 'B') "
            "GROUP BY plant HAVING count(*) >= 5",
            [{"plant": "B", "n": 25}],
        ),
    ],
)
def test_aggregate_only_answers_only_big_enough_groups(
    parts: tuple[SandboxDatabase, DatasetInfo], sql: str, expected: list[dict[str, object]]
) -> None:
    store, info = parts
    relation = relation_for(info, COLUMNS, AGGREGATE, KEY)
    assert _run(store, sql, relation) == expected


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM parts",
        "SELECT id FROM parts ORDER BY id LIMIT 1",
        "SELECT plant, count(*) FROM parts GROUP BY plant",
        "SELECT plant, count(*) FROM parts GROUP BY plant HAVING count(*) >= 4",
        "SELECT plant, count(*) FROM parts GROUP BY plant HAVING count(*) >= 5 OR true",
        "SELECT plant, count(*) FROM parts GROUP BY plant HAVING count(DISTINCT id) >= 5",
        "SELECT plant, sum(CASE WHEN id = 3 THEN price END) FROM parts GROUP BY plant "
        "HAVING count(*) >= 5",
        "SELECT plant, min(serial) FROM parts GROUP BY plant HAVING count(*) >= 5",
        "SELECT plant, string_agg(serial) FROM parts GROUP BY plant HAVING count(*) >= 5",
        "SELECT plant, list(id) FROM parts GROUP BY plant HAVING count(*) >= 5",
        "SELECT plant, arg_max(id, price) FROM parts GROUP BY plant HAVING count(*) >= 5",
        "SELECT plant, count(*) FILTER (WHERE id = 3) FROM parts GROUP BY plant "
        "HAVING count(*) >= 5",
        "SELECT id, row_number() OVER () FROM parts",
        "SELECT (SELECT max(price) FROM parts)",
        "SELECT p.plant, count(*) FROM parts p JOIN parts q ON p.id = q.id GROUP BY p.plant "
        "HAVING count(*) >= 5",
        "SELECT max(c) FROM (SELECT plant, count(*) AS c FROM parts GROUP BY plant "
        "HAVING count(*) >= 5) UNION ALL SELECT id FROM parts",
        # A filter on a column the query does not group by picks rows out of a group.
        "SELECT plant, count(*) AS n FROM (SELECT * FROM parts WHERE id = 3) "
        "GROUP BY plant HAVING count(*) >= 5",
    ],
)
def test_aggregate_only_escapes_are_refused_by_the_sandbox_alone(
    parts: tuple[SandboxDatabase, DatasetInfo], sql: str
) -> None:
    store, info = parts
    relation = relation_for(info, COLUMNS, AGGREGATE, KEY)
    with pytest.raises(QueryRejected):
        _run(store, sql, relation)


def test_a_row_filter_that_does_not_fit_the_data_denies(
    parts: tuple[SandboxDatabase, DatasetInfo],
) -> None:
    store, info = parts
    wrong = Shaping(filters=(RowFilter("week", values=("not a date",)),))
    with pytest.raises(PermissionDenied, match="cannot be applied to its data"):
        _run(store, "SELECT count(*) FROM parts", relation_for(info, COLUMNS, wrong, KEY))
    plain = relation_for(info, COLUMNS, Shaping(), KEY)
    assert _run(store, "SELECT count(*) AS n FROM parts", plain) == [{"n": ROWS}]


def test_a_filter_on_a_missing_column_denies(parts: tuple[SandboxDatabase, DatasetInfo]) -> None:
    _, info = parts
    with pytest.raises(PermissionDenied, match="does not have"):
        relation_for(info, COLUMNS, Shaping(filters=(RowFilter("nope", values=(1,)),)), KEY)


def test_the_mask_key_is_made_once_and_kept_private(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "mask.key"
    key = load_mask_key(path)
    assert len(key) == 32 and load_mask_key(path) == key
    assert path.stat().st_mode & 0o077 == 0
    path.write_text("not hex\n")
    with pytest.raises(ConfigError, match="restore it from backup"):
        load_mask_key(path)


def test_shaped_copies_live_in_a_scratch_file_emptied_at_start(tmp_path: Path) -> None:
    path, info = _parts_database(tmp_path, "plant,serial\nA,S-1\nB,S-2\n")
    scratch = tmp_path / "state" / "shaped.duckdb"
    relation = relation_for(info, {"plant", "serial"}, Shaping(masks=(("serial", "hash"),)), KEY)
    store = SandboxDatabase(path, SandboxLimits(), scratch)
    try:
        assert _run(store, "SELECT count(*) AS n FROM parts", relation) == [{"n": 2}]
    finally:
        store.close()
    assert scratch.exists()
    busy = SandboxDatabase(path, SandboxLimits(), scratch)
    try:
        with pytest.raises(StoreError, match="no other connector uses this home"):
            SandboxDatabase(path, SandboxLimits(), scratch)
        session = busy.session()
        tables = session._cursor.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = 'shaped'"
        ).fetchall()
        session.close()
        assert tables == [(0,)]  # the last run's copy is gone; it is rebuilt on first use
        assert _run(busy, "SELECT count(*) AS n FROM parts", relation) == [{"n": 2}]
    finally:
        busy.close()


def test_unused_copies_beyond_the_limit_are_dropped_least_recent_first(tmp_path: Path) -> None:
    path, info = _parts_database(tmp_path, "plant,serial\nA,S-1\nB,S-2\nC,S-3\n")

    def only(*plants: str) -> Relation:
        shaping = Shaping(filters=(RowFilter("plant", values=plants),))
        return relation_for(info, {"plant", "serial"}, shaping, KEY)

    def copies(store: SandboxDatabase) -> int:
        session = store.session()
        try:
            sql = "SELECT count(*) FROM duckdb_tables() WHERE database_name = 'shaped'"
            return int(session._cursor.execute(sql).fetchall()[0][0])
        finally:
            session.close()

    store = SandboxDatabase(path, SandboxLimits(), tmp_path / "shaped.duckdb", max_shaped_copies=1)
    try:
        assert _run(store, "SELECT count(*) AS n FROM parts", only("A")) == [{"n": 1}]
        assert _run(store, "SELECT count(*) AS n FROM parts", only("A", "B")) == [{"n": 2}]
        assert copies(store) == 1  # A's copy was unused: dropped
        held = store.session()
        held.expose([only("C")])  # in use until closed
        assert _run(store, "SELECT count(*) AS n FROM parts", only("A")) == [{"n": 1}]
        assert copies(store) == 2  # C is in use, so the limit waits for it
        held.close()
        assert _run(store, "SELECT count(*) AS n FROM parts", only("B")) == [{"n": 1}]
        assert copies(store) == 1
    finally:
        store.close()


def test_policies_with_the_same_shaping_written_differently_agree() -> None:
    @dataclass(frozen=True)
    class Policy:
        shaping: Shaping

    @dataclass(frozen=True)
    class Grant:
        dataset: str
        columns: tuple[str, ...]
        policies: tuple[tuple[str, int], ...]

    plants, weeks = RowFilter("plant", values=("A",)), RowFilter("week", bounds=(("lt", 5),))
    one, other = Shaping(filters=(plants, weeks)), Shaping(filters=(weeks, plants))
    grant = Grant("parts", ("plant",), (("a", 1), ("b", 1)))
    assert shaping_of(grant, {"a": Policy(one), "b": Policy(other)}) in (one, other)
    flag = Shaping(filters=(RowFilter("ok", values=(True,)),))
    number = Shaping(filters=(RowFilter("ok", values=(1,)),))
    with pytest.raises(PermissionDenied, match="shape it differently"):
        shaping_of(grant, {"a": Policy(flag), "b": Policy(number)})


def test_a_plan_is_bound_once_per_query_and_relations_until_the_data_changes(
    parts: tuple[SandboxDatabase, DatasetInfo],
) -> None:
    store, info = parts
    relation = relation_for(info, {"plant", "price"}, Shaping(), KEY)
    other = relation_for(info, {"plant"}, Shaping(), KEY)

    def plan(sql: str, exposed: Relation) -> object:
        session = store.session()
        try:
            session.expose([exposed])
            return session.verify_plan(sql, [exposed])
        finally:
            session.close()

    sql = "SELECT plant, sum(price) FROM parts GROUP BY plant"
    first = plan(sql, relation)
    assert plan(sql, relation) is first  # bound and checked once
    with pytest.raises(PermissionDenied, match="column price"):
        plan(sql, other)  # other relations: bound and checked again, and refused
    store.refresh()  # what an ingest's commit does: plans bound before are not reused
    assert plan(sql, relation) is not first

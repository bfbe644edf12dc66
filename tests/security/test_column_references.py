"""Every way of naming a column counts the same: positions, patterns, struct access, whole rows.

Over mutual TLS against a real server (the `shaped` space of tests/integration/
test_shaped_answers.py): supplier-b may read part_defects only in aggregates over groups of
at least 8 rows, grouped by granted columns, filtered only on grouping columns. A filter on
another column, however it is written (`#3`, `COLUMNS('defect_code')`, a struct field), picks
rows out of a group, so two aggregate queries subtract to one row's value: each is refused,
with the guard on and with it off, and the server keeps answering. The audit entry of a query
that reads a column by position names that column.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from connector.audit_chain import read_entries
from connector.errors import QueryRejected
from connector.sqlguard import QueryShape, inspect_query
from tests.integration.test_shaped_answers import (  # noqa: F401 (the fixture)
    BENCH,
    VIEW,
    ShapedSpace,
    shared_shaped,
    source_rows,
)
from tests.security.test_hostile_sql import _no_guard

# In supplier-b's view part_defects has the columns plant, part_no (hashed), defect_code,
# defects, week (supplier_price is not granted): #3 is defect_code, #4 defects, #5 week.
# Row 1 is the only row of week 2026-01-12 with defect code D1; its defects are 18.
ONE_ROW = "#5 = DATE '2026-01-12' AND #3 = 'D1'"
TOTALS = "SELECT plant, sum(defects) AS s FROM part_defects GROUP BY plant ORDER BY plant"

# (property tested, attack): each must be refused on an aggregate-only grant.
ATTACKS: list[tuple[str, str]] = [
    ("positional WHERE singles out one row for differencing",
     f"SELECT plant, sum(defects) AS s FROM part_defects WHERE NOT ({ONE_ROW}) "
     "GROUP BY plant ORDER BY plant"),
    ("positional WHERE on a non-grouping column", "SELECT plant, count(*) AS n FROM "
     "part_defects WHERE #3 <> 'D1' GROUP BY plant"),
    ("positional threshold oracle", "SELECT plant, count(*) AS n FROM part_defects "
     "WHERE #4 < 5 GROUP BY plant"),
    ("positional reference inside a function", "SELECT plant, count(*) AS n FROM part_defects "
     "WHERE abs(#4) < 5 GROUP BY plant"),
    ("COLUMNS by name in WHERE", "SELECT plant, count(*) AS n FROM part_defects WHERE "
     "COLUMNS('defect_code') <> 'D1' GROUP BY plant"),
    ("COLUMNS by regex in WHERE", "SELECT plant, count(*) AS n FROM part_defects WHERE "
     "COLUMNS('defe.*_code') <> 'D1' GROUP BY plant"),
    ("unpacked COLUMNS in WHERE", "SELECT plant, count(*) AS n FROM part_defects WHERE "
     "*COLUMNS('defects') < 5 GROUP BY plant"),
    ("COLUMNS list in WHERE", "SELECT plant, count(*) AS n FROM part_defects WHERE "
     "COLUMNS([defects]) < 5 GROUP BY plant"),
    ("COLUMNS star with EXCLUDE in WHERE", "SELECT plant, count(*) AS n FROM part_defects "
     "WHERE COLUMNS(* EXCLUDE (plant, part_no, defect_code, week)) < 5 GROUP BY plant"),
    ("struct access on the whole row", "SELECT plant, count(*) AS n FROM part_defects "
     "WHERE (part_defects).defects < 5 GROUP BY plant"),
    ("struct_extract on the whole row", "SELECT plant, count(*) AS n FROM part_defects "
     "WHERE struct_extract(part_defects, 'defects') < 5 GROUP BY plant"),
    ("whole-row comparison", "SELECT plant, count(*) AS n FROM part_defects p "
     "WHERE p <> p GROUP BY plant"),
    ("qualified name of a non-grouping column", "SELECT plant, count(*) AS n FROM "
     "part_defects p WHERE p.defects < 5 GROUP BY plant"),
    ("positional GROUP BY", "SELECT count(*) AS n FROM part_defects GROUP BY #1"),
    ("pattern COLUMNS in GROUP BY", "SELECT count(*) AS n FROM part_defects "
     "GROUP BY COLUMNS('plant|week')"),
    ("star COLUMNS in GROUP BY", "SELECT count(*) AS n FROM part_defects GROUP BY COLUMNS(*)"),
    ("positional aggregate argument", "SELECT plant, sum(#4) AS s FROM part_defects "
     "GROUP BY plant"),
    ("pattern COLUMNS in an aggregate", "SELECT plant, max(COLUMNS('defe.*s')) AS m FROM "
     "part_defects GROUP BY plant"),
    ("star COLUMNS in an aggregate", "SELECT plant, count(COLUMNS(*)) FROM part_defects "
     "GROUP BY plant"),
    ("positional column returned", "SELECT #1, count(*) AS n FROM part_defects GROUP BY plant"),
]  # fmt: skip


@pytest.fixture
def shaped(
    shared_shaped: ShapedSpace,  # noqa: F811 (the fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> ShapedSpace:
    """The module's shaped server (the attacks only query it); a guard a test sets on it is
    put back when the test ends."""
    monkeypatch.setattr(shared_shaped.server.provider, "guard", shared_shaped.server.provider.guard)
    return shared_shaped


def _refused_and_still_serving(space: ShapedSpace, prop: str, sql: str) -> None:
    with space.peer(space.supplier_b) as peer:
        with pytest.raises(QueryRejected) as refused:
            table = peer.query(sql, BENCH)
            pytest.fail(f"{prop}: answered {table.to_pylist()[:4]}")
        # Refused by the aggregate form, or earlier when the names do not bind (a star in
        # WHERE): either way before anything is read.
        reason = str(refused.value)
        assert "aggregate-only" in reason or "not available to you" in reason, f"{prop}: {reason}"
        total = peer.query("SELECT count(*) AS n FROM part_defects", BENCH)["n"][0].as_py()
        assert total == len(source_rows())


@pytest.mark.parametrize(("prop", "sql"), ATTACKS, ids=[p for p, _ in ATTACKS])
def test_every_way_of_naming_a_column_is_held_to_the_aggregate_form(
    shaped: ShapedSpace,
    prop: str,
    sql: str,
) -> None:
    _refused_and_still_serving(shaped, prop, sql)


@pytest.mark.parametrize(("prop", "sql"), ATTACKS, ids=[p for p, _ in ATTACKS])
def test_every_way_of_naming_a_column_is_held_with_the_guard_off(
    shaped: ShapedSpace,
    prop: str,
    sql: str,
) -> None:
    shaped.server.provider.guard = _no_guard  # for this test only: a test build
    _refused_and_still_serving(shaped, prop, sql)


@pytest.mark.parametrize("guard", [inspect_query, _no_guard], ids=["guarded", "unguarded"])
def test_two_aggregates_do_not_subtract_to_one_rows_value(
    shaped: ShapedSpace,
    guard: Callable[[str], QueryShape],
) -> None:
    shaped.server.provider.guard = guard
    row = source_rows()[1]
    assert row["week"].isoformat() == "2026-01-12" and row["defect_code"] == "D1"  # type: ignore[attr-defined]
    with shaped.peer(shaped.supplier_b) as peer:
        totals = {r["plant"]: r["s"] for r in peer.query(TOTALS, BENCH).to_pylist()}
        assert totals  # the plain aggregate is answered
        with pytest.raises(QueryRejected):
            rest = peer.query(ATTACKS[0][1], BENCH).to_pylist()
            differences = {r["plant"]: totals[r["plant"]] - r["s"] for r in rest}
            pytest.fail(f"answered: {differences} subtract to row 1's defects {row['defects']}")


def _request_entries(space: ShapedSpace) -> list[dict[str, object]]:
    path = space.provider.home / "audit" / "audit.jsonl"
    return [e for e in read_entries(path) if e["type"] == "request" and e["kind"] == "query"]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count(*) AS n FROM part_defects WHERE #4 > 3",
        "SELECT count(*) AS n FROM part_defects WHERE COLUMNS('defe.*s') > 3",
        "SELECT count(*) AS n FROM part_defects p WHERE p IS NOT NULL AND p.defects > 3",
    ],
)
def test_the_audit_entry_names_a_column_read_by_position_or_pattern(
    shaped: ShapedSpace,
    sql: str,
) -> None:
    with shaped.peer(shaped.supplier_a) as peer:
        peer.query(sql, VIEW)
    entry = _request_entries(shaped)[-1]
    assert entry["outcome"] == "answered", json.dumps(entry)[:400]
    columns = entry["columns"]
    assert isinstance(columns, dict)
    assert "defects" in columns.get("part_defects", []), json.dumps(entry)[:600]

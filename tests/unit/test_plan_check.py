"""The bound-plan check alone (no guard, no aggregate-form rewrite): every filter on the rows
of an aggregate-only relation reads only grouping columns, however the query names them."""

from __future__ import annotations

import dataclasses

import duckdb
import pytest

from connector.enforce import relation_for
from connector.errors import QueryRejected
from connector.plancheck import bound_plan_text, check_plan_text
from connector.sandbox import SandboxDatabase
from connector.store import DatasetInfo
from tests.unit.test_shaped_sandbox import AGGREGATE, COLUMNS, KEY, MASKED, _run, parts

__all__ = ["parts"]  # the fixture

HAVING = "GROUP BY plant HAVING count(*) >= 5"


@pytest.mark.parametrize(
    "where",
    [
        "#3 <> 'S-0001'",  # serial, by position
        "#4 < 150",  # a threshold on price, by position
        "lower(#3) <> 's-0001'",
        "COLUMNS('serial') <> 'S-0001'",
        "COLUMNS('pri.*') < 150",
        "COLUMNS(* EXCLUDE (id, plant, serial, week)) < 150",
        "struct_extract(parts, 'price') < 150",
        "(parts).price < 150",
        "parts <> parts",
        "plant = 'A' AND price < 150",
        "plant = 'A' OR id = 3",
        "CASE WHEN id = 3 THEN false ELSE true END",
        "random() < 0.5",
        "plant IN (SELECT plant FROM parts WHERE id = 3)",
        "EXISTS (SELECT 1 WHERE parts.id = 3)",
    ],
)
def test_a_filter_on_a_non_grouping_column_is_refused(
    parts: tuple[SandboxDatabase, DatasetInfo], where: str
) -> None:
    store, info = parts
    relation = relation_for(info, COLUMNS, AGGREGATE, KEY)
    with pytest.raises(QueryRejected, match="aggregate-only"):
        _run(store, f"SELECT plant, count(*) AS n FROM parts WHERE {where} {HAVING}", relation)


@pytest.mark.parametrize(
    "sql",
    [
        f"SELECT plant, count(*) AS n FROM parts p JOIN parts q USING (plant) {HAVING}",
        "SELECT p.plant, count(*) AS n FROM parts p JOIN parts q ON p.plant = q.plant "
        "AND q.id = 3 GROUP BY p.plant HAVING count(*) >= 5",
        f"SELECT plant, count(*) AS n FROM parts SEMI JOIN (SELECT 3 AS id) x USING (id) {HAVING}",
        f"SELECT plant, count(*) AS n FROM (SELECT * FROM parts WHERE #4 < 150) {HAVING}",
        f"SELECT plant, count(*) AS n FROM (SELECT plant, id FROM parts) WHERE id = 3 {HAVING}",
    ],
)
def test_joins_and_filters_below_a_subquery_are_refused(
    parts: tuple[SandboxDatabase, DatasetInfo], sql: str
) -> None:
    store, info = parts
    relation = relation_for(info, COLUMNS, AGGREGATE, KEY)
    with pytest.raises(QueryRejected, match="aggregate-only"):
        _run(store, sql, relation)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        # A filter on a grouping column keeps or drops whole groups, however it is named.
        (f"SELECT plant, count(*) AS n FROM parts WHERE plant = 'B' {HAVING}", [("B", 25)]),
        (f"SELECT plant, count(*) AS n FROM parts WHERE #2 = 'B' {HAVING}", [("B", 25)]),
        (
            f"SELECT plant, count(*) AS n FROM parts WHERE COLUMNS('plant') = 'B' {HAVING}",
            [("B", 25)],
        ),
        (
            "SELECT plant, count(*) AS n FROM (SELECT plant FROM parts) WHERE plant <> 'A' "
            f"{HAVING} ORDER BY plant",
            [("B", 25), ("C", 25), ("D", 25)],
        ),
        # Filtering on a column it groups by, the query gets only groups of one: dropped.
        (
            "SELECT id, count(*) AS n FROM parts WHERE id = 3 GROUP BY id HAVING count(*) >= 5",
            [],
        ),
    ],
)
def test_a_filter_on_grouping_columns_is_answered(
    parts: tuple[SandboxDatabase, DatasetInfo], sql: str, expected: list[tuple[object, ...]]
) -> None:
    store, info = parts
    relation = relation_for(info, COLUMNS, AGGREGATE, KEY)
    assert [tuple(r.values()) for r in _run(store, sql, relation)] == expected


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT " + "9" * 45 + " FROM parts",
        "SELECT count(*) AS n FROM parts WHERE id < " + "9" * 39,
        "SELECT " + "9" * 40 + "::DOUBLE AS x FROM parts",
    ],
)
@pytest.mark.parametrize("shaping", [MASKED, AGGREGATE], ids=["masked", "aggregate-only"])
def test_a_plan_that_cannot_be_serialised_is_refused_with_a_reason(
    parts: tuple[SandboxDatabase, DatasetInfo], sql: str, shaping: object
) -> None:
    store, info = parts
    relation = relation_for(info, COLUMNS, shaping, KEY)  # type: ignore[arg-type]
    with pytest.raises(QueryRejected, match="cannot check the plan"):
        _run(store, sql, relation)
    assert _run(store, "SELECT 1 AS one", relation) == [{"one": 1}]


@dataclasses.dataclass(frozen=True)
class _Exposed:
    dataset: str
    column_names: tuple[str, ...]
    sql: str = ""
    shaped_table: str = ""
    min_group_size: int = 0


def test_a_plan_that_passed_is_checked_again_for_other_relations() -> None:
    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT 1 AS a, 2 AS b")
    text, plan = bound_plan_text(con, "SELECT a, b FROM t", ["t"])
    source = ("memory", "main", "t")
    for _ in range(2):
        check_plan_text(text, plan, {source: _Exposed("t", ("a", "b"))})
    with pytest.raises(QueryRejected, match="column b of t, not granted"):
        check_plan_text(text, plan, {source: _Exposed("t", ("a",))})
    with pytest.raises(QueryRejected, match="not one of your datasets"):
        check_plan_text(text, plan, {("memory", "main", "u"): _Exposed("t", ("a", "b"))})
    with pytest.raises(QueryRejected, match="aggregate-only"):
        check_plan_text(text, plan, {source: _Exposed("t", ("a", "b"), min_group_size=5)})
    con.close()

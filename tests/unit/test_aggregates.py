"""The aggregate-only form: what it accepts, what it refuses and why, and the HAVING rewrite."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import duckdb
import pytest

from connector.aggregates import (
    AggregateTerms,
    aggregate_form,
    aggregate_only_query,
    is_measurement_type,
)
from connector.errors import QueryRejected
from connector.shaping import Shaping
from connector.store import ColumnInfo

TERMS = AggregateTerms(
    dataset="parts",
    columns=frozenset({"id", "plant", "serial", "price", "week"}),
    measurement_columns=frozenset({"id", "price", "week"}),
    min_group_size=5,
)


def _rows(sql: str) -> list[tuple[object, ...]]:
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE parts AS SELECT i AS id, ['A', 'B'][i % 2 + 1] AS plant, "
        "'S-' || i AS serial, i + 0.5 AS price, DATE '2026-01-05' AS week FROM range(12) t(i)"
    )
    return con.execute(sql).fetchall()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT plant, count(*) FROM parts GROUP BY plant",
        "SELECT plant, sum(price), avg(price), min(week), max(id) FROM parts GROUP BY plant",
        "SELECT parts.plant, count(parts.serial) FROM parts GROUP BY parts.plant",
        "SELECT p.plant, count(*) FROM parts p WHERE p.plant = 'A' GROUP BY p.plant",
        "SELECT plant, count(*) AS n FROM parts WHERE plant IN ('A', 'B') GROUP BY plant "
        "HAVING sum(price) > 1 ORDER BY n DESC LIMIT 2",
        "SELECT plant, week, count(*) FROM parts WHERE week > DATE '2026-01-01' AND plant "
        "LIKE 'A%' GROUP BY plant, week",
        "SELECT count(*) FROM parts",
    ],
)
def test_the_aggregate_form_is_accepted_and_gets_the_minimum(sql: str) -> None:
    rewritten = aggregate_only_query(sql, TERMS)
    assert "count_star() >= 5" in rewritten
    _rows(rewritten)  # still a valid query


def test_the_minimum_drops_small_groups_and_keeps_the_having() -> None:
    rewritten = aggregate_only_query(
        "SELECT plant, count(*) AS n FROM parts GROUP BY plant HAVING sum(id) > 30", TERMS
    )
    assert sorted(_rows(rewritten)) == [("B", 6)]  # A: 0+2+...+10 = 30 is not > 30
    small = AggregateTerms(TERMS.dataset, TERMS.columns, TERMS.measurement_columns, 7)
    assert (
        _rows(aggregate_only_query("SELECT plant, count(*) FROM parts GROUP BY plant", small)) == []
    )


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        # Every way of naming a column other than a plain granted name, in WHERE...
        ("SELECT plant, count(*) FROM parts WHERE #3 <> 'S-1' GROUP BY plant", "positional"),
        ("SELECT plant, count(*) FROM parts WHERE lower(#3) <> 's' GROUP BY plant", "positional"),
        ("SELECT plant, count(*) FROM parts WHERE #4 < 5 GROUP BY plant", "positional"),
        ("SELECT plant, count(*) FROM parts WHERE COLUMNS('serial') <> 'x' GROUP BY plant",
         "COLUMNS"),
        ("SELECT plant, count(*) FROM parts WHERE COLUMNS('ser.*') <> 'x' GROUP BY plant",
         "COLUMNS"),
        ("SELECT plant, count(*) FROM parts WHERE *COLUMNS('serial') <> 'x' GROUP BY plant",
         "COLUMNS"),
        ("SELECT plant, count(*) FROM parts WHERE COLUMNS([serial]) <> 'x' GROUP BY plant",
         "COLUMNS"),
        ("SELECT plant, count(*) FROM parts WHERE COLUMNS(c -> c = 'serial') <> 'x' "
         "GROUP BY plant", "COLUMNS"),
        ("SELECT plant, count(*) FROM parts WHERE COLUMNS(* EXCLUDE (plant)) IS NOT NULL "
         "GROUP BY plant", "COLUMNS"),
        ("SELECT plant, count(*) FROM parts WHERE plant.x = 1 GROUP BY plant", "struct fields"),
        ("SELECT plant, count(*) FROM parts WHERE parts IS NOT NULL GROUP BY plant",
         "only granted columns, not parts"),
        ("SELECT plant, count(*) FROM parts WHERE serial <> 'S-1' GROUP BY plant",
         "only grouping columns, not serial"),
        ("SELECT plant, count(*) FROM parts p WHERE p.serial <> 'S-1' GROUP BY plant",
         "only grouping columns, not serial"),
        # ... in GROUP BY ...
        ("SELECT count(*) FROM parts GROUP BY #2", "positional"),
        ("SELECT count(*) FROM parts GROUP BY COLUMNS('pla.*')", "COLUMNS"),
        ("SELECT count(*) FROM parts GROUP BY COLUMNS(*)", "COLUMNS"),
        ("SELECT count(*) FROM parts GROUP BY plant.x", "struct fields"),
        ("SELECT count(*) FROM parts GROUP BY secret", "only granted columns"),
        ("SELECT count(*) FROM parts GROUP BY 1", "by name"),
        # ... in aggregates ...
        ("SELECT plant, sum(#4) FROM parts GROUP BY plant", "positional"),
        ("SELECT plant, sum(COLUMNS('price')) FROM parts GROUP BY plant", "COLUMNS"),
        ("SELECT plant, max(COLUMNS(*)) FROM parts GROUP BY plant", "COLUMNS"),
        ("SELECT plant, count(COLUMNS(c -> c LIKE 'ser%')) FROM parts GROUP BY plant",
         "COLUMNS"),
        ("SELECT plant, sum(price.x) FROM parts GROUP BY plant", "struct fields"),
        ("SELECT plant, count(parts) FROM parts GROUP BY plant", "only granted columns"),
        ("SELECT plant, min(serial) FROM parts GROUP BY plant", "number or date"),
        ("SELECT plant, sum(price * 2) FROM parts GROUP BY plant", "one granted column"),
        ("SELECT plant, sum(price) FILTER (WHERE id = 3) FROM parts GROUP BY plant", "FILTER"),
        # ... and in what is returned.
        ("SELECT #1, count(*) FROM parts GROUP BY plant", "positional"),
        ("SELECT *, count(*) FROM parts GROUP BY plant", "COLUMNS"),
        ("SELECT COLUMNS('pl.*'), count(*) FROM parts GROUP BY plant", "COLUMNS"),
        ("SELECT plant, count(*) FROM parts GROUP BY plant ORDER BY #4", "positional"),
        ("SELECT plant, id FROM parts GROUP BY plant", "must be grouped or aggregated"),
        ("SELECT plant, count(*) FROM parts GROUP BY ALL", "GROUP BY ALL"),
        ("SELECT plant, count(*) FROM parts GROUP BY ROLLUP (plant)", "ROLLUP"),
        ("SELECT plant, string_agg(serial) FROM parts GROUP BY plant", "string_agg() is not"),
        ("SELECT plant, count(*) FROM parts WHERE plant IN (SELECT plant FROM parts) "
         "GROUP BY plant", "subqueries"),
        ("SELECT count(*) FROM parts JOIN parts q USING (id)", "alone"),
        ("WITH x AS (SELECT 1) SELECT count(*) FROM parts", "WITH"),
        ("SELECT count(*) FROM parts UNION SELECT 1", "UNION"),
    ],
)  # fmt: skip
def test_everything_outside_the_form_is_refused_with_the_reason(sql: str, reason: str) -> None:
    with pytest.raises(QueryRejected) as refused:
        aggregate_only_query(sql, TERMS)
    assert reason in refused.value.message
    assert "parts is aggregate-only" in refused.value.message


def test_deep_nesting_is_refused_not_crashing() -> None:
    sql = "SELECT count(*) FROM parts WHERE plant = " + "lower(" * 2000 + "'a'" + ")" * 2000
    with pytest.raises(QueryRejected):
        aggregate_only_query(sql, TERMS)


@dataclass(frozen=True)
class _Relation:
    dataset: str
    column_names: tuple[str, ...]
    measurement_columns: frozenset[str]
    min_group_size: int
    shaping: Shaping = field(default_factory=Shaping)
    columns: tuple[ColumnInfo, ...] = ()
    clamps: Mapping[str, tuple[int | float, int | float]] = field(default_factory=dict)


def test_aggregate_form_applies_only_to_aggregate_only_relations() -> None:
    open_parts = _Relation("parts", ("plant",), frozenset(), 0)
    assert aggregate_form("SELECT plant FROM parts", ["parts"], [open_parts]) == (
        "SELECT plant FROM parts"
    )
    closed = _Relation("parts", ("plant",), frozenset(), 5)
    rewritten = aggregate_form(
        "SELECT plant, count(*) FROM parts GROUP BY plant", ["parts"], [closed]
    )
    assert "count_star() >= 5" in rewritten
    with pytest.raises(QueryRejected, match="no other dataset"):
        aggregate_form("SELECT 1", ["parts", "plants"], [closed, open_parts])


@pytest.mark.parametrize(
    ("type_name", "measurement"),
    [("INTEGER", True), ("DECIMAL(18,3)", True), ("DATE", True), ("VARCHAR", False),
     ("BLOB", False), ("TIMESTAMP WITH TIME ZONE", True), ("STRUCT(a INTEGER)", False)],
)  # fmt: skip
def test_measurement_types(type_name: str, measurement: bool) -> None:
    assert is_measurement_type(type_name) is measurement

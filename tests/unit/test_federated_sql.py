"""Federated SQL: the partial-aggregate rewrite on DuckDB's parse tree, and the combination
of partial answers, checked against DuckDB computing the same query over all rows at once."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import duckdb
import pyarrow as pa
import pytest

from connector.errors import NotFederable
from connector.federated_plan import AGGREGATE, UNION, FederationPlan, combine
from connector.federated_sql import plan_federation

ROWS = [
    ("Leipzig", "P1", 3, 1.5),
    ("Leipzig", "P2", 5, 2.0),
    ("Munich", "P1", 7, None),
    ("Munich", "P3", None, 4.0),
    ("Regensburg", "P2", 11, 0.5),
    (None, "P1", 2, 1.0),
]
MEMBERS = [ROWS[:2] + ROWS[4:5], ROWS[2:4], ROWS[5:]]  # three members' own rows


def _relation(con: duckdb.DuckDBPyConnection, rows: Sequence[tuple[object, ...]]) -> None:
    con.execute(
        "CREATE OR REPLACE TABLE part_defects(plant TEXT, part_no TEXT, defects INT, w DOUBLE)"
    )
    if rows:
        con.executemany("INSERT INTO part_defects VALUES (?, ?, ?, ?)", rows)


def federated(sql: str) -> pa.Table:
    """The combined answer of the three members, each running the member query."""
    plan = plan_federation(sql)
    con = duckdb.connect()
    partials = []
    for rows in MEMBERS:
        _relation(con, rows)
        partials.append(con.sql(plan.member_sql).to_arrow_table())
    return combine(plan, partials)


def direct(sql: str) -> pa.Table:
    con = duckdb.connect()
    _relation(con, ROWS)
    return con.sql(sql).to_arrow_table()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT plant, count(*) AS n, sum(defects) AS s, avg(defects) AS a, min(w) AS lo, "
        "max(w) AS hi FROM part_defects GROUP BY plant ORDER BY plant",
        "SELECT count(*), sum(defects), avg(w) FROM part_defects",
        "SELECT upper(plant) AS p, count(defects) AS n FROM part_defects GROUP BY p ORDER BY p",
        "SELECT part_no, sum(defects) AS s FROM part_defects GROUP BY ALL ORDER BY s DESC LIMIT 2",
        "SELECT sum(defects) AS s FROM part_defects WHERE w > 0.9 GROUP BY plant ORDER BY s",
        "SELECT plant, sum(defects) FILTER (WHERE part_no = 'P1') AS p1 FROM part_defects "
        "GROUP BY plant ORDER BY 1",
        "SELECT plant, avg(defects) FROM part_defects GROUP BY plant ORDER BY plant",
    ],
)
def test_combined_partials_equal_the_query_over_all_rows(sql: str) -> None:
    combined, expected = federated(sql), direct(sql)
    assert combined.column_names == expected.column_names
    assert combined.to_pylist() == expected.to_pylist()


def test_avg_is_total_sum_over_total_count_not_an_average_of_averages() -> None:
    plan = plan_federation("SELECT avg(defects) AS a FROM part_defects")
    assert plan.kind == AGGREGATE
    assert "sum(defects) AS fed_p0_sum" in plan.member_sql
    assert "count(defects) AS fed_p0_count" in plan.member_sql
    partials = [
        pa.table({"fed_p0_sum": [10], "fed_p0_count": [1]}),
        pa.table({"fed_p0_sum": [0], "fed_p0_count": [9]}),
    ]
    assert combine(plan, partials).to_pylist() == [{"a": 1.0}]  # not (10 + 0) / 2


def test_partials_of_different_number_types_are_combined() -> None:
    plan = plan_federation("SELECT plant, sum(defects) AS s FROM part_defects GROUP BY plant")
    partials = [
        pa.table({"fed_g0": ["a"], "fed_p1": pa.array([2], pa.int64())}),
        pa.table({"fed_g0": ["a"], "fed_p1": pa.array([0.5], pa.float64())}),
    ]
    assert combine(plan, partials).to_pylist() == [{"plant": "a", "s": 2.5}]


def test_combinations_at_once_each_see_only_their_own_partials() -> None:
    # Combinations share one in-memory database, each through a connection of its own: the
    # answers one registers are never read by another running at the same time.
    plan = plan_federation("SELECT sum(defects) AS s FROM part_defects")
    results: dict[int, list[dict[str, object]]] = {}

    def run(n: int) -> None:
        for _ in range(20):
            partials = [pa.table({"fed_p0": [n]}), pa.table({"fed_p0": [n * 1000]})]
            results.setdefault(n, []).extend(combine(plan, partials).to_pylist())

    threads = [threading.Thread(target=run, args=(n,)) for n in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == {n: [{"s": n * 1001}] * 20 for n in range(1, 5)}


def test_nothing_answered_combines_to_no_groups_and_a_zero_count() -> None:
    grouped = plan_federation("SELECT plant, count(*) FROM part_defects GROUP BY plant")
    assert combine(grouped, []).num_rows == 0
    total = plan_federation("SELECT count(*) AS n FROM part_defects")
    assert combine(total, []).to_pylist() == [{"n": 0}]


def test_plain_queries_are_sent_as_written() -> None:
    sql = "SELECT plant, defects FROM part_defects WHERE defects > 3 ORDER BY defects LIMIT 5"
    plan = plan_federation(sql)
    assert plan.kind == UNION and plan.member_sql == sql
    assert plan_federation("SELECT sum(x) OVER () FROM t").kind == UNION


def test_a_plan_survives_its_json_form() -> None:
    plan = plan_federation(
        "SELECT plant, avg(defects) AS a FROM part_defects GROUP BY plant ORDER BY a DESC LIMIT 3"
    )
    assert FederationPlan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError, match="not a federation plan"):
        FederationPlan.from_json({"kind": "aggregate"})


@pytest.mark.parametrize(
    "sql, words",
    [
        ("SELECT quantile_cont(defects, 0.9) FROM part_defects", "quantile"),
        ("SELECT sum(DISTINCT defects) FROM part_defects", "counted once by each"),
        ("SELECT plant, mode(part_no) FROM part_defects GROUP BY plant", "most frequent"),
        ("SELECT plant, var_pop(defects) FROM part_defects GROUP BY plant", "variance"),
        ("SELECT plant, list(part_no) FROM part_defects GROUP BY plant", "collects"),
        ("SELECT plant, arg_max(part_no, defects) FROM part_defects GROUP BY plant",
         "only count, sum, min, max and avg"),
        ("SELECT plant, round(avg(defects), 1) FROM part_defects GROUP BY plant",
         "computes with an aggregate"),
        ("SELECT plant, part_no, sum(defects) FROM part_defects GROUP BY plant",
         "part_no is neither an aggregate nor a GROUP BY column"),
        ("SELECT plant, sum(defects) FROM part_defects GROUP BY ROLLUP (plant)", "ROLLUP"),
        ("SELECT plant, sum(defects) FROM part_defects GROUP BY 1", "by position"),
        ("SELECT plant, sum(defects) s FROM part_defects GROUP BY plant LIMIT 2 OFFSET 1",
         "OFFSET"),
        ("SELECT plant, sum(defects) s FROM part_defects GROUP BY plant ORDER BY max(defects)",
         "ORDER BY must name columns"),
        ("SELECT sum(defects) AS s, count(*) AS s FROM part_defects", "two columns"),
    ],
)  # fmt: skip
def test_what_cannot_be_combined_exactly_is_refused_saying_which_and_why(
    sql: str, words: str
) -> None:
    with pytest.raises(NotFederable, match="cannot be combined across members") as refused:
        plan_federation(sql)
    assert words in str(refused.value)


def test_a_group_by_name_that_aliases_an_expression_is_refused() -> None:
    # DuckDB groups by the dataset's column `plant` here, not by `plant % 2`: the rewrite
    # would ask every member something else, so the query is refused before it is sent.
    sql = "SELECT plant % 2 AS plant, sum(defects) AS s FROM part_defects GROUP BY plant"
    with pytest.raises(NotFederable, match="group by the expression itself"):
        plan_federation(sql)
    renamed = plan_federation("SELECT plant AS p, sum(defects) AS s FROM part_defects GROUP BY p")
    assert "GROUP BY plant" in renamed.member_sql

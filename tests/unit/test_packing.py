"""Row packing as the guard reports it: what packs many rows into one, and what does not."""

from __future__ import annotations

import pytest

from connector.errors import QueryRejected
from connector.sqlguard import inspect_query

PACKS = [
    ("SELECT list(x) FROM t", "list()"),
    ("SELECT array_agg(x ORDER BY y) FILTER (WHERE y > 1) FROM t", "array_agg()"),
    ("SELECT string_agg(x, ',') FROM t", "string_agg()"),
    ("SELECT histogram(x) FROM t GROUP BY y", "histogram()"),
    ("SELECT max(x, 10) FROM t", "max() with a count"),
    ("SELECT max_by(x, y, 10) FROM t", "max_by() with a count"),
    ("SELECT quantile_disc(x, [0.1, 0.9]) FROM t", "quantile_disc() with a list"),
    ("SELECT ARRAY(SELECT x FROM t)", "array_agg()"),
    ("SELECT struct_pack(a := count(*), b := max(x)) FROM t", "struct_pack() over"),
    ("SELECT [min(x), max(x)] FROM t", "list_value() over"),
    ("SELECT lag(x, 3) OVER (ORDER BY y) FROM t", "lag() OVER"),
    ("SELECT sum(x) OVER (ORDER BY y ROWS BETWEEN 2 PRECEDING AND 2 PRECEDING) FROM t", "offset"),
    ("WITH c AS (SELECT string_agg(x, '') AS s FROM t) SELECT s FROM c", "string_agg()"),
    (
        "SELECT * FROM t WHERE y IN (SELECT unnest_me FROM (SELECT list(x) AS unnest_me FROM t))",
        "list()",
    ),
]
PLAIN = [
    "SELECT count(*), sum(x), avg(x), min(x), max(x), median(x) FROM t",
    "SELECT y, count(*) FROM t GROUP BY y HAVING count(*) > 5",
    "SELECT quantile_disc(x, 0.5), arg_max(x, y), min_by(x, y) FROM t",
    "SELECT struct_pack(a := x, b := y), [x, y] FROM t",
    "SELECT x, row_number() OVER (ORDER BY y), rank() OVER (PARTITION BY x ORDER BY y) FROM t",
    "SELECT x, sum(y) OVER (PARTITION BY x) FROM t",
    "SELECT x || y, concat(x, y) FROM t LIMIT 5",
]


@pytest.mark.parametrize(("sql", "reason"), PACKS)
def test_packing_constructs_are_reported(sql: str, reason: str) -> None:
    try:
        shape = inspect_query(sql)
    except QueryRejected as refused:
        # The value-size rule refuses some packing forms outright (a packed value that a
        # subquery could repeat across rows); refused is as good as reported.
        assert reason.split("(", maxsplit=1)[0] in str(refused)
    else:
        assert reason in shape.packing


@pytest.mark.parametrize("sql", PLAIN)
def test_rows_and_plain_aggregates_are_not_packing(sql: str) -> None:
    assert inspect_query(sql).packing == ""

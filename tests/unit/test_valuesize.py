"""The guard's size rule: values that constants in a query could blow up are refused."""

from __future__ import annotations

import pytest

from connector.errors import QueryRejected
from connector.sqlguard import inspect_query
from connector.valuesize import MAX_VALUE_BYTES, Argument, TooLarge, function_bytes

# (what, query, words the refusal must contain)
REFUSED = [
    ("repeat", "SELECT max(length(repeat(plant, 4000000))) FROM part_defects", "repeat()"),
    (
        "repeat in WHERE",
        "SELECT count(*) FROM part_defects WHERE repeat(plant, 9e6) > ''",
        "repeat",
    ),
    (
        "repeat in ORDER BY",
        "SELECT plant FROM part_defects ORDER BY repeat(plant, 4000000)",
        "repeat",
    ),
    (
        "repeat in * REPLACE",
        "SELECT * REPLACE (repeat(plant, 4000000) AS plant) FROM part_defects",
        "repeat",
    ),
    (
        "repeat by a cast",
        "SELECT repeat(plant, CAST('5000000' AS INT)) FROM part_defects",
        "repeat",
    ),
    ("repeat by a double negation", "SELECT repeat(plant, - -4000000) FROM part_defects", "repeat"),
    (
        "repeat by a column",
        "SELECT repeat(plant, defects) FROM part_defects",
        "written in the query",
    ),
    ("nested repeats", "SELECT repeat(repeat(plant, 500), 500) FROM part_defects", "repeat"),
    ("lpad", "SELECT lpad(plant, 40000000, 'x') FROM part_defects", "lpad()"),
    ("rpad", "SELECT rpad(plant, 40000000) FROM part_defects", "rpad()"),
    ("lpad by arithmetic", "SELECT lpad(plant, defects * 1000000, 'x') FROM part_defects", "lpad"),
    ("format width", "SELECT format('{:>100000000}', plant) FROM part_defects", "format()"),
    ("format precision", "SELECT format('{:.100000000f}', defects) FROM part_defects", "format()"),
    ("printf width", "SELECT printf('%100000000s', plant) FROM part_defects", "printf()"),
    ("printf star width", "SELECT printf('%*s', 100000000, plant) FROM part_defects", "arguments"),
    (
        "format nested width",
        "SELECT format('{:>{}}', plant, 100000000) FROM part_defects",
        "arguments",
    ),
    ("format string from data", "SELECT format(plant, 1) FROM part_defects", "format string"),
    (
        "format of many fields",
        "SELECT format('" + "{0}" * 3000 + "', plant) FROM part_defects",
        "format",
    ),
    (
        "regexp_replace growth",
        "SELECT regexp_replace(plant, '', repeat('x', 1000), 'g') FROM part_defects",
        "regexp_replace",
    ),
    (
        "replace growth",
        "SELECT replace(plant, 'e', repeat('x', 2000)) FROM part_defects",
        "replace",
    ),
    (
        "concat of many columns",
        "SELECT concat(" + ", ".join(["plant"] * 1200) + ") FROM part_defects",
        "concat",
    ),
    (
        "string_agg over a cross join",
        "SELECT length(string_agg(a.plant || b.plant, ','))"
        " FROM part_defects a, part_defects b, part_defects c",
        "without joins",
    ),
    (
        "list over a join",
        "SELECT len(list(a.plant)) FROM part_defects a JOIN part_defects b ON a.plant = b.plant",
        "without joins",
    ),
    (
        "array_agg over a union",
        "SELECT array_agg(plant)"
        " FROM (SELECT plant FROM part_defects UNION ALL SELECT plant FROM part_defects)",
        "UNION",
    ),
    (
        "histogram over a join",
        "SELECT histogram(a.plant) FROM part_defects a, part_defects b",
        "without joins",
    ),
    (
        "group_concat over a CTE join",
        "WITH j AS (SELECT a.plant FROM part_defects a, part_defects b)"
        " SELECT group_concat(plant) FROM j",
        "without joins",
    ),
    ("listagg as a window", "SELECT listagg(plant) OVER () FROM part_defects", "window"),
    (
        "list repeated on every row",
        "SELECT (SELECT string_agg(plant, ',') FROM part_defects) FROM part_defects",
        "outermost",
    ),
    (
        "ARRAY subquery on every row",
        "SELECT ARRAY(SELECT plant FROM part_defects) FROM part_defects",
        "outermost",
    ),
    ("top-n too large", "SELECT max(plant, 1000000) FROM part_defects", "at most"),
    (
        "min_by top-n too large",
        "SELECT min_by(plant, defects, 100000) FROM part_defects",
        "at most",
    ),
    (
        "arg_max top-n over a join",
        "SELECT arg_max(a.plant, b.defects, 5) FROM part_defects a, part_defects b",
        "without joins",
    ),
    ("string_agg grown", "SELECT repeat(string_agg(plant, ','), 2) FROM part_defects", "repeat"),
    (
        "split into elements",
        "SELECT string_split(repeat(plant, 1000), '') FROM part_defects",
        "string_split",
    ),
    (
        "deeply nested lists",
        # Refused by the pre-scan (sqlbounds.py) before the size rule sees it.
        "SELECT " + "list_value(" * 120 + "repeat(plant, 1000)" + ")" * 120 + " FROM part_defects",
        "nested more than 64 deep",
    ),
]

ALLOWED = [
    "SELECT repeat('-', 80), repeat(plant, 3) FROM part_defects",
    "SELECT lpad(part_no, 10, '0'), rpad(plant, 20) FROM part_defects",
    "SELECT format('{} has {} defects', plant, defects), printf('%.2f', defects) FROM part_defects",
    "SELECT regexp_replace(plant, '[0-9]', '#', 'g'), replace(plant, 'e', 'E') FROM part_defects",
    "SELECT plant, string_agg(part_no, ',') FROM part_defects GROUP BY plant",
    "SELECT plant, list(defects ORDER BY week) FROM part_defects GROUP BY plant",
    "SELECT arg_max(plant, defects, 10), max(defects, 3) FROM part_defects",
    "SELECT length(string_agg(plant, ',')) FROM part_defects WHERE defects > 3",
    "SELECT list_value(list_value(plant, plant), list_value(plant)) FROM part_defects",
    "SELECT * FROM part_defects",
    "SELECT a.plant, b.part_no FROM part_defects a JOIN part_defects b USING (plant)",
    "SELECT plant, count(*) FROM part_defects GROUP BY ALL HAVING count(*) > 5 ORDER BY 2 LIMIT 3",
    "SELECT string_agg(plant, ',')"
    " FROM part_defects WHERE plant IN (SELECT plant FROM part_defects)",
    # A NULL count builds nothing (DuckDB 2.0 names the literal NULL_LITERAL).
    "SELECT repeat(plant, NULL), lpad(part_no, NULL, '0') FROM part_defects",
]


@pytest.mark.parametrize(("what", "sql", "words"), REFUSED, ids=[w for w, _, _ in REFUSED])
def test_values_that_could_blow_up_are_refused_with_the_function_named(
    what: str, sql: str, words: str
) -> None:
    with pytest.raises(QueryRejected) as refused:
        inspect_query(sql)
    assert words in str(refused.value), f"{what}: {refused.value}"


@pytest.mark.parametrize("sql", ALLOWED)
def test_ordinary_uses_of_the_same_functions_pass(sql: str) -> None:
    inspect_query(sql)


def test_the_rule_for_one_function_needs_no_syntax_tree() -> None:
    """The per-function rule, as a later check of bound plans would call it."""
    column = Argument(64)
    assert function_bytes("repeat", [column, Argument(16, "3")]) == 192
    with pytest.raises(TooLarge):
        function_bytes("repeat", [column, Argument(16, "4000000")])
    with pytest.raises(TooLarge):
        function_bytes("lpad", [column, Argument(16, None)])
    assert function_bytes("string_agg", [column, Argument(16, ",")]) == MAX_VALUE_BYTES

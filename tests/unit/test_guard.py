"""The SQL guard: one SELECT, dataset names only, allow-listed functions; what it reports."""

from __future__ import annotations

import pytest

from connector.errors import QueryRejected
from connector.sqlguard import inspect_query


@pytest.mark.parametrize(
    ("sql", "datasets", "columns", "star"),
    [
        (
            "SELECT plant, sum(defects) FROM part_defects GROUP BY plant ORDER BY 2 DESC LIMIT 5",
            ("part_defects",),
            {"plant", "defects"},
            False,
        ),
        (
            "WITH a AS (SELECT plant, part_no FROM part_defects) "
            "SELECT a.plant FROM a JOIN suppliers s ON a.part_no = s.part_no",
            ("part_defects", "suppliers"),
            {"plant", "part_no"},
            False,
        ),
        (
            "SELECT * FROM part_defects UNION ALL SELECT * FROM other",
            ("other", "part_defects"),
            set(),
            True,
        ),
        (
            "SELECT plant, row_number() OVER (PARTITION BY plant ORDER BY week) FROM part_defects",
            ("part_defects",),
            {"plant", "week"},
            False,
        ),
        ("SELECT x FROM t WHERE y IN (SELECT z FROM u)", ("t", "u"), {"x", "y", "z"}, False),
        ("SELECT EXISTS (SELECT 1 FROM secret WHERE Price > 3)", ("secret",), {"price"}, False),
        ("FROM part_defects SELECT plant", ("part_defects",), {"plant"}, False),
        (
            "SELECT CASE WHEN a > 1 THEN b ELSE c END, CAST(d AS INT) FROM t",
            ("t",),
            {"a", "b", "c", "d"},
            False,
        ),
        ("SELECT t.a FROM t JOIN u USING (k)", ("t", "u"), {"a", "k"}, False),
        (
            "SELECT date_trunc('week', day), count(*) FROM t GROUP BY ALL HAVING count(*) > 1",
            ("t",),
            {"day"},
            False,
        ),
        ("SELECT 1; -- a trailing comment is not a statement", (), set(), False),
    ],
)
def test_allowed_queries_report_what_they_read(
    sql: str, datasets: tuple[str, ...], columns: set[str], star: bool
) -> None:
    shape = inspect_query(sql)
    assert shape.datasets == datasets
    assert shape.column_refs == frozenset(columns)
    assert shape.uses_star is star


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT * FROM read_csv('/etc/passwd')", "table functions such as read_csv()"),
        ("SELECT * FROM read_parquet('x.parquet')", "table functions such as read_parquet()"),
        ("SELECT * FROM glob('/*')", "table functions such as glob()"),
        ("SELECT * FROM query('SELECT 1')", "table functions such as query()"),
        ("SELECT * FROM duckdb_tables()", "table functions such as duckdb_tables()"),
        ("SELECT * FROM '/etc/passwd'", "reading files or URLs is not allowed"),
        ("SELECT * FROM 'https://example.com/x.csv'", "reading files or URLs is not allowed"),
        ("SELECT 1; DROP TABLE x", "exactly one statement, not 2"),
        ("SET threads = 1", "only SELECT is allowed, not SET"),
        ("PRAGMA version", "only SELECT is allowed, not PRAGMA"),
        ("ATTACH 'x.db'", "only SELECT is allowed, not ATTACH"),
        ("COPY t TO 'x.csv'", "only SELECT is allowed, not COPY"),
        ("INSTALL httpfs", "only SELECT is allowed"),
        ("LOAD httpfs", "only SELECT is allowed"),
        ("EXPORT DATABASE '/tmp/x'", "only SELECT is allowed"),
        ("CALL pragma_version()", "only SELECT is allowed, not CALL"),
        ("EXPLAIN SELECT 1", "only SELECT is allowed, not EXPLAIN"),
        ("PIVOT t ON a USING sum(b)", "only SELECT is allowed"),
        ("DESCRIBE t", "DESCRIBE/SUMMARIZE/SHOW is not allowed"),
        ("SUMMARIZE t", "DESCRIBE/SUMMARIZE/SHOW is not allowed"),
        ("SELECT * FROM datasets.part_defects", "qualified table names are not allowed"),
        ("SELECT * FROM memory.main.t", "qualified table names are not allowed"),
        ("SELECT * FROM information_schema.tables", "qualified table names are not allowed"),
        ("SELECT * FROM sqlite_master", "system catalog"),
        ("SELECT * FROM duckdb_settings", "system catalog"),
        ("SELECT a.b.c FROM t a", "qualified column names are allowed only as table.column"),
        ("SELECT current_setting('threads')", "function current_setting() is not allowed"),
        ("SELECT query('SELECT 1')", "function query() is not allowed"),
        ("SELECT json_execute_serialized_sql('x')", "function json_execute_serialized_sql()"),
        ("SELECT version()", "function version() is not allowed"),
        ("SELECT getenv('HOME')", "function getenv() is not allowed"),
        ("SELECT main.lower('x')", "functions must not be qualified"),
        ("SELECT $1", "prepared-statement parameters"),
        ("SELECT ?", "prepared-statement parameters"),
        ("SELECT list_transform([1], x -> x + 1)", "function list_transform() is not allowed"),
        (
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r",
            "recursive CTEs are not allowed",
        ),
        ("SELECT * FROM t USING SAMPLE 10%", "SAMPLE is not allowed"),
        ("SELECT * FROM t TABLESAMPLE 5 ROWS", "SAMPLE is not allowed"),
        ("SELECT * FROM t AT (VERSION => 1)", "time travel"),
        ("SELEC plant FROM t", "syntax error"),
        ("", "the query is empty"),
        ("SELECT 1\x00", "NUL"),
        ("SELECT " + "1 + " * 3000 + "1", "more than 3000 words"),
    ],
)
def test_forbidden_queries_are_rejected_with_the_reason(sql: str, reason: str) -> None:
    with pytest.raises(QueryRejected) as rejected:
        inspect_query(sql)
    assert reason in str(rejected.value)


def test_rejection_gives_the_position_of_the_offending_part() -> None:
    with pytest.raises(QueryRejected) as rejected:
        inspect_query("SELECT plant, read_text('/etc/hosts') FROM t")
    assert rejected.value.position == 14
    assert str(rejected.value).endswith("(at character 15)")


def test_overlong_query_is_rejected() -> None:
    with pytest.raises(QueryRejected, match="longer than 50 characters"):
        inspect_query("SELECT " + "a, " * 30 + "b FROM t", max_length=50)


def test_cte_names_are_not_reported_as_datasets() -> None:
    shape = inspect_query("WITH x AS (SELECT 1 AS a), y AS (SELECT a FROM x) SELECT * FROM y")
    assert shape.datasets == ()


def test_sha256_is_of_the_text_as_sent() -> None:
    import hashlib

    sql = "SELECT 'Grüße' FROM t"
    assert inspect_query(sql).sha256 == hashlib.sha256(sql.encode()).hexdigest()


@pytest.mark.parametrize(
    ("sql", "columns", "star"),
    [
        # A position or a pattern reads columns the guard cannot name: it counts as *.
        ("SELECT #2 FROM t", set(), True),
        ("SELECT count(*) FROM t WHERE #4 < 500", set(), True),
        ("SELECT a FROM t WHERE COLUMNS('serial') <> 'x'", {"a"}, True),
        ("SELECT COLUMNS('ser.*') FROM t", set(), True),
        ("SELECT max(COLUMNS(* EXCLUDE (a))) FROM t", set(), True),
        ("SELECT * REPLACE (lower(b) AS b) FROM t", {"b"}, True),
        ("SELECT t.* FROM t", set(), True),
        ("SELECT COLUMNS([a, b]) FROM t", {"a", "b"}, True),
        ("SELECT a FROM t GROUP BY COLUMNS('a|b')", {"a"}, True),
        # t.a is column a of t; s.f is field f of struct column s (it parses like table.column).
        ("SELECT t.a FROM t", {"a"}, False),
        ("SELECT x.a FROM t AS x", {"a"}, False),
        ("SELECT s.f FROM t", {"s"}, False),
        ("SELECT count(*) FROM t WHERE s.f = 1", {"s"}, False),
        # A relation's name as a value is its whole row: every column, like *.
        ("SELECT t FROM t", {"t"}, True),
        ("SELECT count(*) FROM t AS x WHERE x IS NOT NULL", {"x"}, True),
        ("SELECT struct_extract(x, 'secret') FROM t AS x", {"x"}, True),
        ("SELECT (x).secret FROM t AS x", {"x"}, True),
        ("WITH c AS (SELECT a FROM t) SELECT c FROM c", {"a", "c"}, True),
    ],
)
def test_every_way_of_naming_a_column_is_reported(sql: str, columns: set[str], star: bool) -> None:
    shape = inspect_query(sql)
    assert shape.column_refs == frozenset(columns)
    assert shape.uses_star is star


def test_lambdas_in_columns_are_refused() -> None:
    # COLUMNS(lambda) parses as list_filter(*, lambda): refused as a function not allowed.
    with pytest.raises(QueryRejected, match="list_filter"):
        inspect_query("SELECT COLUMNS(c -> c LIKE 'ser%') FROM t")


@pytest.mark.parametrize(
    ("sql", "position"),
    [("SELEC plant FROM t", 0), ("SELECT plant FROM t WHERE", 20), ("SELECT a,, b FROM t", 9)],
)
def test_syntax_errors_say_where(sql: str, position: int) -> None:
    with pytest.raises(QueryRejected) as refused:
        inspect_query(sql)
    assert refused.value.position == position
    assert f"(at character {position + 1})" in str(refused.value)

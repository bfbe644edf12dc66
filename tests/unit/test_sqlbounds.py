"""The pre-scan before DuckDB's parser: bounded, and in step with DuckDB's own lexer."""

from __future__ import annotations

import contextlib
import time

import duckdb
import pytest

from connector.errors import QueryRejected
from connector.sqlbounds import MAX_BRACKET_DEPTH, MAX_TOKENS, check_query_bounds
from connector.sqlguard import inspect_query


def duckdb_parses(sql: str) -> bool:
    """True when DuckDB's own parser reads sql (without running it)."""
    con = duckdb.connect(":memory:")
    try:
        con.extract_statements(sql)
        text = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
    except duckdb.Error:
        return False
    finally:
        con.close()
    return '"error":false' in text


# Legal queries whose brackets or quotes are hidden in strings, identifiers and comments.
LEGAL = [
    "SELECT ')' AS a",
    "SELECT 'it''s (' AS a",
    "SELECT E'a\\'(' AS a",
    "SELECT e'\\\\' AS a",
    "SELECT 'a\\' AS a",
    'SELECT 1 AS "a""("',
    "SELECT 1 AS `a``(`",
    'SELECT 1 AS `a"(`',
    "SELECT $$($$ AS a",
    "SELECT $a$ ( $b$ $a$ AS a",
    "SELECT $A$ ( $a$ $A$ AS a",
    "SELECT $_$[$_$ AS a",
    "SELECT $é$($é$ AS a",
    "SELECT 1 AS a$b",
    "SELECT 1 /* a /* ( */ c */",
    "SELECT 1 /*/ ( */",
    "SELECT 1 -- (\n",
    "SELECT 1 +-- (\n 2",
    "SELECT 1 +/* ( */ 2",
    "SELECT [1, 2][1:2], {'a': [1]}",
    "SELECT 'a'\n'(' AS a",
    "SELECT 1 AS é, 2 AS \u00a0a",
    "SELECT (((1)))",
]

# Refused by both: unbalanced or mismatched brackets, unterminated quotes and comments.
REFUSED = [
    ("SELECT t FROM (", "never closed"),
    ("SELECT 1)", "closes nothing"),
    ("SELECT (1]", "does not match"),
    ("SELECT {'a': 1)", "does not match"),
    ("SELECT [1", "never closed"),
    ("SELECT 'a\\'(' ", "string literal is never closed"),
    ("SELECT E'a\\'", "string literal is never closed"),
    ('SELECT 1 AS "a', "quoted identifier is never closed"),
    ("SELECT 1 AS `a(", "quoted identifier is never closed"),
    ("SELECT $a$ ( $a", "dollar-quoted string $a$ is never closed"),
    ("SELECT 1 /* a /* b */", "comment is never closed"),
    ("SELECT 1 -- (\r )", "closes nothing"),
]


@pytest.mark.parametrize("sql", LEGAL)
def test_brackets_in_strings_identifiers_and_comments_are_not_counted(sql: str) -> None:
    assert duckdb_parses(sql), sql
    check_query_bounds(sql)
    inspect_query(sql)


@pytest.mark.parametrize(("sql", "reason"), REFUSED)
def test_what_duckdb_refuses_for_its_brackets_and_quotes_is_refused_first(
    sql: str, reason: str
) -> None:
    assert not duckdb_parses(sql)
    with pytest.raises(QueryRejected, match=reason.replace("$", r"\$")):
        check_query_bounds(sql)


def test_the_stall_of_issue_18_is_refused_at_once_with_the_position() -> None:
    started = time.thread_time()  # this thread's CPU time: a busy machine does not count
    with pytest.raises(QueryRejected) as rejected:
        inspect_query("SELECT t FROM" + "(" * 10_400)
    assert time.thread_time() - started < 0.5
    assert rejected.value.position == 13 + MAX_BRACKET_DEPTH


@pytest.mark.parametrize(
    ("sql", "reason", "position"),
    [
        ("SELECT '\ud800' AS a", "lone surrogate", 8),
        ("SELECT 1 AS \udfff", "lone surrogate", 12),
        ("SELECT 1\x00", "NUL", 8),
        ("SELECT 'a\x00'", "NUL", 9),
    ],
)
def test_text_that_is_not_utf8_or_holds_nul_is_refused(
    sql: str, reason: str, position: int
) -> None:
    with pytest.raises(QueryRejected, match=reason) as rejected:
        inspect_query(sql)
    assert rejected.value.position == position


def test_nesting_and_tokens_are_bounded_but_the_bounds_themselves_pass() -> None:
    inside = "SELECT " + "(" * MAX_BRACKET_DEPTH + "1" + ")" * MAX_BRACKET_DEPTH
    check_query_bounds(inside)
    with pytest.raises(QueryRejected, match=f"nested more than {MAX_BRACKET_DEPTH}"):
        check_query_bounds("SELECT " + "(" * (MAX_BRACKET_DEPTH + 1) + ")" * 65)
    items = (MAX_TOKENS - 3) // 2
    check_query_bounds("SELECT " + "a," * items + "a FROM t")
    with pytest.raises(QueryRejected, match=f"more than {MAX_TOKENS} words"):
        check_query_bounds("SELECT " + "a," * (items + 1) + "a FROM t")
    with pytest.raises(QueryRejected, match="longer than 10 characters"):
        check_query_bounds("SELECT 1 AS a", max_length=10)


def test_long_strings_and_comments_cost_no_tokens() -> None:
    check_query_bounds("SELECT '" + "(" * 90_000 + "' AS a /* " + "[" * 5_000 + " */")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1 " + "/* */" * 19_000,
        "SELECT 1 " + "--\n" * 30_000,
        "SELECT 1 " + "/*" * 40_000,
        "SELECT '" + "''" * 45_000 + "'",
        "SELECT E'" + "\\'" * 45_000 + "'",
        'SELECT 1 AS "' + '""' * 45_000 + '"',
    ],
)
def test_the_scan_stays_cheap_on_long_inputs(sql: str) -> None:
    # This thread's CPU time, best of three: other processes on a busy machine (or another
    # test worker) do not count, a scan that is not linear is slow every time.
    assert min(_scan_seconds(sql) for _ in range(3)) < 0.05


def _scan_seconds(sql: str) -> float:
    started = time.thread_time()
    with contextlib.suppress(QueryRejected):
        check_query_bounds(sql)
    return time.thread_time() - started


# The worst shapes the scan lets through; DuckDB must parse each well within a deadline.
WORST_ACCEPTED = {
    "select list": "SELECT " + "a," * ((MAX_TOKENS - 5) // 2) + "a FROM t",
    "IN list": "SELECT a FROM t WHERE a IN (" + "1," * ((MAX_TOKENS - 12) // 2) + "1)",
    "AND chain": "SELECT 1 FROM t WHERE " + " AND ".join(["a=1"] * ((MAX_TOKENS - 8) // 4)),
    "UNION": " UNION ".join(["SELECT a FROM t"] * (MAX_TOKENS // 5)),
    "deep CASE": "SELECT "
    + "CASE WHEN a THEN " * (MAX_TOKENS // 5 - 1)
    + "1"
    + " END" * (MAX_TOKENS // 5 - 1)
    + " FROM t",
    "operator chain": "SELECT " + "1+" * (MAX_TOKENS // 2 - 2) + "1",
    "nested brackets, syntax error": "SELECT "
    + ",".join(["(" * MAX_BRACKET_DEPTH + "1 1" + ")" * MAX_BRACKET_DEPTH] * 20),
    "unclosed brackets": "SELECT t FROM " + "(" * MAX_BRACKET_DEPTH,
}


@pytest.mark.parametrize("shape", list(WORST_ACCEPTED))
def test_the_worst_queries_the_scan_lets_through_parse_quickly(shape: str) -> None:
    sql = WORST_ACCEPTED[shape]
    try:
        check_query_bounds(sql)
    except QueryRejected:
        return  # refused before the parser: nothing to time
    con = duckdb.connect(":memory:")
    best = min(_parse_seconds(con, sql) for _ in range(3))
    # About 30 ms on a loaded 2-core machine; the margin absorbs noise from other processes.
    assert best < 0.25, f"{shape}: {best:.3f} s"


def _parse_seconds(con: duckdb.DuckDBPyConnection, sql: str) -> float:
    started = time.perf_counter()
    try:
        con.extract_statements(sql)
        con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()
    except duckdb.Error:
        pass
    return time.perf_counter() - started

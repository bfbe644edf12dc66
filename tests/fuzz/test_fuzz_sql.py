"""Fuzz the pre-scan and the SQL guard against DuckDB's own parser.

Properties: the scan refuses nothing DuckDB reads (within its size bounds) and never raises
anything but QueryRejected; the guard never accepts what DuckDB's parser refuses, never
raises anything but QueryRejected, and each answer comes quickly.
"""

from __future__ import annotations

import time

import duckdb
from hypothesis import given
from hypothesis import strategies as st

from connector.errors import QueryRejected
from connector.sqlbounds import check_query_bounds
from connector.sqlguard import inspect_query
from tests.fuzz.mutation import mutated

# Lexical pieces that hide or show brackets, as DuckDB's lexer reads them.
FRAGMENTS = [
    " ",
    "\n",
    "\r",
    "\t",
    "a",
    "b1",
    "é",
    "1",
    "1.5",
    ",",
    ".",
    "+",
    "-",
    "*",
    "/",
    "=",
    "<",
    ">",
    "::",
    ";",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "'",
    "''",
    "'('",
    '"',
    '""',
    '"("',
    "`",
    "``",
    "$$",
    "$a$",
    "$b$",
    "$1",
    "/*",
    "*/",
    "--",
    "E'",
    "e'",
    "\\",
    "\\'",
    "x'",
    "SELECT",
    "FROM",
    "t",
    "WHERE",
    "AS",
    "CASE",
    "WHEN",
    "THEN",
    "END",
    "IN",
    "AND",
    "UNION",
    "struct_pack",
    "x :=",
    "'a':",
    "\x00",
    "\ud800",
]
fragments = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)

SEEDS = [
    "SELECT plant, sum(defects) AS n FROM part_defects WHERE week >= '2026-01-01' GROUP BY plant",
    "SELECT [1, 2][1:2] AS l, {'a': (1 + 2) * 3} AS s FROM t /* (nested /* ) */ */",
    "WITH x AS (SELECT a FROM t) SELECT CASE WHEN a IN (1, 2) THEN 'y(' ELSE $$)$$ END FROM x",
    'SELECT "quoted ("" id", E\'esc\\\'(\' FROM t -- trailing (\nWHERE a = 1',
]
queries = st.one_of(
    fragments.map(lambda body: "SELECT " + body),
    st.sampled_from(SEEDS).flatmap(lambda seed: mutated(seed, FRAGMENTS)),
    st.text(max_size=80).map(lambda body: "SELECT " + body),
)
# Refusals that are bounds, not DuckDB's rules: DuckDB may well read those queries.
BOUND_REASONS = ("longer than", "more than", "NUL", "lone surrogate")


def duckdb_parses(con: duckdb.DuckDBPyConnection, sql: str) -> bool:
    try:
        con.extract_statements(sql)
        text = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
    except (duckdb.Error, UnicodeError):
        return False
    return '"error":false' in text


_CON = duckdb.connect(":memory:")


@given(queries)
def test_the_scan_refuses_nothing_duckdb_reads(sql: str) -> None:
    started = time.perf_counter()
    try:
        check_query_bounds(sql)
        refused = None
    except QueryRejected as exc:
        refused = exc.reason
    assert time.perf_counter() - started < 0.5
    if refused is not None and not any(word in refused for word in BOUND_REASONS):
        assert not duckdb_parses(_CON, sql), f"scan refused ({refused}) what DuckDB reads"


@given(queries)
def test_the_guard_accepts_nothing_duckdb_refuses(sql: str) -> None:
    started = time.perf_counter()
    try:
        inspect_query(sql)
        accepted = True
    except QueryRejected:
        accepted = False
    assert time.perf_counter() - started < 2.0
    if accepted:
        assert duckdb_parses(_CON, sql), "the guard accepted what DuckDB's parser refuses"

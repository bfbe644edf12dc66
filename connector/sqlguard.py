"""Parse a peer's SQL with DuckDB's own parser, refuse what is not allowed, report what it reads.

One SELECT statement only. Every relation must be an unqualified name (a dataset, or a CTE
in scope); no table functions, no functions outside FUNCTIONS below, no parameters, no
lambdas, no recursive CTEs, no samples, no time travel. The walker reads the JSON that
`json_serialize_sql` gives in DuckDB 2.0 through sqltree.py and refuses any node it does not
know. The guard knows nothing of policies: it reports datasets and column names (a position,
a pattern or a whole row counts as *); policy decides.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import duckdb

from connector import sqltree
from connector.errors import QueryRejected
from connector.packing import packed_rows
from connector.sqlbounds import DEFAULT_MAX_LENGTH, check_query_bounds
from connector.sqltree import error_position
from connector.valuesize_tree import check_value_sizes

UNKNOWN_LOCATION = 2**64 - 1
MAX_DEPTH = 600
# The verdict on a text is a function of the text alone: peers repeat the same queries, so
# the last ones are kept (accepted ones only; a refusal is parsed again). Texts are bounded
# in size so that the cache holds at most CACHED_QUERIES * MAX_CACHED_LENGTH characters.
CACHED_QUERIES = 512
MAX_CACHED_LENGTH = 16_384

# Scalar functions and operators as DuckDB's parser names them. Deliberately absent: anything
# that runs SQL from a string (query, query_table, json_execute_serialized_sql), reads files
# or the network, shows settings, the catalog or the host (current_setting, duckdb_*,
# pragma_*, version, getenv), and randomness that could be seeded (setseed).
SCALAR_FUNCTIONS = frozenset(
    """
    + - * / // % ^ ** & | << >> ~ ! || ~~ !~~ ~~* !~~* ~~~ !~~~ ^@ @> <@ && <-> <=>
    abs ceil ceiling floor round trunc sign sqrt cbrt exp ln log log2 log10 pow power
    greatest least mod pi degrees radians sin cos tan asin acos atan atan2 even factorial
    gcd lcm isnan isinf isfinite bit_count xor
    lower upper lcase ucase length len strlen char_length character_length substring substr
    left right concat concat_ws trim ltrim rtrim lpad rpad replace reverse repeat
    starts_with ends_with prefix suffix contains position strpos instr split_part
    string_split regexp_matches regexp_full_match regexp_replace regexp_extract
    like_escape ilike_escape not_like_escape not_ilike_escape format printf
    ascii chr unicode initcap translate md5 sha256 hash levenshtein jaccard
    date_trunc datetrunc date_part datepart date_diff datediff date_sub datesub date_add
    year month day week weekofyear quarter hour minute second millisecond microsecond
    dayofweek dayofmonth dayofyear isodow isoyear yearweek weekday epoch epoch_ms
    era decade century millennium julian last_day monthname dayname make_date make_time
    make_timestamp strftime strptime try_strptime to_days to_hours to_minutes to_seconds
    to_weeks to_months to_years to_milliseconds to_microseconds timezone age
    current_date today now get_current_timestamp current_timestamp time_bucket
    coalesce nullif ifnull if iff typeof
    list_value list_pack struct_pack row array_extract list_extract struct_extract
    array_length list_contains list_has array_contains list_sort array_sort list_distinct
    list_aggregate list_unique len cardinality
    """.split()
)

AGGREGATE_FUNCTIONS = frozenset(
    """
    count count_star sum avg mean min max median mode quantile quantile_cont quantile_disc
    stddev stddev_samp stddev_pop variance var_samp var_pop corr covar_pop covar_samp
    regr_slope regr_intercept regr_r2 approx_count_distinct approx_quantile
    bool_and bool_or every any_value first last arg_min arg_max argmin argmax
    min_by max_by product bit_and bit_or bit_xor string_agg group_concat listagg list
    array_agg histogram entropy kurtosis skewness sum_no_overflow fsum favg
    """.split()
)

WINDOW_FUNCTIONS = frozenset(
    """
    row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value
    last_value nth_value
    """.split()
)

FUNCTIONS = SCALAR_FUNCTIONS | AGGREGATE_FUNCTIONS | WINDOW_FUNCTIONS

# Expression classes the walker understands; anything else is refused.
EXPRESSION_CLASSES = frozenset(
    {
        "COLUMN_REF",
        "CONSTANT",
        "FUNCTION",
        "COMPARISON",
        "CONJUNCTION",
        "OPERATOR",
        "CASE",
        "CAST",
        "BETWEEN",
        "SUBQUERY",
        "WINDOW",
        "STAR",
        "COLLATE",
        "POSITIONAL_REFERENCE",
        "TYPE",
    }
)
REFUSED_CLASSES = {
    "PARAMETER": "prepared-statement parameters ($1, ?) are not allowed; write the values",
    "LAMBDA": "lambda functions are not allowed",
    "LAMBDA_REF": "lambda functions are not allowed",
    "DEFAULT": "DEFAULT is not allowed in a query",
}
RESERVED_PREFIXES = ("duckdb_", "sqlite_", "pg_", "information_schema", "_connector")
PATH_LIKE = re.compile(r"[/\\.:]")


@dataclass(frozen=True)
class QueryShape:
    """What a peer's query reads, as far as the guard can tell from its syntax."""

    sql: str
    sha256: str
    datasets: tuple[str, ...]
    column_refs: frozenset[str]
    uses_star: bool
    packing: str = ""  # what packs several rows into one (connector/packing.py), or ''


@dataclass
class _Findings:
    datasets: set[str] = field(default_factory=set)
    relations: set[str] = field(default_factory=set)  # datasets, CTEs and aliases
    names: list[tuple[str, ...]] = field(default_factory=list)  # column names as written
    columns: set[str] = field(default_factory=set)  # USING columns
    uses_star: bool = False

    def read_columns(self) -> tuple[frozenset[str], bool]:
        """The columns the names read, and whether the query reads whole rows.

        `x` names a column, or the whole row of relation x (a struct of every column);
        `a.b` names column b of relation a, or field b of struct column a.
        """
        columns = set(self.columns)
        uses_star = self.uses_star
        for names in self.names:
            if len(names) == 1:
                columns.add(names[0])
                uses_star = uses_star or names[0] in self.relations
            elif names[0] in self.relations:
                columns.add(names[1])
            else:
                columns.add(names[0])
        return frozenset(columns), uses_star


def _parser_database() -> duckdb.DuckDBPyConnection:
    """The locked-down in-memory database that only parses and serialises."""
    con = duckdb.connect(":memory:", config={"threads": 1})
    for statement in (
        "SET enable_external_access = false",
        "SET autoload_known_extensions = false",
        "SET autoinstall_known_extensions = false",
        "SET lock_configuration = true",
    ):
        con.execute(statement)
    return con


# One database for all threads: each DuckDB database starts threads of its own, whose
# stacks would count against the server's address-space limit (process_memory.py).
_PARSER_DATABASE = _parser_database()


class _ParserConnection(threading.local):
    """One cursor per thread on the shared parser database: a database per thread cost
    about 6 MB and 9 threads each, kept for the life of the server's worker threads."""

    def __init__(self) -> None:
        self.con = _PARSER_DATABASE.cursor()


_PARSER = _ParserConnection()


def parser_connection() -> duckdb.DuckDBPyConnection:
    """This thread's locked-down in-memory connection, which only parses and serialises."""
    return _PARSER.con


def _location(node: dict[str, Any]) -> int | None:
    value = node.get("query_location")
    return value if isinstance(value, int) and 0 <= value < UNKNOWN_LOCATION else None


def _reject(reason: str, node: dict[str, Any] | None = None) -> QueryRejected:
    return QueryRejected(reason, position=_location(node) if node else None)


def inspect_query(
    sql: str, *, max_length: int = DEFAULT_MAX_LENGTH, value_sizes: bool = True
) -> QueryShape:
    """Check a peer's SQL; report the datasets and columns it names, or raise QueryRejected.

    value_sizes=False skips the value-size rule: only for tests that show the sandbox's own
    defences (packing under row limits, memory) with that part of the guard switched off.
    The shape is immutable and shared by every caller that sends the same text.
    """
    if len(sql) <= MAX_CACHED_LENGTH and type(sql) is str:
        return _inspect_cached(sql, max_length, value_sizes)
    return _inspect(sql, max_length, value_sizes)


@functools.lru_cache(maxsize=CACHED_QUERIES)
def _inspect_cached(sql: str, max_length: int, value_sizes: bool) -> QueryShape:
    return _inspect(sql, max_length, value_sizes)


def clear_guard_cache() -> None:
    """Forget every cached verdict (for tests and after a change of the guard's rules)."""
    _inspect_cached.cache_clear()


def _inspect(sql: str, max_length: int, value_sizes: bool) -> QueryShape:
    check_query_bounds(sql, max_length)
    if not sql.strip():
        raise QueryRejected("the query is empty; send one SELECT statement")
    findings = _Findings()
    try:
        tree = _parse(sql)
        _Walker(findings).query_node(tree, frozenset(), 0)
        if value_sizes:
            check_value_sizes(tree)
    except RecursionError:
        raise QueryRejected("the query is nested too deeply") from None
    columns, uses_star = findings.read_columns()
    return QueryShape(
        sql=sql,
        sha256=hashlib.sha256(sql.encode("utf-8")).hexdigest(),
        datasets=tuple(sorted(findings.datasets)),
        column_refs=columns,
        uses_star=uses_star,
        packing=packed_rows(tree),
    )


def _parse(sql: str) -> dict[str, Any]:
    con = _PARSER.con
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise _syntax_error(exc, _error_position(con, sql)) from None
    if len(statements) != 1:
        raise QueryRejected(
            f"send exactly one statement, not {len(statements)} (no ';' between statements)"
        )
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryRejected(f"only SELECT is allowed, not {kind.name}", position=0)
    try:
        text = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
    except duckdb.Error as exc:
        raise _syntax_error(exc) from None
    document = json.loads(text)
    if document.get("error"):
        message = str(document.get("error_message", "the query could not be parsed"))
        first = message.splitlines()[0]
        text = first if first.startswith("syntax error") else f"syntax error: {first}"
        raise QueryRejected(text, position=error_position(document))
    nodes = document.get("statements", [])
    if len(nodes) != 1 or not isinstance(nodes[0].get("node"), dict):
        raise QueryRejected("send exactly one SELECT statement")
    node: dict[str, Any] = nodes[0]["node"]
    return node


def _syntax_error(exc: duckdb.Error, position: int | None = None) -> QueryRejected:
    first = str(exc).splitlines()[0] if str(exc) else "the query could not be parsed"
    first = first.replace("Parser Error: ", "")
    if "expression depth" in first:
        return QueryRejected("the query is nested too deeply")
    text = first if first.startswith("syntax error") else f"syntax error: {first}"
    return QueryRejected(text, position=position)


def _error_position(con: duckdb.DuckDBPyConnection, sql: str) -> int | None:
    """Where DuckDB's parser stopped: its serialised error carries the position, which the
    exception's text only draws as a caret."""
    try:
        text = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
        document = json.loads(text)
    except (duckdb.Error, ValueError, IndexError):
        return None
    return error_position(document) if isinstance(document, dict) else None


class _Walker:
    """Walks the serialised AST; refuses what is not allowed and records what is read."""

    def __init__(self, findings: _Findings) -> None:
        self.found = findings

    def query_node(self, node: Any, ctes: frozenset[str], depth: int) -> None:
        if depth > MAX_DEPTH:
            raise QueryRejected("the query is nested too deeply")
        if not isinstance(node, dict):
            raise QueryRejected("the query has a part the connector cannot check")
        kind = sqltree.query_type(node)
        scope = ctes | self._ctes(node, ctes, depth)
        if kind == "SELECT_NODE":
            if node.get("sample") is not None:
                raise _reject("TABLESAMPLE / USING SAMPLE is not allowed", node)
            self.table_ref(node.get("from_table"), scope, depth + 1)
            for key in ("select_list", "where_clause", "group_expressions", "having", "qualify"):
                self.expressions(node.get(key), scope, depth + 1)
            self.expressions(list(sqltree.modifier_expressions(node)), scope, depth + 1)
        elif kind == "SET_OPERATION_NODE":
            for child in sqltree.set_operation_children(node):
                self.query_node(child, scope, depth + 1)
            self.expressions(list(sqltree.modifier_expressions(node)), scope, depth + 1)
        elif kind in ("RECURSIVE_CTE_NODE", "CTE_NODE"):
            raise _reject("recursive CTEs are not allowed", node)
        else:
            raise _reject(f"this kind of query ({kind}) is not allowed", node)

    def _ctes(self, node: dict[str, Any], outer: frozenset[str], depth: int) -> frozenset[str]:
        entries = sqltree.cte_entries(node)
        names = frozenset(name for name, _ in entries)
        self.found.relations.update(names)
        for _, value in entries:
            if value.get("key_targets") or value.get("payload_aggregates"):
                raise QueryRejected("recursive CTEs (USING KEY) are not allowed")
            # A CTE body sees the outer names and the CTEs of its WITH (fails closed if
            # it names itself: that reference is then not a dataset and will not bind).
            self.query_node(value.get("query_node"), outer | names, depth + 1)
        return names

    def table_ref(self, ref: Any, ctes: frozenset[str], depth: int) -> None:
        if depth > MAX_DEPTH:
            raise QueryRejected("the query is nested too deeply")
        if not isinstance(ref, dict):
            raise QueryRejected("the query has a FROM part the connector cannot check")
        kind = sqltree.table_ref_type(ref)
        if ref.get("sample") is not None:
            raise _reject("TABLESAMPLE / USING SAMPLE is not allowed", ref)
        if sqltree.table_alias(ref):
            self.found.relations.add(sqltree.table_alias(ref))
        if kind == "BASE_TABLE":
            self._base_table(ref, ctes)
        elif kind == "JOIN":
            self.table_ref(ref.get("left"), ctes, depth + 1)
            self.table_ref(ref.get("right"), ctes, depth + 1)
            self.expressions(ref.get("condition"), ctes, depth + 1)
            self.found.columns.update(str(c).lower() for c in ref.get("using_columns") or [])
        elif kind == "SUBQUERY":
            self.query_node(sqltree.subquery_body(ref), ctes, depth + 1)
        elif kind == "EXPRESSION_LIST":
            self.expressions(ref.get("values"), ctes, depth + 1)
        elif kind == "EMPTY":
            return
        elif kind == "TABLE_FUNCTION":
            function = ref.get("function") or {}
            name = function.get("function_name", "a table function")
            raise _reject(f"table functions such as {name}() are not allowed in FROM", ref)
        elif kind in ("SHOW_REF", "PIVOT"):
            raise _reject(
                f"{'DESCRIBE/SUMMARIZE/SHOW' if kind == 'SHOW_REF' else 'PIVOT'} is not allowed",
                ref,
            )
        else:
            raise _reject(f"this kind of FROM item ({kind}) is not allowed", ref)

    def _base_table(self, ref: dict[str, Any], ctes: frozenset[str]) -> None:
        name = sqltree.table_name(ref)
        if ref.get("schema_name") or ref.get("catalog_name"):
            raise _reject(
                f"qualified table names are not allowed: use the dataset name only ({name})", ref
            )
        if ref.get("at_clause") is not None:
            raise _reject("time travel (AT ...) is not allowed", ref)
        lowered = name.lower()
        self.found.relations.add(lowered)
        if lowered in ctes:
            return
        if PATH_LIKE.search(name):
            raise _reject(f"reading files or URLs is not allowed ({name!r} is not a dataset)", ref)
        if lowered.startswith(RESERVED_PREFIXES):
            raise _reject(f"{name} is a system catalog, not a dataset", ref)
        self.found.datasets.add(lowered)

    def expressions(self, value: Any, ctes: frozenset[str], depth: int) -> None:
        """Check every expression below value (a node, list, or modifier structure)."""
        if depth > MAX_DEPTH:
            raise QueryRejected("the query is nested too deeply")
        try:
            nodes = list(sqltree.direct_expressions(value))
        except QueryRejected as unknown:
            raise _reject(unknown.message) from None
        for node in nodes:
            self.expression(node, ctes, depth)

    def expression(self, node: dict[str, Any], ctes: frozenset[str], depth: int) -> None:
        if depth > MAX_DEPTH:
            raise QueryRejected("the query is nested too deeply")
        kind = sqltree.expression_class(node)
        if kind in REFUSED_CLASSES:
            raise _reject(REFUSED_CLASSES[kind], node)
        if kind not in EXPRESSION_CLASSES:
            raise _reject(f"this kind of expression ({kind}) is not allowed", node)
        reference = sqltree.column_reference(node)
        if reference is not None:
            self._reference(node, reference)
        elif kind in ("FUNCTION", "WINDOW"):
            self._function(node)
        elif kind == "SUBQUERY":
            self.query_node(sqltree.subquery_body(node), ctes, depth + 1)
        # A STAR's COLUMNS(...) selector, EXCLUDE and REPLACE are walked like any child.
        self.expressions(list(sqltree.child_expressions(node)), ctes, depth + 1)

    def _reference(self, node: dict[str, Any], reference: sqltree.ColumnReference) -> None:
        if reference.kind is sqltree.ReferenceKind.NAME:
            if not reference.names or len(reference.names) > 2:
                raise _reject("qualified column names are allowed only as table.column", node)
            self.found.names.append(reference.names)
        else:
            # #n and every star form read columns the guard cannot name: like *, they
            # count as reading every column the policy exposes, and no more.
            self.found.uses_star = True

    def _function(self, node: dict[str, Any]) -> None:
        name = sqltree.function_name(node)
        if sqltree.function_is_qualified(node):
            raise _reject(f"functions must not be qualified with a schema ({name})", node)
        if name not in FUNCTIONS:
            raise _reject(f"function {name}() is not allowed", node)

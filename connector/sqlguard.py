"""Parse a peer's SQL with DuckDB's own parser, refuse what is not allowed, report what it reads.

One SELECT statement only. Every relation must be an unqualified name (a dataset, or a CTE
in scope); no table functions, no functions outside sqlallowed.FUNCTIONS, no parameters, no
lambdas, no recursive CTEs, no samples, no time travel. The walker reads the JSON that
`json_serialize_sql` gives in DuckDB 2.0 through sqltree.py and refuses any node it does not
know. The guard knows nothing of policies: it reports datasets and column names (a position,
a pattern or a whole row counts as *); policy decides.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any

from connector import querytree, sqltree
from connector.errors import QueryRejected
from connector.packing import packed_rows
from connector.sqlallowed import (
    EXPRESSION_CLASSES,
    FUNCTIONS,
    PATH_LIKE,
    REFUSED_CLASSES,
    RESERVED_PREFIXES,
)
from connector.sqlbounds import DEFAULT_MAX_LENGTH, check_query_bounds
from connector.sqlparser import parse_select
from connector.valuesize_tree import check_value_sizes

MAX_DEPTH = 600
# The verdict on a text is a function of the text alone: peers repeat the same queries, so
# the last ones are kept (accepted ones only; a refusal is parsed again). Texts are bounded
# in size so that the cache holds at most CACHED_QUERIES * MAX_CACHED_LENGTH characters.
CACHED_QUERIES = 512
MAX_CACHED_LENGTH = 16_384


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


def _reject(reason: str, node: dict[str, Any] | None = None) -> QueryRejected:
    return QueryRejected(reason, position=sqltree.query_location(node))


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
        tree = parse_select(sql)
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


class _Walker:
    """Walks the serialised AST; refuses what is not allowed and records what is read."""

    def __init__(self, findings: _Findings) -> None:
        self.found = findings

    def query_node(self, node: Any, ctes: frozenset[str], depth: int) -> None:
        if depth > MAX_DEPTH:
            raise QueryRejected("the query is nested too deeply")
        if not isinstance(node, dict):
            raise QueryRejected("the query has a part the connector cannot check")
        kind = querytree.query_type(node)
        scope = ctes | self._ctes(node, ctes, depth)
        if kind == "SELECT_NODE":
            if querytree.has_sample(node):
                raise _reject("TABLESAMPLE / USING SAMPLE is not allowed", node)
            self.table_ref(querytree.from_item(node), scope, depth + 1)
            for key in ("select_list", "where_clause", "group_expressions", "having", "qualify"):
                self.expressions(node.get(key), scope, depth + 1)
            self.expressions(list(querytree.modifier_expressions(node)), scope, depth + 1)
        elif kind == "SET_OPERATION_NODE":
            for child in querytree.set_operation_children(node):
                self.query_node(child, scope, depth + 1)
            self.expressions(list(querytree.modifier_expressions(node)), scope, depth + 1)
        elif kind in ("RECURSIVE_CTE_NODE", "CTE_NODE"):
            raise _reject("recursive CTEs are not allowed", node)
        else:
            raise _reject(f"this kind of query ({kind}) is not allowed", node)

    def _ctes(self, node: dict[str, Any], outer: frozenset[str], depth: int) -> frozenset[str]:
        entries = querytree.cte_entries(node)
        names = frozenset(name for name, _ in entries)
        self.found.relations.update(names)
        for _, value in entries:
            if querytree.cte_uses_key(value):
                raise QueryRejected("recursive CTEs (USING KEY) are not allowed")
            # A CTE body sees the outer names and the CTEs of its WITH (fails closed if
            # it names itself: that reference is then not a dataset and will not bind).
            self.query_node(querytree.cte_body(value), outer | names, depth + 1)
        return names

    def table_ref(self, ref: Any, ctes: frozenset[str], depth: int) -> None:
        if depth > MAX_DEPTH:
            raise QueryRejected("the query is nested too deeply")
        if not isinstance(ref, dict):
            raise QueryRejected("the query has a FROM part the connector cannot check")
        kind = querytree.table_ref_type(ref)
        if querytree.has_sample(ref):
            raise _reject("TABLESAMPLE / USING SAMPLE is not allowed", ref)
        if querytree.table_alias(ref):
            self.found.relations.add(querytree.table_alias(ref))
        if kind == "BASE_TABLE":
            self._base_table(ref, ctes)
        elif kind == "JOIN":
            for side in querytree.join_sides(ref):
                self.table_ref(side, ctes, depth + 1)
            self.expressions(querytree.join_condition(ref), ctes, depth + 1)
            self.found.columns.update(querytree.join_using_columns(ref))
        elif kind == "SUBQUERY":
            self.query_node(sqltree.subquery_body(ref), ctes, depth + 1)
        elif kind == "EXPRESSION_LIST":
            self.expressions(querytree.values_rows(ref), ctes, depth + 1)
        elif kind == "EMPTY":
            return
        elif kind == "TABLE_FUNCTION":
            name = querytree.table_function_name(ref) or "a table function"
            raise _reject(f"table functions such as {name}() are not allowed in FROM", ref)
        elif kind in ("SHOW_REF", "PIVOT"):
            raise _reject(
                f"{'DESCRIBE/SUMMARIZE/SHOW' if kind == 'SHOW_REF' else 'PIVOT'} is not allowed",
                ref,
            )
        else:
            raise _reject(f"this kind of FROM item ({kind}) is not allowed", ref)

    def _base_table(self, ref: dict[str, Any], ctes: frozenset[str]) -> None:
        name = querytree.table_name(ref)
        if querytree.table_is_qualified(ref):
            raise _reject(
                f"qualified table names are not allowed: use the dataset name only ({name})", ref
            )
        if querytree.table_travels_in_time(ref):
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

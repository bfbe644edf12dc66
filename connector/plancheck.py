"""The second layer: check the bound plan of a peer's query before it runs.

DuckDB binds the query (`json_serialize_plan`), resolving views, CTEs, macros, positional
references and COLUMNS(...) to the table columns they read. Every scan must be a plain scan
of a relation exposed to this request, reading only its exposed columns; a scan of an
aggregate-only relation must feed the aggregate-only form, and every filter on its rows
before the aggregate may read only the columns it groups by. This holds with or without the
SQL guard in front.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import duckdb

from connector import plantree
from connector.aggregates import AGGREGATE_ONLY_FUNCTIONS, EXTREMUM_FUNCTIONS, is_measurement_type
from connector.errors import QueryRejected
from connector.plantree import Ancestors, SourceName, plan_document
from connector.recent import RecentlyUsed
from connector.sandbox_errors import peer_message, plan_refusal
from connector.sqltree import Node

__all__ = [
    "ExposedRelation",
    "SourceName",
    "check_aggregate_scan",
    "check_plan",
    "check_plan_text",
]
PASSED_PLANS = 1024  # plans that passed, kept by digest (LRU)

# DuckDB's VOLATILE functions (duckdb_functions().stability; tests/unit/test_sqltree.py
# checks the list): a filter calling one can pick part of a group without reading a column.
VOLATILE_FUNCTIONS = frozenset(
    "current_connection_id current_query current_query_id current_transaction_id currval "
    "error gen_random_uuid nextval random setseed setval sleep_ms stats uuid uuidv4 uuidv7 "
    "vector_type write_log".split()
)
# Bound expressions a filter under an aggregate-only scan may hold; anything else (a
# subquery, a lambda, an unknown node) is refused.
ROW_FILTER_CLASSES = frozenset(
    "BOUND_REF BOUND_CONSTANT BOUND_FUNCTION BOUND_COMPARISON BOUND_CONJUNCTION BOUND_OPERATOR "
    "BOUND_CAST BOUND_CASE BOUND_BETWEEN".split()
)


class ExposedRelation(Protocol):
    """What the sandbox needs of an enforced relation (see enforce.Relation)."""

    @property
    def dataset(self) -> str: ...
    @property
    def column_names(self) -> tuple[str, ...]: ...
    @property
    def sql(self) -> str: ...
    @property
    def shaped_table(self) -> str: ...
    @property
    def min_group_size(self) -> int: ...


def check_plan(plan: Mapping[str, Any], allowed: Mapping[SourceName, ExposedRelation]) -> None:
    """QueryRejected unless every scan of plan reads an allowed relation's exposed columns,
    and aggregate-only relations only in the aggregate form."""
    try:
        for operator, ancestors in plantree.operators(plan):
            kind = plantree.operator_type(operator)
            if any(word in kind for word in _WRITING_OPERATORS):
                raise QueryRejected("only SELECT is allowed")
            if kind != "LOGICAL_GET":
                continue
            scan = plantree.scan_of(operator)
            relation = _check_scan(scan, allowed)
            if relation.min_group_size:
                check_aggregate_scan(scan, ancestors, relation.min_group_size)
    except RecursionError:
        raise QueryRejected("the query is nested too deeply") from None


_PlanKey = tuple[bytes, tuple[tuple[SourceName, str, tuple[str, ...], int], ...]]
_passed: RecentlyUsed[_PlanKey, bool] = RecentlyUsed(PASSED_PLANS)


def check_plan_text(
    text: str, plan: Mapping[str, Any], allowed: Mapping[SourceName, ExposedRelation]
) -> None:
    """check_plan of plan, the parse of text; a plan that passed with the same relations
    (their sources, names, columns and group minimum: all check_plan reads of them) is not
    walked again. Only passes are kept: a refusal is worked out again each time."""
    key: _PlanKey = (
        hashlib.sha256(text.encode("utf-8")).digest(),
        tuple(
            sorted(
                (
                    source,
                    str(r.dataset),
                    tuple(str(c) for c in r.column_names),
                    int(r.min_group_size),
                )
                for source, r in allowed.items()
            )
        ),
    )
    if _passed.get(key):
        return
    check_plan(plan, allowed)
    _passed.put(key, True)


_WRITING_OPERATORS = (
    "INSERT", "DELETE", "UPDATE", "CREATE", "ALTER", "DROP", "COPY", "EXPORT", "ATTACH",
    "DETACH", "PRAGMA", "SET", "RESET", "LOAD", "TRANSACTION", "VACUUM", "SIMPLE", "MERGE",
)  # fmt: skip


def _check_scan(
    scan: plantree.Scan, allowed: Mapping[SourceName, ExposedRelation]
) -> ExposedRelation:
    """The relation a scan reads; QueryRejected unless it reads exposed columns of one."""
    if scan.function != "seq_scan":
        name = scan.function or "a table function"
        raise QueryRejected(f"the query reads through {name}, not a dataset")
    if scan.source is None:
        raise QueryRejected("the query reads a table that is not one of your datasets")
    relation = allowed.get(scan.source)
    if relation is None:
        raise QueryRejected("the query reads a table that is not one of your datasets as granted")
    columns = scan.output_columns()
    if columns is None:
        raise QueryRejected("the sandbox could not check which columns the query reads")
    visible = set(relation.column_names)
    for column in columns:
        if column is None:
            raise QueryRejected("the query reads a hidden column of a dataset")
        if column not in visible:
            raise QueryRejected(
                f"the query reads column {column} of {relation.dataset}, not granted"
            )
    return relation


def check_aggregate_scan(scan: plantree.Scan, ancestors: Ancestors, min_group_size: int) -> None:
    """A scan of an aggregate-only relation must feed, through column-only steps and filters
    on grouping columns, one aggregate of allowed functions over plain columns, whose every
    group is kept only when count(*) >= min_group_size."""
    refused = QueryRejected(
        "this dataset is aggregate-only: group by granted columns, filter only on grouping "
        "columns, use only count, sum, avg, min, max, stddev or variance of plain columns; "
        f"groups under {min_group_size} rows are dropped"
    )
    if scan.table_filters:
        raise refused  # never produced unoptimised; fail closed rather than read them
    # The scan's column names, carried up through each step: columns[i] is the table column
    # the step's i-th output holds (None: a computed value).
    columns: list[str | None] = list(scan.output_columns() or ())
    filters: list[tuple[Node, list[str | None]]] = []
    steps = iter(ancestors)
    for node in steps:
        kind = plantree.operator_type(node)
        if kind == "LOGICAL_FILTER":
            filters.append((node, columns))
            columns = _after_filter(node, columns, refused)
        elif kind == "LOGICAL_PROJECTION":
            columns = _after_projection(node, columns, refused)
        elif kind == "LOGICAL_AGGREGATE_AND_GROUP_BY":
            aggregate = node
            break
        else:
            raise refused
    else:
        raise refused
    groups = plantree.aggregate_groups(aggregate)
    expressions = plantree.operator_expressions(aggregate)
    if not all(plantree.is_bound_ref(g) for g in groups):
        raise refused
    if not all(_allowed_aggregate(e) for e in expressions):
        raise refused
    grouping = {_column_at(columns, g, refused) for g in groups if plantree.is_bound_ref(g)}
    for node, inputs in filters:
        _check_row_filter(node, inputs, grouping, refused)
    _check_minimum(groups, expressions, next(steps, None), min_group_size, refused)


def _column_at(columns: Sequence[str | None], ref: Node, refused: QueryRejected) -> str:
    index = plantree.bound_ref_index(ref)
    if index is None or not 0 <= index < len(columns) or columns[index] is None:
        raise refused
    return str(columns[index])


def _after_projection(
    node: Node, columns: list[str | None], refused: QueryRejected
) -> list[str | None]:
    outputs: list[str | None] = []
    for expression in plantree.operator_expressions(node):
        if not plantree.is_bound_ref(expression):
            raise refused  # a computed column before the aggregate
        outputs.append(_column_at(columns, expression, refused))
    return outputs


def _after_filter(
    node: Node, columns: list[str | None], refused: QueryRejected
) -> list[str | None]:
    selection = plantree.projection_map(node)
    if not selection:
        return columns
    outputs: list[str | None] = []
    for index in selection:
        if not isinstance(index, int) or not 0 <= index < len(columns):
            raise refused
        outputs.append(columns[index])
    return outputs


def _check_row_filter(
    node: Node, columns: list[str | None], grouping: set[str], refused: QueryRejected
) -> None:
    """A filter before the aggregate keeps or drops whole groups: it may read only grouping
    columns (by any name: #n and COLUMNS(...) are bound to columns here) and call no
    volatile function."""
    for expression in plantree.bound_expressions(plantree.operator_expressions(node)):
        kind = plantree.bound_class(expression)
        if kind not in ROW_FILTER_CLASSES:
            raise refused
        if kind == "BOUND_REF" and _column_at(columns, expression, refused) not in grouping:
            raise QueryRejected(
                f"{refused.message}; this query filters on "
                f"{_column_at(columns, expression, refused)}, which it does not group by"
            )
        if kind == "BOUND_FUNCTION" and plantree.bound_function_name(expression) in (
            VOLATILE_FUNCTIONS
        ):
            raise refused


def _check_minimum(
    groups: list[object],
    expressions: list[object],
    having: Node | None,
    min_group_size: int,
    refused: QueryRejected,
) -> None:
    """The step above the aggregate keeps only groups with count(*) >= min_group_size."""
    count_outputs = {
        len(groups) + i
        for i, e in enumerate(expressions)
        if isinstance(e, dict) and plantree.bound_function_name(e) == "count_star"
    }
    if having is None or plantree.operator_type(having) != "LOGICAL_FILTER":
        raise refused
    if not any(
        _is_min_count(e, count_outputs, min_group_size)
        for e in plantree.conjuncts(plantree.operator_expressions(having))
    ):
        raise refused


def _allowed_aggregate(expression: object) -> bool:
    if not isinstance(expression, dict) or plantree.bound_class(expression) != "BOUND_AGGREGATE":
        return False
    name = plantree.bound_function_name(expression)
    if name not in AGGREGATE_ONLY_FUNCTIONS or plantree.aggregate_is_filtered_or_ordered(
        expression
    ):
        return False
    children = plantree.bound_children(expression)
    if not all(plantree.is_bound_ref(c) for c in children):
        return False
    if name in EXTREMUM_FUNCTIONS:
        types = plantree.bound_argument_types(expression)
        return bool(types) and all(is_measurement_type(t) for t in types)
    return True


def _is_min_count(expression: Mapping[str, Any], counts: set[int], minimum: int) -> bool:
    """expression is `count(*) >= N` with N >= minimum, count(*) of the aggregate below."""
    children = plantree.bound_children(expression)
    if plantree.bound_type(expression) != "COMPARE_GREATERTHANOREQUALTO" or len(children) != 2:
        return False
    left, right = children
    if not plantree.is_bound_ref(left) or plantree.bound_ref_index(left) not in counts:
        return False
    value = plantree.bound_constant(right)
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def bound_plan(
    cursor: duckdb.DuckDBPyConnection, sql: str, datasets: Sequence[str]
) -> dict[str, Any]:
    """The bound plan of one SELECT as DuckDB serialises it; refusals for what cannot bind."""
    return bound_plan_text(cursor, sql, datasets)[1]


def bound_plan_text(
    cursor: duckdb.DuckDBPyConnection, sql: str, datasets: Sequence[str]
) -> tuple[str, dict[str, Any]]:
    """The bound plan's serialised text and its parse; refusals for what cannot bind."""
    # The shaped database is writable: nothing but one SELECT may reach the planner.
    try:
        statements = cursor.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryRejected(peer_message(exc)) from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise QueryRejected("send exactly one SELECT statement")
    try:
        rows = cursor.execute("SELECT json_serialize_plan(?)", [sql]).fetchall()
    except duckdb.Error as exc:
        raise QueryRejected(peer_message(exc)) from None
    text = rows[0][0] if rows else None
    plan = plan_document(text)
    if plan.get("error"):
        raise plan_refusal(plan, datasets)
    return str(text), plan

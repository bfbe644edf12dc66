"""The second layer: check the bound plan of a peer's query before it runs.

DuckDB binds the query (`json_serialize_plan`), resolving views, CTEs and macros to the
tables they read. Every scan must be a plain scan of a relation exposed to this request,
reading only its exposed columns; a scan of an aggregate-only relation must feed the
aggregate-only form. This holds with or without the SQL guard in front.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from connector.aggregates import AGGREGATE_ONLY_FUNCTIONS, EXTREMUM_FUNCTIONS, is_measurement_type
from connector.errors import QueryRejected

SourceName = tuple[str, str, str]  # (catalog, schema, table) as the plan names a scan


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
    for scan, ancestors in _scans(plan, ()):
        relation = _check_scan(scan, allowed)
        if relation.min_group_size:
            check_aggregate_scan(ancestors, relation.min_group_size)


Ancestors = tuple[Mapping[str, Any], ...]


def _scans(node: object, ancestors: Ancestors) -> Iterator[tuple[Mapping[str, Any], Ancestors]]:
    """Every LOGICAL_GET of a serialised plan, with its operators from the nearest up."""
    if isinstance(node, dict):
        kind = str(node.get("type", ""))
        if kind.startswith("LOGICAL_"):
            if any(word in kind for word in _WRITING_OPERATORS):
                raise QueryRejected("only SELECT is allowed")
            if kind == "LOGICAL_GET":
                yield node, ancestors
            ancestors = (node, *ancestors)
        for value in node.values():
            yield from _scans(value, ancestors)
    elif isinstance(node, list):
        for item in node:
            yield from _scans(item, ancestors)


_WRITING_OPERATORS = (
    "INSERT", "DELETE", "UPDATE", "CREATE", "ALTER", "DROP", "COPY", "EXPORT", "ATTACH",
    "DETACH", "PRAGMA", "SET", "RESET", "LOAD", "TRANSACTION", "VACUUM", "SIMPLE", "MERGE",
)  # fmt: skip


def _check_scan(
    scan: Mapping[str, Any], allowed: Mapping[SourceName, ExposedRelation]
) -> ExposedRelation:
    """The relation a scan reads; QueryRejected unless it reads exposed columns of one."""
    function = scan.get("qname", {})
    name = function.get("path", [""])[-1] if isinstance(function, dict) else ""
    if name != "seq_scan":
        raise QueryRejected(f"the query reads through {name or 'a table function'}, not a dataset")
    data = scan.get("function_data")
    if not isinstance(data, dict):
        raise QueryRejected("the query reads a table that is not one of your datasets")
    source = (str(data.get("catalog")), str(data.get("schema")), str(data.get("table")))
    relation = allowed.get(source)
    if relation is None:
        raise QueryRejected("the query reads a table that is not one of your datasets as granted")
    names = scan.get("names")
    indexes = scan.get("column_indexes")
    if not isinstance(names, list) or not isinstance(indexes, list):
        raise QueryRejected("the sandbox could not check which columns the query reads")
    visible = set(relation.column_names)
    for entry in indexes:
        index = entry.get("index") if isinstance(entry, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(names):
            raise QueryRejected("the query reads a hidden column of a dataset")
        if str(names[index]) not in visible:
            raise QueryRejected(
                f"the query reads column {names[index]} of {relation.dataset}, not granted"
            )
    return relation


def check_aggregate_scan(ancestors: Ancestors, min_group_size: int) -> None:
    """A scan of an aggregate-only relation must feed, through column-only steps, one
    aggregate of allowed functions over plain columns, whose every group is kept only when
    count(*) >= min_group_size."""
    refused = QueryRejected(
        "this dataset is aggregate-only: group by granted columns, use only count, sum, avg, "
        f"min, max, stddev or variance of plain columns; groups under {min_group_size} rows "
        "are dropped"
    )
    steps = iter(ancestors)
    for node in steps:
        kind = node.get("type")
        if kind == "LOGICAL_FILTER":
            continue
        if kind == "LOGICAL_PROJECTION" and all(_is_ref(e) for e in node.get("expressions", [])):
            continue
        if kind != "LOGICAL_AGGREGATE_AND_GROUP_BY":
            raise refused
        aggregate = node
        break
    else:
        raise refused
    groups = aggregate.get("groups") or []
    expressions = aggregate.get("expressions") or []
    if not all(_is_ref(g) for g in groups) or not all(_allowed_aggregate(e) for e in expressions):
        raise refused
    count_outputs = {
        len(groups) + i for i, e in enumerate(expressions) if _function_name(e) == "count_star"
    }
    having = next(steps, None)
    if having is None or having.get("type") != "LOGICAL_FILTER":
        raise refused
    if not any(
        _is_min_count(e, count_outputs, min_group_size)
        for e in _conjuncts(having.get("expressions", []))
    ):
        raise refused


def _is_ref(expression: Any) -> bool:
    return isinstance(expression, dict) and expression.get("expression_class") == "BOUND_REF"


def _function_name(expression: Mapping[str, Any]) -> str:
    path = (expression.get("qname") or {}).get("path") or [""]
    return str(path[-1])


def _allowed_aggregate(expression: Any) -> bool:
    if not isinstance(expression, dict) or expression.get("expression_class") != "BOUND_AGGREGATE":
        return False
    name = _function_name(expression)
    children = expression.get("children") or []
    if name not in AGGREGATE_ONLY_FUNCTIONS or expression.get("filter") is not None:
        return False
    if expression.get("order_bys") or not all(_is_ref(c) for c in children):
        return False
    if name in EXTREMUM_FUNCTIONS:
        types = [a.get("id", "") for a in expression.get("arguments") or [] if isinstance(a, dict)]
        return bool(types) and all(is_measurement_type(str(t)) for t in types)
    return True


def _conjuncts(expressions: list[Any]) -> Iterator[Mapping[str, Any]]:
    for expression in expressions:
        if not isinstance(expression, dict):
            continue
        if expression.get("type") == "CONJUNCTION_AND":
            yield from _conjuncts(expression.get("children") or [])
        else:
            yield expression


def _is_min_count(expression: Mapping[str, Any], counts: set[int], minimum: int) -> bool:
    """expression is `count(*) >= N` with N >= minimum, count(*) of the aggregate below."""
    children = expression.get("children") or []
    if expression.get("type") != "COMPARE_GREATERTHANOREQUALTO" or len(children) != 2:
        return False
    left, right = children
    if not _is_ref(left) or left.get("index") not in counts:
        return False
    value = _constant(right)
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _constant(expression: Any) -> Any:
    if not isinstance(expression, dict):
        return None
    if expression.get("expression_class") == "BOUND_CONSTANT":
        value = expression.get("value") or {}
        return None if value.get("is_null") else value.get("value")
    if _function_name(expression) == "__cast" and len(expression.get("children") or []) == 1:
        return _constant(expression["children"][0])
    return None

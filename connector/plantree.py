"""Typed reading of DuckDB's serialised bound plan (json_serialize_plan, DuckDB 2.0): its
operators, bound expressions and scans, for the plan check (plancheck.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from connector.errors import QueryRejected
from connector.sqltree import Node

SourceName = tuple[str, str, str]  # (catalog, schema, table) as the plan names a scan
Ancestors = tuple[Node, ...]


def plan_document(text: object) -> Node:
    """The serialised plan as a dict; QueryRejected when DuckDB could not serialise it."""
    # DuckDB returns an empty string for plans it cannot serialise, e.g. an integer
    # literal of more than 38 digits: refuse, never fail on it.
    unserialisable = QueryRejected(
        "the sandbox cannot check the plan of this query (it holds a value or construct the "
        "plan cannot represent, such as an integer literal of more than 38 digits); "
        "rewrite that part"
    )
    if not isinstance(text, str) or not text.strip():
        raise unserialisable
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        raise unserialisable from None
    if not isinstance(document, dict):
        raise unserialisable
    if not document.get("error") and not isinstance(document.get("plans"), list):
        raise unserialisable
    return document


def operator_type(node: Mapping[str, Any]) -> str:
    """LOGICAL_GET, LOGICAL_FILTER, ... ("" for a structure that is not an operator)."""
    kind = str(node.get("type", ""))
    return kind if kind.startswith("LOGICAL_") else ""


def operators(value: object, ancestors: Ancestors = ()) -> Iterator[tuple[Node, Ancestors]]:
    """Every operator at or below value, with its enclosing operators, nearest first."""
    if isinstance(value, dict):
        if operator_type(value):
            yield value, ancestors
            ancestors = (value, *ancestors)
        for child in value.values():
            yield from operators(child, ancestors)
    elif isinstance(value, list):
        for item in value:
            yield from operators(item, ancestors)


def operator_expressions(node: Mapping[str, Any]) -> list[object]:
    """The expressions of a projection, filter or aggregate operator."""
    return list(node.get("expressions") or [])


def aggregate_groups(node: Mapping[str, Any]) -> list[object]:
    """The GROUP BY expressions of a LOGICAL_AGGREGATE_AND_GROUP_BY."""
    return list(node.get("groups") or [])


def projection_map(node: Mapping[str, Any]) -> list[object]:
    """A filter's output column selection (empty: all its input columns, in order)."""
    return list(node.get("projection_map") or [])


def bound_class(expression: object) -> str:
    """BOUND_REF, BOUND_FUNCTION, BOUND_AGGREGATE, ... ("" when not a bound expression)."""
    if not isinstance(expression, dict):
        return ""
    return str(expression.get("expression_class", ""))


def is_bound_ref(expression: object) -> TypeGuard[Node]:
    """A reference to a column of the operator's input, by position."""
    return bound_class(expression) == "BOUND_REF"


def bound_ref_index(expression: Mapping[str, Any]) -> int | None:
    """The input position a BOUND_REF reads."""
    index = expression.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else None


def bound_function_name(expression: Mapping[str, Any]) -> str:
    """The unqualified name of a bound function or aggregate (count_star, >=, __cast)."""
    path = (expression.get("qname") or {}).get("path") or [""]
    return str(path[-1])


def bound_children(expression: Mapping[str, Any]) -> list[object]:
    """The argument expressions of a bound function, aggregate or operator."""
    return list(expression.get("children") or [])


def bound_argument_types(expression: Mapping[str, Any]) -> list[str]:
    """The declared argument types of a bound function or aggregate."""
    return [str(a.get("id", "")) for a in expression.get("arguments") or [] if isinstance(a, dict)]


def bound_type(expression: Mapping[str, Any]) -> str:
    """The expression's kind within its class (COMPARE_GREATERTHANOREQUALTO, WINDOW_LAG)."""
    return str(expression.get("type", ""))


def bound_return_type(expression: Mapping[str, Any]) -> str:
    """The id of the type an expression returns (INTEGER, LIST, MAP, ...)."""
    returns = expression.get("return_type")
    return str(returns.get("id", "")) if isinstance(returns, dict) else ""


def aggregate_is_filtered_or_ordered(expression: Mapping[str, Any]) -> bool:
    """A bound aggregate with FILTER (WHERE ...) or ORDER BY inside the call."""
    return expression.get("filter") is not None or bool(expression.get("order_bys"))


def window_has_frame_offsets(expression: Mapping[str, Any]) -> bool:
    """A bound window whose frame starts or ends an offset away (ROWS n PRECEDING)."""
    return bool(expression.get("start_expr") or expression.get("end_expr"))


def bound_expressions(value: object) -> Iterator[Node]:
    """Every bound expression at or below value."""
    if isinstance(value, dict):
        if "expression_class" in value:
            yield value
        for child in value.values():
            yield from bound_expressions(child)
    elif isinstance(value, list):
        for item in value:
            yield from bound_expressions(item)


def bound_constant(expression: object) -> object:
    """The value of a constant (also under a cast); None for anything else."""
    if not isinstance(expression, dict):
        return None
    if bound_class(expression) == "BOUND_CONSTANT":
        value = expression.get("value") or {}
        return None if value.get("is_null") else value.get("value")
    children = bound_children(expression)
    if bound_function_name(expression) == "__cast" and len(children) == 1:
        return bound_constant(children[0])
    return None


def conjuncts(expressions: list[object]) -> Iterator[Node]:
    """The terms of the AND of expressions."""
    for expression in expressions:
        if not isinstance(expression, dict):
            continue
        if expression.get("type") == "CONJUNCTION_AND":
            yield from conjuncts(bound_children(expression))
        else:
            yield expression


@dataclass(frozen=True)
class Scan:
    """A LOGICAL_GET: which function reads which table, and which of its columns."""

    function: str  # seq_scan for a table; anything else is a table function
    source: SourceName | None
    names: tuple[str, ...]  # every column of the table
    read: tuple[int | None, ...] | None  # the positions in names it outputs (None: unknown)
    table_filters: bool  # filters pushed into the scan

    def output_columns(self) -> tuple[str | None, ...] | None:
        """The names of the columns the scan outputs, in order (None: unknown position)."""
        if self.read is None:
            return None
        return tuple(
            self.names[i] if i is not None and 0 <= i < len(self.names) else None for i in self.read
        )


def scan_of(node: Mapping[str, Any]) -> Scan:
    """What a LOGICAL_GET reads."""
    qname = node.get("qname")
    function = str((qname.get("path") or [""])[-1]) if isinstance(qname, dict) else ""
    data = node.get("function_data")
    source = None
    if isinstance(data, dict):
        source = (str(data.get("catalog")), str(data.get("schema")), str(data.get("table")))
    names = node.get("names")
    indexes = node.get("column_indexes")
    read = None
    if isinstance(names, list) and isinstance(indexes, list):
        read = tuple(
            e.get("index") if isinstance(e, dict) and isinstance(e.get("index"), int) else None
            for e in indexes
        )
    return Scan(
        function,
        source,
        tuple(str(n) for n in names) if isinstance(names, list) else (),
        read,
        _has_table_filters(node.get("table_filters")),
    )


def _has_table_filters(value: object) -> bool:
    if value is None:
        return False
    if not isinstance(value, dict):
        return True
    return any(v for v in value.values())

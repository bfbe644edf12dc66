"""Typed reading of DuckDB's two serialised trees: the parsed query and the bound plan.

The guard (sqlguard.py), the aggregate-only rules (aggregates.py) and the plan check
(plancheck.py) read nodes only through these accessors, so each way of naming a column is
recognised in one place and counts the same in every layer. The shapes are those of DuckDB
2.0's `json_serialize_sql` and `json_serialize_plan`; callers refuse what is not recognised.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeGuard

from connector.errors import QueryRejected

Node = dict[str, Any]

# ---------------------------------------------------------------------------------------
# The parsed query (json_serialize_sql)

# Nodes that are not expressions and must only be reached through the typed walk.
QUERY_NODE_TYPES = frozenset(
    {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}
)
TABLE_REF_TYPES = frozenset(
    {"BASE_TABLE", "JOIN", "SUBQUERY", "TABLE_FUNCTION", "EXPRESSION_LIST", "EMPTY", "SHOW_REF"}
    | {"PIVOT"}
)
STRUCTURAL_TYPES = QUERY_NODE_TYPES | TABLE_REF_TYPES


def is_expression(value: object) -> TypeGuard[Node]:
    """True for an expression node (it has a `class`)."""
    return isinstance(value, dict) and "class" in value


def expression_class(node: Mapping[str, Any]) -> str | None:
    """COLUMN_REF, FUNCTION, STAR, ... or None for a structure that is not an expression."""
    kind = node.get("class")
    return str(kind) if kind is not None else None


def is_structural(node: Mapping[str, Any]) -> bool:
    """A query node or FROM item met where an expression was expected."""
    return "class" not in node and node.get("type") in STRUCTURAL_TYPES


def direct_expressions(value: object) -> Iterator[Node]:
    """The expression nodes directly below value, through lists and the non-expression
    structures that hold them (ORDER BY entries, LIMIT modifiers)."""
    if isinstance(value, dict):
        if "class" in value:
            yield value
        elif value.get("type") in STRUCTURAL_TYPES:
            raise QueryRejected("the query has a part the connector cannot check")
        else:
            for child in value.values():
                yield from direct_expressions(child)
    elif isinstance(value, list):
        for item in value:
            yield from direct_expressions(item)


def child_expressions(node: Mapping[str, Any]) -> Iterator[Node]:
    """The expressions directly inside an expression (a subquery's body is not one)."""
    for key, value in node.items():
        if key != "subquery":
            yield from direct_expressions(value)


def all_expressions(value: object) -> Iterator[Node]:
    """Every expression at or below value, not entering subquery bodies."""
    for expression in direct_expressions(value):
        yield expression
        yield from all_expressions([v for k, v in expression.items() if k != "subquery"])


def subquery_body(node: Mapping[str, Any]) -> object:
    """The query node of a SUBQUERY expression or FROM item (None when absent)."""
    subquery = node.get("subquery")
    return subquery.get("node") if isinstance(subquery, dict) else None


class ReferenceKind(Enum):
    """The ways a query can refer to a column."""

    NAME = "name"  # plant, t.plant, struct_col.field (which parses like table.column)
    POSITION = "position"  # #2
    STAR = "star"  # *, t.*, COLUMNS('regex'), COLUMNS([list]), COLUMNS(lambda), EXCLUDE/REPLACE


@dataclass(frozen=True)
class ColumnReference:
    """One reference to a column, however it is written."""

    kind: ReferenceKind
    names: tuple[str, ...] = ()  # NAME: the dotted parts, lower-cased
    position: int | None = None  # POSITION: the 1-based index
    relation: str = ""  # STAR: the relation of `t.*` (lower-cased), else ""
    columns_expression: bool = False  # STAR: written as COLUMNS(...)
    selector: object = None  # STAR: the pattern, list or lambda of COLUMNS(...)

    @property
    def is_plain_name(self) -> bool:
        """A single unqualified name."""
        return self.kind is ReferenceKind.NAME and len(self.names) == 1


def column_reference(node: Mapping[str, Any]) -> ColumnReference | None:
    """The column reference node is, or None when it is another kind of expression."""
    kind = node.get("class")
    if kind == "COLUMN_REF":
        names = node.get("column_names") or []
        return ColumnReference(ReferenceKind.NAME, names=tuple(str(n).lower() for n in names))
    if kind == "POSITIONAL_REFERENCE":
        index = node.get("index")
        return ColumnReference(
            ReferenceKind.POSITION, position=index if isinstance(index, int) else None
        )
    if kind == "STAR":
        return ColumnReference(
            ReferenceKind.STAR,
            relation=str(node.get("relation_name") or "").lower(),
            columns_expression=bool(node.get("columns")),
            selector=node.get("expr"),
        )
    return None


def column_references(value: object) -> Iterator[tuple[Node, ColumnReference]]:
    """Every column reference at or below value (not inside subquery bodies)."""
    for expression in all_expressions(value):
        reference = column_reference(expression)
        if reference is not None:
            yield expression, reference


def function_name(node: Mapping[str, Any]) -> str:
    """The lower-cased name of a FUNCTION or WINDOW expression."""
    return str(node.get("function_name", "")).lower()


def function_is_qualified(node: Mapping[str, Any]) -> bool:
    """The function is written with a schema or catalog (main.lower)."""
    return bool(node.get("schema") or node.get("catalog"))


def function_arguments(node: Mapping[str, Any]) -> list[object]:
    """The argument expressions of a FUNCTION, in order."""
    return [
        a.get("expression") if isinstance(a, dict) else None for a in node.get("arguments") or []
    ]


def function_has_modifiers(node: Mapping[str, Any]) -> bool:
    """FILTER, ORDER BY inside the call, or EXPORT_STATE."""
    return function_has_filter_or_order(node) or function_exports_state(node)


def function_has_filter_or_order(node: Mapping[str, Any]) -> bool:
    """FILTER (WHERE ...) or ORDER BY inside the call."""
    orders = node.get("order_bys") or {}
    return bool(
        node.get("filter") is not None or (isinstance(orders, dict) and orders.get("orders"))
    )


def function_exports_state(node: Mapping[str, Any]) -> bool:
    """EXPORT_STATE: the aggregate's internal state instead of its value."""
    return bool(node.get("export_state"))


def function_is_distinct(node: Mapping[str, Any]) -> bool:
    """An aggregate over distinct values, like count(DISTINCT x)."""
    return bool(node.get("distinct"))


def expression_alias(node: Mapping[str, Any]) -> str:
    """The alias of a select-list expression as written ("" when none)."""
    return str(node.get("alias") or "")


def constant_literal(node: Mapping[str, Any]) -> tuple[str, str] | None:
    """A CONSTANT's (kind, text), e.g. ("INTEGER", "5"); None for other expressions."""
    if node.get("class") != "CONSTANT":
        return None
    literal = node.get("literal") or {}
    return str(literal.get("kind", "")), str(literal.get("text", ""))


def query_type(node: Mapping[str, Any]) -> str:
    """SELECT_NODE, SET_OPERATION_NODE, ..."""
    return str(node.get("type", ""))


def cte_entries(node: Mapping[str, Any]) -> list[tuple[str, Node]]:
    """The (lower-cased name, body entry) of each CTE of a query node's WITH."""
    entries = (node.get("cte_map") or {}).get("map") or []
    return [(str(e.get("key", "")).lower(), e.get("value") or {}) for e in entries]


def modifier_expressions(node: Mapping[str, Any]) -> Iterator[Node]:
    """The expressions of ORDER BY, DISTINCT ON and LIMIT/OFFSET."""
    yield from direct_expressions(node.get("modifiers"))


def set_operation_children(node: Mapping[str, Any]) -> list[object]:
    """The queries a UNION / INTERSECT / EXCEPT combines."""
    children = [c for c in (node.get("left"), node.get("right")) if c is not None]
    return children + list(node.get("children") or [])


def table_ref_type(ref: Mapping[str, Any]) -> str:
    """BASE_TABLE, JOIN, SUBQUERY, ..."""
    return str(ref.get("type", ""))


def table_name(ref: Mapping[str, Any]) -> str:
    """The name of a BASE_TABLE as written."""
    return str(ref.get("table_name", ""))


def table_alias(ref: Mapping[str, Any]) -> str:
    """The lower-cased alias of a FROM item ("" when none)."""
    return str(ref.get("alias") or "").lower()


# ---------------------------------------------------------------------------------------
# The bound plan (json_serialize_plan)

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


def error_position(document: Mapping[str, Any]) -> int | None:
    """Where a serialised DuckDB error (from json_serialize_sql or _plan) points, if it does."""
    try:
        position = int(str(document.get("position", "")))
    except ValueError:
        return None
    return position if position >= 0 else None

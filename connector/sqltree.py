"""Typed reading of the expressions of DuckDB's serialised parsed query: column references,
functions, constants (query nodes and FROM items: querytree.py; the bound plan: plantree.py).

The guard (sqlguard.py), the aggregate-only rules (aggregates.py), the noise planner and the
federated rewrite read expressions only through these accessors, so each way of naming a
column is recognised in one place and counts the same in every layer. The shapes are those
of DuckDB 2.0's `json_serialize_sql`; callers refuse what is not recognised.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeGuard

from connector.errors import QueryRejected

Node = dict[str, Any]

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


def operand_expressions(node: Mapping[str, Any]) -> Iterator[Node]:
    """The expressions an expression's value is computed from: its children, without a
    subquery's body or a CAST's target type (a type is not a value)."""
    for key, value in node.items():
        if key not in ("subquery", "type_expr"):
            yield from direct_expressions(value)


def call_modifier_expressions(node: Mapping[str, Any]) -> Iterator[Node]:
    """A call's expressions besides its arguments: FILTER, ORDER BY inside the call, and a
    window's PARTITION BY, ORDER BY, frame bounds and defaults."""
    for key, value in node.items():
        if key != "arguments":
            yield from direct_expressions(value)


def cast_operand(node: Mapping[str, Any]) -> Node | None:
    """The expression a CAST converts (None for anything else)."""
    child = node.get("child") if node.get("class") == "CAST" else None
    return child if is_expression(child) else None


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


def written_column_names(node: Mapping[str, Any]) -> tuple[str, ...]:
    """A column reference's dotted names as written (case kept: they name output columns);
    () for any other expression."""
    if node.get("class") != "COLUMN_REF":
        return ()
    return tuple(str(n) for n in node.get("column_names") or [])


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


def window_has_frame_offsets(node: Mapping[str, Any]) -> bool:
    """A WINDOW whose frame starts or ends an offset away (ROWS n PRECEDING)."""
    return bool(node.get("start_expr") or node.get("end_expr"))


def expression_alias(node: Mapping[str, Any]) -> str:
    """The alias of a select-list expression as written ("" when none)."""
    return str(node.get("alias") or "")


def constant_literal(node: Mapping[str, Any]) -> tuple[str, str] | None:
    """A CONSTANT's (kind, text), e.g. ("INTEGER", "5"); None for other expressions."""
    if node.get("class") != "CONSTANT":
        return None
    literal = node.get("literal") or {}
    return str(literal.get("kind", "")), str(literal.get("text", ""))


def query_location(node: Mapping[str, Any] | None) -> int | None:
    """Where in the query text a node starts (None when DuckDB does not know: it writes
    2**64 - 1 then)."""
    value = node.get("query_location") if node else None
    return value if isinstance(value, int) and 0 <= value < 2**63 else None


def subquery_type(node: Mapping[str, Any]) -> str:
    """SCALAR, EXISTS, ANY, ARRAY, ... of a SUBQUERY expression."""
    return str(node.get("subquery_type", ""))


def error_position(document: Mapping[str, Any]) -> int | None:
    """Where a serialised DuckDB error (from json_serialize_sql or _plan) points, if it does."""
    try:
        position = int(str(document.get("position", "")))
    except ValueError:
        return None
    return position if position >= 0 else None

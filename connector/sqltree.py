"""Typed reading of DuckDB's serialised parsed query (the bound plan: plantree.py).

The guard (sqlguard.py), the aggregate-only rules (aggregates.py) and the federated rewrite
read nodes only through these accessors, so each way of naming a column is recognised in one
place and counts the same in every layer. The shapes are those of DuckDB 2.0's
`json_serialize_sql`; callers refuse what is not recognised.
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


def statement_node(document: Mapping[str, Any]) -> Node:
    """The query node of a serialised single-statement document."""
    node: Node = document["statements"][0]["node"]
    return node


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


def query_type(node: Mapping[str, Any]) -> str:
    """SELECT_NODE, SET_OPERATION_NODE, ..."""
    return str(node.get("type", ""))


def cte_entries(node: Mapping[str, Any]) -> list[tuple[str, Node]]:
    """The (lower-cased name, body entry) of each CTE of a query node's WITH."""
    entries = (node.get("cte_map") or {}).get("map") or []
    return [(str(e.get("key", "")).lower(), e.get("value") or {}) for e in entries]


@dataclass(frozen=True)
class OrderTerm:
    """One term of an ORDER BY."""

    expression: Node
    descending: bool
    null_order: str  # ORDER_DEFAULT unless NULLS FIRST / LAST was written


@dataclass(frozen=True)
class QueryModifier:
    """One modifier after a query: ORDER BY, LIMIT / OFFSET, DISTINCT (ON)."""

    kind: str  # ORDER_MODIFIER, LIMIT_MODIFIER, DISTINCT_MODIFIER, ...
    orders: tuple[OrderTerm, ...] = ()  # ORDER_MODIFIER
    limit: Node | None = None  # LIMIT_MODIFIER: the LIMIT expression
    has_offset: bool = False  # LIMIT_MODIFIER: an OFFSET was written


def query_modifiers(node: Mapping[str, Any]) -> list[QueryModifier]:
    """The modifiers of a query node, in order (unknown entries come with an empty kind)."""
    found = []
    for modifier in node.get("modifiers") or []:
        if not isinstance(modifier, dict):
            found.append(QueryModifier(""))
            continue
        orders = tuple(
            OrderTerm(
                order.get("expression") or {},
                order.get("type") == "DESCENDING",
                str(order.get("null_order") or "ORDER_DEFAULT"),
            )
            for order in modifier.get("orders") or []
            if isinstance(order, dict)
        )
        limit = modifier.get("limit")
        found.append(
            QueryModifier(
                str(modifier.get("type") or ""),
                orders,
                limit if is_expression(limit) else None,
                modifier.get("offset") is not None,
            )
        )
    return found


def modifier_expressions(node: Mapping[str, Any]) -> Iterator[Node]:
    """The expressions of ORDER BY, DISTINCT ON and LIMIT/OFFSET."""
    yield from direct_expressions(node.get("modifiers"))


def set_operation_children(node: Mapping[str, Any]) -> list[object]:
    """The queries a UNION / INTERSECT / EXCEPT combines."""
    children = [c for c in (node.get("left"), node.get("right")) if c is not None]
    return children + list(node.get("children") or [])


def cte_body(entry: Mapping[str, Any]) -> object:
    """The query node of a CTE entry (from cte_entries)."""
    return entry.get("query_node")


def cte_uses_key(entry: Mapping[str, Any]) -> bool:
    """A recursive CTE's USING KEY (its key targets or payload aggregates)."""
    return bool(entry.get("key_targets") or entry.get("payload_aggregates"))


def has_sample(node: Mapping[str, Any]) -> bool:
    """TABLESAMPLE on a FROM item, or USING SAMPLE on a SELECT."""
    return node.get("sample") is not None


def table_ref_type(ref: Mapping[str, Any]) -> str:
    """BASE_TABLE, JOIN, SUBQUERY, ..."""
    return str(ref.get("type", ""))


def table_name(ref: Mapping[str, Any]) -> str:
    """The name of a BASE_TABLE as written."""
    return str(ref.get("table_name", ""))


def table_is_qualified(ref: Mapping[str, Any]) -> bool:
    """A BASE_TABLE written with a schema or catalog (main.t, db.main.t)."""
    return bool(ref.get("schema_name") or ref.get("catalog_name"))


def table_travels_in_time(ref: Mapping[str, Any]) -> bool:
    """A BASE_TABLE read AT a version or time."""
    return ref.get("at_clause") is not None


def table_function_name(ref: Mapping[str, Any]) -> str:
    """The function a TABLE_FUNCTION item calls, as written."""
    function = ref.get("function")
    return str(function.get("function_name", "")) if isinstance(function, dict) else ""


def join_sides(ref: Mapping[str, Any]) -> tuple[object, object]:
    """The left and right FROM items of a JOIN."""
    return ref.get("left"), ref.get("right")


def join_type(ref: Mapping[str, Any]) -> str:
    """INNER, LEFT, SEMI, ANTI, ... of a JOIN (upper-cased)."""
    return str(ref.get("join_type", "")).upper()


def join_condition(ref: Mapping[str, Any]) -> object:
    """A JOIN's ON condition (None for USING, NATURAL and cross joins)."""
    return ref.get("condition")


def join_using_columns(ref: Mapping[str, Any]) -> list[str]:
    """The lower-cased columns of a JOIN's USING (...)."""
    return [str(c).lower() for c in ref.get("using_columns") or []]


def values_rows(ref: Mapping[str, Any]) -> object:
    """The rows of expressions of a VALUES list (EXPRESSION_LIST)."""
    return ref.get("values")


def table_alias(ref: Mapping[str, Any]) -> str:
    """The lower-cased alias of a FROM item ("" when none)."""
    return str(ref.get("alias") or "").lower()


def query_location(node: Mapping[str, Any] | None) -> int | None:
    """Where in the query text a node starts (None when DuckDB does not know: it writes
    2**64 - 1 then)."""
    value = node.get("query_location") if node else None
    return value if isinstance(value, int) and 0 <= value < 2**63 else None


def from_item(node: Mapping[str, Any]) -> object:
    """The FROM item of a SELECT node (EMPTY when it has none)."""
    return node.get("from_table")


def select_list(node: Mapping[str, Any]) -> Iterator[Node]:
    """The expressions a SELECT node selects, in order."""
    return direct_expressions(node.get("select_list"))


def where_clause(node: Mapping[str, Any]) -> object:
    """A SELECT node's WHERE condition (None when it has none)."""
    return node.get("where_clause")


def having_clause(node: Mapping[str, Any]) -> object:
    """A SELECT node's HAVING condition (None when it has none)."""
    return node.get("having")


def qualify_clause(node: Mapping[str, Any]) -> object:
    """A SELECT node's QUALIFY condition (None when it has none)."""
    return node.get("qualify")


def group_expressions(node: Mapping[str, Any]) -> list[object]:
    """A SELECT node's GROUP BY expressions, as written."""
    return list(node.get("group_expressions") or [])


def group_sets(node: Mapping[str, Any]) -> list[object]:
    """The grouping sets over group_expressions (indexes; one set for a plain GROUP BY)."""
    return list(node.get("group_sets") or [])


def aggregate_handling(node: Mapping[str, Any]) -> str:
    """STANDARD_HANDLING, or FORCE_AGGREGATES for GROUP BY ALL and the like."""
    return str(node.get("aggregate_handling", ""))


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

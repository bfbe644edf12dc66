"""Typed reading of DuckDB's serialised query nodes: statements, SELECT clauses, CTEs, set
operations, FROM items (tables, joins, table functions, VALUES) and modifiers.

Expressions inside them are read through sqltree.py; the guard, the aggregate-only rules,
the noise planner and the federated rewrite read query nodes only through these accessors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from connector.sqltree import Node, direct_expressions, is_expression


def statement_node(document: Mapping[str, Any]) -> Node:
    """The query node of a serialised single-statement document."""
    node: Node = document["statements"][0]["node"]
    return node


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

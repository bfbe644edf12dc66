"""The size rule (valuesize) applied to DuckDB's serialised syntax tree (json_serialize_sql,
2.0 with 1.5 fallbacks): each expression's bound, each result row's, and where aggregates
that collect rows into one value may stand."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from connector.errors import QueryRejected
from connector.packing import TOP_N
from connector.valuesize import (
    COLLECTING,
    COLUMN_BYTES,
    HUGE,
    MAX_ROW_BYTES,
    MAX_VALUE_BYTES,
    NUMBER_BYTES,
    STAR_COLUMNS,
    Argument,
    TooLarge,
    function_bytes,
    readable_size,
)


def check_value_sizes(tree: Mapping[str, Any]) -> None:
    """Refuse (QueryRejected) a query whose values or rows could outgrow valuesize's bounds."""
    _SizeWalker().query(tree, _Block(outermost=True, single_source=True), {})


@dataclass(frozen=True)
class _Block:
    """Where an expression sits: row-collecting aggregates need one source, no window,
    and the outermost SELECT (a collected value fed to another query is multiplied)."""

    outermost: bool
    single_source: bool
    in_window: bool = False


class _SizeWalker:
    def query(self, node: Any, block: _Block, ctes: Mapping[str, bool]) -> int:
        """Check one query node; returns the bound of its first column (scalar subqueries)."""
        if not isinstance(node, dict):
            return HUGE
        scope = dict(ctes)
        for name, body in _cte_bodies(node):
            self.query(body, _Block(outermost=False, single_source=False), scope)
            scope[name] = _single_query(body, scope)
        kind = node.get("type")
        if kind == "SET_OPERATION_NODE":
            children = [node.get("left"), node.get("right"), *(node.get("children") or [])]
            inner = _Block(block.outermost, single_source=False)
            widths = [self.query(c, inner, scope) for c in children if c is not None]
            return max(widths, default=0)
        if kind != "SELECT_NODE":
            return HUGE
        source = node.get("from_table")
        self.source(source, scope)
        here = _Block(block.outermost, _single_source(source, scope))
        widths = [self.expression(e, here, scope) for e in _list(node.get("select_list"))]
        row = sum(widths)
        if row > MAX_ROW_BYTES:
            raise QueryRejected(
                f"a result row could take {readable_size(row)}, more than this connector's "
                f"{readable_size(MAX_ROW_BYTES)} per row; select fewer or smaller values"
            )
        for key in ("where_clause", "group_expressions", "having", "qualify", "modifiers"):
            for expression in _expressions(node.get(key)):
                self.expression(expression, here, scope)
        return widths[0] if widths else 0

    def source(self, ref: Any, ctes: Mapping[str, bool]) -> None:
        """Check the subqueries and join conditions of a FROM item."""
        if not isinstance(ref, dict):
            return
        kind = ref.get("type")
        nested = _Block(outermost=False, single_source=False)
        if kind == "SUBQUERY":
            self.query((ref.get("subquery") or {}).get("node"), nested, ctes)
        elif kind == "JOIN":
            self.source(ref.get("left"), ctes)
            self.source(ref.get("right"), ctes)
            for expression in _expressions(ref.get("condition")):
                self.expression(expression, nested, ctes)
        elif kind == "EXPRESSION_LIST":
            for expression in _expressions(ref.get("values")):
                self.expression(expression, nested, ctes)

    def expression(self, node: dict[str, Any], block: _Block, ctes: Mapping[str, bool]) -> int:
        """The bound of one expression's value, checking every function inside it."""
        kind = node.get("class")
        if kind == "CONSTANT":
            return len((_literal(node) or "").encode()) + NUMBER_BYTES
        if kind == "COLUMN_REF":
            return COLUMN_BYTES
        if kind == "STAR":
            # * REPLACE (expression AS column) and COLUMNS(...) carry expressions of their own.
            return COLUMN_BYTES * STAR_COLUMNS + self._children(node, block, ctes)
        if kind == "SUBQUERY":
            return self._subquery(node, block, ctes)
        if kind in ("FUNCTION", "WINDOW"):
            return self._function(node, block, ctes)
        if kind == "CAST":
            return self._children(node, block, ctes) * 2 + NUMBER_BYTES * 4
        if kind in ("COMPARISON", "CONJUNCTION", "BETWEEN"):
            self._children(node, block, ctes)
            return NUMBER_BYTES
        return self._children(node, block, ctes) + NUMBER_BYTES

    def _children(self, node: dict[str, Any], block: _Block, ctes: Mapping[str, bool]) -> int:
        return sum(self.expression(child, block, ctes) for child in _child_expressions(node))

    def _subquery(self, node: dict[str, Any], block: _Block, ctes: Mapping[str, bool]) -> int:
        inner = (node.get("subquery") or {}).get("node")
        kind = str(node.get("subquery_type", ""))
        for child in _expressions(node.get("child")):
            self.expression(child, block, ctes)
        if kind == "ARRAY":
            # ARRAY(SELECT ...) collects rows into one value, like list().
            _collecting_allowed("ARRAY(SELECT ...)", block, _single_query(inner, ctes))
            self.query(inner, _Block(outermost=False, single_source=False), ctes)
            return MAX_VALUE_BYTES
        width = self.query(inner, _Block(outermost=False, single_source=False), ctes)
        return width if kind == "SCALAR" else NUMBER_BYTES

    def _function(self, node: dict[str, Any], block: _Block, ctes: Mapping[str, bool]) -> int:
        name = str(node.get("function_name", "")).lower()
        window = node.get("class") == "WINDOW"
        inner = _Block(block.outermost, block.single_source, block.in_window or window)
        arguments = [
            Argument(self.expression(e, inner, ctes), _literal(e) if _is_constant(e) else None)
            for e in _arguments(node)
        ]
        # ORDER BY inside the call, FILTER, and a window's PARTITION BY / ORDER BY / frame.
        for extra in _extra_expressions(node):
            self.expression(extra, inner, ctes)
        positional_n = TOP_N.get(name)
        if name in COLLECTING or (positional_n is not None and len(arguments) > positional_n):
            if window or block.in_window:
                raise _refuse(f"{name}() may not be used as a window function here", node)
            if name in COLLECTING:
                _collecting_allowed(f"{name}()", block, block.single_source, node)
            elif not block.single_source:
                raise _refuse(
                    f"{name}() with a count keeps many values per group: use it over one "
                    "dataset, without joins",
                    node,
                )
        try:
            return function_bytes(name, arguments)
        except TooLarge as exc:
            raise _refuse(str(exc), node) from None


def _collecting_allowed(
    what: str, block: _Block, single_source: bool, node: dict[str, Any] | None = None
) -> None:
    if block.in_window:
        raise _refuse(f"{what} may not be used as a window function", node)
    if not block.outermost:
        raise _refuse(
            f"{what} builds one value from many rows: use it only in the outermost SELECT "
            "(not in a subquery or WITH), where its value cannot be repeated across rows",
            node,
        )
    if not single_source:
        raise _refuse(
            f"{what} builds one value from many rows: use it over one dataset, without joins "
            "or UNION, so that its size is bounded by the dataset",
            node,
        )


def _refuse(reason: str, node: Mapping[str, Any] | None) -> QueryRejected:
    location = node.get("query_location") if node else None
    if isinstance(location, int) and 0 <= location < 2**63:
        return QueryRejected(reason, position=location)
    return QueryRejected(reason)


def _single_source(ref: Any, ctes: Mapping[str, bool]) -> bool:
    """Whether a FROM item yields at most the rows of one dataset (no join multiplies)."""
    if not isinstance(ref, dict):
        return False
    kind = ref.get("type")
    if kind == "BASE_TABLE":
        return ctes.get(str(ref.get("table_name", "")).lower(), True)
    if kind == "SUBQUERY":
        return _single_query((ref.get("subquery") or {}).get("node"), ctes)
    if kind == "JOIN" and str(ref.get("join_type", "")).upper() in ("SEMI", "ANTI"):
        return _single_source(ref.get("left"), ctes)
    return kind in ("EMPTY", "EXPRESSION_LIST")


def _single_query(node: Any, ctes: Mapping[str, bool]) -> bool:
    if not isinstance(node, dict) or node.get("type") != "SELECT_NODE":
        return False
    scope = dict(ctes)
    for name, body in _cte_bodies(node):
        scope[name] = _single_query(body, scope)
    return _single_source(node.get("from_table"), scope)


def _cte_bodies(node: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for entry in (node.get("cte_map") or {}).get("map") or []:
        body = (entry.get("value") or {}).get("query_node")
        yield str(entry.get("key", "")).lower(), body


def _list(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _expressions(value: Any) -> Iterator[dict[str, Any]]:
    """The outermost expressions in value (a node, a list, or a modifier structure)."""
    if isinstance(value, dict):
        if "class" in value:
            yield value
        elif "type" not in value or not str(value.get("type", "")).endswith("_NODE"):
            for item in value.values():
                yield from _expressions(item)
    elif isinstance(value, list):
        for item in value:
            yield from _expressions(item)


def _arguments(node: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A function's arguments (DuckDB 2.0 `arguments`, 1.5 `children`)."""
    if "arguments" in node:
        return [
            a["expression"] if isinstance(a, dict) and "expression" in a else a
            for a in node.get("arguments") or []
            if isinstance(a, dict)
        ]
    return _list(node.get("children"))


_FUNCTION_PARTS = frozenset(("arguments", "children"))


def _extra_expressions(node: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for key, value in node.items():
        if key not in _FUNCTION_PARTS:
            yield from _expressions(value)


def _child_expressions(node: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for key, value in node.items():
        if key != "type_expr":
            yield from _expressions(value)


def _is_constant(node: Mapping[str, Any]) -> bool:
    """A constant, possibly cast or negated: its value is known before the query runs."""
    kind = node.get("class")
    if kind == "CONSTANT":
        return True
    if kind == "CAST":
        child = node.get("child")
        return isinstance(child, dict) and _is_constant(child)
    if kind == "FUNCTION" and node.get("function_name") in ("-", "+"):
        args = _arguments(node)
        return len(args) == 1 and _is_constant(args[0])
    return False


def _literal(node: Mapping[str, Any]) -> str | None:
    """The text of a constant (NULL as '0'), seen through casts and a sign."""
    kind = node.get("class")
    if kind == "CAST":
        child = node.get("child")
        return _literal(child) if isinstance(child, dict) else None
    if kind == "FUNCTION":
        args = _arguments(node)
        inner = _literal(args[0]) if len(args) == 1 else None
        if inner is None or node.get("function_name") == "+":
            return inner
        return inner[1:] if inner.startswith("-") else f"-{inner}"
    literal = node.get("literal")
    if isinstance(literal, dict):
        if str(literal.get("kind", "")).upper() in ("NULL", "NULL_LITERAL"):  # 2.0: NULL_LITERAL
            return "0"
        return str(literal.get("text", ""))
    value = node.get("value")  # DuckDB 1.5
    if isinstance(value, dict):
        return "0" if value.get("is_null") else str(value.get("value", ""))
    return None

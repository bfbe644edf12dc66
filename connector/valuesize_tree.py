"""The size rule (valuesize) applied to DuckDB's serialised syntax tree, read through
sqltree's accessors: each expression's bound, each result row's, and where aggregates that
collect rows into one value may stand. Runs after the guard's walk accepted the tree."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from connector import querytree, sqltree
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
        kind = querytree.query_type(node)
        if kind == "SET_OPERATION_NODE":
            inner = _Block(block.outermost, single_source=False)
            widths = [self.query(c, inner, scope) for c in querytree.set_operation_children(node)]
            return max(widths, default=0)
        if kind != "SELECT_NODE":
            return HUGE
        source = querytree.from_item(node)
        self.source(source, scope)
        here = _Block(block.outermost, _single_source(source, scope))
        widths = [self.expression(e, here, scope) for e in querytree.select_list(node)]
        row = sum(widths)
        if row > MAX_ROW_BYTES:
            raise QueryRejected(
                f"a result row could take {readable_size(row)}, more than this connector's "
                f"{readable_size(MAX_ROW_BYTES)} per row; select fewer or smaller values"
            )
        for key in ("where_clause", "group_expressions", "having", "qualify", "modifiers"):
            for expression in sqltree.direct_expressions(node.get(key)):
                self.expression(expression, here, scope)
        return widths[0] if widths else 0

    def source(self, ref: Any, ctes: Mapping[str, bool]) -> None:
        """Check the subqueries and join conditions of a FROM item."""
        if not isinstance(ref, dict):
            return
        kind = querytree.table_ref_type(ref)
        nested = _Block(outermost=False, single_source=False)
        if kind == "SUBQUERY":
            self.query(sqltree.subquery_body(ref), nested, ctes)
        elif kind == "JOIN":
            for side in querytree.join_sides(ref):
                self.source(side, ctes)
            for expression in sqltree.direct_expressions(querytree.join_condition(ref)):
                self.expression(expression, nested, ctes)
        elif kind == "EXPRESSION_LIST":
            for expression in sqltree.direct_expressions(querytree.values_rows(ref)):
                self.expression(expression, nested, ctes)

    def expression(self, node: dict[str, Any], block: _Block, ctes: Mapping[str, bool]) -> int:
        """The bound of one expression's value, checking every function inside it."""
        kind = sqltree.expression_class(node)
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
        operands = sqltree.operand_expressions(node)
        return sum(self.expression(child, block, ctes) for child in operands)

    def _subquery(self, node: dict[str, Any], block: _Block, ctes: Mapping[str, bool]) -> int:
        inner = sqltree.subquery_body(node)
        kind = sqltree.subquery_type(node)
        for child in sqltree.operand_expressions(node):  # the left side of IN / ANY
            self.expression(child, block, ctes)
        if kind == "ARRAY":
            # ARRAY(SELECT ...) collects rows into one value, like list().
            _collecting_allowed("ARRAY(SELECT ...)", block, _single_query(inner, ctes))
            self.query(inner, _Block(outermost=False, single_source=False), ctes)
            return MAX_VALUE_BYTES
        width = self.query(inner, _Block(outermost=False, single_source=False), ctes)
        return width if kind == "SCALAR" else NUMBER_BYTES

    def _function(self, node: dict[str, Any], block: _Block, ctes: Mapping[str, bool]) -> int:
        name = sqltree.function_name(node)
        window = sqltree.expression_class(node) == "WINDOW"
        inner = _Block(block.outermost, block.single_source, block.in_window or window)
        arguments = [
            Argument(self.expression(e, inner, ctes), _literal(e) if _is_constant(e) else None)
            for e in _arguments(node)
        ]
        for extra in sqltree.call_modifier_expressions(node):
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
    return QueryRejected(reason, position=sqltree.query_location(node))


def _single_source(ref: Any, ctes: Mapping[str, bool]) -> bool:
    """Whether a FROM item yields at most the rows of one dataset (no join multiplies)."""
    if not isinstance(ref, dict):
        return False
    kind = querytree.table_ref_type(ref)
    if kind == "BASE_TABLE":
        return ctes.get(querytree.table_name(ref).lower(), True)
    if kind == "SUBQUERY":
        return _single_query(sqltree.subquery_body(ref), ctes)
    if kind == "JOIN" and querytree.join_type(ref) in ("SEMI", "ANTI"):
        return _single_source(querytree.join_sides(ref)[0], ctes)
    return kind in ("EMPTY", "EXPRESSION_LIST")


def _single_query(node: Any, ctes: Mapping[str, bool]) -> bool:
    if not isinstance(node, dict) or querytree.query_type(node) != "SELECT_NODE":
        return False
    scope = dict(ctes)
    for name, body in _cte_bodies(node):
        scope[name] = _single_query(body, scope)
    return _single_source(querytree.from_item(node), scope)


def _cte_bodies(node: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for name, entry in querytree.cte_entries(node):
        yield name, querytree.cte_body(entry)


def _arguments(node: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [a for a in sqltree.function_arguments(node) if isinstance(a, dict)]


def _is_constant(node: Mapping[str, Any]) -> bool:
    """A constant, possibly cast or negated: its value is known before the query runs."""
    kind = sqltree.expression_class(node)
    if kind == "CONSTANT":
        return True
    if kind == "CAST":
        operand = sqltree.cast_operand(node)
        return operand is not None and _is_constant(operand)
    if kind == "FUNCTION" and sqltree.function_name(node) in ("-", "+"):
        args = _arguments(node)
        return len(args) == 1 and _is_constant(args[0])
    return False


def _literal(node: Mapping[str, Any]) -> str | None:
    """The text of a constant (NULL as '0'), seen through casts and a sign."""
    kind = sqltree.expression_class(node)
    if kind == "CAST":
        operand = sqltree.cast_operand(node)
        return _literal(operand) if operand is not None else None
    if kind == "FUNCTION":
        args = _arguments(node)
        inner = _literal(args[0]) if len(args) == 1 else None
        if inner is None or sqltree.function_name(node) == "+":
            return inner
        return inner[1:] if inner.startswith("-") else f"-{inner}"
    constant = sqltree.constant_literal(node)
    if constant is None:
        return None
    literal_kind, text = constant
    return "0" if literal_kind.upper() in ("NULL", "NULL_LITERAL") else text

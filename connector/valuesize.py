"""The guard's size rule: no value a query builds may outgrow a bound set by its constants.

DuckDB's `memory_limit` does not count strings and lists built while expressions run, nor
aggregate states: `repeat(plant, 4000000)` takes gigabytes for a one-row answer. This rule
bounds, from the parsed query alone, how large each value can get: a column value counts as
COLUMN_BYTES (widths are unknown to the guard), constants count as written, and every
function that makes values grow (repeat, lpad/rpad, format/printf, replace, regexp_replace,
list builders, concatenation, top-n and row-collecting aggregates) multiplies or adds as it
would at worst. What the guard cannot know (real column widths, row counts, batch sizes) is
bounded by the process's own memory limit (process_memory.py).

`function_bytes` is the rule for one function given its arguments' bounds; it reads no
syntax tree, so a check of bound plans can apply the same rule later.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from connector.errors import QueryRejected
from connector.packing import TOP_N  # one list of the top-n aggregates, for both rules

MAX_VALUE_BYTES = 64 * 1024  # any one value an expression builds, at worst
MAX_ROW_BYTES = 256 * 1024  # one result row (all selected values together)
COLUMN_BYTES = 64  # what the guard assumes for one stored value (real widths are unknown)
STAR_COLUMNS = 64  # what the guard assumes a * or COLUMNS(...) expands to
CHAR_BYTES = 4  # a character counted by a width (lpad, format) may take 4 bytes in UTF-8
ELEMENT_BYTES = 16  # DuckDB's per-element overhead in lists and structs
NUMBER_BYTES = 16
MAX_TOP_N = 1000  # n of max(x, n), arg_max(x, y, n), min_by(x, y, n)...
HUGE = 2**62  # stands for a number too large to matter

# Aggregates that build one value out of every row they see.
COLLECTING = frozenset("string_agg group_concat listagg list array_agg histogram list_agg".split())
# Functions whose result is a number, a truth value, a date or a digest, whatever they read.
SMALL_RESULTS = frozenset(
    """
    length len strlen char_length character_length octet_length bit_length strlen
    count count_star sum avg mean median stddev stddev_samp stddev_pop variance var_samp
    var_pop corr covar_pop covar_samp regr_slope regr_intercept regr_r2
    approx_count_distinct entropy kurtosis skewness product sum_no_overflow fsum favg
    bool_and bool_or every bit_and bit_or bit_xor
    position strpos instr levenshtein jaccard ascii unicode array_length cardinality
    list_contains list_has array_contains contains starts_with ends_with prefix suffix
    regexp_full_match isnan isinf isfinite bit_count hash md5 sha256
    year month day week weekofyear quarter hour minute second millisecond microsecond
    dayofweek dayofmonth dayofyear isodow isoyear yearweek weekday epoch epoch_ms era
    decade century millennium julian date_part datepart date_diff datediff date_sub
    datesub date_trunc datetrunc last_day make_date make_time make_timestamp
    row_number rank dense_rank percent_rank cume_dist ntile
    """.split()
)
SPLITTING = frozenset(
    """
    string_split str_split string_split_regex str_split_regex regexp_split_to_array
    string_to_array split regexp_extract_all
    """.split()
)
LIST_BUILDERS = frozenset("list_value list_pack struct_pack row array_value map".split())
RANGES = frozenset(("range", "generate_series"))
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class Argument:
    """What the rule needs of one argument: an upper bound of its size and its constant."""

    bytes: int
    constant: str | None = None  # the text of a constant argument (None: computed)


class TooLarge(Exception):
    """One function would build a value past the bound; says which and what to do."""


def function_bytes(name: str, args: Sequence[Argument]) -> int:
    """An upper bound of the bytes of name(args...), or TooLarge (no syntax involved)."""
    sizes = [a.bytes for a in args]
    if name in SMALL_RESULTS:
        size = NUMBER_BYTES * 4
    elif name == "repeat":
        size = _at(sizes, 0) * _count(name, args, 1, "count")
    elif name in ("lpad", "rpad"):
        size = _count(name, args, 1, "length") * CHAR_BYTES
    elif name in ("format", "printf"):
        size = _format_bytes(name, args)
    elif name == "replace":
        size = _replace_bytes(args)
    elif name == "regexp_replace":
        size = _at(sizes, 0) * (1 + _at(sizes, 2)) + _at(sizes, 2)
    elif name in SPLITTING:
        size = _at(sizes, 0) * ELEMENT_BYTES + ELEMENT_BYTES
    elif name in LIST_BUILDERS:
        size = sum(sizes) + ELEMENT_BYTES * (len(sizes) + 1)
    elif name in ("list_aggregate", "array_aggregate", "list_aggr", "aggregate"):
        size = _at(sizes, 0) * 2 + sum(sizes[1:])
    elif name in RANGES:
        size = _range_elements(name, args) * ELEMENT_BYTES
    elif name in COLLECTING:
        size = MAX_VALUE_BYTES  # as large as allowed: nothing may make it grow further
    elif name in TOP_N and len(args) > TOP_N[name]:
        n = _count(name, args, TOP_N[name], "n")
        if n > MAX_TOP_N:
            raise TooLarge(f"{name}() may keep at most {MAX_TOP_N} values, not {n}")
        size = n * (_at(sizes, 0) + ELEMENT_BYTES)
    else:
        # Everything else (concat, ||, upper, substring, coalesce, CASE...) returns at
        # most what it was given.
        size = sum(sizes) + NUMBER_BYTES
    if size > MAX_VALUE_BYTES:
        raise TooLarge(
            f"{name}() could build a value of {_readable(size)}, more than this connector's "
            f"{_readable(MAX_VALUE_BYTES)} per value (a column value counts as {COLUMN_BYTES} "
            "bytes); use smaller counts, widths or fewer nested calls"
        )
    return size


def _at(sizes: Sequence[int], index: int) -> int:
    return sizes[index] if index < len(sizes) else 0


def _count(name: str, args: Sequence[Argument], index: int, what: str) -> int:
    """A count argument: it must be a number written in the query."""
    if index >= len(args):
        return 1
    number = constant_number(args[index].constant)
    if number is None:
        raise TooLarge(
            f"the {what} of {name}() must be a number written in the query, so that the "
            "size of what it builds is known"
        )
    return max(0, number)


def constant_number(text: str | None) -> int | None:
    """The whole number a constant's text stands for (HUGE when past any bound)."""
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    if math.isnan(value):
        return None
    if not math.isfinite(value) or abs(value) >= HUGE:
        return HUGE if value > 0 else -HUGE
    return math.ceil(value)


def _format_bytes(name: str, args: Sequence[Argument]) -> int:
    """format('{:>N}', ...) and printf('%N.Ms', ...): widths and precisions come from the
    format string, which must therefore be written in the query."""
    fmt = args[0].constant if args else None
    if fmt is None:
        raise TooLarge(f"the format string of {name}() must be a string written in the query")
    if "*" in fmt or re.search(r"\{[^{}]*\{", fmt):
        raise TooLarge(f"{name}() must not take widths or precisions from its arguments")
    # Every number in the format string counts as a width, every field as the widest
    # argument: a bound, not an exact size.
    widths = sum(min(int(d), HUGE) if len(d) < 19 else HUGE for d in _DIGITS.findall(fmt))
    fields = fmt.count("{") + fmt.count("%") + 1
    widest = max((a.bytes for a in args[1:]), default=0)
    return len(fmt.encode()) + widths * CHAR_BYTES + fields * widest


def _replace_bytes(args: Sequence[Argument]) -> int:
    source, old, new = (list(args) + [Argument(0)] * 3)[:3]
    if old.constant and new.constant is not None:
        growth = math.ceil(len(new.constant.encode()) / len(old.constant.encode()))
        return source.bytes * max(1, growth)
    return source.bytes * max(1, new.bytes)


def _range_elements(name: str, args: Sequence[Argument]) -> int:
    numbers = [constant_number(a.constant) for a in args]
    if not numbers or any(n is None for n in numbers):
        raise TooLarge(f"the bounds of {name}() must be numbers written in the query")
    known = [n for n in numbers if n is not None]
    start, stop = (0, known[0]) if len(known) == 1 else (known[0], known[1])
    step = known[2] if len(known) > 2 and known[2] else 1
    return max(0, (stop - start) // step + 1)


def _readable(size: int) -> str:
    if size >= HUGE:
        return "an unbounded size"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}" if size < scale * 10**6 else "an unbounded size"
    return f"{size} bytes"


# --- Reading DuckDB's serialised syntax tree (json_serialize_sql, 2.0 with 1.5 fallbacks) --


def check_value_sizes(tree: Mapping[str, Any]) -> None:
    """Refuse (QueryRejected) a query whose values or rows could outgrow the bounds above."""
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
                f"a result row could take {_readable(row)}, more than this connector's "
                f"{_readable(MAX_ROW_BYTES)} per row; select fewer or smaller values"
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
        if str(literal.get("kind", "")).upper() == "NULL":
            return "0"
        return str(literal.get("text", ""))
    value = node.get("value")  # DuckDB 1.5
    if isinstance(value, dict):
        return "0" if value.get("is_null") else str(value.get("value", ""))
    return None

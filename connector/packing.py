"""Row packing: SQL that puts many source rows into one result row (lists, strings, maps).

A row limit counts result rows, so `SELECT list(struct_pack(*)) FROM t` would send a whole
dataset as one row. The guard reports the first packing construct it finds (it knows no
policy); the provider refuses such a query on datasets whose policies set a row limit.

Refusing, rather than counting the source rows that feed an answer, keeps ordinary
aggregates usable under row limits (a count over 10,000 rows is one row, not 10,000) and is
decided from the query alone, before anything runs. What remains possible is packing by
hand, one expression per value (`max(CASE WHEN ... THEN x END)`, numeric encodings): it is
bounded by the query's length, and the byte limits bound it whatever its shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

from connector import plantree, sqltree

# Aggregates whose result grows with the number of rows they read.
PACKING_AGGREGATES = frozenset(
    """
    list array_agg string_agg group_concat listagg histogram histogram_exact
    bitstring_agg json_group_array json_group_object json_group_structure map_agg
    approx_top_k reservoir_quantile
    """.split()
)
# Aggregates that return the top n values when given n (max(x, n), min_by(x, y, n)).
TOP_N = {
    "min": 1,
    "max": 1,
    "arg_min": 2,
    "arg_max": 2,
    "argmin": 2,
    "argmax": 2,
    "min_by": 2,
    "max_by": 2,
}
# Quantiles return one value per fraction asked, so a list of fractions packs the sorted column.
QUANTILES = frozenset("quantile quantile_cont quantile_disc approx_quantile".split())
# Window functions that read another row's value into this one.
OFFSET_WINDOWS = frozenset("lag lead first_value last_value nth_value".split())
# Value builders: harmless over one row's values, packing when they gather aggregates.
BUILDERS = frozenset(
    "list_value list_pack struct_pack row map map_from_entries array_value".split()
)


def packed_rows(tree: Any) -> str:
    """What in a serialised query packs several rows into one ('' when nothing does)."""
    for node in _nodes(tree):
        found = _packing(node)
        if found:
            return found
    return ""


def _packing(node: dict[str, Any]) -> str:
    kind = sqltree.expression_class(node)
    if kind not in ("FUNCTION", "WINDOW"):
        return ""
    name = sqltree.function_name(node)
    arguments = sqltree.function_arguments(node)
    if name in PACKING_AGGREGATES:
        return f"{name}() gathers many rows into one value"
    if name in TOP_N and len(arguments) > TOP_N[name]:
        return f"{name}() with a count returns the top rows as a list"
    if name in QUANTILES and len(arguments) > 1 and not _is_constant(arguments[1]):
        return f"{name}() with a list of fractions returns many rows' values"
    if kind == "WINDOW" and name in OFFSET_WINDOWS:
        return f"{name}() OVER reads other rows' values into each row"
    if kind == "WINDOW" and sqltree.window_has_frame_offsets(node):
        return "a window frame with an offset (ROWS n PRECEDING) reads other rows into each row"
    if name in BUILDERS and any(_is_aggregate(n) for n in _nodes(arguments)):
        return f"{name}() over aggregates or windows packs several values into one"
    return ""


def packed_in_plan(plan: Any) -> str:
    """What in a bound plan (json_serialize_plan) packs several rows into one ('' if
    nothing): the sandbox's check, independent of how the SQL spelled it."""
    for node in _nodes(plan):
        kind = plantree.bound_class(node)
        if kind not in ("BOUND_AGGREGATE", "BOUND_WINDOW"):
            continue
        name = plantree.bound_function_name(node).lower()
        returns = plantree.bound_return_type(node)
        if returns in COLLECTION_TYPES:
            return f"{name or 'an aggregate'}() returns a {returns.lower()} of many rows' values"
        if name in PACKING_AGGREGATES:
            return f"{name}() gathers many rows into one value"
        if kind == "BOUND_WINDOW" and plantree.bound_type(node) in OFFSET_WINDOW_TYPES:
            return "a window function reads other rows' values into each row"
        if kind == "BOUND_WINDOW" and plantree.window_has_frame_offsets(node):
            return "a window frame with an offset reads other rows into each row"
    return ""


COLLECTION_TYPES = frozenset({"LIST", "ARRAY", "MAP"})
OFFSET_WINDOW_TYPES = frozenset(
    {"WINDOW_LAG", "WINDOW_LEAD", "WINDOW_FIRST_VALUE", "WINDOW_LAST_VALUE", "WINDOW_NTH_VALUE"}
)


def _is_constant(expression: object) -> bool:
    return sqltree.is_expression(expression) and sqltree.expression_class(expression) == "CONSTANT"


def _is_aggregate(node: dict[str, Any]) -> bool:
    kind = sqltree.expression_class(node)
    if kind == "WINDOW":
        return True
    if kind != "FUNCTION":
        return False
    name = sqltree.function_name(node)
    return name in AGGREGATES or name in PACKING_AGGREGATES


# Every aggregate the guard may allow (a builder over any of them packs aggregate values).
AGGREGATES = frozenset(
    """
    count count_star sum avg mean min max median mode quantile quantile_cont quantile_disc
    stddev stddev_samp stddev_pop variance var_samp var_pop corr covar_pop covar_samp
    regr_slope regr_intercept regr_r2 regr_count regr_avgx regr_avgy regr_sxx regr_syy
    regr_sxy approx_count_distinct approx_quantile bool_and bool_or every any_value first
    last arg_min arg_max argmin argmax min_by max_by product bit_and bit_or bit_xor entropy
    kurtosis kurtosis_pop skewness sum_no_overflow fsum favg kahan_sum sumkahan mad
    """.split()
)


def _nodes(value: Any) -> Iterator[dict[str, Any]]:
    """Every dict in value, depth first (iterative: the guard bounds the depth already)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))


def packing_refused(packing: str) -> str:
    """The reason a query that packs rows is refused where the policies limit rows."""
    return (
        f"{packing}; the policies limit rows (per query or per day), so a result row must "
        "not carry many rows: ask for the rows themselves (within the limits) or for "
        "aggregates such as count, sum, avg, min and max"
    )


def built_collection(schema: pa.Schema, dataset_types: Iterable[str]) -> str | None:
    """The first result column holding a list or map the datasets do not hold (so a row
    could carry many rows); None when there is none or the datasets hold lists themselves
    (the guard's check is what applies then)."""
    if any(_is_collection(t) for t in dataset_types):
        return None
    return next((f.name for f in schema if _nested_collection(f.type)), None)


def _is_collection(duckdb_type: str) -> bool:
    """A DuckDB column type holding several values (LIST, ARRAY, MAP, or a STRUCT of them)."""
    return "[" in duckdb_type or "MAP(" in duckdb_type.upper()


def _nested_collection(arrow_type: pa.DataType) -> bool:
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return True
    if pa.types.is_fixed_size_list(arrow_type) or pa.types.is_map(arrow_type):
        return True
    if pa.types.is_list_view(arrow_type) or pa.types.is_large_list_view(arrow_type):
        return True
    return pa.types.is_struct(arrow_type) and any(
        _nested_collection(arrow_type.field(i).type) for i in range(arrow_type.num_fields)
    )

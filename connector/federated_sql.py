"""One question for many members: what each member is asked (the plan, federated_plan).

A plain query is sent as written and the answers are stacked (a `_member` column first). An
aggregate query (GROUP BY with count, sum, min, max, avg) is rewritten, on DuckDB's own
parse tree, into partial aggregates every member can answer (avg as sum and count), which
federated_plan combines exactly on the peer's side. Anything that cannot be combined exactly
is refused here, before any member is asked, saying which part and why.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator, Mapping
from typing import Any

from connector import querytree, sqltree
from connector.errors import NotFederable
from connector.federated_plan import AGGREGATE, UNION, AggregatePart, FederationPlan
from connector.sqlallowed import AGGREGATE_FUNCTIONS
from connector.sqljson import query_sql, serialised_query

COMBINABLE = frozenset({"count", "count_star", "sum", "avg", "mean", "min", "max"})
_NOT_COMBINABLE = {
    "median": "a median of the whole cannot be computed from each member's median",
    "quantile": "a quantile of the whole cannot be computed from each member's quantiles",
    "mode": "the most frequent value of the whole cannot be computed from each member's",
    "stddev": "a standard deviation cannot be combined from members' deviations; ask for "
    "sum(x), sum(x * x) and count(x), which combine exactly, and compute it from those",
    "var": "a variance cannot be combined from members' variances; ask for sum(x), "
    "sum(x * x) and count(x), which combine exactly, and compute it from those",
    "string_agg": "it collects values rather than summing them; send a plain query (the "
    "rows come back per member) instead",
    "distinct": "a value held by several members would be counted once by each of them",
}


def _shape(value: object) -> object:
    """An expression without positions and aliases, to compare two of them."""
    if isinstance(value, dict):
        return {
            k: _shape(v)
            for k, v in value.items()
            if k not in ("query_location", "query_location_length", "alias")
        }
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return value


def _is_aggregate(node: Mapping[str, Any]) -> bool:
    return (
        sqltree.expression_class(node) == "FUNCTION"
        and sqltree.function_name(node) in AGGREGATE_FUNCTIONS
    )


def _aggregates_in(node: Mapping[str, Any]) -> Iterator[sqltree.Node]:
    return (e for e in sqltree.all_expressions(node) if _is_aggregate(e))


def _why_not(node: Mapping[str, Any]) -> str:
    name = sqltree.function_name(node)
    if sqltree.function_is_distinct(node) or name == "approx_count_distinct":
        return _NOT_COMBINABLE["distinct"]
    for prefix in ("quantile", "stddev", "var", "median", "mode", "string_agg"):
        if name.startswith(prefix) or (prefix == "var" and name == "variance"):
            return _NOT_COMBINABLE[prefix]
    if name in ("group_concat", "listagg", "list", "array_agg", "histogram"):
        return _NOT_COMBINABLE["string_agg"]
    return "the connector combines only count, sum, min, max and avg exactly"


@functools.cache
def _empty_select() -> str:
    return json.dumps(querytree.statement_node(serialised_query("SELECT 1")))


def expression_text(node: Mapping[str, Any]) -> str:
    """The SQL of one expression, as DuckDB writes it (and names an unaliased column)."""
    select = json.loads(_empty_select())
    select["select_list"] = [dict(node, alias="")]
    document = {"error": False, "statements": [{"node": select, "named_param_map": []}]}
    return query_sql(document).removeprefix("SELECT ")


def output_name(node: Mapping[str, Any]) -> str:
    """The column name DuckDB gives a select-list expression."""
    alias = sqltree.expression_alias(node)
    if alias:
        return alias
    names = sqltree.written_column_names(node)
    return names[-1] if names else expression_text(node)


def _tables(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        if querytree.table_ref_type(value) == "BASE_TABLE" and querytree.table_name(value):
            yield querytree.table_name(value).lower()
        for child in value.values():
            yield from _tables(child)
    elif isinstance(value, list):
        for item in value:
            yield from _tables(item)


def query_datasets(sql: str) -> tuple[str, ...]:
    """The names a query reads from (datasets, and CTE names, which match no dataset)."""
    return tuple(sorted(set(_tables(querytree.statement_node(serialised_query(sql))))))


def plan_federation(sql: str, *, per_member: bool = False) -> FederationPlan:
    """How sql is asked of many members (each answer kept apart when per_member);
    NotFederable (before anything is sent) when the answers could not be combined exactly."""
    document = serialised_query(sql)
    node = querytree.statement_node(document)
    datasets = tuple(sorted(set(_tables(node))))
    if per_member or querytree.query_type(node) != "SELECT_NODE":
        return FederationPlan(UNION, sql, datasets)
    grouped = bool(querytree.group_expressions(node)) or (
        querytree.aggregate_handling(node) == "FORCE_AGGREGATES"
    )
    select_list = list(querytree.select_list(node))
    if not grouped and not any(any(_aggregates_in(item)) for item in select_list):
        return FederationPlan(UNION, sql, datasets)
    return _aggregate_plan(document, node, datasets)


def _refuse(message: str, node: Mapping[str, Any] | None = None) -> NotFederable:
    return NotFederable(
        f"this query cannot be combined across members: {message}",
        position=sqltree.query_location(node),
    )


def _aggregate_plan(
    document: dict[str, Any], node: dict[str, Any], datasets: tuple[str, ...]
) -> FederationPlan:
    if querytree.having_clause(node) is not None:
        raise _refuse(
            "HAVING would filter each member's partial groups, not the combined ones; filter "
            "the combined answer yourself, or ask with --per-member"
        )
    if querytree.qualify_clause(node) is not None or querytree.has_sample(node):
        raise _refuse("QUALIFY and USING SAMPLE are not combined")
    if len(querytree.group_sets(node)) > 1:
        raise _refuse("GROUPING SETS, ROLLUP and CUBE are not combined; ask one grouping")
    select_list: list[dict[str, Any]] = list(querytree.select_list(node))
    force = querytree.aggregate_handling(node) == "FORCE_AGGREGATES"
    group_nodes = _group_nodes(node, select_list, force)
    new_select: list[dict[str, Any]] = []
    groups: list[tuple[str, str]] = []
    group_of: dict[str, int] = {}
    for i, expression in enumerate(group_nodes):
        column = f"fed_g{i}"
        new_select.append(dict(expression, alias=column))
        groups.append(("", column))
        group_of[json.dumps(_shape(expression), sort_keys=True)] = i
    aggregates: list[AggregatePart] = []
    outputs: list[str] = []
    for i, item in enumerate(select_list):
        name = output_name(item)
        if name in outputs:
            raise _refuse(f"two columns are named {name!r}; give each its own alias", item)
        outputs.append(name)
        key = json.dumps(_shape(item), sort_keys=True)
        if key in group_of:
            index = group_of[key]
            groups[index] = (name, groups[index][1])
            continue
        part, partial_nodes = _partial(item, name, i)
        aggregates.append(part)
        new_select += partial_nodes
    order_by, limit = _modifiers(node, select_list, outputs)
    rewritten = copy.deepcopy(document)
    member = querytree.statement_node(rewritten)
    member["select_list"] = new_select
    member["modifiers"] = []
    if not force:
        member["group_expressions"] = [copy.deepcopy(g) for g in group_nodes]
        member["group_sets"] = [list(range(len(group_nodes)))] if group_nodes else []
    return FederationPlan(
        AGGREGATE,
        query_sql(rewritten),
        datasets,
        tuple(groups),
        tuple(aggregates),
        tuple(outputs),
        order_by,
        limit,
    )


def _group_nodes(
    node: Mapping[str, Any], select_list: list[dict[str, Any]], force: bool
) -> list[dict[str, Any]]:
    """The grouping expressions, with a select alias named in GROUP BY replaced by its
    expression (the rewritten select list no longer carries the alias)."""
    if force:
        return [dict(item) for item in select_list if not any(_aggregates_in(item))]
    by_alias = {sqltree.expression_alias(i): i for i in select_list if sqltree.expression_alias(i)}
    read_columns = {
        reference.names[0] for _, reference in sqltree.column_references(select_list)
        if reference.is_plain_name
    }  # fmt: skip
    found = []
    for written in sqltree.direct_expressions(querytree.group_expressions(node)):
        names = sqltree.written_column_names(written)
        expression = written
        if len(names) == 1 and names[0] in by_alias:
            expression = by_alias[names[0]]
            # DuckDB binds a GROUP BY name to the dataset's column first when one exists:
            # `plant % 2 AS plant ... GROUP BY plant` groups by the column plant. When the
            # query reads a column of the alias's name, grouping by the aliased expression
            # would ask the members something else.
            if _renames_nothing(expression) and names[0].lower() in read_columns:
                raise _refuse(
                    f"GROUP BY {names[0]} names both a select alias and a column; group by "
                    "the expression itself, not its alias",
                    written,
                )
        if sqltree.constant_literal(expression) is not None:
            raise _refuse("GROUP BY by position is not combined; name the columns", expression)
        found.append(dict(expression, alias=""))
    return found


def _renames_nothing(node: Mapping[str, Any]) -> bool:
    """True unless node is a plain column (then its alias only renames it)."""
    reference = sqltree.column_reference(node)
    return reference is None or not reference.is_plain_name


def _partial(
    item: dict[str, Any], name: str, index: int
) -> tuple[AggregatePart, list[dict[str, Any]]]:
    """The partial aggregates one output aggregate is asked as, and how they combine."""
    if not _is_aggregate(item):
        inner = next(_aggregates_in(item), None)
        if inner is None:
            raise _refuse(f"{name} is neither an aggregate nor a GROUP BY column", item)
        raise _refuse(
            f"{name} computes with an aggregate; the connector combines plain count, sum, min, "
            "max and avg: ask for those and compute the rest from the combined answer",
            item,
        )
    function = sqltree.function_name(item)
    if (
        function not in COMBINABLE
        or (sqltree.function_is_distinct(item) and function not in ("min", "max"))
        or sqltree.function_exports_state(item)
    ):
        distinct = "DISTINCT " if sqltree.function_is_distinct(item) else ""
        raise _refuse(f"{function}({distinct}...) in {name}: {_why_not(item)}", item)
    if any(any(_aggregates_in(a)) for a in sqltree.function_arguments(item) if isinstance(a, dict)):
        raise _refuse(f"{name} nests aggregates", item)
    column = f"fed_p{index}"
    if function in ("avg", "mean"):
        total = dict(copy.deepcopy(item), function_name="sum", alias=f"{column}_sum")
        total["qualified_name"] = {"path": ["sum"]}
        count = dict(copy.deepcopy(item), function_name="count", alias=f"{column}_count")
        count["qualified_name"] = {"path": ["count"]}
        return AggregatePart(name, "avg", (f"{column}_sum", f"{column}_count")), [total, count]
    kind = "count" if function in ("count", "count_star") else function
    return AggregatePart(name, kind, (column,)), [dict(item, alias=column)]


def _modifiers(
    node: Mapping[str, Any], select_list: list[dict[str, Any]], outputs: list[str]
) -> tuple[tuple[tuple[str, bool], ...], int | None]:
    """ORDER BY and LIMIT, applied after combining (each member's limit would cut groups)."""
    order_by: list[tuple[str, bool]] = []
    limit: int | None = None
    shapes = [json.dumps(_shape(i), sort_keys=True) for i in select_list]
    for modifier in querytree.query_modifiers(node):
        kind = modifier.kind
        if kind == "ORDER_MODIFIER":
            for order in modifier.orders:
                order_by.append(
                    (_order_output(order.expression, shapes, outputs), _descending(order))
                )
        elif kind == "LIMIT_MODIFIER" and not modifier.has_offset:
            literal = sqltree.constant_literal(modifier.limit or {})
            if literal is None or not literal[1].isdigit():
                raise _refuse("LIMIT must be a whole number to be applied after combining")
            limit = int(literal[1])
        else:
            raise _refuse(f"{kind} is not applied after combining (OFFSET, DISTINCT)")
    return tuple(order_by), limit


def _descending(order: querytree.OrderTerm) -> bool:
    if order.null_order != "ORDER_DEFAULT":
        raise _refuse("NULLS FIRST / LAST is not applied after combining")
    return order.descending


def _order_output(expression: dict[str, Any], shapes: list[str], outputs: list[str]) -> str:
    key = json.dumps(_shape(expression), sort_keys=True)
    if key in shapes:
        return outputs[shapes.index(key)]
    names = sqltree.written_column_names(expression)
    if len(names) == 1 and names[0] in outputs:
        return names[0]
    literal = sqltree.constant_literal(expression)
    if literal is not None and literal[1].isdigit() and 0 < int(literal[1]) <= len(outputs):
        return outputs[int(literal[1]) - 1]
    raise _refuse("ORDER BY must name columns of the answer to be applied after combining")
